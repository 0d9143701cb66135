"""Models by preset name (nnsight), and uniform access to the residual stream.

Convention (method.md): layer L is resid_pre L, the residual stream entering
block L (Hugging Face ``hidden_states[L]``).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import Any

import torch

from .architectures import architecture, submodule
from .fingerprints import folder_digest, weights_fingerprint
from .hub import hub_files
from .presets import GEMMA3_270M_PYPI, Preset, get_preset


@dataclass(frozen=True, eq=False)
class Model:
    """A loaded model: nnsight's wrapper with what tvlib loaded it as.

    ``nn`` is nnsight's object, untouched: NDIF rebuilds a remote model from its class
    path, so tvlib wraps it rather than subclassing it or setting attributes on it.
    Everything else (``trace``, ``tokenizer``, ``_module``, the module tree) reads
    through to it, so ``lm.trace(...)`` and ``lm.model.layers`` work as on nnsight's.
    """

    nn: Any                      # nnsight.modeling.transformers.TransformersModel
    preset: Preset
    remote: bool | str = False   # True: NDIF; "local": NDIF's path simulated in-process

    def __getattr__(self, name: str):
        # only reached for attributes the handle does not own; dunder lookups (copy,
        # pickle) and a handle without ``nn`` yet (while unpickling) must not recurse
        if name.startswith("__") or name == "nn":
            raise AttributeError(name)
        return getattr(self.nn, name)


def as_model(lm) -> Model:
    """``lm`` itself when it is a loaded Model, else a clear error naming the fix."""
    if isinstance(lm, Model):
        return lm
    raise TypeError(
        f"expected a model loaded by tvlib.load_model, got {type(lm).__module__}."
        f"{type(lm).__qualname__}: load it with load_model(preset) (it returns a Model "
        "holding nnsight's wrapper as .nn and the preset it was loaded as)")


def default_device() -> str:
    """Where a model or SAE goes when no device is named: ``TVLIB_DEVICE`` if set ("cpu"
    or "cuda"; the tests set "cpu"), else CUDA if available."""
    chosen = os.environ.get("TVLIB_DEVICE", "").strip()
    if not chosen:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if chosen not in ("cpu", "cuda"):
        raise ValueError(f"TVLIB_DEVICE={chosen!r}: set it to 'cpu' or 'cuda', or unset it "
                         "(CUDA when available)")
    if chosen == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("TVLIB_DEVICE='cuda' but torch sees no CUDA GPU: unset it or set "
                           "it to 'cpu'")
    return chosen


def load_model(preset: str | Preset, device: str | None = None, device_map: str | None = None,
               remote: bool | str = False, dtype: str | None = None) -> Model:
    """The preset's model wrapped by nnsight, in eval mode, ready to trace.

    device: "cpu" (float32) or "cuda" (the preset's ``dtype_cuda``); default: CUDA if
    available; ``dtype`` overrides either. device_map="auto" spreads a model too
    large for one GPU over all GPUs. Vectors, SAEs and optimisation stay float32.
    remote=True runs every trace on NDIF (nnsight's remote backend; no local weights:
    reading, steering and scoring work, gradient-based steps do not, see
    ``require_local``); remote="local" simulates that path in-process (for tests).
    Returns a ``Model``: nnsight's wrapper as ``.nn``, with ``.preset`` and ``.remote``.
    """
    preset = get_preset(preset)
    source = model_source(preset)
    if preset.name == "toy" and not Path(source).is_dir():
        raise FileNotFoundError(
            f"the embedded model is missing from {preset.model_id}; restore data/toy from "
            "git or rebuild it with `python -m tvlib.toy train`")
    local_dir = _is_local(source)
    with nullcontext() if local_dir else hub_files(preset.model_id, "model"):
        lm = _load(source, device, device_map, remote, dtype, preset)
    lm.tokenizer.padding_side = "left"
    if lm.tokenizer.pad_token is None:
        lm.tokenizer.pad_token = lm.tokenizer.eos_token
    return Model(lm, preset, remote)


def _is_local(source: str) -> bool:
    """Whether ``source`` is a local folder (an absolute path: presets and preset.json
    resolve theirs) or a hub id. transformers reads a folder named like a hub id from
    the working directory before the hub: such a folder is refused, never used."""
    path = Path(source)
    if path.is_absolute():
        if not path.is_dir():
            raise FileNotFoundError(f"the model folder {source} does not exist")
        return True
    if path.exists():
        raise ValueError(
            f"the working directory {Path.cwd()} holds {source!r}, which transformers would "
            f"load instead of the hub model {source!r}: rename or move it, or run from "
            "another directory; to use that folder as the model, name it by its absolute "
            "path in a preset.json")
    return False


def _load(source: str, device, device_map, remote, dtype, preset: Preset):
    from nnsight.modeling.transformers import TransformersModel

    if remote is True:   # a meta-device skeleton: config and tokenizer only
        from transformers import AutoTokenizer
        return TransformersModel(source, task="text-generation",
                                 tokenizer=AutoTokenizer.from_pretrained(source))
    device = device or default_device()
    on_cpu = device == "cpu" and device_map is None
    dtype = dtype or ("float32" if on_cpu else preset.dtype_cuda)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype {dtype!r} is not one of 'float32', 'bfloat16', 'float16'")
    # nnsight loads through a transformers pipeline, which puts a model it is given no
    # ``device`` for on the first accelerator: name the device, or pass the device map
    placement = {"device_map": device_map} if device_map else {"device": device}
    lm = TransformersModel(source, task="text-generation", dtype=getattr(torch, dtype),
                           dispatch=True, **placement)
    landed = lm._module.get_input_embeddings().weight.device
    if device_map is None and landed.type != torch.device(device).type:
        raise RuntimeError(f"the model was asked for on {device!r} but landed on {landed}: "
                           "report this with your transformers and nnsight versions")
    lm._module.eval()
    lm._module.requires_grad_(False)   # never trained here; gradients go to vectors
    return lm


def model_source(preset: str | Preset) -> str:
    """What the preset's model loads from: a local folder or a hub id. A model from a
    PyPI package is converted into a local folder on first use (tvlib.gguf_model)."""
    preset = get_preset(preset)
    if preset.model_id == GEMMA3_270M_PYPI:
        from .gguf_model import offline_gemma3_270m
        return str(offline_gemma3_270m())
    return preset.model_id


def model_device(lm) -> torch.device:
    """Where the model's inputs go (the embedding's device); CPU for remote models."""
    if as_model(lm).remote is True:
        return torch.device("cpu")
    return lm._module.get_input_embeddings().weight.device


def model_dtype(lm) -> torch.dtype:
    return lm._module.get_input_embeddings().weight.dtype


def to_model(lm, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model inputs moved to the model's input device (tensors; other arguments as given)."""
    device = model_device(lm)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def context_length(lm) -> int | None:
    """The longest input the model handles: what its position embeddings cover, or what it
    was trained on where the preset records less (``trained_context``); None if neither
    is recorded."""
    config = lm._module.config
    # GPT-2's config maps max_position_embeddings to n_positions
    limits = [int(config.max_position_embeddings)] if getattr(
        config, "max_position_embeddings", None) else []
    preset = as_model(lm).preset
    if preset.trained_context:
        limits.append(int(preset.trained_context))
    return min(limits) if limits else None


def check_context(lm, width: int) -> None:
    """Fail for inputs of ``width`` tokens longer than the model's context."""
    limit = context_length(lm)
    if limit is not None and width > limit:
        raise ValueError(
            f"inputs of {width} tokens are longer than the model's context of {limit} "
            "tokens: lower n_shots (or shorten the texts) so that every prompt fits")


def trace(lm, inputs: dict[str, torch.Tensor]):
    """``lm.trace`` on inputs moved to the model, remotely when the model was loaded so.

    Inputs longer than the model's context are refused here, for every forward pass.
    """
    check_context(lm, inputs["input_ids"].shape[-1])
    remote = as_model(lm).remote
    inputs = to_model(lm, inputs)
    return lm.trace(inputs, remote=remote) if remote else lm.trace(inputs)


def require_local(lm, what: str) -> None:
    """Fail for steps that need gradients through a model that runs remotely.

    The in-process simulation (remote="local") is refused too, so that it shows
    what NDIF would refuse.
    """
    if as_model(lm).remote:
        raise RuntimeError(
            f"{what} optimises through the model with gradients, step after step; remote "
            "traces return saved values, not autograd graphs. Load the model locally "
            "(load_model(preset, device='cuda'), device_map='auto' across GPUs).")


def blocks(lm):
    """The model's list of transformer blocks (where its family's row says)."""
    return submodule(lm, architecture(lm).blocks)


def final_norm_scale(lm) -> tuple[torch.Tensor, bool]:
    """(scale, centres): what the final norm does to a direction added to the residual.

    Up to the positive factor 1 / rms (or 1 / std) that depends on the whole residual, the
    final norm maps a direction ``d`` to ``scale * d``, or for LayerNorm (``centres``) to
    ``scale * (d - d.mean())``; a LayerNorm bias does not depend on ``d``. ``scale`` is
    float32 (d,), on the norm's device: Llama's (and the embedded model's) and GPT-2's
    ``weight``, Gemma's (1, 2, 3) ``1 + weight``. Folded into the unembedding this is
    TransformerLens's ``fold_ln`` (with its centring of the unembedding for LayerNorm).
    """
    family = architecture(lm)
    norm = lm._module.get_submodule(family.final_norm)
    weight = norm.weight.detach()
    if weight.device.type == "meta":
        raise ValueError("the model's weights are not here (remote=True loads a skeleton): "
                         "load the model locally to read its final norm")
    weight = weight.float()
    return (1 + weight if family.norm_offset else weight), family.norm_centres


def unembedding(lm) -> torch.Tensor:
    """The unembedding matrix W_U as the model stores it, (vocab, d), detached."""
    weight = lm._module.get_output_embeddings().weight.detach()
    if weight.device.type == "meta":
        raise ValueError("the model's weights are not here (remote=True loads a skeleton): "
                         "load the model locally to read its unembedding")
    return weight


def n_layers(lm) -> int:
    return len(blocks(lm))


def d_model(lm) -> int:
    return lm._module.config.hidden_size       # GPT-2's config maps it to n_embd


def check_layer(lm, layer: int) -> None:
    n = n_layers(lm)
    if isinstance(layer, bool) or not isinstance(layer, Integral):
        raise ValueError(f"layer must be an int (a resid_pre layer 0..{n - 1}), not {layer!r}")
    if not 0 <= layer < n:
        raise ValueError(f"layer {layer} is out of range: this model has resid_pre layers "
                         f"0..{n - 1}")


def check_layers(lm, layers) -> list[int]:
    """``layers`` as a list, refused if empty, not a list of ints in range, or repeated."""
    if isinstance(layers, (int, str)) or not hasattr(layers, "__iter__"):
        raise ValueError(f"layers must be a list of resid_pre layers, e.g. [{layers}], not "
                         f"{layers!r}")
    layers = list(layers)
    if not layers:
        raise ValueError("layers is empty: give at least one resid_pre layer, or None for the "
                         "default layers")
    for layer in layers:
        check_layer(lm, layer)
    layers = [int(layer) for layer in layers]
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers {layers} repeats a layer: list each layer once")
    return layers


def resid_pre(lm, layer: int):
    """Inside a trace: the residual stream entering block ``layer``, shape (B, T, d).

    Editing it in place (``resid_pre(lm, L)[rows, pos] += v``) steers the model.
    """
    check_layer(lm, layer)
    return blocks(lm)[layer].input


def model_identity(lm) -> dict:
    """What the model's results depend on: its files, its weights as they are in
    memory, dtype, device kind (cache keys).

    Every file of the model's folder counts (weights, config, tokenizer); hub
    models are read from their cached snapshot. The in-memory fingerprint
    (``fingerprints.weights_fingerprint``) tells an edited model from its files.
    """
    preset = as_model(lm).preset
    source = Path(model_source(preset))
    if not _is_local(str(source)):
        from .hub import cached_snapshot
        source = cached_snapshot(preset.model_id)
        if source is None:
            raise FileNotFoundError(f"the files of {preset.model_id!r} are not in the local hub "
                                    "cache: load the model with load_model first")
    remote = lm.remote
    # a remote model's weights are NDIF's, read from the files; a local one's as edited
    weights = "remote" if remote is True else weights_fingerprint(lm._module)
    return {"model_id": preset.model_id, "files": folder_digest(source), "weights": weights,
            "dtype": str(model_dtype(lm)).removeprefix("torch."),
            "device": "remote" if remote is True else model_device(lm).type}
