"""A task vector seen through an SAE (method.md section 2).

- "Recon of TV": ``decode(encode(TV))``, b_dec included.
- "TV on recon": the layer's residuals at the separators replaced by their SAE
  reconstructions, then averaged as for the TV.
- "ITO": gradient pursuit of the TV in the SAE's decoder directions.

Each view returns a vector used in place of the TV and scored as in 01.
Works with any sae-lens SAE (standard, gated, JumpReLU, TopK): only its
``encode``, ``decode``, ``W_dec`` and ``b_dec`` are used.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral

import torch

from .checks import FLAG, POSITIVE_INT, distinct, validate
from .saes import check_sae_site
from .pursuit import PursuitResult, sae_pursuit



@dataclass(frozen=True)
class SAEViewConfig:
    """Notebook 02's views of the task vector: ITO's number of features (the writeup's
    ITO(40)) and whether pursuit encodes TV - b_dec instead of TV (the authors did not)."""

    target_l0: int = 40
    subtract_b_dec: bool = False

    def __post_init__(self):
        validate(self, target_l0=POSITIVE_INT, subtract_b_dec=FLAG)


@dataclass(frozen=True)
class ITOSweepConfig:
    """Notebook 03: ITO at several numbers of features, one run each."""

    target_l0s: tuple[int, ...] = (5, 10, 20, 40, 100)
    subtract_b_dec: bool = False

    def __post_init__(self):
        validate(self, target_l0s=distinct(POSITIVE_INT), subtract_b_dec=FLAG)


def check_features(sae, features) -> list[int]:
    """``features`` as a list of feature indices of ``sae``, refused if any is out of range.

    Negative indices are refused rather than counted from the end, so that a
    feature is never read or labelled as another.
    """
    if isinstance(features, (str, int)) or not hasattr(features, "__iter__"):
        raise ValueError(f"features must be a list of feature indices, e.g. [{features}], not "
                         f"{features!r}")
    if isinstance(features, torch.Tensor):
        features = features.tolist()
    checked = []
    for feature in features:
        if isinstance(feature, bool) or not isinstance(feature, Integral) \
                or not 0 <= feature < sae.cfg.d_sae:
            raise ValueError(f"feature {feature!r} is not a feature of this SAE: features are "
                             f"ints 0..{sae.cfg.d_sae - 1}")
        checked.append(int(feature))
    return checked


def _check_width(sae, x: torch.Tensor, what: str = "vector") -> None:
    if not isinstance(x, torch.Tensor) or x.shape[-1] != sae.cfg.d_in:
        shape = tuple(getattr(x, "shape", ()))
        raise ValueError(f"the {what} has shape {shape}, but this SAE reads vectors of width "
                         f"{sae.cfg.d_in}: use the SAE made for this model")


@torch.no_grad()
def encode(sae, x: torch.Tensor) -> torch.Tensor:
    """The SAE code of ``x`` (..., d) from any device: (..., F) float32 on the CPU."""
    _check_width(sae, x)
    return sae.encode(x.to(sae.W_dec)).float().cpu()


@torch.no_grad()
def decode(sae, weights: torch.Tensor) -> torch.Tensor:
    """``weights @ W_dec + b_dec`` (the SAE's own decoder): float32 on the CPU."""
    return sae.decode(weights.to(sae.W_dec)).float().cpu()


@torch.no_grad()
def recon_of_tv(sae, tv: torch.Tensor, layer: int) -> torch.Tensor:
    """``decode(encode(tv))`` for a TV read at resid_pre ``layer``: (d,) or (B, d) in and out."""
    check_sae_site(sae, None, layer)
    _check_width(sae, tv, "task vector")
    return sae.decode(sae.encode(tv.to(sae.W_dec))).float().cpu()


@torch.no_grad()
def tv_on_recon(sae, separator_resid: torch.Tensor, layer: int) -> torch.Tensor:
    """Mean SAE reconstruction of the residuals at separators.

    separator_resid: (B, S, d) residuals at resid_pre ``layer``, NaN where a
    prompt has no separator (as returned by ``collect_residuals``). Returns (d,).
    """
    check_sae_site(sae, None, layer)
    _check_width(sae, separator_resid, "residual tensor")
    present = ~separator_resid.isnan().any(-1)                      # (B, S)
    h = separator_resid[present].to(sae.W_dec)                      # (n, d)
    return sae.decode(sae.encode(h)).mean(0).float().cpu()


@torch.no_grad()
def ito(sae, tv: torch.Tensor, layer: int, target_l0: int, subtract_b_dec: bool = False,
        step: str = "feasible", selection: str = "inactive") -> tuple[torch.Tensor, PursuitResult]:
    """Gradient-pursuit reconstruction of ``tv`` (d,) or (B, d), read at resid_pre ``layer``,
    with ``target_l0`` features (``step`` and ``selection``: see ``tvlib.pursuit``).

    Returns the vector to steer with (``w W_dec``, plus b_dec when it was
    subtracted first) and the pursuit result (weights, errors, pick order).
    """
    check_sae_site(sae, None, layer)
    _check_width(sae, tv, "task vector")
    result = sae_pursuit(sae, tv, target_l0, step, selection, subtract_b_dec)
    D = sae.W_dec.float()                                           # (F, d), on the SAE's device
    b_dec = sae.b_dec.float() if subtract_b_dec else 0
    vector = (result.weights.to(D) @ D + b_dec).cpu()
    return vector.squeeze(0) if tv.dim() == 1 else vector, result
