"""Notebooks 04 and 05: task vectors and detector vectors cleaned at every layer with an
SAE, the lambda sweep, and the reports on them."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Iterator

import pandas as pd
import torch

from ..cache import cached_table
from ..checks import FRACTION, check, check_config
from ..fingerprints import digest
from ..result_keys import result_key
from ..cleanup import CleanupConfig, cleanup, finished
from ..detectors import DETECTOR_CLEANUP, detector_vectors
from ..interventions import Steering
from ..scoring import score
from ..models import check_layers
from ..saes import SAEShelf, check_sae_site, load_sae, model_shelf
from ..prompt_batch import PromptBatch
from ..sae_views import decode
from ..taskvec import task_vectors
from .prompt_setup import (PromptConfig, TaskPrompts, build_task_prompts, layers_with_sae,
                           model_tasks, prompt_config)
from .runner import cleanup_settings, run_per_layer
from .schema import (AT_CLEANED_NORM, BASELINES, BEST_SCALED, CLEANED, DETECTOR, PURSUIT_START,
                     RANDOM, RAW, RECON, START_VIEWS, TUNED_TOP_COSINE, TUNED_TOP_ENCODING, TV,
                     ZERO_SHOT, method_label, score_row)

if TYPE_CHECKING:
    from ..controls import ControlsConfig

MIN_GAIN = 0.2      # a vector "works" at a layer when it lowers the NLL this much (relative)


def start_view(cfg: CleanupConfig) -> tuple[str, int | None]:
    """(view, k) of the vector a cleanup starts from: the SAE encoding or the pursuit code."""
    return (RECON, None) if cfg.init == "encoder" else (PURSUIT_START, cfg.pursuit_l0)



# a cleanup's features: each one active where it starts, its weight there ("start_weight":
# the SAE encoding's, or the pursuit's, as the "start" view says) and once cleaned
FEATURE_COLUMNS = {"task": "object", "layer": "int64", "feature": "int64", "start": "object",
                   "start_weight": "float64", "cleaned_weight": "float64"}


def clean_vectors(lm, name: str, label: str, vectors, layers, train: PromptBatch,
                  evaluate: PromptBatch, cfg: CleanupConfig, batch_size: int = 32,
                  seed: int = 0, saes: SAEShelf | None = None
                  ) -> Iterator[tuple[int, dict[str, pd.DataFrame]]]:
    """Score raw and cleaned versions of per-layer ``vectors``: yields (layer, its "scores"
    rows and the "features" weights) as each layer finishes.

    Views of the vector ``label`` (TV or detector): RAW, the cleanup's start decoded
    (``start_view(cfg)``: RECON, the SAE encoding, or PURSUIT_START) and CLEANED
    (scored on ``evaluate``, trained on ``train``). saes: the SAEs by layer (default: the
    preset's, loaded here).
    """
    view, k = start_view(cfg)
    saes = model_shelf(lm, saes)
    for layer, vector in zip(layers, vectors):
        sae = saes[layer]
        check_sae_site(sae, lm, layer)
        result = finished(cleanup(lm, sae, layer, vector, train, evaluate, cfg, seed))
        start = decode(sae, result.start_weights)
        rows = [score_row(name, label, RAW, layer,
                          score(lm, evaluate, Steering(layer, vector), batch_size), l0=None),
                score_row(name, label, view, layer,
                          score(lm, evaluate, Steering(layer, start), batch_size), k=k,
                          l0=int((result.start_weights > 0).sum())),
                score_row(name, label, CLEANED, layer, result.heldout_scores,
                          l0=int((result.weights > 0).sum()), steps=result.steps,
                          train_nll_start=result.nll[0], train_nll_end=result.nll[-1])]
        features = [{"task": name, "layer": layer, "feature": feature, "start": view,
                     "start_weight": result.start_weights[feature].item(),
                     "cleaned_weight": result.weights[feature].item()}
                    for feature in (result.start_weights > 0).nonzero().squeeze(-1).tolist()]
        yield layer, {"scores": pd.DataFrame(rows),
                      "features": pd.DataFrame(features, columns=list(FEATURE_COLUMNS))
                      .astype(FEATURE_COLUMNS)}


def cleanup_layers(lm, prompts: TaskPrompts, layers, cfg: CleanupConfig, batch_size: int = 32,
                   seed: int = 0, saes: SAEShelf | None = None
                   ) -> Iterator[tuple[int, dict[str, pd.DataFrame]]]:
    """TV, its SAE encoding and the cleaned TV at each layer (notebook 04), yielded per
    layer as it finishes: "scores" (the cleaned TV's NLL is on the evaluation prompts,
    never trained on) and "features" (the non-zero weights of the SAE encoding and of
    the cleaned vector)."""
    vectors = task_vectors(lm, prompts.few_shot, layers, batch_size=batch_size)
    return clean_vectors(lm, prompts.task.name, TV, vectors, layers, prompts.train,
                         prompts.zero_shot, cfg, batch_size, seed, saes)


def detector_layers(lm, prompts: TaskPrompts, layers, cfg: CleanupConfig,
                    batch_size: int = 32, seed: int = 0, saes: SAEShelf | None = None
                    ) -> Iterator[tuple[int, dict[str, pd.DataFrame]]]:
    """Detector vectors (answer tokens) raw and cleaned, steered at ``Y`` (notebook 05),
    yielded per layer as it finishes."""
    vectors = detector_vectors(lm, prompts.few_shot, layers, batch_size)
    return clean_vectors(lm, prompts.task.name, DETECTOR, vectors, layers,
                         prompts.detector_train, prompts.detector_eval, cfg, batch_size, seed,
                         saes)


def _run_cleaning(experiment: str, layers_of, lm, tasks, layers, prompt_cfg,
                  cfg: CleanupConfig, batch_size: int, refresh: bool,
                  baselines: str) -> dict[str, pd.DataFrame]:
    """Run ``layers_of`` (cleanup_layers or detector_layers) per (task, layer), cached."""
    check_config("cfg", cfg, CleanupConfig)
    prompt_cfg = prompt_cfg or prompt_config(lm)
    layers = layers_with_sae(lm, layers)
    saes = SAEShelf(lm.preset)              # each layer's SAE loaded once for every task
    return run_per_layer(experiment, lm, tasks, layers, prompt_cfg,
                         {"cleanup": cleanup_settings(cfg)},
                         lambda p, ls: layers_of(lm, p, ls, cfg, batch_size, prompt_cfg.seed,
                                                 saes),
                         refresh, baselines=baselines, baselines_part="scores",
                         batch_size=batch_size)


def run_cleanup_sweep(lm, tasks, layers=None, prompt_cfg: PromptConfig | None = None,
                      cfg: CleanupConfig = CleanupConfig(), batch_size: int = 32,
                      refresh: bool = False) -> dict[str, pd.DataFrame]:
    """TV, SAE encoding and cleaned TV (``cleanup_layers``) with the zero-shot baselines for
    each task, each (task, layer) cached; returns the "scores" and "features" tables."""
    return _run_cleaning("cleanup_sweep", cleanup_layers, lm, tasks, layers, prompt_cfg, cfg,
                         batch_size, refresh, "zero-shot")


def run_detector_sweep(lm, tasks, layers=None, prompt_cfg: PromptConfig | None = None,
                       cfg: CleanupConfig = DETECTOR_CLEANUP,
                       batch_size: int = 32, refresh: bool = False) -> dict[str, pd.DataFrame]:
    """Raw and cleaned detector vectors (``detector_layers``) with the detector baselines for
    each task, each (task, layer) cached (defaults: the authors' pursuit init, k=7)."""
    return _run_cleaning("detector_sweep", detector_layers, lm, tasks, layers, prompt_cfg,
                         cfg, batch_size, refresh, "detector")


def run_controls_sweep(lm, tasks, layers=None, prompt_cfg: PromptConfig | None = None,
                       cfg: CleanupConfig = CleanupConfig(),
                       controls: ControlsConfig | None = None, batch_size: int = 32,
                       refresh: bool = False) -> pd.DataFrame:
    """The controls of ``tvlib.controls`` beside each task's cleaned TV at each layer (on
    the cleanup's own training and held-out prompts), each (task, layer) cached.

    Runs (or reads) ``run_cleanup_sweep`` with the same settings and returns its "scores"
    rows (baselines, TV, its SAE encoding, the cleaned TV) followed by the controls' rows;
    ``controls``: a ``ControlsConfig`` (None: its defaults). The hand-picked features are
    tuned with ``cfg`` and the prompts' seed, as the cleanup was.
    """
    from ..controls import ControlsConfig, control_rows   # tvlib.controls reads .schema
    controls = ControlsConfig() if controls is None else controls
    check_config("controls", controls, ControlsConfig)
    prompt_cfg = prompt_cfg or prompt_config(lm)
    layers = layers_with_sae(lm, layers)
    cleaned = run_cleanup_sweep(lm, tasks, layers, prompt_cfg, cfg, batch_size, refresh)
    features = cleaned["features"]
    saes = SAEShelf(lm.preset)

    def compute(prompts: TaskPrompts, missing) -> Iterator[tuple[int, pd.DataFrame]]:
        name = prompts.task.name
        tvs = task_vectors(lm, prompts.few_shot, missing, batch_size=batch_size)
        for layer, tv in zip(missing, tvs):
            sae = saes[layer]
            kept = features[(features.task == name) & (features.layer == layer)]
            weights = torch.zeros(sae.cfg.d_sae)                            # (F,)
            weights[torch.tensor(kept.feature.tolist(), dtype=torch.long)] = torch.tensor(
                kept.cleaned_weight.tolist(), dtype=torch.float32)
            yield layer, control_rows(lm, sae, name, layer, tv, weights, prompts.train,
                                      prompts.zero_shot, cfg, controls, prompt_cfg.seed,
                                      batch_size)

    rows = run_per_layer("cleanup_controls", lm, tasks, layers, prompt_cfg,
                         {"cleanup": cleanup_settings(cfg), "controls": controls}, compute,
                         refresh, baselines=None)
    return pd.concat([cleaned["scores"], rows], ignore_index=True)


CONTROL_COLUMNS = {BEST_SCALED: "best-scaled TV nll", AT_CLEANED_NORM: "TV at cleaned norm nll",
                   TUNED_TOP_COSINE: "tuned top-cosine nll",
                   TUNED_TOP_ENCODING: "tuned top-encoding nll"}


def _refuse_repeats(rows: pd.DataFrame, column: str, fix: str) -> None:
    """Refuse rows that repeat a (task, layer, ``column``): a report would average them."""
    repeated = rows.duplicated(["task", "layer", column])
    if repeated.any():
        first = rows[repeated].iloc[0]
        raise ValueError(f"{int(repeated.sum())} rows repeat a (task, layer, method), e.g. "
                         f"({first.task!r}, {first.layer}, {first.method!r}): {fix}")


def controls_report(scores: pd.DataFrame) -> pd.DataFrame:
    """Per (task, layer), from ``run_controls_sweep``'s table: the cleaned TV's held-out NLL
    beside the TV, the zero-shot baseline and every control (random directions: mean and
    sample standard deviation over seeds), with the features cleanup kept (k) and the
    scale chosen on the training prompts."""
    layered = scores[scores.layer.notna()]
    _refuse_repeats(layered, "method", "pass the table of one run_controls_sweep")
    tv = layered[layered.vector == TV]
    missing = [v for v in (RAW, CLEANED, BEST_SCALED) if v not in set(tv.view)]
    if missing:
        raise ValueError(f"no rows of views {missing}: pass the table of run_controls_sweep")
    index = ["task", "layer"]
    view = lambda name: tv[tv.view == name].set_index(index)           # noqa: E731
    zero = scores[scores.view == ZERO_SHOT].drop_duplicates("task").set_index("task").nll
    cleaned, best = view(CLEANED), view(BEST_SCALED)
    report = pd.DataFrame({"features (cleaned)": cleaned.l0.astype(int)})
    report["zero-shot nll"] = [zero.get(task, float("nan")) for task, _ in report.index]
    report["TV nll"] = view(RAW).nll
    report["cleaned nll"] = cleaned.nll
    report["best scale"] = best.scale
    for name, column in CONTROL_COLUMNS.items():
        report[column] = view(name).nll
    random = layered[layered.vector == RANDOM].groupby(index).nll
    report["random nll (mean)"], report["random nll (sd)"] = random.mean(), random.std()
    return report.rename(index=int, level="layer")


def controls_summary(report: pd.DataFrame) -> str:
    """One line: for how many (task, layer) the cleaned TV's NLL is below each control's."""
    columns = {"TV nll": "TV", **{c: c.removesuffix(" nll") for c in CONTROL_COLUMNS.values()},
               "random nll (mean)": "random (mean)"}
    counts = [f"{name} {int((report['cleaned nll'] < report[column]).sum())}"
              f"/{int(report[column].notna().sum())}" for column, name in columns.items()]
    return "cleaned TV below: " + ", ".join(counts)


def cleanup_report(scores: pd.DataFrame, label: str = TV) -> pd.DataFrame:
    """Per (task, layer): features before/after cleanup and whether cleaned loss <= raw loss."""
    layered = scores[(scores.vector == label) & scores.layer.notna()]
    starts = layered[layered.view.isin(START_VIEWS)].drop_duplicates("method")
    if len(starts) != 1:
        raise ValueError(f"expected the rows of one cleanup start of {label!r}, found "
                         f"{starts.method.tolist()}: pass the scores of one cleaning sweep")
    start, view = starts.method.iloc[0], starts.view.iloc[0]
    start_name = "SAE encoding" if view == RECON else start.removesuffix(f" of {label}")
    _refuse_repeats(layered, "view", "pass the scores of one sweep (tables from several "
                    "sweeps would be averaged)")
    table = layered.pivot_table(index=["task", "layer"], columns="view",
                                values=["nll", "l0"], sort=False)
    report = pd.DataFrame({
        f"features ({start_name})": table[("l0", view)].astype(int),
        "features (cleaned)": table[("l0", CLEANED)].astype(int),
        f"{label} nll": table[("nll", RAW)],
        f"{start} nll": table[("nll", view)],
        "cleaned nll": table[("nll", CLEANED)]})
    report[f"cleaned <= {label}"] = report["cleaned nll"] <= report[f"{label} nll"]
    return report.rename(index=int, level="layer")       # layers print as 4, not 4.0


def earliest_effective_layer(scores: pd.DataFrame, vector: str, view: str, baseline: str,
                             min_gain: float | None = None) -> pd.Series:
    """Per task, the first layer where ``vector`` used as ``view`` (e.g. ``TV``,
    ``CLEANED``) lowers the NLL of ``baseline`` (e.g. ``ZERO_SHOT``) by ``min_gain``
    (relative; None: ``MIN_GAIN``). Rows are selected by the schema's columns, never by
    their labels."""
    min_gain = MIN_GAIN if min_gain is None else check(
        "min_gain", min_gain, FRACTION, "pass the relative NLL decrease that counts as "
        f"working, e.g. min_gain={MIN_GAIN} for 20% (or None)")
    steered_rows = scores[(scores.vector == vector) & (scores.view == view)]
    base_rows = scores[scores.view == baseline]
    if not len(steered_rows):
        pairs = sorted({(v, w) for v, w in zip(scores.vector, scores.view) if isinstance(v, str)})
        raise ValueError(f"no rows of vector {vector!r} as view {view!r}; the table has "
                         f"(vector, view) {pairs}")
    if baseline not in BASELINES or not len(base_rows):
        raise ValueError(f"no rows of baseline {baseline!r}; baselines are {list(BASELINES)}, "
                         f"the table has {sorted(set(scores.view) & set(BASELINES))}")
    out = {}
    for task, steered in steered_rows.groupby("task", sort=False):
        base = base_rows[base_rows.task == task].nll
        if len(base) != 1:
            raise ValueError(f"task {task!r} has {len(base)} rows of baseline {baseline!r}, not "
                             "one: pass the scores of one sweep (its baseline rows with it)")
        base = base.iloc[0]
        good = steered.sort_values("layer")
        good = good[good.nll <= (1 - min_gain) * base]
        out[task] = int(good.layer.iloc[0]) if len(good) else None
    return pd.Series(out, name=method_label(vector, view), dtype="object")


def top_cleaned_features(features: pd.DataFrame, layer: int, n: int = 1) -> dict[str, list]:
    """Per task, its ``n`` cleaned features with the largest weight at ``layer``."""
    rows = features[(features.layer == layer) & (features.cleaned_weight > 0)]
    return {task: g.nlargest(n, "cleaned_weight").feature.astype(int).tolist()
            for task, g in rows.groupby("task", sort=False)}


def lambda_sweep(lm, task, layer: int, lams, prompt_cfg: PromptConfig | None = None,
                 cfg: CleanupConfig = CleanupConfig(), refresh: bool = False) -> pd.DataFrame:
    """Held-out NLL and active features of the cleaned TV for several lambdas (cached)."""
    prompt_cfg = prompt_cfg or prompt_config(lm)
    check_layers(lm, [layer])
    task = next(iter(model_tasks(lm, [task]).values()))
    lams = list(lams) if hasattr(lams, "__iter__") else lams
    if not isinstance(lams, list) or not lams:
        raise ValueError(f"lams must be a non-empty list of lambdas, e.g. [0.01, 0.1], not "
                         f"{lams!r}")
    for lam in lams:
        replace(cfg, lam=lam)              # CleanupConfig refuses a bad lambda, naming it
    key = result_key("lambda_sweep", lm, [layer], task=digest(task), layer=layer, lams=lams,
                     prompts=prompt_cfg, cleanup=cleanup_settings(cfg))

    def compute():
        prompts = build_task_prompts(lm.tokenizer, task, prompt_cfg)
        sae = load_sae(lm.preset, layer)
        tv = task_vectors(lm, prompts.few_shot, [layer])[0]
        rows = []
        for lam in lams:
            result = finished(cleanup(lm, sae, layer, tv, prompts.train, prompts.zero_shot,
                                      replace(cfg, lam=lam), prompt_cfg.seed))
            rows.append({"task": task.name, "layer": layer, "lam": lam,
                         "l0": int((result.weights > 0).sum()), "nll": result.heldout_nll,
                         "accuracy": result.heldout_accuracy, "steps": result.steps})
        return pd.DataFrame(rows)

    return cached_table(key, compute, refresh=refresh)
