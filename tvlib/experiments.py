"""The experiments behind the notebooks, each returning a tidy table.

Every table has one row per (task, method, layer) with columns ``nll``,
``accuracy`` and ``n_prompts``; baselines that do not depend on the layer
(zero-shot, ICL) have an empty layer.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd

from .cache import cached_table, cached_tables, digest, result_key
from .cleanup import CleanupConfig, cleanup
from .models import check_layers, check_sae_site, load_sae, n_layers
from .prompts import (PromptBatch, detector_prompts, few_shot_prompts, get_format,
                      tokenize_prompts, zero_shot_prompts)
from .sae_views import decode, encode, ito, recon_of_tv, tv_on_recon
from .steering import steering_grid
from .taskvec import Steering, collect_residuals, detector_vectors, score, task_vectors
from .tasks import Task, TaskDataError, load_task


@dataclass(frozen=True)
class PromptConfig:
    """How a task's pairs become few-shot and evaluation prompts."""

    n_prompts: int = 16        # few-shot prompts for the task vector and ICL
    n_shots: int = 8           # demonstrations per few-shot prompt
    n_eval: int = 50           # zero-shot evaluation prompts (pairs held apart)
    n_train: int = 24          # zero-shot prompts that cleanup optimises on (from the pool)
    fmt: str = "authors"
    n_first: int = 2           # answer tokens scored
    seed: int = 0

    def __post_init__(self):
        for name in ("n_prompts", "n_shots", "n_eval", "n_train", "n_first"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PromptConfig.{name} must be a positive int, not {value!r}"
                                 + (" (a task vector needs demonstrations; zero-shot prompts "
                                    "are built separately)" if name == "n_shots" else ""))
        if not isinstance(self.fmt, str):
            raise ValueError(f"PromptConfig.fmt must be a format name, not {self.fmt!r}")
        try:
            get_format(self.fmt)
        except ValueError as err:       # names the known formats
            raise ValueError(f"PromptConfig.fmt: {err}") from None
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"PromptConfig.seed must be an int, not {self.seed!r}")


@dataclass
class TaskPrompts:
    task: Task
    few_shot: PromptBatch      # demonstrations + query, answer appended
    zero_shot: PromptBatch     # evaluation pairs, answer appended
    train: PromptBatch         # zero-shot prompts for optimisation, disjoint from evaluation
    detector_eval: PromptBatch   # one-shot "X -> Y" prompts on the evaluation pairs
    detector_train: PromptBatch  # the same on the optimisation pairs


def model_tasks(lm, tasks) -> dict[str, Task]:
    """Tasks by name or path, or as loaded ``Task`` objects (e.g. ``load_task(path,
    duplicates="first")``), keeping only the pairs the model's preset knows (all,
    for real models)."""
    if isinstance(tasks, (str, Path, Task)) or not hasattr(tasks, "__iter__"):
        raise TaskDataError(f"tasks must be a list, e.g. ['antonyms'], not {tasks!r}")
    tasks = [t if isinstance(t, Task) else load_task(t) for t in tasks]
    if not tasks:
        raise TaskDataError("no tasks given: pass at least one task name, e.g. ['antonyms']")
    by_name = {}
    for task in tasks:
        if task.name in by_name:
            raise TaskDataError(f"task {task.name!r} is given twice: list each task once")
        by_name[task.name] = task.head(lm.preset.max_pairs_per_task)
    return by_name


def layers_with_sae(lm, layers) -> list[int]:
    """``layers`` checked to have an SAE; None: every resid_pre layer with one."""
    available = list(lm.preset.resid_pre_layers_with_sae())
    if layers is None:
        return available
    layers = check_layers(lm, layers)
    missing = [layer for layer in layers if layer not in available]
    if missing:
        raise ValueError(f"preset {lm.preset.name!r} has no SAE at resid_pre layers {missing}; "
                         f"SAEs exist at {available}")
    return layers


def start_method(label: str, cfg: CleanupConfig) -> str:
    """The name of the vector a cleanup starts from: the SAE encoding or the pursuit code."""
    if cfg.init == "encoder":
        return f"Recon of {label}"
    return f"pursuit start (L0={cfg.pursuit_l0}) of {label}"


def _results_config(cfg: CleanupConfig) -> dict:
    """The cleanup settings that change results (the progress bar does not)."""
    return {k: v for k, v in asdict(cfg).items() if k != "progress"}


def _positive_ints(name: str, values) -> list[int]:
    values = list(values) if hasattr(values, "__iter__") and not isinstance(values, str) \
        else None
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                         for v in values):
        raise ValueError(f"{name} must be a non-empty list of positive ints, e.g. [5, 10, 20]")
    return values


def split_eval(task: Task, cfg: PromptConfig) -> tuple[list, list]:
    """(pool, eval_pairs): evaluation pairs never serve as demonstrations or queries."""
    pairs = list(task.pairs)
    random.Random(f"eval-split-{task.name}-{cfg.seed}").shuffle(pairs)
    pool = len(pairs) - cfg.n_eval
    if pool < max(cfg.n_shots + 1, cfg.n_train):
        raise TaskDataError(
            f"task {task.name!r} has {len(pairs)} pairs: n_eval={cfg.n_eval} evaluation pairs "
            f"leave {pool}, fewer than the {max(cfg.n_shots + 1, cfg.n_train)} needed for "
            f"n_shots={cfg.n_shots} demonstrations plus a query and n_train={cfg.n_train} "
            "training prompts; lower n_eval, n_shots or n_train")
    return pairs[cfg.n_eval:], pairs[:cfg.n_eval]


def build_task_prompts(tokenizer, task: Task, cfg: PromptConfig) -> TaskPrompts:
    pool, eval_pairs = split_eval(task, cfg)
    # An input with several outputs (peers' files) stays on the evaluation side only.
    held_out = {x for x, _ in eval_pairs}
    pool = [pair for pair in pool if pair[0] not in held_out]
    if len(pool) < max(cfg.n_shots + 1, cfg.n_train):
        raise TaskDataError(
            f"task {task.name!r}: {len(pool)} pairs are left for demonstrations once inputs "
            f"shared with evaluation pairs are set aside, fewer than n_shots + 1 = "
            f"{cfg.n_shots + 1} or n_train = {cfg.n_train}; "
            "lower n_eval, n_shots or n_train, or load the task with duplicates='first'")
    few = few_shot_prompts(task, cfg.n_prompts, cfg.n_shots, cfg.seed, cfg.fmt,
                           queries=pool, demo_pool=pool)
    zero = zero_shot_prompts(eval_pairs, cfg.fmt, task=task)
    train = zero_shot_prompts(pool[:cfg.n_train], cfg.fmt, task=task)
    detector_eval = detector_prompts(eval_pairs, cfg.fmt, task=task)
    detector_train = detector_prompts(pool[:cfg.n_train], cfg.fmt, task=task)
    return TaskPrompts(task, *(tokenize_prompts(tokenizer, p, cfg.n_first)
                               for p in (few, zero, train, detector_eval, detector_train)))


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
    layers = list(range(n_layers(lm))) if layers is None else check_layers(lm, layers)
    settings = {"layers": layers, "positions": positions, "mode": mode}
    table = run_per_task("task_vector_sweep", lm, tasks, prompt_cfg or PromptConfig(), settings,
                         lambda p: task_vector_sweep(lm, p, layers, positions, mode, batch_size),
                         refresh)
    table.loc[table.method == "TV", "method"] = tv_method(mode, positions)
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
    later = [t[~t.method.isin(["zero-shot", "ICL"])] for t in tables[1:]]
    return pd.concat([tables[0], *later], ignore_index=True)


def tv_method(mode: str = "add", positions: str = "all") -> str:
    """The method label of a task vector: "TV" as the writeup builds and applies it (mean
    of every separator, added), else e.g. "TV (replace, last)" (Hendel et al.)."""
    return "TV" if (mode, positions) == ("add", "all") else f"TV ({mode}, {positions})"


def run_sae_view_sweep(lm, tasks, layers=None, prompt_cfg: PromptConfig | None = None,
                       target_l0: int = 40, subtract_b_dec: bool = False, batch_size: int = 32,
                       refresh: bool = False) -> pd.DataFrame:
    """``sae_view_sweep`` for each task at every layer with an SAE (default)."""
    layers = layers_with_sae(lm, layers)
    settings = {"layers": layers, "target_l0": target_l0, "subtract_b_dec": subtract_b_dec}
    return run_per_task("sae_view_sweep", lm, tasks, prompt_cfg or PromptConfig(), settings,
                        lambda p: sae_view_sweep(lm, p, layers, target_l0, subtract_b_dec,
                                                 batch_size), refresh, sae_layers=layers)


def separator_residuals(lm, few_shot: PromptBatch, layers, batch_size: int = 32):
    """(L, B, S, d) resid_pre at every separator, NaN where absent."""
    return collect_residuals(lm, few_shot.model_inputs(), layers, few_shot.separator_pos,
                             batch_size)


def sae_view_sweep(lm, prompts: TaskPrompts, layers, target_l0: int = 40,
                   subtract_b_dec: bool = False, batch_size: int = 32) -> pd.DataFrame:
    """TV, Recon of TV, TV on recon and ITO at each layer, plus baselines (notebook 02)."""
    name = prompts.task.name
    rows = [_row(name, "zero-shot", None, score(lm, prompts.zero_shot, batch_size=batch_size)),
            _row(name, "ICL", None, score(lm, prompts.few_shot, batch_size=batch_size))]
    resid = separator_residuals(lm, prompts.few_shot, layers, batch_size)   # (L, B, S, d)
    for layer, layer_resid in zip(layers, resid):
        sae = load_sae(lm.preset, layer)
        check_sae_site(sae, lm, layer)
        tv = layer_resid.flatten(0, 1).nanmean(0)                            # (d,)
        views = {"TV": tv, "Recon of TV": recon_of_tv(sae, tv, layer),
                 "TV on recon": tv_on_recon(sae, layer_resid, layer),
                 f"ITO (L0={target_l0})": ito(sae, tv, layer, target_l0, subtract_b_dec)[0]}
        for method, vector in views.items():
            steered = score(lm, prompts.zero_shot, Steering(layer, vector), batch_size)
            rows.append(_row(name, method, layer, steered))
    return pd.DataFrame(rows)


def ito_sweep(lm, prompts: TaskPrompts, sae, layer: int, target_l0s, subtract_b_dec=False,
              batch_size: int = 32) -> pd.DataFrame:
    """Loss and active features of ITO for several target L0 at one layer (notebook 03).

    Rows: TV, Recon of TV (its L0 is the SAE encoding's) and ITO per target L0.
    """
    check_sae_site(sae, lm, layer)
    name = prompts.task.name
    tv = task_vectors(lm, prompts.few_shot, [layer], batch_size=batch_size)[0]
    code = encode(sae, tv)
    views = [("TV", None, None, tv), ("Recon of TV", None, int((code > 0).sum()),
                                      decode(sae, code))]
    for k in target_l0s:
        vector, result = ito(sae, tv, layer, k, subtract_b_dec)
        views.append(("ITO", k, int((result.weights > 0).sum()), vector))
    rows = []
    for method, k, l0, vector in views:
        scores = score(lm, prompts.zero_shot, Steering(layer, vector.detach()), batch_size)
        rows.append({**_row(name, method, layer, scores), "target_l0": k, "l0": l0})
    return pd.DataFrame(rows)


def run_ito_sweep(lm, tasks, layer: int, target_l0s, prompt_cfg: PromptConfig | None = None,
                  subtract_b_dec: bool = False, batch_size: int = 32,
                  refresh: bool = False) -> pd.DataFrame:
    """``ito_sweep`` for each task at ``layer``, cached."""
    check_layers(lm, [layer])
    target_l0s = _positive_ints("target_l0s", target_l0s)
    sae = load_sae(lm.preset, layer)
    settings = {"layer": layer, "target_l0s": target_l0s, "subtract_b_dec": subtract_b_dec}
    return run_per_task("ito_sweep", lm, tasks, prompt_cfg or PromptConfig(), settings,
                        lambda p: ito_sweep(lm, p, sae, layer, target_l0s, subtract_b_dec,
                                            batch_size), refresh, sae_layers=[layer])


def first_pursuit_features(lm, tasks, sae, layer: int, n_features: int, density,
                           prompt_cfg: PromptConfig | None = None,
                           subtract_b_dec: bool = False) -> pd.DataFrame:
    """The features gradient pursuit picks first for each task's TV, with their density."""
    prompt_cfg = prompt_cfg or PromptConfig()
    check_sae_site(sae, lm, layer)
    rows = []
    for name, task in model_tasks(lm, tasks).items():
        prompts = build_task_prompts(lm.tokenizer, task, prompt_cfg)
        tv = task_vectors(lm, prompts.few_shot, [layer])[0]
        _, pursuit = ito(sae, tv, layer, n_features, subtract_b_dec)
        for rank, feature in enumerate(pursuit.order[0].tolist()):
            rows.append({"task": name, "rank": rank, "feature": feature,
                         "weight": pursuit.weights[0, feature].item(),
                         "density": density[feature].item()})
    return pd.DataFrame(rows)


def clean_vectors(lm, name: str, label: str, vectors, layers, train: PromptBatch,
                  evaluate: PromptBatch, cfg: CleanupConfig, batch_size: int = 32,
                  seed: int = 0) -> tuple[list, list]:
    """Score raw and cleaned versions of per-layer ``vectors``; rows and feature weights.

    Methods: ``label`` (the raw vector), the cleanup's start decoded
    (``start_method(label, cfg)``: "Recon of {label}", the SAE encoding, or the
    gradient-pursuit start) and "cleaned {label}" (scored on ``evaluate``,
    trained on ``train``).
    """
    start = start_method(label, cfg)
    rows, features = [], []
    for layer, vector in zip(layers, vectors):
        sae = load_sae(lm.preset, layer)
        check_sae_site(sae, lm, layer)
        result = cleanup(lm, sae, layer, vector, train, evaluate, cfg, seed)
        rows.append({**_row(name, label, layer, score(lm, evaluate, Steering(layer, vector),
                                                      batch_size)), "l0": None})
        rows.append({**_row(name, start, layer, score(
            lm, evaluate, Steering(layer, decode(sae, result.initial_weights)), batch_size)),
            "l0": int((result.initial_weights > 0).sum())})
        rows.append({"task": name, "method": f"cleaned {label}", "layer": layer,
                     "nll": result.heldout_nll, "accuracy": result.heldout_accuracy,
                     "n_prompts": len(evaluate), "l0": int((result.weights > 0).sum()),
                     "steps": result.steps, "train_nll_start": result.nll[0],
                     "train_nll_end": result.nll[-1]})
        for feature in (result.initial_weights > 0).nonzero().squeeze(-1).tolist():
            features.append({"task": name, "layer": layer, "feature": feature,
                             "recon_weight": result.initial_weights[feature].item(),
                             "cleaned_weight": result.weights[feature].item()})
    return rows, features


def cleanup_sweep(lm, prompts: TaskPrompts, layers, cfg: CleanupConfig,
                  batch_size: int = 32, seed: int = 0) -> dict[str, pd.DataFrame]:
    """TV and cleaned TV at each layer, plus baselines (notebook 04).

    Returns "scores" (one row per task, method, layer; the cleaned TV's NLL is
    on the evaluation prompts, never trained on) and "features" (the non-zero
    feature weights of the SAE encoding and of the cleaned vector).
    """
    name = prompts.task.name
    rows = [_row(name, "zero-shot", None, score(lm, prompts.zero_shot, batch_size=batch_size)),
            _row(name, "ICL", None, score(lm, prompts.few_shot, batch_size=batch_size))]
    vectors = task_vectors(lm, prompts.few_shot, layers, batch_size=batch_size)
    cleaned, features = clean_vectors(lm, name, "TV", vectors, layers, prompts.train,
                                      prompts.zero_shot, cfg, batch_size, seed)
    return {"scores": pd.DataFrame(rows + cleaned), "features": pd.DataFrame(features)}


def detector_sweep(lm, prompts: TaskPrompts, layers, cfg: CleanupConfig,
                   batch_size: int = 32, seed: int = 0) -> dict[str, pd.DataFrame]:
    """Detector vectors (answer tokens) raw and cleaned, steered at ``Y`` (notebook 05)."""
    name = prompts.task.name
    rows = [_row(name, "one-shot (X -> Y)", None, score(lm, prompts.detector_eval,
                                                        batch_size=batch_size)),
            _row(name, "ICL", None, score(lm, prompts.few_shot, batch_size=batch_size))]
    vectors = detector_vectors(lm, prompts.few_shot, layers, batch_size)
    cleaned, features = clean_vectors(lm, name, "detector", vectors, layers,
                                      prompts.detector_train, prompts.detector_eval, cfg,
                                      batch_size, seed)
    return {"scores": pd.DataFrame(rows + cleaned), "features": pd.DataFrame(features)}


def _run_cleaning(experiment: str, sweep, lm, tasks, layers, prompt_cfg, cfg: CleanupConfig,
                  batch_size: int, refresh: bool) -> dict[str, pd.DataFrame]:
    """Run a cleaning ``sweep`` (cleanup_sweep or detector_sweep) per task, cached."""
    prompt_cfg = prompt_cfg or PromptConfig()
    layers = layers_with_sae(lm, layers)
    settings = {"layers": layers, "cleanup": _results_config(cfg)}
    return run_per_task(experiment, lm, tasks, prompt_cfg, settings,
                        lambda p: sweep(lm, p, layers, cfg, batch_size, prompt_cfg.seed),
                        refresh, sae_layers=layers)


def run_cleanup_sweep(lm, tasks, layers=None, prompt_cfg: PromptConfig | None = None,
                      cfg: CleanupConfig = CleanupConfig(), batch_size: int = 32,
                      refresh: bool = False) -> dict[str, pd.DataFrame]:
    """``cleanup_sweep`` for each task, cached; returns the "scores" and "features" tables."""
    return _run_cleaning("cleanup_sweep", cleanup_sweep, lm, tasks, layers, prompt_cfg, cfg,
                         batch_size, refresh)


def run_detector_sweep(lm, tasks, layers=None, prompt_cfg: PromptConfig | None = None,
                       cfg: CleanupConfig = CleanupConfig(init="pursuit", lam=5e-4),
                       batch_size: int = 32, refresh: bool = False) -> dict[str, pd.DataFrame]:
    """``detector_sweep`` for each task, cached (defaults: the authors' pursuit init, k=7)."""
    return _run_cleaning("detector_sweep", detector_sweep, lm, tasks, layers, prompt_cfg, cfg,
                         batch_size, refresh)


def earliest_effective_layer(scores: pd.DataFrame, method: str, baseline: str,
                             min_gain: float = 0.2) -> pd.Series:
    """Per task, the first layer where ``method`` lowers the baseline NLL by ``min_gain`` (relative)."""
    for name in (method, baseline):
        if name not in set(scores.method):
            raise ValueError(f"no rows of method {name!r}; the table has {sorted(set(scores.method))}")
    out = {}
    for task, group in scores.groupby("task", sort=False):
        base = group[group.method == baseline].nll.iloc[0]
        steered = group[group.method == method].sort_values("layer")
        good = steered[steered.nll <= (1 - min_gain) * base]
        out[task] = int(good.layer.iloc[0]) if len(good) else None
    return pd.Series(out, name=method, dtype="object")


def top_cleaned_features(features: pd.DataFrame, layer: int, n: int = 1) -> dict[str, list]:
    """Per task, its ``n`` cleaned features with the largest weight at ``layer``."""
    rows = features[(features.layer == layer) & (features.cleaned_weight > 0)]
    return {task: g.nlargest(n, "cleaned_weight").feature.astype(int).tolist()
            for task, g in rows.groupby("task", sort=False)}


def run_steering_matrix(lm, tasks, layer: int, features_by_task: dict[str, list],
                        prompt_cfg: PromptConfig | None = None, scale: float = 20.0,
                        detectors: bool = False, refresh: bool = False) -> pd.DataFrame:
    """Relative loss change for every (task, feature), steering with one feature at a time.

    Task features are added at the separator of zero-shot prompts; with
    ``detectors`` at ``Y`` of one-shot detector prompts. ``feature_task`` names the
    task(s) whose cleaned vector the feature came from, joined by "+" when a
    feature was kept for several tasks.
    """
    prompt_cfg = prompt_cfg or PromptConfig()
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


def cleanup_report(scores: pd.DataFrame, label: str = "TV") -> pd.DataFrame:
    """Per (task, layer): features before/after cleanup and whether cleaned loss <= raw loss."""
    layered = scores.dropna(subset=["layer"])
    starts = [m for m in layered.method.unique() if m == f"Recon of {label}"
              or (m.startswith("pursuit start") and m.endswith(f" of {label}"))]
    if len(starts) != 1:
        raise ValueError(f"expected the rows of one cleanup start of {label!r}, found {starts}: "
                         "pass the scores of one cleaning sweep")
    start = starts[0]
    start_name = "SAE encoding" if start.startswith("Recon") else start.removesuffix(f" of {label}")
    repeated = layered.duplicated(["task", "layer", "method"])
    if repeated.any():
        first = layered[repeated].iloc[0]
        raise ValueError(f"{int(repeated.sum())} rows repeat a (task, layer, method), e.g. "
                         f"({first.task!r}, {first.layer}, {first.method!r}): pass the scores of "
                         "one sweep (tables from several sweeps would be averaged)")
    table = layered.pivot_table(index=["task", "layer"], columns="method",
                                values=["nll", "l0"], sort=False)
    report = pd.DataFrame({
        f"features ({start_name})": table[("l0", start)].astype(int),
        "features (cleaned)": table[("l0", f"cleaned {label}")].astype(int),
        f"{label} nll": table[("nll", label)],
        f"{start} nll": table[("nll", start)],
        "cleaned nll": table[("nll", f"cleaned {label}")]})
    report[f"cleaned <= {label}"] = report["cleaned nll"] <= report[f"{label} nll"]
    return report


def lambda_sweep(lm, task, layer: int, lams, prompt_cfg: PromptConfig | None = None,
                 cfg: CleanupConfig = CleanupConfig(), refresh: bool = False) -> pd.DataFrame:
    """Held-out NLL and active features of the cleaned TV for several lambdas (cached)."""
    prompt_cfg = prompt_cfg or PromptConfig()
    check_layers(lm, [layer])
    task = next(iter(model_tasks(lm, [task]).values()))
    lams = list(lams) if hasattr(lams, "__iter__") else lams
    if not isinstance(lams, list) or not lams:
        raise ValueError(f"lams must be a non-empty list of lambdas, e.g. [0.01, 0.1], not "
                         f"{lams!r}")
    for lam in lams:
        replace(cfg, lam=lam)              # CleanupConfig refuses a bad lambda, naming it
    key = result_key("lambda_sweep", lm, [layer], task=digest(task), layer=layer, lams=lams,
                     prompts=prompt_cfg, cleanup=_results_config(cfg))

    def compute():
        prompts = build_task_prompts(lm.tokenizer, task, prompt_cfg)
        sae = load_sae(lm.preset, layer)
        tv = task_vectors(lm, prompts.few_shot, [layer])[0]
        rows = []
        for lam in lams:
            result = cleanup(lm, sae, layer, tv, prompts.train, prompts.zero_shot,
                             replace(cfg, lam=lam), prompt_cfg.seed)
            rows.append({"task": task.name, "layer": layer, "lam": lam,
                         "l0": int((result.weights > 0).sum()), "nll": result.heldout_nll,
                         "accuracy": result.heldout_accuracy, "steps": result.steps})
        return pd.DataFrame(rows)

    return cached_table(key, compute, refresh=refresh)


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


def summarise_sweep(results: pd.DataFrame, layered_method: str = "TV") -> pd.DataFrame:
    """Per task: the baselines and ``layered_method`` at its best (lowest-NLL) layer."""
    if layered_method not in set(results.method):
        raise ValueError(f"no rows of method {layered_method!r}; the table has "
                         f"{sorted(set(results.method))}")
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
