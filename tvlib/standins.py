"""Local stand-ins for the real-model presets: the same formats, random weights, no hub.

``make_standin("gemma-2-2b", folder)`` writes a randomly initialised small model
of the preset's architecture (GPT-2, Gemma, Gemma 2 or Gemma 3), a tokenizer, SAEs in the
preset's format (sae-lens folders named by its SAE ids, or the writeup authors'
gated files) at its site, a small text corpus and a ``preset.json``. Passing the
folder wherever a preset name goes (``load_model(folder)``, a notebook's
``PRESET``) then runs the real-model code path offline. The weights are random,
so the numbers mean nothing; the shapes, sites and formats are the real ones.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from .presets import get_preset, Preset, preset_to_json, PRESETS
from .paths import TOY_DIR

ARCHITECTURES = {"gpt2": "gpt2", "gemma-2b": "gemma", "gemma-2b-it-authors": "gemma",
                 "gemma-2b-it-authors-scripts": "gemma",
                 "gemma-2-2b": "gemma2", "gemma-3-270m": "gemma3",
                 "gemma-3-270m-neuronpedia": "gemma3", "gemma-3-270m-offline": "gemma3"}


def model_config(architecture: str, vocab_size: int, n_layers: int, d_model: int,
                 bos_id: int, eos_id: int, pad_id: int):
    """A small transformers config of the given family."""
    from transformers import Gemma2Config, Gemma3TextConfig, GemmaConfig, GPT2Config

    special = dict(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    if architecture == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=256, n_embd=d_model,
                          n_layer=n_layers, n_head=4, **special)
    family = {"gemma": GemmaConfig, "gemma2": Gemma2Config, "gemma3": Gemma3TextConfig}
    extra = {}
    if architecture == "gemma3":    # sliding-window blocks, then one full-attention block
        extra = dict(sliding_window=8, layer_types=["sliding_attention"] * (n_layers - 1)
                     + ["full_attention"])
    return family[architecture](
        vocab_size=vocab_size, hidden_size=d_model, intermediate_size=2 * d_model,
        num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=1,
        head_dim=d_model // 4, max_position_embeddings=256, **special, **extra)


def random_sae_weights(d_in: int, d_sae: int, generator: torch.Generator) -> dict:
    """Unit-norm decoder rows and a matching encoder: a random but well-formed SAE."""
    W_dec = torch.randn(d_sae, d_in, generator=generator)
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    return {"W_enc": W_dec.T.clone(), "b_enc": -0.1 * torch.rand(d_sae, generator=generator),
            "W_dec": W_dec, "b_dec": torch.zeros(d_in)}


def save_sae_lens_sae(folder: Path, architecture: str, weights: dict, hook_name: str) -> None:
    """An SAE folder as sae-lens writes it (``cfg.json`` + ``sae_weights.safetensors``)."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    d_sae, d_in = weights["W_dec"].shape
    kinds = {"standard": (StandardSAE, StandardSAEConfig),
             "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig)}
    sae_class, cfg_class = kinds[architecture]
    sae = sae_class(cfg_class(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook_name)))
    state = dict(weights)
    if architecture == "jumprelu":
        state["threshold"] = torch.full((d_sae,), 0.05)
    sae.load_state_dict(state)
    sae.save_model(str(folder))


def save_authors_sae(folder: Path, weights: dict, generator: torch.Generator,
                     mean_norm: float | None = None) -> None:
    """An SAE file in the writeup authors' gated format (keys as in their repository)."""
    d_sae, d_in = weights["W_dec"].shape
    tensors = {**weights, "s_gate": 0.5 * torch.randn(d_sae, generator=generator),
               "b_gate": 0.1 * torch.randn(d_sae, generator=generator),
               "scaling_factor": 0.5 + torch.rand(d_sae, generator=generator)}
    if mean_norm is not None:
        tensors["mean_norm"] = torch.tensor(mean_norm)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))


def sae_architecture(preset: Preset) -> str:
    """The architecture of a sae-lens preset's SAEs: read from the first one's cfg.json
    when they are shipped in a local folder, JumpReLU for Gemma Scope, else standard."""
    if preset.sae_dir is not None:
        cfg = Path(preset.sae_dir) / preset.sae_id.format(layer=preset.sae_layers[0]) / "cfg.json"
        if cfg.is_file():
            return json.loads(cfg.read_text(encoding="utf-8"))["architecture"]
    return "jumprelu" if "gemma-scope" in (preset.sae_release or "") else "standard"


def make_standin(preset_name: str, out_dir: str | Path, n_layers: int = 4, d_model: int = 64,
                 expansion: int = 4, seed: int = 0) -> Preset:
    """Write a stand-in for ``preset_name`` into ``out_dir``; return its preset."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if preset_name not in ARCHITECTURES:
        raise ValueError(f"no stand-in for preset {preset_name!r}; those are {sorted(ARCHITECTURES)}")
    real = PRESETS[preset_name]
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty: a stand-in is written into a new or "
                              "empty folder only, so that nothing in it is overwritten")
    if n_layers < 2 or d_model % 4:
        raise ValueError(f"a stand-in needs n_layers >= 2 and d_model divisible by 4 (4 "
                         f"heads), not n_layers={n_layers}, d_model={d_model}")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)

    # The embedded model's word-level tokenizer covers every task word, offline.
    tokenizer = AutoTokenizer.from_pretrained(TOY_DIR / "model")
    config = model_config(ARCHITECTURES[preset_name], len(tokenizer), n_layers, d_model,
                          tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out_dir / "model")
    tokenizer.save_pretrained(out_dir / "model")

    # SAE blocks at the preset's site, so that every resid_pre layer 1..n-1 has one.
    blocks = range(n_layers - 1) if real.sae_site == "resid_post" else range(1, n_layers)
    sae_dir = out_dir / "saes"
    for block in blocks:
        weights = random_sae_weights(d_model, expansion * d_model, generator)
        folder_name = real.sae_id.format(layer=block).replace("*", "3.00E-05")
        if real.sae_format == "authors":
            save_authors_sae(sae_dir / folder_name, weights, generator,
                             mean_norm=2 * math.sqrt(d_model))   # a norm factor of 1/2
        else:
            save_sae_lens_sae(sae_dir / folder_name, sae_architecture(real), weights,
                              f"blocks.{block}.hook_{real.sae_site}")

    corpus = json.loads((TOY_DIR / "corpus.json").read_text(encoding="utf-8"))[:40]
    (out_dir / "corpus.json").write_text(json.dumps(corpus))
    # Paths relative to preset.json, so the folder can be copied elsewhere.
    preset = dataclasses.replace(
        real, name=f"{preset_name}-standin", model_id="model", sae_layers=tuple(blocks),
        sae_release=None, sae_repo=None, sae_dir="saes", n_shots=4, dtype_cuda="float32",
        task_layer=n_layers - 1, detector_layer=n_layers - 2, max_pairs_per_task=100,
        corpus="corpus.json")
    preset_to_json(preset, out_dir / "preset.json")
    return get_preset(out_dir)
