"""Notebook 06: the (task x feature) steering matrix of single cleaned features."""

from __future__ import annotations

import pandas as pd

from ..cache import cached_table, digest, result_key
from ..models import check_layers
from ..saes import load_sae
from ..detectors import DETECTOR_SCALE
from ..steering import TASK_SCALE, steering_grid
from .prompt_setup import PromptConfig, build_task_prompts, model_tasks, prompt_config


def run_steering_matrix(lm, tasks, layer: int, features_by_task: dict[str, list],
                        prompt_cfg: PromptConfig | None = None, scale: float | None = None,
                        detectors: bool = False, refresh: bool = False) -> pd.DataFrame:
    """Relative loss change for every (task, feature), steering with one feature at a time.

    Task features are added at the separator of zero-shot prompts; with
    ``detectors`` at ``Y`` of one-shot detector prompts. ``feature_task`` names the
    task(s) whose cleaned vector the feature came from, joined by "+" when a
    feature was kept for several tasks. ``scale`` None: the writeup's (``TASK_SCALE``,
    or ``DETECTOR_SCALE`` with ``detectors``).
    """
    prompt_cfg = prompt_cfg or prompt_config(lm)
    if scale is None:
        scale = DETECTOR_SCALE if detectors else TASK_SCALE
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
                     layer=layer, features_by_task=features_by_task, scale=scale,
                     detectors=detectors, prompts=prompt_cfg)

    def compute():
        batches = {}
        for name, task in loaded.items():
            prompts = build_task_prompts(lm.tokenizer, task, prompt_cfg)
            batches[name] = prompts.detector_eval if detectors else prompts.zero_shot
        sae = load_sae(lm.preset, layer)
        grid = steering_grid(lm, batches, layer, sae, features, scale)
        grid["feature_task"] = grid.feature.map(origin)
        return grid

    return cached_table(key, compute, refresh=refresh)


def own_feature_wins(grid: pd.DataFrame) -> pd.Series:
    """Per task row: is the strongest loss decrease given by a feature from that task?"""
    out = {}
    for task, row in grid.groupby("task", sort=False):
        best = row.loc[row.relative_change.idxmin()]
        out[task] = bool(task in best.feature_task.split("+") and best.relative_change < 0)
    return pd.Series(out, name="own feature is the strongest decrease")
