"""Notebook 01: the task vector added (or written) at every layer, beside zero-shot and ICL."""

from __future__ import annotations

from typing import Iterator

import pandas as pd

from ..interventions import Steering
from ..scoring import score
from ..models import check_layers, n_layers
from ..taskvec import task_vectors
from .prompt_setup import PromptConfig, TaskPrompts, prompt_config
from .runner import baseline_table, run_per_layer
from .schema import BASELINES as BASELINE_VIEWS, ICL, RAW, TV, ZERO_SHOT, score_row


def task_vector_layers(lm, prompts: TaskPrompts, layers, positions: str = "all",
                       mode: str = "add", batch_size: int = 32
                       ) -> Iterator[tuple[int, pd.DataFrame]]:
    """The task vector added (or written) at each layer, scored: yields (layer, its row)
    as each layer finishes."""
    vectors = task_vectors(lm, prompts.few_shot, layers, positions, batch_size)   # (L, d)
    for layer, vector in zip(layers, vectors):
        yield layer, pd.DataFrame([score_row(prompts.task.name, TV, RAW, layer, score(
            lm, prompts.zero_shot, Steering(layer, vector, mode), batch_size))])


def task_vector_sweep(lm, prompts: TaskPrompts, layers, positions: str = "all",
                      mode: str = "add", batch_size: int = 32) -> pd.DataFrame:
    """Zero-shot, ICL, and the task vector at each layer, for one task (uncached)."""
    by_layer = dict(task_vector_layers(lm, prompts, layers, positions, mode, batch_size))
    return pd.concat([baseline_table(lm, prompts, batch_size), *by_layer.values()],
                     ignore_index=True)


def run_task_vector_sweep(lm, tasks, layers=None, prompt_cfg: PromptConfig | None = None,
                          positions: str = "all", mode: str = "add", batch_size: int = 32,
                          refresh: bool = False) -> pd.DataFrame:
    """``task_vector_sweep`` for each task (notebook 01), each (task, layer) cached."""
    layers = list(range(n_layers(lm))) if layers is None else check_layers(lm, layers)
    table = run_per_layer("task_vector_sweep", lm, tasks, layers,
                          prompt_cfg or prompt_config(lm), {"positions": positions, "mode": mode},
                          lambda p, ls: task_vector_layers(lm, p, ls, positions, mode,
                                                           batch_size),
                          refresh, uses_saes=False, batch_size=batch_size)
    vectors = table.view == RAW                      # labelled after the cache, never stored
    table.loc[vectors, "method"] = tv_method(mode, positions)
    table.loc[vectors, "mode"], table.loc[vectors, "positions"] = mode, positions
    return table


def run_task_vector_variants(lm, tasks, layers=None, prompt_cfg: PromptConfig | None = None,
                             variants=(("add", "all"),), batch_size: int = 32,
                             refresh: bool = False) -> pd.DataFrame:
    """``run_task_vector_sweep`` for each (mode, positions) variant, in one table: each
    variant's rows labelled ``tv_method(mode, positions)``, the baselines once."""
    variants = [tuple(v) for v in variants]
    if not variants or any(len(v) != 2 for v in variants) or len(set(variants)) < len(variants):
        raise ValueError(f"variants={variants!r}: pass distinct (mode, positions) pairs, "
                         "e.g. [('add', 'all'), ('replace', 'last')]")
    tables = [run_task_vector_sweep(lm, tasks, layers, prompt_cfg, positions, mode,
                                    batch_size, refresh) for mode, positions in variants]
    later = [t[~t.view.isin(BASELINE_VIEWS)] for t in tables[1:]]
    return pd.concat([tables[0], *later], ignore_index=True)


def tv_method(mode: str = "add", positions: str = "all") -> str:
    """The method label of a task vector: "TV" as the writeup builds and applies it (mean
    of every separator, added), else e.g. "TV (replace, last)" (Hendel et al.)."""
    return "TV" if (mode, positions) == ("add", "all") else f"TV ({mode}, {positions})"


def summarise_sweep(results: pd.DataFrame, layered_method: str = "TV") -> pd.DataFrame:
    """Per task: the baselines and ``layered_method`` at its best (lowest-NLL) layer."""
    if layered_method not in set(results.method):
        raise ValueError(f"no rows of method {layered_method!r}; the table has "
                         f"{sorted(set(results.method))}")
    rows = []
    for task, group in results.groupby("task", sort=False):
        row = {"task": task}
        for method in (ZERO_SHOT, ICL):
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
