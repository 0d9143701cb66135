"""Training the embedded model and its SAEs, and moving them into ``data/toy/``."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..paths import TOY_DIR
from .data import ToyConfig, generate_documents, write_corpus
from .tokenizer import build_tokenizer, vocabulary_texts


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


# ---------------------------------------------------------------- all of it

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
