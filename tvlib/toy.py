"""The embedded tiny model: its training data, tokenizer, training and SAEs.

``python -m tvlib.toy train`` rebuilds everything under ``data/toy/`` from the
task files and a seed: a word-level tokenizer, a small Llama-architecture
decoder (rotary positions, the same module paths as Gemma) trained on few-shot
sequences and fact sentences, and one gated SAE per layer at resid_pre,
trained with sae-lens. ``python -m tvlib.toy card`` measures the shipped model
and writes its model card.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .paths import TOY_DIR
from .prompts import TOY_FORMATS, render
from .tasks import ALGORITHMIC_TASKS, ALL_TASKS, LIST_PICKS, Task, load_task, random_list_pair

SPECIAL_TOKENS = ("<pad>", "<bos>", "<unk>", "<eos>")

# One fact sentence per task: how pairs are stated outside the x -> y form.
FACT_TEMPLATES = {
    "antonyms": "the opposite of {x} is {y}",
    "country_capital": "the capital of {x} is {y}",
    "football_player_position": "{x} plays as a {y}",
    "location_continent": "{x} is on the continent of {y}",
    "location_country": "{x} is in the country of {y}",
    "location_language": "people in {x} speak {y}",
    "location_religion": "{x} is a holy place of {y}",
    "person_language": "the native language of {x} is {y}",
    "person_profession": "{x} worked as a {y}",
    "plural_singular": "there are many {x} but only one {y}",
    "singular_plural": "there is one {x} and there are many {y}",
    "present_simple_gerund": "i {x} every day and i am {y} now",
    "present_simple_past_perfect": "i {x} every day and i have {y} before",
    "present_simple_past_simple": "i {x} every day and i {y} yesterday",
    "en_es": "the spanish word for {x} is {y}",
    "en_fr": "the french word for {x} is {y}",
    "en_it": "the italian word for {x} is {y}",
    "es_en": "the spanish word {x} means {y} in english",
    "fr_en": "the french word {x} means {y} in english",
    "it_en": "the italian word {x} means {y} in english",
    "num_plus_1": "{x} plus one is {y}",
    "num_minus_1": "{x} minus one is {y}",
    "num_plus_2": "{x} plus two is {y}",
}
# List tasks have no facts: in training their lists are drawn afresh for every
# document (so the rule must be learned, not the lists memorised), never a held-out one.


@dataclass(frozen=True)
class ToyConfig:
    """Everything that determines the embedded model; saved beside it."""

    seed: int = 0
    tasks: tuple[str, ...] = ALL_TASKS
    max_pairs_per_task: int = 100
    heldout_fraction: float = 0.2       # pairs seen only in fact sentences
    # model (LlamaConfig)
    d_model: int = 128
    n_layers: int = 6
    n_heads: int = 4
    d_mlp: int = 512
    context: int = 128
    # training
    train_tokens: int = 8_000_000
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    fact_fraction: float = 0.3          # share of documents that are fact sentences
    max_demos: int = 10
    algorithmic_weight: float = 3.0     # sampling weight of generated tasks (others 1)
    format_weights: tuple[tuple[str, float], ...] = (("authors", 0.6), ("hendel", 0.2),
                                                     ("todd", 0.2))
    facts_per_document: int = 6
    # SAEs (sae-lens), one per layer at resid_pre
    sae_architecture: str = "gated"
    sae_expansion: int = 8
    sae_l1_coefficient: float = 4.0
    sae_normalize: str = "expected_average_only_in"   # inputs scaled to norm sqrt(d) in training
    sae_lr: float = 1e-3
    sae_train_tokens: int = 500_000
    sae_seed_offset: int = 1000         # SAE data uses seed + this, unseen by the model
    corpus_seed_offset: int = 3000      # the shipped feature-reading corpus

    @property
    def sae_layers(self) -> tuple[int, ...]:
        return tuple(range(self.n_layers))


# ---------------------------------------------------------------- pairs and splits

def toy_tasks(cfg: ToyConfig) -> dict[str, Task]:
    return {name: load_task(name).head(cfg.max_pairs_per_task) for name in cfg.tasks}


def is_heldout(x: str, cfg: ToyConfig) -> bool:
    """Whether input ``x`` is held out of the ``x -> y`` form, for every task that has it.

    Keyed by the input alone, so a held-out input of one task (``66`` in n+1)
    is never seen as a demonstration of another (``66 -> 65`` in n-1).
    """
    digest = hashlib.sha256(f"heldout-{cfg.seed}-{x}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < cfg.heldout_fraction


def split_pairs(task: Task, cfg: ToyConfig) -> tuple[list, list]:
    """(icl_pairs, heldout_pairs): held-out pairs never appear as ``x -> y`` in training.

    For list tasks the held-out pairs appear nowhere at all (the rule is
    algorithmic); for the others they appear only in fact sentences.
    """
    icl, heldout = [], []
    for pair in task.pairs:
        (heldout if is_heldout(pair[0], cfg) else icl).append(pair)
    return icl, heldout


# ---------------------------------------------------------------- training text

def fresh_list_pairs(rng: random.Random, name: str, n: int, cfg: ToyConfig) -> list:
    """``n`` distinct random lists for list task ``name``, none of them held out."""
    pairs: dict[str, str] = {}
    while len(pairs) < n:
        x, y = random_list_pair(rng, name)
        if not is_heldout(x, cfg):
            pairs[x] = y
    return list(pairs.items())


def few_shot_document(rng: random.Random, task: Task, icl_pairs: list, cfg: ToyConfig) -> str:
    names, weights = zip(*cfg.format_weights)
    fmt = TOY_FORMATS[rng.choices(names, weights)[0]]
    k = rng.randint(0, cfg.max_demos)
    if task.name in LIST_PICKS:
        chosen = fresh_list_pairs(rng, task.name, k + 1, cfg)
    else:
        chosen = rng.sample(icl_pairs, min(k + 1, len(icl_pairs)))
    (x, y), demos = chosen[0], chosen[1:]
    return render(fmt, demos, x, y).text


def fact_document(rng: random.Random, facts: list[tuple[str, str, str]], cfg: ToyConfig) -> str:
    lines = []
    for _ in range(cfg.facts_per_document):
        name, x, y = rng.choice(facts)
        lines.append(FACT_TEMPLATES[name].format(x=x, y=y))
    return "\n".join(lines)


def generate_documents(cfg: ToyConfig, n_documents: int, seed: int) -> list[str]:
    """Training text: few-shot sequences (one task each) and fact documents."""
    rng = random.Random(f"documents-{seed}")
    tasks = toy_tasks(cfg)
    icl = {name: split_pairs(task, cfg)[0] for name, task in tasks.items()}
    facts = [(name, x, y) for name, task in tasks.items() if name in FACT_TEMPLATES
             for x, y in task.pairs]
    names = list(tasks)
    weights = [cfg.algorithmic_weight if n in ALGORITHMIC_TASKS else 1.0 for n in names]
    docs = []
    for _ in range(n_documents):
        if rng.random() < cfg.fact_fraction:
            docs.append(fact_document(rng, facts, cfg))
        else:
            name = rng.choices(names, weights)[0]
            docs.append(few_shot_document(rng, tasks[name], icl[name], cfg))
    return docs


# ---------------------------------------------------------------- tokenizer

def _pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers
    # Words split on spaces; "->", ":" and newlines are tokens of their own, so the
    # Hendel ("x->y") and Todd ("Q:x") formats tokenise like the authors' one.
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"->|:|\n"), behavior="isolated"),
        pre_tokenizers.Split(Regex(r"[ \t]+"), behavior="removed"),
    ])


def build_tokenizer(texts: list[str]):
    """A word-level Hugging Face tokenizer over every word in ``texts``."""
    from tokenizers import Tokenizer, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.Lowercase()
    pre = _pre_tokenizer()
    words = set()
    for text in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in sorted(words):
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizer
    core.pre_tokenizer = pre
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", unk_token="<unk>",
        eos_token="<eos>", padding_side="left")


def vocabulary_texts(cfg: ToyConfig) -> list[str]:
    """Every string the model may see: templates, formats, all pairs, placeholders."""
    texts = [fmt.instruction + fmt.query + fmt.answer for fmt in TOY_FORMATS.values()]
    texts += [t.format(x="", y="") for t in FACT_TEMPLATES.values()]
    texts += ["X Y"]
    for task in toy_tasks(cfg).values():
        texts += [f"{x} {y}" for x, y in task.pairs]
    texts += [x for name in ALGORITHMIC_TASKS for x in load_task(name).inputs]
    return texts


# ---------------------------------------------------------------- model

def build_model(cfg: ToyConfig, vocab_size: int, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads, max_position_embeddings=4 * cfg.context,
        rope_theta=10000.0, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


def pack(tokenizer, docs: list[str], context: int) -> torch.Tensor:
    """Concatenate tokenised documents (each starts with BOS) into rows of ``context``."""
    ids = [i for row in tokenizer(docs)["input_ids"] for i in row]
    n_rows = len(ids) // context
    return torch.tensor(ids[: n_rows * context]).view(n_rows, context)


def train_model(cfg: ToyConfig, out_dir: Path, log=print) -> dict:
    """Train tokenizer and model into ``out_dir``; return training statistics."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    start = time.time()
    tokenizer = build_tokenizer(vocabulary_texts(cfg))
    tokens_per_doc = 40  # rough; documents are drawn until the token budget is met
    docs = generate_documents(cfg, cfg.train_tokens // tokens_per_doc, cfg.seed)
    rows = pack(tokenizer, docs, cfg.context)
    n_steps = len(rows) // cfg.batch_size
    log(f"vocab {len(tokenizer)}, {rows.numel():,} tokens, {n_steps} steps")

    model = build_model(cfg, len(tokenizer), tokenizer)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                                  weight_decay=cfg.weight_decay)

    def lr_at(step):  # linear warm-up, cosine decay to 10%
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, n_steps - cfg.warmup_steps)
        return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))

    generator = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(rows), generator=generator)
    losses = []
    for step in range(n_steps):
        batch = rows[order[step * cfg.batch_size:(step + 1) * cfg.batch_size]]  # (B, T)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == n_steps - 1:
            log(f"step {step:5d}/{n_steps}  loss {sum(losses[-100:]) / len(losses[-100:]):.3f}"
                f"  {time.time() - start:.0f}s")
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"train_tokens": int(rows.numel()), "steps": n_steps,
            "final_loss": sum(losses[-100:]) / len(losses[-100:]),
            "seconds": round(time.time() - start, 1), "vocab_size": len(tokenizer)}


# ---------------------------------------------------------------- SAEs

def resid_pre_hook_name(layer: int) -> str:
    """The HF module whose *output* is resid_pre ``layer`` (sae-lens hooks outputs)."""
    return "model.embed_tokens" if layer == 0 else f"model.layers.{layer - 1}"


def train_saes(cfg: ToyConfig, model_dir: Path, out_dir: Path, log=print,
               layers=None) -> dict:
    """One sae-lens SAE per layer at resid_pre, on fresh text from the training mix."""
    os.environ.setdefault("WANDB_MODE", "disabled")
    import datasets
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
    from sae_lens.config import LoggingConfig
    from sae_lens.saes.gated_sae import GatedTrainingSAEConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAEConfig
    from transformers import AutoTokenizer

    sae_config_class = {"gated": GatedTrainingSAEConfig,
                        "standard": StandardTrainingSAEConfig}[cfg.sae_architecture]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    seed = cfg.seed + cfg.sae_seed_offset
    docs = generate_documents(cfg, int(1.3 * cfg.sae_train_tokens) // 40, seed)
    rows = pack(tokenizer, docs, cfg.context)
    dataset = datasets.Dataset.from_dict({"input_ids": rows.tolist()})
    stats = {}
    for layer in cfg.sae_layers if layers is None else layers:
        start = time.time()
        torch.manual_seed(seed + layer)
        runner_cfg = LanguageModelSAERunnerConfig(
            sae=sae_config_class(d_in=cfg.d_model, d_sae=cfg.d_model * cfg.sae_expansion,
                                 l1_coefficient=cfg.sae_l1_coefficient,
                                 normalize_activations=cfg.sae_normalize,
                                 apply_b_dec_to_input=True),
            model_name=str(model_dir), model_class_name="AutoModelForCausalLM",
            hook_name=resid_pre_hook_name(layer), dataset_path="local",
            is_dataset_tokenized=True, streaming=False, context_size=cfg.context,
            prepend_bos=False, exclude_special_tokens=True,
            training_tokens=cfg.sae_train_tokens, train_batch_size_tokens=2048,
            n_batches_in_buffer=16, store_batch_size_prompts=16, lr=cfg.sae_lr,
            lr_warm_up_steps=50, n_eval_batches=2, seed=seed + layer, device="cpu",
            n_batches_for_norm_estimate=20,
            logger=LoggingConfig(log_to_wandb=False), output_path=None,
            checkpoint_path=None, n_checkpoints=0, verbose=False)
        runner = LanguageModelSAETrainingRunner(runner_cfg, override_dataset=dataset)
        sae = runner.run()
        layer_dir = out_dir / f"layer_{layer}"
        sae.save_inference_model(str(layer_dir))
        _record_site(layer_dir, layer)
        stats[layer] = {"seconds": round(time.time() - start, 1)}
        log(f"SAE layer {layer}: {stats[layer]['seconds']}s")
    return stats


def _record_site(sae_dir: Path, layer: int) -> None:
    """Write the site the SAE reads into its cfg.json metadata (layer, resid_pre)."""
    path = sae_dir / "cfg.json"
    cfg = json.loads(path.read_text())
    meta = cfg.setdefault("metadata", {})
    meta.update({"hook_name": f"model.layers.{layer}.input", "site": "resid_pre",
                 "layer": layer, "model_name": "toy"})
    path.write_text(json.dumps(cfg, indent=2))


def write_corpus(cfg: ToyConfig, path: Path, n_documents: int = 400) -> None:
    """The text corpus shipped for reading features: unseen documents of the training mix."""
    docs = generate_documents(cfg, n_documents, cfg.seed + cfg.corpus_seed_offset)
    path.write_text(json.dumps(docs, indent=0, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- command line

def train_all(cfg: ToyConfig, out_dir: Path = TOY_DIR, skip_model: bool = False) -> None:
    """Retrain model and SAEs into a scratch folder, then move into place atomically."""
    out_dir = Path(out_dir)
    scratch = Path(tempfile.mkdtemp(prefix="toy-", dir=out_dir.parent))
    log_lines = []

    def log(msg):
        print(msg, flush=True)
        log_lines.append(msg)

    try:
        start = time.time()
        if skip_model:
            shutil.copytree(out_dir / "model", scratch / "model")
            model_stats = json.loads((out_dir / "training.json").read_text())["model"]
        else:
            model_stats = train_model(cfg, scratch / "model", log)
        sae_stats = train_saes(cfg, scratch / "model", scratch / "saes", log)
        write_corpus(cfg, scratch / "corpus.json")
        record = {"config": asdict(cfg), "model": model_stats, "saes": sae_stats,
                  "total_seconds": round(time.time() - start, 1),
                  "torch_threads": torch.get_num_threads()}
        (scratch / "training.json").write_text(json.dumps(record, indent=2))
        (scratch / "training.log").write_text("\n".join(log_lines) + "\n")
        backup = out_dir.with_name(out_dir.name + "-previous")
        if out_dir.exists():
            out_dir.rename(backup)          # the old files survive until the new ones are in
        scratch.rename(out_dir)
        shutil.rmtree(backup, ignore_errors=True)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tvlib.toy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="retrain the embedded model and its SAEs")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", type=Path, default=TOY_DIR)
    train.add_argument("--train-tokens", type=int, default=ToyConfig.train_tokens)
    train.add_argument("--sae-train-tokens", type=int, default=ToyConfig.sae_train_tokens)
    train.add_argument("--saes-only", action="store_true",
                       help="keep the trained model, retrain only the SAEs")
    card = sub.add_parser("card", help="measure the shipped model and write its model card")
    card.add_argument("--out", type=Path, default=TOY_DIR)
    args = parser.parse_args(argv)
    if args.command == "train":
        cfg = ToyConfig(seed=args.seed, train_tokens=args.train_tokens,
                        sae_train_tokens=args.sae_train_tokens)
        train_all(cfg, args.out, skip_model=args.saes_only)
    else:
        from .model_card import write_model_card
        write_model_card(args.out)


if __name__ == "__main__":
    main()
