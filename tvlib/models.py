"""Models and SAEs by preset name, and uniform access to the residual stream.

Convention (method.md): layer L is resid_pre L, the residual stream entering
block L (Hugging Face ``hidden_states[L]``). An SAE trained on resid_post L
reads the same tensor as resid_pre L+1; presets record their SAE site and
``load_sae`` converts, so callers always speak in resid_pre layers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .paths import TOY_DIR

SITES = ("resid_pre", "resid_post")


@dataclass(frozen=True)
class Preset:
    """One row of the preset table: a model and where its SAEs come from."""

    name: str
    model_id: str                   # hub id, or a local directory
    sae_site: str                   # "resid_pre" or "resid_post": what the SAEs read
    sae_layers: tuple[int, ...]     # block indices with an SAE, at ``sae_site``
    sae_release: str | None = None  # sae-lens release; None: local folders ``sae_dir``
    sae_id: str = "layer_{layer}"   # id (release) or folder name (local), by block index
    sae_dir: str | None = None
    n_shots: int = 19               # demonstrations per few-shot prompt (method.md)
    dtype_cuda: str = "bfloat16"
    max_pairs_per_task: int | None = None   # the embedded model knows only the first pairs

    def resid_pre_layers_with_sae(self) -> tuple[int, ...]:
        """The resid_pre layers at which an SAE can be used."""
        shift = 1 if self.sae_site == "resid_post" else 0
        return tuple(layer + shift for layer in self.sae_layers)


PRESETS: dict[str, Preset] = {
    "toy": Preset("toy", str(TOY_DIR / "model"), "resid_pre", tuple(range(6)),
                  sae_dir=str(TOY_DIR / "saes"), n_shots=8, dtype_cuda="float32",
                  max_pairs_per_task=100),
    "gpt2": Preset("gpt2", "gpt2", "resid_pre", tuple(range(12)),
                   sae_release="gpt2-small-res-jb", sae_id="blocks.{layer}.hook_resid_pre",
                   n_shots=10),
    "gemma-2b": Preset("gemma-2b", "google/gemma-2b", "resid_post", (0, 6, 10, 12, 17),
                       sae_release="gemma-2b-res-jb", sae_id="blocks.{layer}.hook_resid_post"),
    "gemma-2-2b": Preset("gemma-2-2b", "google/gemma-2-2b", "resid_post", tuple(range(26)),
                         sae_release="gemma-scope-2b-pt-res-canonical",
                         sae_id="layer_{layer}/width_16k/canonical"),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(preset: str | Preset, device: str | None = None):
    """The preset's model wrapped by nnsight, in eval mode, ready to trace.

    CPU runs in float32; CUDA uses the preset's ``dtype_cuda``.
    """
    from nnsight.modeling.transformers import TransformersModel

    preset = get_preset(preset) if isinstance(preset, str) else preset
    device = device or default_device()
    if preset.name == "toy" and not Path(preset.model_id).is_dir():
        raise FileNotFoundError(
            f"the embedded model is missing from {preset.model_id}; restore data/toy from "
            "git or rebuild it with `python -m tvlib.toy train`")
    dtype = torch.float32 if device == "cpu" else getattr(torch, preset.dtype_cuda)
    lm = TransformersModel(preset.model_id, task="text-generation", device_map=device,
                           dtype=dtype, dispatch=True)
    lm.tokenizer.padding_side = "left"
    if lm.tokenizer.pad_token is None:
        lm.tokenizer.pad_token = lm.tokenizer.eos_token
    lm._module.eval()
    lm._module.requires_grad_(False)   # the model is never trained here; gradients go to vectors
    lm.preset = preset
    return lm


def blocks(lm):
    """The model's list of transformer blocks (Llama/Gemma or GPT-2 layout)."""
    inner = lm._module
    if hasattr(inner, "model") and hasattr(inner.model, "layers"):
        return lm.model.layers
    if hasattr(inner, "transformer") and hasattr(inner.transformer, "h"):
        return lm.transformer.h
    raise ValueError(f"cannot find the transformer blocks of {type(inner).__name__}")


def n_layers(lm) -> int:
    return len(blocks(lm))


def d_model(lm) -> int:
    return lm._module.config.hidden_size if hasattr(lm._module.config, "hidden_size") \
        else lm._module.config.n_embd


def check_layer(lm, layer: int) -> None:
    n = n_layers(lm)
    if not 0 <= layer < n:
        raise ValueError(f"layer {layer} is out of range: this model has resid_pre layers "
                         f"0..{n - 1}")


def resid_pre(lm, layer: int):
    """Inside a trace: the residual stream entering block ``layer``, shape (B, T, d).

    Editing it in place (``resid_pre(lm, L)[rows, pos] += v``) steers the model.
    """
    check_layer(lm, layer)
    return blocks(lm)[layer].input


def model_fingerprint(lm) -> str:
    """A short id of the weights' source, for keying cached results."""
    source = Path(lm.preset.model_id)
    if source.is_dir():
        digest = hashlib.sha256((source / "config.json").read_bytes())
        for weights in sorted(source.glob("*.safetensors")):
            with open(weights, "rb") as f:   # size and tail: cheap, changes on retraining
                f.seek(max(0, weights.stat().st_size - 4096))
                digest.update(f.read())
        return f"{lm.preset.name}-{digest.hexdigest()[:12]}"
    return lm.preset.model_id


def load_sae(preset: str | Preset, layer: int, device: str = "cpu"):
    """The sae-lens SAE that reads resid_pre ``layer`` for this preset.

    For presets whose SAEs sit at resid_post, the SAE of block ``layer - 1`` is
    loaded (it reads the same tensor).
    """
    from sae_lens import SAE

    preset = get_preset(preset) if isinstance(preset, str) else preset
    available = preset.resid_pre_layers_with_sae()
    if layer not in available:
        raise ValueError(f"preset {preset.name!r} has no SAE reading resid_pre {layer}; "
                         f"SAEs exist at resid_pre layers {list(available)}")
    block = layer - 1 if preset.sae_site == "resid_post" else layer
    sae_id = preset.sae_id.format(layer=block)
    if preset.sae_release is None:
        folder = Path(preset.sae_dir) / sae_id
        if not (folder / "cfg.json").is_file():
            raise FileNotFoundError(f"no SAE at {folder} (expected cfg.json and "
                                    "sae_weights.safetensors)")
        sae = SAE.load_from_disk(str(folder), device=device)
    else:
        sae = SAE.from_pretrained(preset.sae_release, sae_id, device=device)
    sae.eval()
    return sae


def check_sae_fits(sae, lm) -> None:
    """Fail loudly when an SAE's width does not match the model's residual stream."""
    if sae.cfg.d_in != d_model(lm):
        raise ValueError(f"SAE input width {sae.cfg.d_in} does not match the model's "
                         f"residual width {d_model(lm)}: load the SAE made for this model")

