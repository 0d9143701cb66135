"""Controls beside "the cleaned vector works" (method.md section 7).

Each control is a vector scored on the same held-out prompts as the cleaned vector
(the cleanup's own split: it is trained on ``train`` and reported on ``heldout``);
nothing here ever chooses anything on ``heldout``.

- Scale (``scaled_tv_rows``, ``cleaned_norm_tv_row``): the TV times the scalar of a grid
  (``ControlsConfig.scales``, values below 1 included) with the lowest NLL on the
  *training* prompts (``choose_scale``); and the TV rescaled to the cleaned vector's
  norm. Cleanup also changes the vector's length; these ask whether that alone explains
  the gain.
- Random (``random_direction_rows``): random directions with the cleaned vector's norm,
  one per seed (``random_directions``); the report gives their mean and spread.
- Hand-picked features (``tuned_hand_picked_rows``), the interpretability-illusion
  control the writeup proposes: ``k`` features (k = as many as cleanup kept) picked by a
  rule that does not use the loss (``hand_picked_features``: the highest cosine between
  a decoder row and the TV, or the largest weights of the TV's SAE encoding), their
  weights then tuned by the cleanup itself restricted to them (``cleanup(...,
  support=...)``) with lambda 0 and no early stop (``tune_config``). If the cleanup's
  features were an illusion of tuning, loss-free picks tuned alike would do as well.

Every function returns tidy rows in the experiments' score schema
(``tvlib.experiments.schema``: ``task``, ``method``, ``vector``, ``view``, ``k``,
``layer``, ``nll``, ``accuracy``, ``n_prompts``, and columns of its own: ``scale``,
``seed``, ``train_nll``, ``l0``, ``steps``, ``features``). ``random_direction_grid``
gives notebook 06's steering matrix its random-direction column, in the matrix's
schema.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pandas as pd
import torch

from .checks import (FINITE, INT, NON_NEGATIVE, OPTIONAL_POSITIVE_INT, POSITIVE,
                     POSITIVE_INT, Rule, check, distinct, one_of, validate)
from .cleanup import CleanupConfig, check_support, cleanup, finished
from .interventions import Steering
from .scoring import score
from .models import d_model
from .experiments.schema import (AT_CLEANED_NORM, BEST_SCALED, RANDOM, SCALED, TUNED_TOP_COSINE,
                                 TUNED_TOP_ENCODING, TV, score_row)
from .prompt_batch import PromptBatch
from .sae_views import decode, encode

RULES = ("cosine", "encoding")          # how hand-picked features are picked
RULE_VIEWS = {"cosine": TUNED_TOP_COSINE, "encoding": TUNED_TOP_ENCODING}


@dataclass(frozen=True)
class ControlsConfig:
    """The controls' settings (the cleanup's own are its ``CleanupConfig``)."""

    scales: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)
    random_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)   # one random direction per seed
    rules: tuple[str, ...] = RULES                    # hand-picked features: RULES
    tune_steps: int | None = None     # Adam steps of the hand-picked tune; None: max_steps

    def __post_init__(self):
        validate(self, scales=distinct(NON_NEGATIVE), random_seeds=distinct(INT),
                 rules=distinct(one_of(RULES), allow_empty=True),
                 tune_steps=OPTIONAL_POSITIVE_INT)
        validate(self, scales=Rule(lambda s: 1 in s and any(x < 1 for x in s),
                                   "must include 1 (the TV itself) and a value below 1 (a "
                                   "cleaned vector may work by being shorter)"))


# ---------------------------------------------------------------- checks

def _check_vector(tv: torch.Tensor, d: int | None = None, what: str = "tv") -> None:
    if not isinstance(tv, torch.Tensor) or tv.dim() != 1 or (d is not None and len(tv) != d):
        shape = tuple(getattr(tv, "shape", ()))
        width = f"({d},)" if d is not None else "(d,)"
        raise ValueError(f"{what} must be one vector of shape {width}, not "
                         f"{type(tv).__name__} of shape {shape}: pass one task vector "
                         "(a row of task_vectors(...))")
    if not torch.isfinite(tv).all() or not tv.abs().sum() > 0:
        raise ValueError(f"{what} is zero or holds NaN or infinite values: pass a finite, "
                         "non-zero vector")


def _check_norm(norm) -> float:
    return float(check("norm", norm, Rule(POSITIVE.holds, "the cleaned vector's norm "
                                          + POSITIVE.text), "pass cleaned_vector.norm().item()"))


def _check_k(sae, k) -> int:
    width = sae.cfg.d_sae
    return int(check("k", k, Rule(lambda v: POSITIVE_INT.holds(v) and v <= width,
                                  f"the number of features to pick must be an int between 1 "
                                  f"and the SAE's {width}"), "pass the number cleanup kept"))


# ---------------------------------------------------------------- scale

def choose_scale(lm, layer: int, tv: torch.Tensor, train: PromptBatch,
                 scales=ControlsConfig.scales, batch_size: int = 32
                 ) -> tuple[float, dict[float, float]]:
    """The scale of ``scales`` whose ``scale * tv`` (d,) has the lowest mean NLL on
    ``train`` (the first of equals), and the training NLL of every scale. Sees no other
    prompts."""
    scales = ControlsConfig(scales=scales).scales
    _check_vector(tv)
    train_nll = {s: score(lm, train, Steering(layer, s * tv), batch_size).mean_nll()
                 for s in scales}
    return min(scales, key=lambda s: train_nll[s]), train_nll


def scaled_tv_rows(lm, task: str, layer: int, tv: torch.Tensor, train: PromptBatch,
                   heldout: PromptBatch, scales=ControlsConfig.scales, vector: str = TV,
                   batch_size: int = 32) -> pd.DataFrame:
    """``scale * tv`` for every scale (view SCALED) and at the scale chosen on ``train``
    (BEST_SCALED), scored on ``heldout``; ``train_nll`` is each scale's NLL on ``train``."""
    best, train_nll = choose_scale(lm, layer, tv, train, scales, batch_size)
    heldout_scores = {s: score(lm, heldout, Steering(layer, s * tv), batch_size)
                      for s in train_nll}
    rows = [score_row(task, vector, SCALED, layer, heldout_scores[s], scale=s,
                      train_nll=train_nll[s]) for s in train_nll]
    rows.append(score_row(task, vector, BEST_SCALED, layer, heldout_scores[best], scale=best,
                          train_nll=train_nll[best]))
    return pd.DataFrame(rows)


def cleaned_norm_tv_row(lm, task: str, layer: int, tv: torch.Tensor, norm: float,
                        heldout: PromptBatch, vector: str = TV,
                        batch_size: int = 32) -> pd.DataFrame:
    """``tv`` (d,) rescaled to ``norm`` (the cleaned vector's), scored on ``heldout``
    (view AT_CLEANED_NORM; ``scale`` = norm / ||tv||)."""
    _check_vector(tv)
    norm = _check_norm(norm)
    scale = norm / tv.norm().item()
    return pd.DataFrame([score_row(task, vector, AT_CLEANED_NORM, layer,
                                   score(lm, heldout, Steering(layer, scale * tv), batch_size),
                                   scale=scale)])


# ---------------------------------------------------------------- random directions

def random_directions(d: int, seeds) -> torch.Tensor:
    """(n_seeds, d) unit vectors, each drawn from N(0, I_d) with its own seed (CPU)."""
    seeds = ControlsConfig(random_seeds=seeds).random_seeds
    check("d", d, Rule(POSITIVE_INT.holds, "the width " + POSITIVE_INT.text),
          "pass the residual stream's width, d_model(lm)")
    rows = [torch.randn(d, generator=torch.Generator().manual_seed(seed)) for seed in seeds]
    directions = torch.stack(rows)                                        # (n, d)
    return directions / directions.norm(dim=-1, keepdim=True)


def random_direction_rows(lm, task: str, layer: int, norm: float, heldout: PromptBatch,
                          seeds=ControlsConfig.random_seeds,
                          batch_size: int = 32) -> pd.DataFrame:
    """One random direction per seed with norm ``norm`` (the cleaned vector's), scored on
    ``heldout``: vector RANDOM, view AT_CLEANED_NORM, column ``seed``."""
    norm = _check_norm(norm)
    seeds = ControlsConfig(random_seeds=seeds).random_seeds
    directions = random_directions(d_model(lm), seeds)                   # (n, d)
    return pd.DataFrame([
        score_row(task, RANDOM, AT_CLEANED_NORM, layer,
                  score(lm, heldout, Steering(layer, norm * direction), batch_size), seed=seed)
        for seed, direction in zip(seeds, directions)])


def random_direction_grid(lm, batches: dict[str, PromptBatch], layer: int, scale: float,
                          seed: int, batch_size: int = 256) -> pd.DataFrame:
    """Notebook 06's random column: one random unit direction (``seed``) times ``scale``, the
    features' scale, added as ``steering.steering_grid`` adds a feature; its rows in the
    grid's schema (``feature`` empty, ``feature_task`` RANDOM, column ``seed``)."""
    check("scale", scale, FINITE, "pass the features' scale, e.g. scale=20.0")
    if not isinstance(batches, dict) or not batches:
        raise ValueError("batches must be a non-empty dict {task name: PromptBatch}")
    direction = random_directions(d_model(lm), [seed])[0]                  # (d,)
    rows = []
    for task, batch in batches.items():
        base = score(lm, batch, batch_size=batch_size).nll.mean().item()  # as steering_grid
        loss = score(lm, batch, Steering(layer, scale * direction), batch_size).nll.mean().item()
        rows.append({"task": task, "feature": pd.NA, "loss": loss, "base_loss": base,
                     "relative_change": (loss - base) / base, "feature_task": RANDOM,
                     "seed": seed})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- hand-picked features

def hand_picked_features(sae, tv: torch.Tensor, k: int, rule: str) -> list[int]:
    """The ``k`` features a rule that does not use the loss picks for ``tv`` (d,), best first.

    "cosine": the highest cosine between the decoder row ``W_dec[i]`` and ``tv``;
    "encoding": the largest weights of the SAE encoding of ``tv`` (in the SAE's units),
    refused when it activates fewer than ``k`` features.
    """
    if rule not in RULES:
        raise ValueError(f"rule={rule!r} is unknown: pass one of {RULES}")
    k = _check_k(sae, k)
    _check_vector(tv, sae.cfg.d_in)
    if rule == "cosine":
        W = sae.W_dec.detach().float().cpu()                                # (F, d)
        x = tv.detach().float().cpu()                                       # (d,)
        norms = W.norm(dim=-1)                                              # (F,)
        cosine = (W @ x) / (norms.clamp(min=1e-12) * x.norm())              # (F,)
        cosine = cosine.masked_fill(norms == 0, -math.inf)   # a dead row has no direction
        return cosine.topk(k).indices.tolist()
    weights = encode(sae, tv)                                               # (F,)
    active = int((weights > 0).sum())
    if active < k:
        raise ValueError(f"the SAE encoding of tv activates {active} features, fewer than "
                         f"k={k}: pick at most {active} by rule 'encoding'")
    return weights.topk(k).indices.tolist()


def tune_config(cfg: CleanupConfig, steps: int | None = None) -> CleanupConfig:
    """The cleanup's settings for tuning given features: lambda 0 (no L1) and exactly
    ``steps`` Adam steps (None: ``cfg.max_steps``); no early stop, which watches L0."""
    steps = cfg.max_steps if steps is None else steps
    return replace(cfg, lam=0.0, max_steps=steps, patience=steps)


def tuned_hand_picked_rows(lm, sae, task: str, layer: int, tv: torch.Tensor, k: int,
                           train: PromptBatch, heldout: PromptBatch,
                           cfg: CleanupConfig = CleanupConfig(), rules=RULES,
                           steps: int | None = None, seed: int = 0,
                           vector: str = TV) -> pd.DataFrame:
    """For each rule, the ``k`` hand-picked features of ``tv`` (d,) tuned on ``train`` by
    the cleanup restricted to them with ``tune_config(cfg, steps)``, scored on ``heldout``.

    Rows (views TUNED_TOP_COSINE, TUNED_TOP_ENCODING) carry ``k``, ``features`` (the
    picks, comma-separated), ``l0`` (non-zero at the end), ``steps`` and the training
    NLL at the start and end.
    """
    rules = ControlsConfig(rules=rules).rules
    tune = tune_config(cfg, steps)
    rows, tuned = [], {}
    for rule in rules:
        picked = check_support(sae, hand_picked_features(sae, tv, k, rule))
        if frozenset(picked) not in tuned:        # two rules may pick the same features
            tuned[frozenset(picked)] = finished(cleanup(lm, sae, layer, tv, train, heldout,
                                                        tune, seed, support=picked))
        result = tuned[frozenset(picked)]
        view = RULE_VIEWS[rule]
        rows.append(score_row(task, vector, view, layer, result.heldout_scores, k=k,
                              features=",".join(map(str, picked)),
                              l0=int((result.weights > 0).sum()), steps=result.steps,
                              train_nll_start=result.nll[0], train_nll_end=result.nll[-1]))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- all of them

def control_rows(lm, sae, task: str, layer: int, tv: torch.Tensor,
                 cleaned_weights: torch.Tensor, train: PromptBatch, heldout: PromptBatch,
                 cfg: CleanupConfig = CleanupConfig(),
                 controls: ControlsConfig = ControlsConfig(), seed: int = 0,
                 batch_size: int = 32) -> pd.DataFrame:
    """Every control of ``tv`` (d,) beside its cleanup, whose final weights are
    ``cleaned_weights`` (F,) (cleaned vector ``decode(cleaned_weights)``, k = its non-zero
    count): scale, random and, when k >= 1, the hand-picked features tuned with ``cfg``
    (the cleanup's settings) and ``seed`` (the cleanup's)."""
    _check_vector(tv, sae.cfg.d_in)
    if not isinstance(cleaned_weights, torch.Tensor) or cleaned_weights.shape != (sae.cfg.d_sae,):
        raise ValueError(f"cleaned_weights must be the cleanup's weights, shape "
                         f"({sae.cfg.d_sae},), not {tuple(getattr(cleaned_weights, 'shape', ()))}")
    norm = decode(sae, cleaned_weights).norm().item()
    k = int((cleaned_weights > 0).sum())
    parts = [scaled_tv_rows(lm, task, layer, tv, train, heldout, controls.scales,
                            batch_size=batch_size),
             cleaned_norm_tv_row(lm, task, layer, tv, norm, heldout, batch_size=batch_size),
             random_direction_rows(lm, task, layer, norm, heldout, controls.random_seeds,
                                   batch_size)]
    if k >= 1 and controls.rules:
        parts.append(tuned_hand_picked_rows(lm, sae, task, layer, tv, k, train, heldout, cfg,
                                            controls.rules, controls.tune_steps, seed))
    return pd.concat(parts, ignore_index=True)
