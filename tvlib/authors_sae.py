"""The writeup authors' own gated SAEs (Gemma 1 2B instruct), converted to sae-lens.

Their files (hub repo ``nev/gemma-2b-saex-test``, one folder per layer and
sparsity, e.g. ``it-l12-residual-test-run-1-<sparsity>/``) hold a safetensors
file with ``W_enc (d, F), b_enc, W_dec (F, d), b_dec, s_gate, b_gate,
scaling_factor`` and optionally ``mean_norm`` and ``tgt_mean_norm``. Their
layer L reads resid_pre L. Both encodings below read and write raw residuals
(no b_dec subtracted from the input) with the same decoder:

    x' = x * n,   n = sqrt(d) / mean_norm (1 without it),   s = softplus(s_gate) * scaling_factor
    x_hat = (f W_dec + b_dec) / n_out,   n_out = sqrt(d) / tgt_mean_norm (else n)
    W_dec' = W_dec / n_out,   b_dec' = b_dec / n_out

so the converted SAE's feature weights are their f exactly, in their units.

``encoding="training"`` (default): the encoder the SAE was trained with
(neverix/saex, ``saex/sae.py`` ``SAE.encode``, ``is_gated``). It gates on one
affine map and takes magnitudes from a rescaled copy:
    f = [x' W_enc + b_enc > 0] * relu((x' W_enc) * s + b_gate)
With s > 0 the gate is ``m > b_gate - b_enc * s`` for the magnitude pre-activation
``m = (x' W_enc) * s + b_gate``, so the SAE is exactly a JumpReLU SAE with
    W_enc' = n * W_enc * s,   b_enc' = b_gate,   threshold = max(0, b_gate - b_enc * s).

``encoding="scripts"``: the encoding their experiment scripts used for task
vectors, ``sae_encode_gated`` in ``micrlhf/utils/load_sae.py`` of
neverix/micrlhf-progress (at commit 6c42eb4, lines 201-241; called through
``sae_encode`` by ``sprint/run_task_vector_cleaning.py``, ``..._detectors.py``
and ``sprint/tvc_tune.py``, and, with ``pre_relu=weights``, by the cleanup's
``FeatureSearch.get_loss`` in ``sprint/task_vector_utils.py``):
    p = (x' W_enc + b_enc) * s,   f = p * [relu(p) > max(0, b_gate - b_enc * s)]
As the threshold t = max(0, b_gate - b_enc * s) is >= 0, ``relu(p) > t`` is
``p > t`` and f = relu(p) [p > t]: exactly a JumpReLU SAE with
    W_enc' = n * W_enc * s,   b_enc' = b_enc * s,   threshold = max(0, b_gate - b_enc * s).
This is not the training encoder: p = m - (b_gate - b_enc * s), i.e. the
training magnitude shifted down by u = b_gate - b_enc * s, and the gate
``p > max(0, u)`` is ``m > u + max(0, u)``, where training gates at ``m > u``.
The two agree only for features with b_gate = b_enc * s; it is the threshold
derived for m applied to the rescaled gate pre-activation. (Their file had the
training encoder until commit ac64e2f of 2024-09-14 and this one after; their
task-vector scripts at HEAD use this one.) Their loader also casts the weights
to bfloat16, which this conversion does not.

The encoding is recorded as ``sae.cfg.metadata.authors_encoding`` so that
caches and readers can tell the two apart.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

REQUIRED_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec", "s_gate", "b_gate", "scaling_factor")
ENCODINGS = ("training", "scripts")


def _scalar_or_none(weights: dict, key: str) -> float | None:
    if key not in weights:
        return None
    if weights[key].numel() != 1:
        raise ValueError(f"{key} should be one number, not a tensor of shape "
                         f"{tuple(weights[key].shape)}")
    return float(weights[key])


def _check_encoding(encoding: str) -> None:
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding={encoding!r} is not one of the authors' encodings: pass "
                         "encoding='training' (the SAE's own encoder) or encoding='scripts' "
                         "(the one their task-vector scripts used)")


def convert_authors_weights(weights: dict[str, torch.Tensor], hook_name: str = "",
                            layer: int | None = None, device: str = "cpu",
                            encoding: str = "training"):
    """A sae-lens ``JumpReLUSAE`` computing exactly the authors' gated SAE.

    encoding: "training" (the SAE's own encoder) or "scripts" (the encoding of
    their task-vector scripts); see the module docstring.
    """
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    _check_encoding(encoding)
    missing = [k for k in REQUIRED_KEYS if k not in weights]
    if missing:
        raise KeyError(f"not an SAE in the authors' format: missing {missing} "
                       f"(expected {list(REQUIRED_KEYS)})")
    w = {k: v.float() for k, v in weights.items()}
    d_in, d_sae = w["W_enc"].shape
    mean_norm, tgt_mean_norm = _scalar_or_none(w, "mean_norm"), _scalar_or_none(w, "tgt_mean_norm")
    norm_in = math.sqrt(d_in) / mean_norm if mean_norm else 1.0
    norm_out = math.sqrt(d_in) / tgt_mean_norm if tgt_mean_norm else norm_in
    scale = F.softplus(w["s_gate"]) * w["scaling_factor"]                  # (F,)
    # the training gate's rewriting as a threshold on m divides by s
    if encoding == "training" and (scale <= 0).any():
        raise ValueError("the authors' SAE has a non-positive gate scale; cannot convert")

    # their files record no model (nor site): none is claimed here
    metadata = SAEMetadata(hook_name=hook_name)
    cfg = JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=False,
                            device=device, metadata=metadata)
    sae = JumpReLUSAE(cfg)
    threshold = (w["b_gate"] - w["b_enc"] * scale).clamp(min=0)             # (F,)
    state = {
        "W_enc": norm_in * w["W_enc"] * scale,                              # (d, F)
        "b_enc": w["b_gate"] if encoding == "training" else w["b_enc"] * scale,
        "threshold": threshold,
        "W_dec": w["W_dec"] / norm_out,
        "b_dec": w["b_dec"] / norm_out,
    }
    sae.load_state_dict({k: v.to(device) for k, v in state.items()})
    sae.cfg.metadata.authors_encoding = encoding
    if layer is not None:
        sae.cfg.metadata.site, sae.cfg.metadata.layer = "resid_pre", layer
    return sae.eval()


def load_authors_sae(folder: str | Path, layer: int | None = None, device: str = "cpu",
                     encoding: str = "training"):
    """Convert the single safetensors file of one of the authors' SAE folders."""
    _check_encoding(encoding)
    files = sorted(Path(folder).glob("*.safetensors"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one .safetensors file in {folder}, found "
                                f"{[f.name for f in files]}")
    hook = f"blocks.{layer}.hook_resid_pre" if layer is not None else ""
    return convert_authors_weights(load_file(str(files[0])), hook, layer, device, encoding)
