"""Loss-guided sparse cleanup of a task vector in SAE features (method.md section 3).

Parameters theta (one per SAE feature) start at the SAE encoder's
pre-activations of the task vector, so that the initial weights equal the SAE
encoding exactly. Each step the weights w = act(theta) give a steering vector
v = decode(w) = w W_dec + b_dec, added at layer L at the steer token of a fixed
set of training prompts; the loss is the answer NLL (first 2 tokens) plus
lambda * L1(w). Adam, early stopping when L0 has not reached a new minimum for
``patience`` steps. The activation, the start and the units of lr and lambda
(``CleanupConfig.activation``, ``init``, ``units``) are ``tvlib.feature_weights``'.

Speed: what the vector does not change (the blocks before L, the tokens before
the steer token, the unembedding at unscored positions) is computed once or not
at all (``tvlib.steered_loss``); prompts are tokenised once.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .checks import FLAG, NON_NEGATIVE, POSITIVE, POSITIVE_INT, one_of, validate
from .interventions import Steering
from .scoring import Scores, check_scored, score
from .feature_weights import (ACTIVATIONS, INITS, UNITS, activation_function, feature_units,
                              initial_theta)
from .models import check_layer, require_local
from .saes import check_sae_site
from .sae_views import check_features
from .prompt_batch import PromptBatch
from .pursuit import SELECTIONS
from .steered_loss import SteeredNLL


@dataclass(frozen=True)
class CleanupConfig:
    lam: float = 0.02            # L1 coefficient (method.md: 0.02 default, ~0.05 on Gemma)
    lr: float = 1e-2             # Adam's step, in the units below
    max_steps: int = 1000
    patience: int = 200          # stop when L0 has no new minimum for this many steps
    init: str = "encoder"        # "encoder" pre-activations, or "pursuit" weights
    pursuit_l0: int = 7          # target L0 of the "pursuit" initialisation
    pursuit_selection: str = "inactive"   # pursuit's pick rule (tvlib.pursuit): or "all"
    activation: str = "sae"      # the SAE's own activation (gate, threshold), or "relu"
    units: str = "norm_scaled"   # of lr and L1: "norm_scaled" (any model), or "sae" (authors)
    progress: bool = True

    def __post_init__(self):
        validate(self, lam=NON_NEGATIVE, lr=POSITIVE, max_steps=POSITIVE_INT,
                 patience=POSITIVE_INT, pursuit_l0=POSITIVE_INT, init=one_of(INITS),
                 pursuit_selection=one_of(SELECTIONS), activation=one_of(ACTIVATIONS),
                 units=one_of(UNITS), progress=FLAG)


@dataclass
class CleanupResult:
    weights: torch.Tensor        # (F,) final feature weights, non-negative
    vector: torch.Tensor         # (d,) the cleaned steering vector, decode(weights)
    start_weights: torch.Tensor  # (F,) where it starts: the SAE encoding, or the pursuit's
    loss: list[float] = field(default_factory=list)   # total loss per step
    nll: list[float] = field(default_factory=list)    # training NLL per step
    l0: list[int] = field(default_factory=list)       # active features per step
    heldout_scores: Scores | None = None   # the cleaned vector on the held-out prompts
    stopped_early: bool = False
    # stopped by an interrupt (Ctrl-C, a notebook's stop button): the weights are those of
    # the last finished step; not a finished cleanup, so sweeps never cache it
    interrupted: bool = False

    @property
    def steps(self) -> int:
        return len(self.loss)

    @property
    def heldout_nll(self) -> float:
        return math.nan if self.heldout_scores is None else self.heldout_scores.mean_nll()

    @property
    def heldout_accuracy(self) -> float:
        return math.nan if self.heldout_scores is None else self.heldout_scores.accuracy()


def _close_bar(bar, result: CleanupResult, cfg: CleanupConfig) -> None:
    """End the progress bar saying why the cleanup stopped. The early stop is the normal
    end, shown as a full bar (a notebook colours a bar closed short of its total red);
    an interrupt or an error stays short (red)."""
    if result.stopped_early:
        reason = f"no new L0 minimum in {cfg.patience} steps"
    elif result.interrupted:
        reason = "interrupted"
    else:
        reason = "max_steps" if result.steps == cfg.max_steps else "error"
    if result.stopped_early or reason == "max_steps":
        bar.total = result.steps
    bar.n = result.steps
    if result.steps:
        bar.set_postfix_str(f"nll={result.nll[-1]:.3f}, l0={result.l0[-1]}, stop: {reason}",
                            refresh=False)
    bar.close()


# Adam on a well-scaled objective never climbs far above where it starts: on the
# embedded model the objective (NLL + lambda x L1) peaked at its starting value for lr
# 0.01 to 1 and lambda 0.02 to 1 (layers 3 and 4), while lr 1e3 overshot to about 100
# times it and pruned every feature. A run whose objective rose past 1.5 x its start
# + 0.5 is refused, not returned as a cleaned vector (its last step may look harmless).
DIVERGED_RATIO, DIVERGED_MARGIN = 1.5, 0.5


def _check_converged(result: CleanupResult, cfg: CleanupConfig, layer: int) -> None:
    if result.interrupted or len(result.loss) < 2:
        return
    start, peak = result.loss[0], max(result.loss)
    if peak > DIVERGED_RATIO * start + DIVERGED_MARGIN:
        raise CleanupDiverged(
            f"cleanup diverged: the training objective (NLL + lambda x L1) rose from "
            f"{start:.3f} to {peak:.3f} at step {result.loss.index(peak)} (layer {layer}, "
            f"lambda {cfg.lam}, lr {cfg.lr}; it ended with {result.l0[-1]} active features): "
            f"lower CleanupConfig.lr (default {CleanupConfig.lr})")


def finished(result: CleanupResult) -> CleanupResult:
    """``result``, or the interrupt again if it was interrupted: what is cached or built
    on must be a finished cleanup (a sweep keeps the layers finished before)."""
    if result.interrupted:
        raise KeyboardInterrupt(f"cleanup interrupted after {result.steps} steps: not stored")
    return result


class CleanupDiverged(FloatingPointError):
    """The cleanup loss became NaN or infinite."""



def cleanup(lm, sae, layer: int, tv: torch.Tensor, train: PromptBatch,
            heldout: PromptBatch | None = None, cfg: CleanupConfig = CleanupConfig(),
            seed: int = 0, support: list[int] | None = None) -> CleanupResult:
    """Optimise the SAE feature weights of ``tv`` (d,) against the task loss plus L1.

    support: None (every feature the start activates), or the feature indices that alone
    may be non-zero, each starting on (``feature_weights.initial_theta``); with
    ``lam=0`` this tunes given features' weights with the task loss alone (the
    hand-picked controls of ``tvlib.controls``).
    """
    check_layer(lm, layer)
    require_local(lm, "cleanup")
    check_sae_site(sae, lm, layer)
    d = sae.cfg.d_in
    if not isinstance(tv, torch.Tensor) or tv.shape != (d,):
        raise ValueError(f"tv must be one vector of the SAE's width, shape ({d},), not "
                         f"{type(tv).__name__} of shape {tuple(getattr(tv, 'shape', ()))}: "
                         "pass one task vector (a row of task_vectors(...))")
    if not torch.isfinite(tv).all():
        raise ValueError(f"tv holds {int((~torch.isfinite(tv)).sum())} NaN or infinite values: "
                         "pass a finite task vector (NaN comes from prompts with no separator)")
    check_scored(train)
    if cfg.init == "pursuit" and cfg.pursuit_l0 > sae.cfg.d_sae:
        raise ValueError(f"CleanupConfig.pursuit_l0={cfg.pursuit_l0} is more than this SAE's "
                         f"{sae.cfg.d_sae} features: lower it (the authors used 7)")
    if support is not None:
        support = check_support(sae, support)
    # seeded for reproducibility, on a copy of the random state: the caller's is left as it
    # was (every GPU's too, since manual_seed seeds them all)
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        torch.manual_seed(seed)
        return _optimise(lm, sae, layer, tv, train, heldout, cfg, support)


def check_support(sae, support) -> list[int]:
    """``support`` as a non-empty list of distinct feature indices of ``sae``, or refused."""
    support = check_features(sae, support)
    if not support:
        raise ValueError("support is empty: pass the feature indices to tune, e.g. [5, 192], "
                         "or support=None for every feature the start activates")
    if len(set(support)) != len(support):
        repeated = sorted({f for f in support if support.count(f) > 1})
        raise ValueError(f"support lists features {repeated} more than once: list each "
                         "feature once")
    return support


def _optimise(lm, sae, layer: int, tv: torch.Tensor, train: PromptBatch,
              heldout: PromptBatch | None, cfg: CleanupConfig,
              support: list[int] | None = None) -> CleanupResult:
    act = activation_function(sae, cfg.activation)
    theta0 = initial_theta(sae, tv, cfg.init, cfg.pursuit_l0, cfg.pursuit_selection,
                           cfg.activation, support)
    unit = feature_units(sae, tv, cfg.units).to(theta0.device)          # (F,)
    # theta = theta0 + delta * unit: Adam's step on delta is lr in these units.
    delta = torch.zeros_like(theta0, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=cfg.lr)
    decode = lambda w: sae.decode(w.to(sae.W_dec.dtype)).float()        # noqa: E731

    steered_nll = SteeredNLL(lm, layer, train)     # shares the work that v does not change

    result = CleanupResult(weights=act(theta0).detach().cpu(),
                           vector=decode(act(theta0)).detach().cpu(),
                           start_weights=act(theta0).detach().cpu())
    best_l0, since_best = None, 0
    # kept when done: each cleanup leaves one line with its steps, NLL, L0 and why it stopped
    bar = tqdm(range(cfg.max_steps), desc=f"cleanup L{layer}", disable=not cfg.progress,
               leave=True, mininterval=1.0)
    last = delta.detach().clone()          # delta after the last finished step
    try:
        for step in bar:
            w = act(theta0 + delta * unit)                               # (F,)
            v = decode(w)                                                # (d,)
            l1 = (w / unit).sum()
            nll = steered_nll(v).mean().to(l1.device)
            loss = nll + cfg.lam * l1
            if not torch.isfinite(loss):
                raise CleanupDiverged(
                    f"cleanup loss is {loss.item()} at step {step} (layer {layer}, lambda "
                    f"{cfg.lam}, lr {cfg.lr}): lower CleanupConfig.lr or lam")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            last = delta.detach().clone()
            l0 = int((w > 0).sum())
            result.loss.append(loss.item())
            result.nll.append(nll.item())
            result.l0.append(l0)
            bar.set_postfix(nll=f"{nll.item():.3f}", l0=l0)
            if best_l0 is None or l0 < best_l0:
                best_l0, since_best = l0, 0
            else:
                since_best += 1
                if since_best >= cfg.patience:
                    result.stopped_early = True
                    break
    except KeyboardInterrupt:
        result.interrupted = True
        warnings.warn(f"cleanup interrupted after {result.steps} steps (layer {layer}): "
                      "returning the weights of the last finished step, marked interrupted",
                      stacklevel=3)
    finally:
        _close_bar(bar, result, cfg)
    _check_converged(result, cfg, layer)
    with torch.no_grad():
        weights = act(theta0 + last * unit).detach()
        result.weights, result.vector = weights.cpu(), decode(weights).cpu()
    if heldout is not None and not result.interrupted:
        result.heldout_scores = score(lm, heldout, Steering(layer, result.vector))
    return result
