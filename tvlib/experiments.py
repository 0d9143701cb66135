"""The experiments behind the notebooks, each returning a tidy table.

Every table has one row per (task, method, layer) with columns ``nll``,
``accuracy`` and ``n_prompts``; baselines that do not depend on the layer
(zero-shot, ICL) have an empty layer.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import pandas as pd

from .cache import cached_table, config_key
from .models import model_fingerprint, n_layers
from .prompts import PromptBatch, few_shot_prompts, tokenize_prompts, zero_shot_prompts
from .taskvec import Steering, score, task_vectors
from .tasks import Task, TaskDataError, load_tasks


@dataclass(frozen=True)
class PromptConfig:
    """How a task's pairs become few-shot and evaluation prompts."""

    n_prompts: int = 16        # few-shot prompts for the task vector and ICL
    n_shots: int = 8           # demonstrations per few-shot prompt
    n_eval: int = 50           # zero-shot evaluation prompts (pairs held apart)
    fmt: str = "authors"
    n_first: int = 2           # answer tokens scored
    seed: int = 0


@dataclass
class TaskPrompts:
    task: Task
    few_shot: PromptBatch      # demonstrations + query, answer appended
    zero_shot: PromptBatch     # evaluation pairs, answer appended


def split_eval(task: Task, cfg: PromptConfig) -> tuple[list, list]:
    """(pool, eval_pairs): evaluation pairs never serve as demonstrations or queries."""
    pairs = list(task.pairs)
    random.Random(f"eval-split-{task.name}-{cfg.seed}").shuffle(pairs)
    n_eval = min(cfg.n_eval, len(pairs) // 2)
    if len(pairs) - n_eval < cfg.n_shots + 1:
        raise TaskDataError(f"task {task.name!r} has {len(pairs)} pairs: too few for "
                            f"n_shots={cfg.n_shots} plus evaluation pairs; lower n_shots")
    return pairs[n_eval:], pairs[:n_eval]


def build_task_prompts(tokenizer, task: Task, cfg: PromptConfig) -> TaskPrompts:
    pool, eval_pairs = split_eval(task, cfg)
    few = few_shot_prompts(task, cfg.n_prompts, cfg.n_shots, cfg.seed, cfg.fmt,
                           queries=pool, demo_pool=pool)
    zero = zero_shot_prompts(eval_pairs, cfg.fmt)
    return TaskPrompts(task, tokenize_prompts(tokenizer, few, cfg.n_first),
                       tokenize_prompts(tokenizer, zero, cfg.n_first))


def _row(task: str, method: str, layer, scores) -> dict:
    return {"task": task, "method": method, "layer": layer, "nll": scores.mean_nll(),
            "accuracy": scores.accuracy(), "n_prompts": len(scores.nll)}


def task_vector_sweep(lm, prompts: TaskPrompts, layers, positions: str = "all",
                      mode: str = "add", batch_size: int = 32) -> pd.DataFrame:
    """Zero-shot, ICL, and the task vector added at each layer (notebook 01)."""
    name = prompts.task.name
    rows = [_row(name, "zero-shot", None, score(lm, prompts.zero_shot, batch_size=batch_size)),
            _row(name, "ICL", None, score(lm, prompts.few_shot, batch_size=batch_size))]
    vectors = task_vectors(lm, prompts.few_shot, layers, positions, batch_size)   # (L, d)
    for layer, vector in zip(layers, vectors):
        steered = score(lm, prompts.zero_shot, Steering(layer, vector, mode), batch_size)
        rows.append(_row(name, "TV", layer, steered))
    return pd.DataFrame(rows)


def run_task_vector_sweep(lm, tasks, layers=None, prompt_cfg: PromptConfig | None = None,
                          positions: str = "all", mode: str = "add", batch_size: int = 32,
                          refresh: bool = False) -> pd.DataFrame:
    """``task_vector_sweep`` for each task, each cached by its full configuration."""
    prompt_cfg = prompt_cfg or PromptConfig()
    layers = list(range(n_layers(lm))) if layers is None else list(layers)
    tables = []
    for name, task in load_tasks(tasks).items():
        config = {"experiment": "task_vector_sweep", "model": model_fingerprint(lm),
                  "task": name, "task_pairs": config_key(task.pairs), "layers": layers,
                  "positions": positions, "mode": mode, **asdict(prompt_cfg)}

        def compute(task=task):
            prompts = build_task_prompts(lm.tokenizer, task, prompt_cfg)
            return task_vector_sweep(lm, prompts, layers, positions, mode, batch_size)

        tables.append(cached_table("task_vector_sweep", config, compute, refresh=refresh))
    return pd.concat(tables, ignore_index=True)


def summarise_sweep(results: pd.DataFrame, layered_method: str = "TV") -> pd.DataFrame:
    """Per task: the baselines and ``layered_method`` at its best (lowest-NLL) layer."""
    rows = []
    for task, group in results.groupby("task", sort=False):
        row = {"task": task}
        for method in ("zero-shot", "ICL"):
            match = group[group.method == method]
            if len(match):
                row[f"{method} nll"] = match.nll.iloc[0]
                row[f"{method} acc"] = match.accuracy.iloc[0]
        layered = group[group.method == layered_method]
        if len(layered):
            best = layered.loc[layered.nll.idxmin()]
            row["best layer"] = int(best.layer)
            row[f"{layered_method} nll"] = best.nll
            row[f"{layered_method} acc"] = best.accuracy
        rows.append(row)
    return pd.DataFrame(rows).set_index("task")
