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

import torch

from .models import check_sae_fits
from .pursuit import PursuitResult, gradient_pursuit


def check_sae_site(sae, lm, layer: int, site: str = "resid_pre") -> None:
    """Fail unless ``sae`` fits the model's width and reads resid_pre ``layer``.

    The site is read from the SAE's metadata when it records one (``site`` and
    ``layer``, as the embedded SAEs do; or a sae-lens ``hook_name`` such as
    ``blocks.{L}.hook_resid_post``).
    """
    check_sae_fits(sae, lm)
    recorded = sae_site(sae)
    if recorded is not None and recorded != (site, layer):
        raise ValueError(
            f"this SAE reads {recorded[0]} {recorded[1]} (= resid_pre "
            f"{recorded[1] + (recorded[0] == 'resid_post')}), not {site} {layer}: load the SAE "
            "for this layer with tvlib.models.load_sae(preset, layer)")


def sae_site(sae) -> tuple[str, int] | None:
    """(site, layer) in resid_pre terms as recorded by the SAE, or None if unknown."""
    meta = sae.cfg.metadata
    if meta.site in ("resid_pre", "resid_post") and meta.layer is not None:
        site, layer = meta.site, int(meta.layer)
    else:
        hook = meta.hook_name or ""
        parts = hook.split(".")
        if len(parts) == 3 and parts[0] == "blocks" and parts[2] in ("hook_resid_pre",
                                                                   "hook_resid_post"):
            site, layer = parts[2].removeprefix("hook_"), int(parts[1])
        else:
            return None
    return ("resid_pre", layer + 1) if site == "resid_post" else ("resid_pre", layer)


@torch.no_grad()
def encode(sae, x: torch.Tensor) -> torch.Tensor:
    """The SAE code of ``x`` (..., d) from any device: (..., F) float32 on the CPU."""
    return sae.encode(x.to(sae.W_dec)).float().cpu()


@torch.no_grad()
def decode(sae, weights: torch.Tensor) -> torch.Tensor:
    """``weights @ W_dec + b_dec`` (the SAE's own decoder): float32 on the CPU."""
    return sae.decode(weights.to(sae.W_dec)).float().cpu()


@torch.no_grad()
def recon_of_tv(sae, tv: torch.Tensor) -> torch.Tensor:
    """``decode(encode(tv))``: (d,) or (B, d) in, the same shape out."""
    return sae.decode(sae.encode(tv.to(sae.W_dec))).float().cpu()


@torch.no_grad()
def tv_on_recon(sae, separator_resid: torch.Tensor) -> torch.Tensor:
    """Mean SAE reconstruction of the residuals at separators.

    separator_resid: (B, S, d) residuals at layer L, NaN where a prompt has no
    separator (as returned by ``collect_residuals``). Returns (d,).
    """
    present = ~separator_resid.isnan().any(-1)                      # (B, S)
    h = separator_resid[present].to(sae.W_dec)                      # (n, d)
    return sae.decode(sae.encode(h)).mean(0).float().cpu()


@torch.no_grad()
def ito(sae, tv: torch.Tensor, target_l0: int = 40, subtract_b_dec: bool = False,
        step: str = "feasible") -> tuple[torch.Tensor, PursuitResult]:
    """Gradient-pursuit reconstruction of ``tv`` (d,) or (B, d) with ``target_l0`` features.

    Returns the vector to steer with (``w W_dec``, plus b_dec when it was
    subtracted first) and the pursuit result (weights, errors, pick order).
    """
    D = sae.W_dec.float()                                           # (F, d), on the SAE's device
    b_dec = sae.b_dec.float() if subtract_b_dec else 0
    result = gradient_pursuit(tv.to(D) - b_dec, D, target_l0, step)
    vector = (result.weights.to(D) @ D + b_dec).cpu()
    return vector.squeeze(0) if tv.dim() == 1 else vector, result
