"""Loss-guided sparse cleanup of a task vector in SAE features (method.md section 3).

Parameters theta (one per SAE feature) start at the SAE encoder's
pre-activations of the task vector, so that the initial weights equal the SAE
encoding exactly. Each step the weights w = act(theta) (ReLU; the threshold for
JumpReLU SAEs) give a steering vector v = decode(w) = w W_dec + b_dec, added at
layer L at the steer token of a fixed set of training prompts; the loss is
the answer NLL (first 2 tokens) plus lambda * L1(w). Adam, early stopping when
L0 has not reached a new minimum for ``patience`` steps.

A feature inactive at initialisation has theta <= 0 (or below its JumpReLU
threshold), hence w = 0 and no gradient: it stays zero. Cleanup therefore only
prunes and reweights the features the SAE encoding activates; a pruned feature
never returns.

The L1 term is scaled so one lambda means the same on any model: it penalises
``sum_i w_i ||W_dec[i]||`` (each feature's contribution to the vector's norm)
times ``sqrt(d) / ||TV||``, as if the task vector had norm sqrt(d), the input
norm of the writeup authors' SAEs.

Speed: the blocks before L see the same input every step, so their output is
computed once and each step's trace skips them; prompts are tokenised once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .models import (blocks, check_layer, model_device, model_dtype, require_local, to_model,
                     trace)
from .prompts import PromptBatch
from .pursuit import gradient_pursuit
from .taskvec import (Steering, answer_nll, apply_steering, collect_residuals,
                      logits_at_targets, score)


@dataclass(frozen=True)
class CleanupConfig:
    lam: float = 0.02            # L1 coefficient (method.md: 0.02 default, ~0.05 on Gemma)
    lr: float = 1e-2
    max_steps: int = 1000
    patience: int = 200          # stop when L0 has no new minimum for this many steps
    init: str = "encoder"        # "encoder" pre-activations, or "pursuit" weights
    pursuit_l0: int = 7          # target L0 of the "pursuit" initialisation
    progress: bool = True


@dataclass
class CleanupResult:
    weights: torch.Tensor        # (F,) final feature weights, non-negative
    vector: torch.Tensor         # (d,) the cleaned steering vector, decode(weights)
    initial_weights: torch.Tensor  # (F,) weights at initialisation (the SAE encoding)
    loss: list[float] = field(default_factory=list)   # total loss per step
    nll: list[float] = field(default_factory=list)    # training NLL per step
    l0: list[int] = field(default_factory=list)       # active features per step
    heldout_nll: float = math.nan
    heldout_accuracy: float = math.nan
    stopped_early: bool = False

    @property
    def steps(self) -> int:
        return len(self.loss)


class CleanupDiverged(FloatingPointError):
    """The cleanup loss became NaN or infinite."""


def _activation(sae):
    """The SAE's own activation on theta: ReLU, or ReLU above the JumpReLU threshold."""
    threshold = getattr(sae, "threshold", None)
    if threshold is None:
        return torch.relu
    threshold = threshold.detach().float()
    return lambda theta: torch.relu(theta) * (theta > threshold)


def initial_theta(sae, tv: torch.Tensor, init: str = "encoder", pursuit_l0: int = 7):
    """theta0 (F,) such that ``_activation(sae)(theta0)`` is the SAE encoding of ``tv``.

    "encoder": pre-activations on active features, and at most 0 on the others.
    "pursuit": gradient-pursuit weights of ``tv`` with ``pursuit_l0`` features (the
    authors' choice for detector vectors); inactive features at -1.
    """
    x = tv.detach().to(sae.W_dec).unsqueeze(0)
    if init == "pursuit":
        w = gradient_pursuit(x, sae.W_dec.detach(), pursuit_l0).weights[0].to(x.device)
        return torch.where(w > 0, w, torch.full_like(w, -1.0))
    if init != "encoder":
        raise ValueError(f"init must be 'encoder' or 'pursuit', not {init!r}")
    with torch.no_grad():
        _, cache = sae.run_with_cache(x)
        pre = cache["hook_sae_acts_pre"][0].float()
        active = sae.encode(x)[0] > 0
    return torch.where(active, pre, pre.clamp(max=0))


def cleanup(lm, sae, layer: int, tv: torch.Tensor, train: PromptBatch,
            heldout: PromptBatch | None = None, cfg: CleanupConfig = CleanupConfig(),
            seed: int = 0) -> CleanupResult:
    """Optimise the SAE feature weights of ``tv`` against the task loss plus L1."""
    check_layer(lm, layer)
    require_local(lm, "cleanup")
    torch.manual_seed(seed)
    act = _activation(sae)
    theta0 = initial_theta(sae, tv, cfg.init, cfg.pursuit_l0)
    theta = theta0.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([theta], lr=cfg.lr)
    dec_norms = sae.W_dec.detach().float().norm(dim=-1)                  # (F,)
    l1_scale = math.sqrt(tv.shape[-1]) / tv.float().norm().clamp(min=1e-8).item()
    decode = lambda w: sae.decode(w.to(sae.W_dec.dtype)).float()        # noqa: E731

    # The blocks before `layer` see the same tokens every step: run them once.
    inputs = to_model(lm, train.model_inputs())
    if layer > 0:
        positions = torch.arange(train.input_ids.shape[1]).expand_as(train.input_ids)
        cached = collect_residuals(lm, inputs, [layer], positions, len(train))[0]   # (B, T, d)
        cached = cached.to(device=model_device(lm), dtype=model_dtype(lm))

    result = CleanupResult(weights=act(theta0).detach().cpu(),
                           vector=decode(act(theta0)).detach().cpu(),
                           initial_weights=act(theta0).detach().cpu())
    best_l0, since_best = None, 0
    bar = tqdm(range(cfg.max_steps), desc=f"cleanup L{layer}", disable=not cfg.progress,
               leave=False, mininterval=1.0)
    for step in bar:
        w = act(theta)                                                   # (F,)
        v = decode(w)                                                    # (d,)
        l1 = (w * dec_norms).sum() * l1_scale
        saved = {}
        with trace(lm, inputs):
            if layer > 0:
                start = cached.clone()     # edited in place below: keep the cache clean
                for block in blocks(lm)[:layer]:
                    block.skip(start)
            apply_steering(lm, Steering(layer, v), train)
            saved["nll"] = answer_nll(logits_at_targets(lm, train), train.targets).mean().save()
        nll = saved["nll"].to(l1.device)
        loss = nll + cfg.lam * l1
        if not torch.isfinite(loss):
            raise CleanupDiverged(
                f"cleanup loss is {loss.item()} at step {step} (layer {layer}, lambda "
                f"{cfg.lam}, lr {cfg.lr}): lower CleanupConfig.lr or lam")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
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
    with torch.no_grad():
        weights = act(theta).detach()
        result.weights, result.vector = weights.cpu(), decode(weights).cpu()
    if heldout is not None:
        scores = score(lm, heldout, Steering(layer, result.vector))
        result.heldout_nll, result.heldout_accuracy = scores.mean_nll(), scores.accuracy()
    return result
