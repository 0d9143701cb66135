"""Cleanup's parameters: SAE feature weights as a function of pre-activations theta.

Cleanup optimises theta, one number per SAE feature; the weights are
w = act(theta), and theta starts where w is the SAE encoding of the vector
(``initial_theta``), or gradient pursuit's weights for detectors.

The activation (``CleanupConfig.activation``):

- ``"sae"`` (default): the SAE's own activation, as method.md asks. ReLU for
  standard SAEs; ReLU above the threshold for JumpReLU SAEs; the gate for gated
  SAEs; TopK for TopK SAEs. A sae-lens ``GatedSAE`` computes
  ``[x W_enc + b_gate > 0] * relu(m)`` with the magnitude pre-activation
  ``m = x (W_enc * exp(r_mag)) + b_mag`` (x after the SAE's own input
  processing, b_dec and normalisation, which both paths share). Per feature,
  ``x W_enc = (m - b_mag) exp(-r_mag)``, so the gate is ``m > b_mag - b_gate
  exp(r_mag)`` and the SAE is exactly a JumpReLU on m (theta here) with
  threshold ``max(0, b_mag - b_gate exp(r_mag))``. TopK (the k largest, ReLU'd)
  is exact too; with the encoder start it never differs from ReLU, since the
  active set starts with at most k features and only shrinks. Other
  architectures (TopK with ``rescale_acts_by_decoder_norm``, AbsTopK,
  transcoders, ...) are refused with a pointer to "relu".
- ``"relu"``: plain ReLU on theta, for any SAE (before, this was what cleanup
  did for gated SAEs: a weight could then sink below the gate and stay on).

A feature inactive at initialisation has theta <= 0 (or below its threshold),
hence w = 0 and no gradient: it stays zero. Cleanup therefore only prunes and
reweights the features the SAE encoding activates; a pruned feature never
returns. (The same holds for the authors' code: their cleanup starts from the
pre-activations and applies the same gate.)

Units of the learning rate and the L1 term (``CleanupConfig.units``):

- ``"norm_scaled"`` (default): a weight's unit is the size that adds a direction
  of norm ``||TV|| / sqrt(d)`` to the vector: feature i's weight is
  ``c_i = w_i ||W_dec[i]|| sqrt(d) / ||TV||``, its share of the vector's norm as
  if the task vector had norm sqrt(d). The L1 term is ``sum_i c_i`` and Adam
  moves each c_i by about lr per step (the optimiser works on theta through
  ``theta = theta0 + delta * unit``, with one unit per feature). Why: so that
  one lr and one lambda mean the same on any model and SAE, whatever the
  residual stream's scale and the decoder norms. The authors' SAEs read inputs
  scaled to norm sqrt(d), so their weights are already close to these units;
  method.md's lr 1e-2 and lambda 0.02-0.05 come from them. On SAEs trained on
  raw residuals the difference is large: on Gemma 3 270M a task vector's
  weights are about 300 in the SAE's units (its residual norm is ~10^4), so an
  lr of 1e-2 there hardly moves them.
- ``"sae"``: weights in the SAE's own units, lr and L1 ``sum_i w_i`` on them:
  the authors' code (``l1_coeff * jnp.linalg.norm(weights, ord=1)`` in
  ``FeatureSearch.get_loss``, Adam on the pre-activations). For their converted SAE
  (``tvlib.authors_sae``) the weights are exactly their f, so this is their
  optimisation and lr and lambda are in their units (0.05 for task vectors,
  5e-4 for detectors in their scripts).

How the two relate on the authors' SAEs: they decode ``(f W_dec + b_dec) / n_out``
with ``n_out = sqrt(d) / tgt_mean_norm``, so the converted decoder rows are
``W_dec[i] / n_out`` and ``c_i = f_i ||W_dec[i]|| * tgt_mean_norm / ||TV||`` (their
raw W_dec). It equals their ``f_i`` exactly when ``||W_dec[i]|| = ||TV|| / tgt_mean_norm``,
e.g. when (a) those raw decoder rows have norm 1 and (b) ||TV|| = tgt_mean_norm (the
task vector has the mean norm of the residuals their SAE was trained on). Their
training script (neverix/saex, scripts/train_gemma_sae.py) does not constrain
decoder norms (``restrict_dec_norm=None``, ``anthropic_norm=True``: the training
penalty is ``f_i ||W_dec[i]||``, the norm-weighted form the default uses), and a
mean of residuals is usually shorter than a residual, so the two are equal only
approximately; "sae" reproduces their numbers, "norm_scaled" transfers.
"""

from __future__ import annotations

import math

import torch

from .pursuit import sae_pursuit

INITS = ("encoder", "pursuit")
ACTIVATIONS = ("sae", "relu")
UNITS = ("norm_scaled", "sae")


def _architecture(sae) -> str:
    return sae.cfg.architecture()


def sae_threshold(sae) -> torch.Tensor | None:
    """(F,) the JumpReLU threshold on the pre-activation, or the gate as one; None if none.

    For a gated SAE the pre-activation is the magnitude path's m (what
    ``hook_sae_acts_pre`` records) and the gate ``x W_enc + b_gate > 0`` is
    ``m > b_mag - b_gate exp(r_mag)``; relu(m) makes thresholds below 0 act as 0.
    """
    architecture = _architecture(sae)
    if architecture == "gated":
        scale = sae.r_mag.detach().float().exp()                        # (F,)
        return (sae.b_mag.detach().float() - sae.b_gate.detach().float() * scale).clamp(min=0)
    if getattr(sae, "threshold", None) is not None:
        return sae.threshold.detach().float()
    return None


def activation_function(sae, activation: str = "sae"):
    """w = act(theta) (F,) -> (F,): the SAE's own activation, or plain ReLU."""
    if activation == "relu":
        return torch.relu
    if activation != "sae":
        raise ValueError(f"activation={activation!r} is unknown: pass activation='sae' or 'relu'")
    architecture = _architecture(sae)
    threshold = sae_threshold(sae)
    if threshold is not None:
        threshold = threshold.to(sae.W_dec.device)
        return lambda theta: torch.relu(theta) * (theta > threshold)
    if architecture == "standard":
        return torch.relu
    if architecture == "topk" and not getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        k = sae.cfg.k

        def topk(theta):                        # ReLU of the k largest, zero elsewhere
            values, index = theta.topk(min(k, theta.shape[-1]), dim=-1)
            return torch.zeros_like(theta).scatter(-1, index, values.relu())
        return topk
    raise ValueError(
        f"CleanupConfig.activation='sae' needs the SAE's activation as a function of its "
        f"pre-activations; tvlib knows it for standard, gated, jumprelu and topk SAEs "
        f"(without rescale_acts_by_decoder_norm), not this {architecture!r} SAE: pass "
        "CleanupConfig(activation='relu') to use ReLU on the pre-activations")


def initial_theta(sae, tv: torch.Tensor, init: str = "encoder", pursuit_l0: int = 7,
                  pursuit_selection: str = "inactive", activation: str = "sae",
                  support: list[int] | None = None):
    """theta0 (F,) such that ``activation_function(sae, activation)(theta0)`` is the SAE encoding of ``tv``.

    "encoder": pre-activations on active features, and at most 0 on the others.
    "pursuit": gradient-pursuit weights of ``tv`` (``tvlib.pursuit.sae_pursuit``, b_dec not
    subtracted) with ``pursuit_l0`` features and the ``pursuit_selection`` rule (the
    authors' start for detector vectors; decoded with b_dec like every cleanup vector);
    inactive features at -1. With activation "sae", pursuit weights at or below
    a feature's threshold start at w = 0, as in the authors' code (their cleanup
    passes the pursuit weights through the same gate). Their detector script
    runs pursuit with their files' raw W_dec, whose weights are n_out times
    smaller than with the converted decoder, and decodes them with the SAE's
    decoder: their start is about (tv + b_dec) / n_out, tvlib's about
    tv + b_dec / n_out (the same when n_out = 1).

    support: feature indices (checked by the caller) that alone may be non-zero, e.g.
    hand-picked features (``tvlib.controls``). Every other feature starts at theta <= 0,
    where it has no gradient and stays at zero; a feature of the support that the start
    leaves at zero starts just on (theta the next float above its threshold, or above 0),
    at the smallest weight its activation lets through, so that it can be tuned.
    """
    if init not in INITS:
        raise ValueError(f"init must be 'encoder' or 'pursuit', not {init!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is unknown: pass activation='sae' or 'relu'")
    x = tv.detach().to(sae.W_dec).unsqueeze(0)                         # (1, d)
    if init == "pursuit":
        w = sae_pursuit(sae, x, pursuit_l0, selection=pursuit_selection).weights[0].to(x.device)
        return _restricted(sae, torch.where(w > 0, w, torch.full_like(w, -1.0)), activation,
                           support)
    with torch.no_grad():
        _, cache = sae.run_with_cache(x)
        pre = cache["hook_sae_acts_pre"][0].float()                     # (F,)
        active = sae.encode(x)[0] > 0                                   # (F,)
    theta = torch.where(active, pre, pre.clamp(max=0))
    threshold = sae_threshold(sae) if activation == "sae" else None
    if threshold is not None:
        # A gated SAE decides with its gate, the threshold compares m: at a float
        # tie an active feature could land on the threshold. Keep it just above.
        threshold = threshold.to(theta.device)
        theta = torch.where(active, torch.maximum(theta, torch.nextafter(
            threshold, torch.full_like(threshold, math.inf))), theta)
    return _restricted(sae, theta, activation, support)


def _restricted(sae, theta: torch.Tensor, activation: str,
                support: list[int] | None) -> torch.Tensor:
    """theta (F,) with every feature off outside ``support`` and every feature on inside it."""
    if support is None:
        return theta
    inside = torch.zeros_like(theta, dtype=torch.bool)
    inside[torch.as_tensor(support, dtype=torch.long, device=theta.device)] = True
    threshold = sae_threshold(sae) if activation == "sae" else None
    floor = torch.zeros_like(theta) if threshold is None else threshold.to(theta)
    just_on = torch.nextafter(floor, torch.full_like(floor, math.inf))          # (F,)
    return torch.where(inside, torch.maximum(theta, just_on), theta.clamp(max=0))


def feature_units(sae, tv: torch.Tensor, units: str = "norm_scaled") -> torch.Tensor:
    """(F,) the size of one unit of each feature's weight, in the SAE's units.

    "norm_scaled": ``||tv|| / (sqrt(d) ||W_dec[i]||)``, the weight whose decoded
    direction has norm ``||tv|| / sqrt(d)``; "sae": 1.
    """
    if units not in UNITS:
        raise ValueError(f"units={units!r} is unknown: pass units='norm_scaled' or 'sae'")
    if units == "sae":
        return torch.ones(sae.cfg.d_sae)
    row_norms = sae.W_dec.detach().float().norm(dim=-1).cpu().clamp(min=1e-12)  # (F,)
    return tv.detach().float().norm().cpu().clamp(min=1e-8) / (math.sqrt(sae.cfg.d_in)
                                                                * row_norms)
