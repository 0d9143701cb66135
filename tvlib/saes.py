"""SAEs by preset and resid_pre layer (sae-lens), and the checks that an SAE is used
only at the site it was trained for."""

from __future__ import annotations

import re
from numbers import Integral
from pathlib import Path

import torch

from .authors_sae import load_authors_sae
from .fingerprints import folder_digest
from .hub import download_first_folder, hub_files
from .models import as_model, d_model, default_device
from .presets import PRESETS, Preset, get_preset


def sae_identity(preset: str | Preset, layer: int) -> dict:
    """What results from the SAE at resid_pre ``layer`` depend on (cache keys)."""
    preset = get_preset(preset)
    folder, sae_id = sae_source(preset, layer)
    return {"source": preset.sae_release or preset.sae_repo or "local", "id": sae_id,
            "format": preset.sae_format, "encoding": preset.sae_encoding,
            "files": folder_digest(folder)}


def sae_source(preset: str | Preset, layer: int) -> tuple[Path, str]:
    """(folder holding the SAE's files, its id) for resid_pre ``layer``; downloads if needed."""
    preset = get_preset(preset)
    available = preset.resid_pre_layers_with_sae()
    if isinstance(layer, bool) or not isinstance(layer, Integral):
        raise ValueError(f"layer must be an int (a resid_pre layer), not {layer!r} "
                         f"({type(layer).__name__}); preset {preset.name!r} has SAEs at "
                         f"resid_pre layers {list(available)}")
    if layer not in available:
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
        with _release_files(preset.sae_release, sae_id):
            sae = SAE.from_pretrained(preset.sae_release, sae_id, device=device)
    elif preset.sae_format == "authors":
        # their files record no site; their folder names do ("it-l12-residual-...")
        named = re.search(r"-l(\d+)-", folder.name)
        sae = load_authors_sae(folder, int(named.group(1)) if named else layer, device,
                               encoding=preset.sae_encoding)
    else:
        from sae_lens import SAE
        try:
            sae = SAE.load_from_disk(str(folder), device=device)
        except (ValueError, KeyError, TypeError) as err:    # JSONDecodeError is a ValueError
            raise ValueError(f"the SAE folder {folder} cannot be loaded: its cfg.json is broken "
                             f"or incomplete ({type(err).__name__}: {err}); restore the folder "
                             "(git, or rebuild the SAEs)") from None
    check_sae_finite(sae, f"the SAE in {folder}")
    check_sae_model(sae, preset, f"the SAE in {folder}")
    recorded = sae_site(sae)
    if recorded != ("resid_pre", layer):
        found = "no site" if recorded is None else f"resid_pre {recorded[1]}"
        raise ValueError(
            f"the SAE in {folder} records {found} ({_record_text(sae)}), but preset "
            f"{preset.name!r} lists it for resid_pre {layer} ({preset.sae_site} block "
            f"{layer - (preset.sae_site == 'resid_post')}): check the preset's sae_site, "
            "sae_layers and sae_id, or replace the SAE folder with the right one")
    return sae.eval().requires_grad_(False)   # never trained here; gradients go to weights


class SAEShelf:
    """A preset's SAEs by resid_pre layer, each loaded (by ``load_sae``, with its checks) on
    first use and kept: a sweep over tasks loads each layer's SAE once.

    At most ``max_bytes`` of SAE weights are kept (default 4 GB: every layer of the embedded
    and the Gemma 3 270M SAEs, about 13 of Gemma 2 2B's); beyond it the SAE loaded first
    is dropped, and loaded again if asked for.
    """

    def __init__(self, preset: str | Preset, device: str | None = None,
                 max_bytes: int = 4 * 2 ** 30):
        self.preset, self.device, self.max_bytes = get_preset(preset), device, max_bytes
        self._loaded: dict[int, object] = {}      # in load order

    def __getitem__(self, layer: int):
        if layer not in self._loaded:
            sae = load_sae(self.preset, layer, self.device)
            size = sum(t.numel() * t.element_size() for t in sae.state_dict().values())
            while self._loaded and size * (len(self._loaded) + 1) > self.max_bytes:
                del self._loaded[next(iter(self._loaded))]
            self._loaded[layer] = sae
        return self._loaded[layer]


def model_shelf(lm, saes: SAEShelf | None = None) -> SAEShelf:
    """``saes``, refused unless it holds the SAEs of ``lm``'s preset; a new shelf if None.

    Results are cached under the model's preset: SAEs of another preset would be
    stored as if they were its own.
    """
    lm = as_model(lm)
    if saes is None:
        return SAEShelf(lm.preset)
    if saes.preset != lm.preset:
        raise ValueError(f"the SAEs passed are preset {saes.preset.name!r}'s, but the model "
                         f"was loaded as preset {lm.preset.name!r}: pass SAEShelf(lm.preset) "
                         "or leave saes out")
    return saes


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


def check_sae_finite(sae, name: str = "this SAE") -> None:
    """Fail if any of the SAE's weights is NaN or infinite (a damaged file or an edit):
    every result computed through it would be NaN, and the error would name another
    cause (a cleanup's learning rate)."""
    for param_name, tensor in [*sae.named_parameters(), *sae.named_buffers()]:
        bad = int((~torch.isfinite(tensor.detach())).sum()) if tensor.is_floating_point() else 0
        if bad:
            raise ValueError(f"{name} holds {bad} NaN or infinite values in {param_name}: "
                             "reload it from its files (or rebuild them); an SAE is never "
                             "used with non-finite weights")


def sae_model_names(preset: Preset) -> set[str]:
    """The model names an SAE of this preset may record (``cfg.metadata.model_name``): the
    preset's name and model, the names of the presets that run the same model (a copy of
    a preset under another name), and for a sae-lens release its catalogue's model."""
    names = {preset.name, preset.model_id}
    names |= {other.name for other in PRESETS.values() if other.model_id == preset.model_id}
    if preset.sae_release is not None:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
        entry = get_pretrained_saes_directory().get(preset.sae_release)
        if entry is not None:
            names.add(entry.model)
    return names


def _bare_model_name(name: str) -> str:
    # "google/gemma-3-270m" and "gemma-3-270m" name the same model
    return name.rsplit("/", 1)[-1].lower()


def check_sae_model(sae, preset: Preset, name: str = "this SAE") -> None:
    """Fail if the SAE records that it was trained on another model than the preset's.

    An SAE that records no model is let through (many formats do not); its width and
    site are still checked.
    """
    recorded = getattr(sae.cfg.metadata, "model_name", None)
    if recorded is None:
        return
    expected = sae_model_names(preset)
    if _bare_model_name(str(recorded)) not in {_bare_model_name(n) for n in expected}:
        raise ValueError(
            f"{name} records that it was trained on model {recorded!r}, but preset "
            f"{preset.name!r} runs {preset.model_id!r} (its SAEs may record "
            f"{sorted(expected)}): load the SAEs made for this model, or fix "
            "cfg.json's metadata.model_name if it is wrong")


def check_sae_site(sae, lm, layer: int) -> None:
    """Fail unless ``sae`` fits the model's width, was made for its model (where it records
    one), has finite weights and records that it reads resid_pre ``layer``.

    ``lm`` may be None where no model is involved (then only the site is checked).
    """
    if lm is not None:
        check_sae_fits(sae, lm)
        check_sae_model(sae, as_model(lm).preset)
    check_sae_finite(sae)
    recorded = sae_site(sae)
    if recorded is None:
        raise ValueError(
            f"this SAE does not record which layer it reads ({_record_text(sae)}), so it "
            f"cannot be checked against resid_pre {layer}: load it with "
            "tvlib.saes.load_sae(preset, layer), or set sae.cfg.metadata.hook_name = "
            f"'blocks.{layer}.hook_resid_pre' if you know it was trained there")
    if recorded != ("resid_pre", layer):
        raise ValueError(
            f"this SAE reads resid_pre {recorded[1]} ({_record_text(sae)}), not resid_pre "
            f"{layer}: load the SAE for this layer with tvlib.saes.load_sae(preset, {layer})")


def _release_entry(release: str, sae_id: str) -> tuple[str, str]:
    """(repository, folder in it) of one SAE of a sae-lens release, from sae-lens's catalogue."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    lookup = get_pretrained_saes_directory().get(release)
    if lookup is None or sae_id not in lookup.saes_map:
        raise ValueError(f"sae-lens release {release!r} has no SAE {sae_id!r} in the installed "
                         "catalogue; check the preset's sae_release and sae_id")
    return lookup.repo_id, lookup.saes_map[sae_id]


def _release_files(release: str, sae_id: str):
    """``hub_files`` for one SAE of a sae-lens release: its folder in the release's repository."""
    repo_id, folder = _release_entry(release, sae_id)
    return hub_files(repo_id, f"SAE {sae_id!r} of sae-lens release {release!r}, in "
                     "repository", f"{folder}/*", include=f"{folder}/*")


def _release_folder(release: str, sae_id: str) -> Path:
    """The local folder of one SAE of a sae-lens release (downloaded if not cached)."""
    from huggingface_hub import constants, snapshot_download

    repo_id, folder = _release_entry(release, sae_id)
    with _release_files(release, sae_id):
        root = snapshot_download(repo_id, allow_patterns=[f"{folder}/*"],
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
