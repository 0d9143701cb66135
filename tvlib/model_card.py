"""Measure the embedded model and its SAEs; write ``data/toy/MODEL_CARD.md``.

Every number in the card is computed here from the shipped files:
- ICL accuracy on held-out pairs (seen in training only as fact sentences, or
  for list tasks not at all) against zero-shot accuracy on the same pairs;
- the additive task vector at each layer (accuracy and NLL on held-out pairs);
- the same on inputs shared by two tasks with different outputs, where only
  the task can tell the answer;
- an output-vocabulary-filter control: zero-shot accuracy when the prediction
  is restricted to the task's possible first answer tokens;
- each SAE's fraction of variance unexplained (FVU), L0 and dead fraction.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from .cache import write_atomic
from .models import load_model, load_sae
from .paths import TOY_DIR
from .prompts import few_shot_prompts, tokenize_prompts, zero_shot_prompts
from .taskvec import Steering, collect_residuals, score, task_vectors
from .tasks import Task
from .toy import ToyConfig, generate_documents, pack, split_pairs, toy_tasks


@dataclass(frozen=True)
class CardConfig:
    n_shots: int = 8
    n_tv_prompts: int = 16
    seed: int = 0
    sae_eval_documents: int = 400
    sae_eval_seed: int = 2000


def shared_inputs(tasks: dict[str, Task]) -> set[str]:
    """Inputs that appear in two or more tasks with different outputs."""
    outputs = defaultdict(set)
    for task in tasks.values():
        for x, y in task.pairs:
            outputs[x].add(y)
    return {x for x, ys in outputs.items() if len(ys) > 1}


def first_token_ids(tokenizer, outputs) -> torch.Tensor:
    """Ids of the first token of each output (as it appears after a space)."""
    ids = {tokenizer(" " + y, add_special_tokens=False)["input_ids"][0] for y in outputs}
    return torch.tensor(sorted(ids))


def measure_tasks(lm, cfg: CardConfig, toy_cfg: ToyConfig) -> pd.DataFrame:
    """Per-task rows: ICL / zero-shot / vocab-filtered zero-shot / TV per layer."""
    tasks = toy_tasks(toy_cfg)
    shared = shared_inputs(tasks)
    layers = list(range(toy_cfg.n_layers))
    rows = []
    for name, task in tasks.items():
        icl_pairs, heldout = split_pairs(task, toy_cfg)
        tok = lm.tokenizer
        icl = score(lm, tokenize_prompts(tok, few_shot_prompts(
            task, len(heldout), cfg.n_shots, cfg.seed, queries=heldout, demo_pool=icl_pairs)))
        zero_batch = tokenize_prompts(tok, zero_shot_prompts(heldout))
        zero = score(lm, zero_batch)
        allowed = first_token_ids(tok, task.outputs)
        is_shared = torch.tensor([x in shared for x, _ in heldout])
        few = tokenize_prompts(tok, few_shot_prompts(
            task, cfg.n_tv_prompts, cfg.n_shots, cfg.seed, queries=icl_pairs,
            demo_pool=icl_pairs))
        vectors = task_vectors(lm, few, layers)
        base = {"task": name, "n_heldout": len(heldout), "n_shared": int(is_shared.sum())}
        rows.append({**base, "method": "ICL", "layer": None, "accuracy": icl.accuracy(),
                     "nll": icl.mean_nll()})
        rows.append({**base, "method": "zero-shot", "layer": None, "accuracy": zero.accuracy(),
                     "nll": zero.mean_nll(), "vocab_filtered_accuracy":
                     zero.filtered_accuracy(allowed),
                     "shared_accuracy": _subset_accuracy(zero, is_shared)})
        for layer, vector in zip(layers, vectors):
            tv = score(lm, zero_batch, Steering(layer, vector))
            rows.append({**base, "method": "TV", "layer": layer, "accuracy": tv.accuracy(),
                         "nll": tv.mean_nll(), "shared_accuracy": _subset_accuracy(tv, is_shared)})
    return pd.DataFrame(rows)


def _subset_accuracy(scores, mask: torch.Tensor) -> float | None:
    return scores.correct[mask].float().mean().item() if mask.any() else None


def measure_saes(lm, cfg: CardConfig, toy_cfg: ToyConfig, preset="toy") -> list:
    """FVU, L0 and dead fraction of each layer's SAE on fresh text."""
    docs = generate_documents(toy_cfg, cfg.sae_eval_documents, cfg.sae_eval_seed)
    ids = pack(lm.tokenizer, docs, toy_cfg.context)                    # (N, T)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    resid = collect_residuals(lm, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                              toy_cfg.sae_layers, positions)            # (L, N, T, d)
    keep = ids != lm.tokenizer.bos_token_id                              # SAEs skip BOS
    out = []
    for i, layer in enumerate(toy_cfg.sae_layers):
        sae = load_sae(preset, layer)
        x = resid[i][keep]                                             # (n_tokens, d)
        with torch.no_grad():
            f = sae.encode(x)
            x_hat = sae.decode(f)
        fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
        out.append({"layer": layer, "site": "resid_pre", "d_sae": sae.cfg.d_sae,
                    "architecture": sae.cfg.architecture(), "fvu": fvu.item(),
                    "l0": (f > 0).sum(-1).float().mean().item(),
                    "dead_fraction": ((f > 0).sum(0) == 0).float().mean().item(),
                    "n_tokens": int(x.shape[0])})
    return out


def _weighted(rows: pd.DataFrame, column: str, weight: str) -> float:
    rows = rows.dropna(subset=[column])
    return float((rows[column] * rows[weight]).sum() / rows[weight].sum())


def summarise(tasks: pd.DataFrame) -> dict:
    """Headline numbers, pooled over tasks (weighted by their prompt counts)."""
    icl = tasks[tasks.method == "ICL"]
    zero = tasks[tasks.method == "zero-shot"]
    tv = tasks[tasks.method == "TV"]
    by_layer = (tv.groupby("layer")
                  .apply(lambda g: pd.Series({
                      "accuracy": _weighted(g, "accuracy", "n_heldout"),
                      "nll": _weighted(g, "nll", "n_heldout"),
                      "shared_accuracy": _weighted(g, "shared_accuracy", "n_shared")}),
                         include_groups=False))
    best = int(by_layer["shared_accuracy"].idxmax())
    return {
        "icl_heldout_accuracy": _weighted(icl, "accuracy", "n_heldout"),
        "zero_shot_heldout_accuracy": _weighted(zero, "accuracy", "n_heldout"),
        "zero_shot_vocab_filtered_accuracy": _weighted(zero, "vocab_filtered_accuracy",
                                                       "n_heldout"),
        "tv_by_layer": {int(k): v for k, v in by_layer.to_dict("index").items()},
        "best_layer": best,
        "tv_best_layer_accuracy": float(by_layer.loc[best, "accuracy"]),
        "shared_inputs_zero_shot_accuracy": _weighted(zero, "shared_accuracy", "n_shared"),
        "shared_inputs_tv_accuracy": float(by_layer.loc[best, "shared_accuracy"]),
        "n_shared_prompts": int(zero["n_shared"].sum()),
        "n_heldout_prompts": int(zero["n_heldout"].sum()),
    }


def write_model_card(root: Path = TOY_DIR, cfg: CardConfig = CardConfig()) -> dict:
    """Measure the model and SAEs under ``root``; write card.json and MODEL_CARD.md."""
    import dataclasses

    from .models import get_preset
    root = Path(root)
    preset = dataclasses.replace(get_preset("toy"), model_id=str(root / "model"),
                                 sae_dir=str(root / "saes"))
    training = json.loads((root / "training.json").read_text())
    toy_cfg = ToyConfig(**{k: tuple(v) if isinstance(v, list) else v
                           for k, v in training["config"].items()})
    lm = load_model(preset, device="cpu")
    tasks = measure_tasks(lm, cfg, toy_cfg)
    saes = measure_saes(lm, cfg, toy_cfg, preset)
    card = {"summary": summarise(tasks), "saes": saes, "card_config": asdict(cfg),
            "training": training}
    write_atomic(root / "card.json", lambda p: p.write_text(json.dumps(card, indent=2)))
    write_atomic(root / "card_tasks.csv", lambda p: tasks.to_csv(p, index=False))
    write_atomic(root / "MODEL_CARD.md", lambda p: p.write_text(render_card(card, tasks)))
    return card


def render_card(card: dict, tasks: pd.DataFrame) -> str:
    s, t, c = card["summary"], card["training"], card["training"]["config"]
    sae_time = sum(v["seconds"] for v in t.get("saes", {}).values())
    lines = [
        "# The embedded toy model",
        "",
        "A small Llama-architecture decoder (rotary positions, module paths `model.layers[L]`",
        "as in Gemma) with a word-level tokenizer, trained from scratch on few-shot sequences",
        "of the project's tasks and on fact sentences, plus one gated SAE per layer at",
        "resid_pre, trained with sae-lens. Written by `python -m tvlib.toy card`; every",
        "number below is measured from the files in this folder.",
        "",
        "## Training",
        "",
        f"- Model: {c['n_layers']} layers, d_model {c['d_model']}, {c['n_heads']} heads, "
        f"MLP {c['d_mlp']}, context {c['context']}, vocabulary {t['model']['vocab_size']}.",
        f"- Data: {t['model']['train_tokens']:,} tokens; {int(100 * c['fact_fraction'])}% "
        f"fact documents, the rest few-shot sequences with 0-{c['max_demos']} demonstrations "
        f"in the authors', Hendel and Todd formats; {int(100 * c['heldout_fraction'])}% of each "
        "task's pairs are held out of the `x -> y` form (list tasks: held out entirely).",
        f"- {t['model']['steps']} AdamW steps, lr {c['lr']}, batch {c['batch_size']}; final "
        f"training loss {t['model']['final_loss']:.3f}; seed {c['seed']}.",
        f"- Time on this machine ({t.get('torch_threads', '?')} CPU threads): model "
        f"{t['model']['seconds'] / 60:.1f} min, SAEs {sae_time / 60:.1f} min.",
        f"- SAEs: {c['sae_architecture']}, {c['sae_expansion']}x expansion, "
        f"L1 coefficient {c['sae_l1_coefficient']}, {c['sae_train_tokens']:,} tokens each.",
        "",
        "## In-context learning",
        "",
        f"Held-out pairs: {s['n_heldout_prompts']} zero-shot / {card['card_config']['n_shots']}"
        "-shot prompts over all tasks.",
        "",
        "| measure | accuracy |",
        "|---|---|",
        f"| ICL ({card['card_config']['n_shots']} shots), held-out pairs | "
        f"{s['icl_heldout_accuracy']:.3f} |",
        f"| zero-shot, held-out pairs | {s['zero_shot_heldout_accuracy']:.3f} |",
        f"| zero-shot, output-vocabulary filter | {s['zero_shot_vocab_filtered_accuracy']:.3f} |",
        f"| task vector at layer {s['best_layer']}, held-out pairs | "
        f"{s['tv_best_layer_accuracy']:.3f} |",
        f"| zero-shot, inputs shared by two tasks ({s['n_shared_prompts']} prompts) | "
        f"{s['shared_inputs_zero_shot_accuracy']:.3f} |",
        f"| task vector at layer {s['best_layer']}, inputs shared by two tasks | "
        f"{s['shared_inputs_tv_accuracy']:.3f} |",
        "",
        "The output-vocabulary filter restricts the zero-shot prediction to the first tokens",
        "of the task's outputs: what knowing only the answer vocabulary would give. On inputs",
        "shared by two tasks the answer depends on the task alone.",
        "",
        "Task vector (mean resid_pre over every separator of 16 few-shot prompts, added at the",
        "separator of zero-shot prompts), by layer:",
        "",
        "| layer | accuracy | NLL | accuracy on shared inputs |",
        "|---|---|---|---|",
    ]
    for layer, v in s["tv_by_layer"].items():
        lines.append(f"| {layer} | {v['accuracy']:.3f} | {v['nll']:.3f} | "
                     f"{v['shared_accuracy']:.3f} |")
    lines += ["", "Per task (held-out pairs):", "",
              "| task | ICL | zero-shot | vocab-filtered zero-shot | best TV | best TV layer |",
              "|---|---|---|---|---|---|"]
    for name, group in tasks.groupby("task", sort=False):
        tv = group[group.method == "TV"]
        best = tv.loc[tv.accuracy.idxmax()]
        zero = group[group.method == "zero-shot"].iloc[0]
        icl = group[group.method == "ICL"].iloc[0]
        lines.append(f"| {name} | {icl.accuracy:.2f} | {zero.accuracy:.2f} | "
                     f"{zero.vocab_filtered_accuracy:.2f} | {best.accuracy:.2f} | "
                     f"{int(best.layer)} |")
    lines += ["", "## SAEs", "",
              f"Measured on {card['saes'][0]['n_tokens']:,} fresh tokens of the training mix "
              "(BOS excluded).", "",
              "| layer | site | architecture | width | FVU | L0 | dead fraction |",
              "|---|---|---|---|---|---|---|"]
    for r in card["saes"]:
        lines.append(f"| {r['layer']} | {r['site']} | {r['architecture']} | {r['d_sae']} | "
                     f"{r['fvu']:.4f} | {r['l0']:.1f} | {r['dead_fraction']:.3f} |")
    return "\n".join(lines) + "\n"
