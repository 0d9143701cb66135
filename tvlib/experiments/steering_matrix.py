"""Notebook 06: the (task x feature) steering matrix of single cleaned features."""

from __future__ import annotations

import pandas as pd

from ..cache import cached_table
from ..checks import check_config
from ..fingerprints import digest
from ..result_keys import result_key
from ..models import check_layers
from ..saes import load_sae
from ..steering import DETECTOR_STEERING, TASK_STEERING, SteeringConfig, steering_grid
from .prompt_setup import PromptConfig, build_task_prompts, model_tasks, prompt_config


def run_steering_matrix(lm, tasks, layer: int, features_by_task: dict[str, list],
                        prompt_cfg: PromptConfig | None = None,
                        steering: SteeringConfig | None = None, detectors: bool = False,
                        refresh: bool = False) -> pd.DataFrame:
    """Relative loss change for every (task, feature), steering with one feature at a time.

    Task features are added at the separator of zero-shot prompts; with
    ``detectors`` at ``Y`` of one-shot detector prompts. ``feature_task`` names the
    task(s) whose cleaned vector the feature came from, joined by "+" when a
    feature was kept for several tasks. ``steering`` None: the writeup's
    (``TASK_STEERING``, or ``DETECTOR_STEERING`` with ``detectors``). Its
    ``random_seed``: also a random unit direction of that seed at the same scale, a
    control column after the features (``controls.random_direction_grid``: ``feature``
    empty, ``feature_task`` "random", column ``seed``); None: none.
    """
    prompt_cfg = prompt_cfg or prompt_config(lm)
    if steering is None:
        steering = DETECTOR_STEERING if detectors else TASK_STEERING
    check_config("steering", steering, SteeringConfig)
    scale, random_seed = steering.scale, steering.random_seed
    check_layers(lm, [layer])
    loaded = model_tasks(lm, tasks)
    if not isinstance(features_by_task, dict):
        raise ValueError("features_by_task must be a dict {task: [features]}, e.g. the output "
                         f"of top_cleaned_features, not {type(features_by_task).__name__}")
    features_by_task = {task: list(fs) for task, fs in features_by_task.items()}
    features = list(dict.fromkeys(f for fs in features_by_task.values() for f in fs))
    origin = {f: "+".join(t for t, fs in features_by_task.items() if f in fs) for f in features}
    key = result_key("steering_matrix", lm, [layer], tasks={n: digest(t) for n, t in
                                                            loaded.items()},
                     layer=layer, features_by_task=features_by_task, steering=steering,
                     detectors=detectors, prompts=prompt_cfg)

    def compute():
        from ..controls import random_direction_grid   # tvlib.controls reads .schema
        batches = {}
        for name, task in loaded.items():
            prompts = build_task_prompts(lm.tokenizer, task, prompt_cfg)
            batches[name] = prompts.detector_eval if detectors else prompts.zero_shot
        sae = load_sae(lm.preset, layer)
        grid = steering_grid(lm, batches, layer, sae, features, scale)
        grid["feature_task"] = grid.feature.map(origin)
        if random_seed is None:
            return grid
        random = random_direction_grid(lm, batches, layer, scale, random_seed)
        grid = pd.concat([grid.assign(seed=pd.NA), random], ignore_index=True)
        return grid.astype({"feature": "Int64", "seed": "Int64"})

    return cached_table(key, compute, refresh=refresh)


def own_feature_wins(grid: pd.DataFrame) -> pd.Series:
    """Per task row: is the strongest loss decrease given by a feature from that task (not
    another task's, nor the random direction)?"""
    out = {}
    for task, row in grid.groupby("task", sort=False):
        best = row.loc[row.relative_change.idxmin()]
        out[task] = bool(task in best.feature_task.split("+") and best.relative_change < 0)
    return pd.Series(out, name="own feature is the strongest decrease")


def own_vs_random(grid: pd.DataFrame) -> pd.DataFrame:
    """Per task row of a matrix with a random column (``random_seed``): the lowest relative
    loss change of the task's own feature(s), the random direction's, and whether the own
    feature's change is below the random direction's."""
    random = grid[grid.feature.isna()]
    if random.empty:
        raise ValueError("the matrix has no random-direction column: pass random_seed=0 to "
                         "run_steering_matrix")
    out = {}
    for task, row in grid[grid.feature.notna()].groupby("task", sort=False):
        own = row[row.feature_task.str.split("+").map(lambda tasks: task in tasks)]
        change = own.relative_change.min() if len(own) else float("nan")
        chance = random[random.task == task].relative_change.min()
        out[task] = {"own feature": change, "random direction": chance,
                     "own below random": bool(change < chance)}
    return pd.DataFrame.from_dict(out, orient="index")

