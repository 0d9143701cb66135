"""Running an experiment under the result cache, and the rows of its tables.

Sweeps over layers (``run_per_layer``) store each (task, layer) as an entry of
its own: a sweep over other layers, or another notebook asking for the same
layer with the same settings, reuses it. The baselines that do not depend on a
layer (zero-shot or one-shot, and ICL) are one entry per task and prompts,
shared by every experiment.
"""

from __future__ import annotations

from dataclasses import asdict

import pandas as pd

from ..cache import cached_groups, cached_table, cached_tables
from ..fingerprints import digest
from ..result_keys import result_key
from ..cleanup import CleanupConfig
from ..scoring import score
from ..models import model_identity
from .prompt_setup import PromptConfig, TaskPrompts, build_task_prompts, model_tasks
from .schema import ICL, ONE_SHOT, ZERO_SHOT, score_row


def run_per_task(experiment: str, lm, tasks, prompt_cfg: PromptConfig, settings: dict,
                 compute, refresh: bool = False, sae_layers=()):
    """Run ``compute(prompts)`` for each task, cached under ``result_key``.

    ``compute`` returns a table, or a dict of named tables; the result has the
    same form, each table concatenated over tasks. ``sae_layers``: the layers
    whose SAEs ``compute`` uses (they are part of the key).
    """
    parts: dict[str, list] = {}
    for name, task in model_tasks(lm, tasks).items():
        key = result_key(experiment, lm, sae_layers, task=digest(task), prompts=prompt_cfg,
                         **settings)

        def named(task=task):
            out = compute(build_task_prompts(lm.tokenizer, task, prompt_cfg))
            return {"table": out} if isinstance(out, pd.DataFrame) else out

        for part, table in cached_tables(key, named, refresh=refresh).items():
            parts.setdefault(part, []).append(table)
    merged = {part: pd.concat(tables, ignore_index=True) for part, tables in parts.items()}
    return merged["table"] if list(merged) == ["table"] else merged


BASELINE_KINDS = ("zero-shot", "detector", None)   # which baseline rows a sweep puts first


def run_per_layer(experiment: str, lm, tasks, layers, prompt_cfg: PromptConfig,
                  settings: dict, compute, refresh: bool = False, uses_saes: bool = True,
                  baselines: str | None = "zero-shot", baselines_part: str = "table",
                  batch_size: int = 32):
    """Run ``compute(prompts, layers)`` on the (task, layer) pairs not in the cache, one
    call per task; it yields ``(layer, table or dict of tables)`` as each layer finishes
    (or returns them as a dict), and every pair is cached under its own ``result_key``
    (with the SAE of its layer when ``uses_saes``) as it arrives: an interrupt keeps the
    finished layers.

    ``baselines`` ("zero-shot", "detector" or None): the layer-free rows of
    ``baseline_table``, put before the layers' rows in the table ``baselines_part``. The
    result has the form ``compute`` gives, each table concatenated over tasks and layers.
    ``batch_size`` is the baselines' (it does not change their numbers, so it is not keyed).
    """
    if baselines not in BASELINE_KINDS:
        raise ValueError(f"baselines={baselines!r}: pass one of {BASELINE_KINDS}")
    if not layers:
        raise ValueError(f"{experiment}: no layers to run; pass at least one layer")
    parts: dict[str, list] = {}
    identity = model_identity(lm)      # reads every weight: once for all of this call's keys
    for name, task in model_tasks(lm, tasks).items():
        prompts = {}

        def task_prompts(task=task):
            if "built" not in prompts:
                prompts["built"] = build_task_prompts(lm.tokenizer, task, prompt_cfg)
            return prompts["built"]

        def compute_missing(missing):
            out = compute(task_prompts(), missing)
            for layer, t in out.items() if isinstance(out, dict) else out:
                yield layer, {"table": t} if isinstance(t, pd.DataFrame) else t

        keys = {layer: result_key(experiment, lm, [layer] if uses_saes else [],
                                  identity=identity, task=digest(task), prompts=prompt_cfg,
                                  layer=layer, **settings) for layer in layers}
        by_layer = cached_groups(keys, compute_missing, refresh=refresh)
        if baselines is not None:
            key = result_key("baselines", lm, [], identity=identity, task=digest(task),
                             prompts=prompt_cfg, kind=baselines)
            base = cached_table(key, lambda: baseline_table(
                lm, task_prompts(), batch_size, detector=baselines == "detector"),
                refresh=refresh)
            parts.setdefault(baselines_part, []).append(base)
        for layer in layers:
            for part, table in by_layer[layer].items():
                parts.setdefault(part, []).append(table)
    merged = {part: pd.concat(tables, ignore_index=True) for part, tables in parts.items()}
    return merged["table"] if list(merged) == ["table"] else merged


def cleanup_settings(cfg: CleanupConfig) -> dict:
    """The cleanup settings that change results (the progress bar does not)."""
    return {k: v for k, v in asdict(cfg).items() if k != "progress"}


def baseline_table(lm, prompts: TaskPrompts, batch_size: int = 32,
                   detector: bool = False) -> pd.DataFrame:
    """The rows that do not depend on a layer: zero-shot (or, for detectors, the one-shot
    ``X -> Y`` prompts) and ICL; layer and k are float (NaN), as in a sweep's table."""
    first = (ONE_SHOT, prompts.detector_eval) if detector else (ZERO_SHOT, prompts.zero_shot)
    rows = [score_row(prompts.task.name, None, view, None,
                      score(lm, batch, batch_size=batch_size))
            for view, batch in (first, (ICL, prompts.few_shot))]
    return pd.DataFrame(rows).astype({"layer": "float64", "k": "float64"})
