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

from ..cache import write_atomic
from ..interventions import Steering
from ..scoring import score
from ..experiments.schema import ICL, RAW, TV, ZERO_SHOT, score_row
from ..models import load_model
from ..saes import check_sae_site, load_sae
from ..paths import TOY_DIR
from ..prompt_batch import tokenize_prompts
from ..prompts import few_shot_prompts, zero_shot_prompts
from ..sae_training import sae_quality, text_residuals
from ..taskvec import task_vectors
from ..tasks import Task
from .data import ToyConfig, generate_documents, split_pairs, toy_tasks
from .training import pack, toy_preset


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
    """Score rows in the experiments' schema (``experiments.schema``: task, vector, view,
    layer, nll, accuracy, n_prompts, ...) with a ``split`` and subset accuracies.

    Splits: "heldout" (pairs seen in training only as facts, or not at all) and
    "seen" (pairs seen as ``x -> y`` in training, but not among the pairs the
    task vector is built from). ICL queries are held-out pairs.
    """
    tasks = toy_tasks(toy_cfg)
    shared = shared_inputs(tasks)
    layers = list(range(toy_cfg.n_layers))
    tok = lm.tokenizer
    rows = []
    for name, task in tasks.items():
        icl_pairs, heldout = split_pairs(task, toy_cfg)
        tv_pool, seen = icl_pairs[: len(icl_pairs) // 2], icl_pairs[len(icl_pairs) // 2:]
        few = tokenize_prompts(tok, few_shot_prompts(
            task, cfg.n_tv_prompts, cfg.n_shots, cfg.seed, queries=tv_pool, demo_pool=tv_pool))
        vectors = task_vectors(lm, few, layers)                             # (L, d)
        icl = score(lm, tokenize_prompts(tok, few_shot_prompts(
            task, len(heldout), cfg.n_shots, cfg.seed, queries=heldout, demo_pool=icl_pairs)))
        rows.append(_row(name, ICL, "heldout", None, icl))
        allowed = first_token_ids(tok, task.outputs)
        for split, pairs in (("heldout", heldout), ("seen", seen)):
            batch = tokenize_prompts(tok, zero_shot_prompts(pairs))
            is_shared = torch.tensor([x in shared for x, _ in pairs])
            zero = score(lm, batch, keep_logits=True)
            rows.append(_row(name, ZERO_SHOT, split, None, zero, is_shared,
                             vocab_filtered_accuracy=zero.filtered_accuracy(allowed)))
            for layer, vector in zip(layers, vectors):
                rows.append(_row(name, RAW, split, layer,
                                 score(lm, batch, Steering(layer, vector)), is_shared))
    return pd.DataFrame(rows)


def _row(task, view, split, layer, scores, is_shared=None, **extra) -> dict:
    row = score_row(task, TV if view == RAW else None, view, layer, scores, split=split)
    if is_shared is not None:
        row["n_shared"] = int(is_shared.sum())
        row["shared_accuracy"] = _subset_accuracy(scores, is_shared)
    return {**row, **extra}


def _subset_accuracy(scores, mask: torch.Tensor) -> float | None:
    return scores.correct[mask].float().mean().item() if mask.any() else None


def measure_saes(lm, cfg: CardConfig, toy_cfg: ToyConfig, preset=None) -> list:
    """FVU, L0 and dead fraction of each layer's SAE on fresh text (default: the SAEs of
    the model's own preset; each is checked to read its layer of this model)."""
    preset = lm.preset if preset is None else preset
    docs = generate_documents(toy_cfg, cfg.sae_eval_documents, cfg.sae_eval_seed)
    ids = pack(lm.tokenizer, docs, toy_cfg.context)                    # (N, T)
    resid = text_residuals(lm, ids, toy_cfg.sae_layers)                # {layer: (n, d)}
    out = []
    for layer in toy_cfg.sae_layers:
        sae = load_sae(preset, layer, device="cpu")
        check_sae_site(sae, lm, layer)
        out.append({"layer": layer, "site": "resid_pre", "d_sae": sae.cfg.d_sae,
                    "architecture": sae.cfg.architecture(),
                    **sae_quality(sae, resid[layer])})
    return out


def _weighted(rows: pd.DataFrame, column: str, weight: str) -> float:
    rows = rows.dropna(subset=[column])
    return float((rows[column] * rows[weight]).sum() / rows[weight].sum())


def task_family(name: str) -> str:
    """"Hendel tasks", "number tasks" or "list tasks"."""
    return {"num": "number tasks", "list": "list tasks"}.get(name.split("_")[0], "Hendel tasks")


def summarise(tasks: pd.DataFrame) -> dict:
    """Headline numbers, pooled over tasks (each task weighted by its prompt count)."""
    def pick(view, split):
        return tasks[(tasks.view == view) & (tasks.split == split)]

    def by_layer(split):
        return {int(layer): {"accuracy": _weighted(g, "accuracy", "n_prompts"),
                             "nll": _weighted(g, "nll", "n_prompts"),
                             "shared_accuracy": _weighted(g, "shared_accuracy", "n_shared")}
                for layer, g in pick(RAW, split).groupby("layer")}

    icl = pick(ICL, "heldout")
    family = icl.task.map(task_family)
    icl_by_family = {name: _weighted(icl[family == name], "accuracy", "n_prompts")
                     for name in dict.fromkeys(family)}
    seen, heldout = by_layer("seen"), by_layer("heldout")
    best = max(seen, key=lambda layer: seen[layer]["shared_accuracy"])
    zero_seen, zero_heldout = pick(ZERO_SHOT, "seen"), pick(ZERO_SHOT, "heldout")
    return {
        "icl_heldout_accuracy": _weighted(icl, "accuracy", "n_prompts"),
        "icl_heldout_accuracy_by_family": icl_by_family,
        "zero_shot_heldout_accuracy": _weighted(zero_heldout, "accuracy", "n_prompts"),
        "zero_shot_seen_accuracy": _weighted(zero_seen, "accuracy", "n_prompts"),
        "zero_shot_seen_vocab_filtered_accuracy":
            _weighted(zero_seen, "vocab_filtered_accuracy", "n_prompts"),
        "zero_shot_seen_shared_accuracy": _weighted(zero_seen, "shared_accuracy", "n_shared"),
        "zero_shot_heldout_shared_accuracy":
            _weighted(zero_heldout, "shared_accuracy", "n_shared"),
        "best_layer": best,
        "tv_seen_by_layer": seen,
        "tv_heldout_by_layer": heldout,
        "n_heldout_prompts": int(zero_heldout.n_prompts.sum()),
        "n_seen_prompts": int(zero_seen.n_prompts.sum()),
        "n_seen_shared_prompts": int(zero_seen.n_shared.sum()),
    }


def write_model_card(root: Path = TOY_DIR, cfg: CardConfig = CardConfig()) -> dict:
    """Measure the model and SAEs under ``root``; write card.json and MODEL_CARD.md."""
    root = Path(root)
    preset = toy_preset(root)
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
    shots = card["card_config"]["n_shots"]
    best = s["best_layer"]
    tv_seen, tv_held = s["tv_seen_by_layer"][best], s["tv_heldout_by_layer"][best]
    sae_time = sum(v["seconds"] for v in t.get("saes", {}).values())
    lines = [
        "# The embedded toy model",
        "",
        "A small Llama-architecture decoder (rotary positions, module paths `model.layers[L]`",
        "as in Gemma) with a word-level tokenizer, trained from scratch on few-shot sequences",
        "of the project's tasks and on fact sentences, plus one gated SAE per layer at",
        "resid_pre, trained with sae-lens on recorded residuals (`tvlib.sae_training`, the",
        "training path of the offline Gemma SAEs too). Written by `python -m tvlib.toy card`;",
        "every number below is measured from the files in this folder (`card.json`,",
        "`card_tasks.csv`).",
        "",
        "## Training",
        "",
        f"- Model: {c['n_layers']} layers, d_model {c['d_model']}, {c['n_heads']} heads, "
        f"MLP {c['d_mlp']}, context {c['context']}, vocabulary {t['model']['vocab_size']}.",
        f"- Data: {t['model']['train_tokens']:,} tokens; {int(100 * c['fact_fraction'])}% "
        f"fact documents, the rest few-shot sequences of one task each with 0-{c['max_demos']} "
        "demonstrations in the authors', Hendel and Todd formats (generated tasks sampled "
        f"{c['algorithmic_weight']:g}x as often). Inputs are held out of the `x -> y` form with "
        f"probability {c['heldout_fraction']} (for every task that has them); held-out pairs "
        "appear only in fact sentences. List tasks have no facts: each few-shot sequence "
        "draws new random lists, never a held-out one.",
        f"- {t['model']['steps']} AdamW steps, lr {c['lr']}, batch {c['batch_size']}; final "
        f"training loss {t['model']['final_loss']:.3f}; seed {c['seed']}.",
        f"- Time on 2 CPU cores: model {t['model']['seconds'] / 60:.1f} min, SAEs "
        f"{sae_time / 60:.1f} min.",
        f"- SAEs: {c['sae_architecture']}, {c['sae_expansion']}x expansion, L1 coefficient "
        f"{c['sae_l1_coefficient']:g}; {c['sae_epochs']} epoch(s) over the residuals of "
        f"{c['sae_train_tokens']:,} fresh tokens of the training mix (special tokens left "
        f"out), batches of {c['sae_batch_tokens']}, lr {c['sae_lr']} (cosine to a tenth), "
        f"seed {c['seed'] + c['sae_seed_offset']} + layer. Inputs are scaled to mean norm "
        "sqrt(d) in training, the scale folded into the saved weights, so they read and "
        "write raw residuals.",
        "",
        "## In-context learning and task vectors",
        "",
        "*Held-out* pairs were never seen as `x -> y`; *seen* pairs were, but are disjoint",
        "from the pairs the task vector is built from. The task vector is the mean resid_pre",
        f"over every separator of {card['card_config']['n_tv_prompts']} {shots}-shot prompts, "
        "added at the separator of zero-shot prompts.",
        "",
        "| measure | accuracy |",
        "|---|---|",
        f"| ICL ({shots} shots), held-out pairs ({s['n_heldout_prompts']} prompts) | "
        f"{s['icl_heldout_accuracy']:.3f} |",
        *[f"| ICL, held-out pairs, {name} only | {value:.3f} |"
          for name, value in s["icl_heldout_accuracy_by_family"].items()],
        f"| zero-shot, held-out pairs | {s['zero_shot_heldout_accuracy']:.3f} |",
        f"| task vector at layer {best}, held-out pairs | {tv_held['accuracy']:.3f} |",
        f"| zero-shot, seen pairs ({s['n_seen_prompts']} prompts) | "
        f"{s['zero_shot_seen_accuracy']:.3f} |",
        f"| zero-shot with output-vocabulary filter, seen pairs | "
        f"{s['zero_shot_seen_vocab_filtered_accuracy']:.3f} |",
        f"| task vector at layer {best}, seen pairs | {tv_seen['accuracy']:.3f} |",
        f"| zero-shot, seen inputs shared by two tasks ({s['n_seen_shared_prompts']} prompts) | "
        f"{s['zero_shot_seen_shared_accuracy']:.3f} |",
        f"| task vector at layer {best}, seen inputs shared by two tasks | "
        f"{tv_seen['shared_accuracy']:.3f} |",
        "",
        "The output-vocabulary filter restricts the zero-shot prediction to the first tokens",
        "of the task's outputs: what knowing only the answer vocabulary would give. On inputs",
        "shared by two tasks with different outputs only the task decides the answer.",
        "",
        "Task vector by layer:",
        "",
        "| layer | seen: accuracy | seen: NLL | seen, shared inputs: accuracy | "
        "held-out: accuracy | held-out: NLL |",
        "|---|---|---|---|---|---|",
    ]
    for layer in sorted(s["tv_seen_by_layer"]):
        a, h = s["tv_seen_by_layer"][layer], s["tv_heldout_by_layer"][layer]
        lines.append(f"| {layer} | {a['accuracy']:.3f} | {a['nll']:.3f} | "
                     f"{a['shared_accuracy']:.3f} | {h['accuracy']:.3f} | {h['nll']:.3f} |")
    lines += ["", f"Per task (TV at layer {best}):", "",
              "| task | ICL held-out | zero-shot held-out | TV held-out | zero-shot seen | "
              "vocab-filtered zero-shot seen | TV seen |",
              "|---|---|---|---|---|---|---|"]
    for name, g in tasks.groupby("task", sort=False):
        def acc(view, split, layer=None, column="accuracy"):
            rows = g[(g.view == view) & (g.split == split)]
            if layer is not None:
                rows = rows[rows.layer == layer]
            return f"{rows[column].iloc[0]:.2f}"
        lines.append(f"| {name} | {acc(ICL, 'heldout')} | {acc(ZERO_SHOT, 'heldout')} | "
                     f"{acc(RAW, 'heldout', best)} | {acc(ZERO_SHOT, 'seen')} | "
                     f"{acc(ZERO_SHOT, 'seen', column='vocab_filtered_accuracy')} | "
                     f"{acc(RAW, 'seen', best)} |")
    lines += ["", "## SAEs", "",
              f"Measured on {card['saes'][0]['n_tokens']:,} fresh tokens of the training mix "
              "(special tokens excluded).", "",
              "| layer | site | architecture | width | FVU | L0 | dead fraction |",
              "|---|---|---|---|---|---|---|"]
    for r in card["saes"]:
        lines.append(f"| {r['layer']} | {r['site']} | {r['architecture']} | {r['d_sae']} | "
                     f"{r['fvu']:.4f} | {r['l0']:.1f} | {r['dead_fraction']:.3f} |")
    return "\n".join(lines) + "\n"
