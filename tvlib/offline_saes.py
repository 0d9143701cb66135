"""SAEs for an offline model, built here: text it writes, residuals, training, a model card.

    python -m tvlib.offline_saes                 # preset gemma-3-270m-offline -> data/gemma-3-270m

1. The model samples ``generation.n_texts`` texts from BOS (tvlib.generated_text),
   recording the residual stream at each SAE layer of the preset; the last
   ``n_heldout_chunks`` chunks are held out.
2. One BatchTopK SAE per layer is trained with sae-lens on the other chunks
   (tvlib.sae_training), saved where the preset reads its SAEs.
3. On the held-out texts: FVU, L0, dead fraction, and the change in next-token loss when
   the reconstruction replaces the residual. The held-out texts are also the corpus
   the notebooks read features on (``corpus.json``): the same model-written text the
   SAEs were trained on, not texts they saw.
Everything is written into a scratch folder and moved into place when complete; other
files in the output folder are left alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .generated_text import GenerationConfig, generate
from .cache import write_atomic
from .models import load_model, model_source
from .presets import get_preset
from .saes import check_sae_site
from .paths import REPO_ROOT
from .sae_training import SAETrainingConfig, loss_change, sae_quality, save_sae, train_sae


@dataclass(frozen=True)
class BuildConfig:
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    training: SAETrainingConfig = field(default_factory=SAETrainingConfig)
    n_heldout_chunks: int = 2       # chunks kept out of training: card and corpus
    loss_texts: int = 32            # held-out texts scored for the loss change


def _masked(chunks: list[dict], name: str) -> torch.Tensor:
    """The rows of tensor ``name`` at the masked-in positions of every chunk: (N, d)."""
    return torch.cat([chunk[name][chunk["mask"]] for chunk in chunks])


def _texts(tokenizer, chunks: list[dict]) -> list[str]:
    """The texts of ``chunks``, cut at the end-of-text token."""
    texts = []
    for chunk in chunks:
        for row in chunk["ids"].tolist():
            if tokenizer.eos_token_id in row:
                row = row[:row.index(tokenizer.eos_token_id)]
            texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


def build(preset_name: str = "gemma-3-270m-offline", cfg: BuildConfig = BuildConfig(),
          out_dir: Path | None = None, cache_dir: Path = REPO_ROOT / ".cache",
          log=print) -> dict:
    """Build the preset's SAEs and corpus into ``out_dir`` (default: the preset's folder)."""
    preset = get_preset(preset_name)
    if preset.sae_dir is None or preset.sae_site != "resid_post":
        raise ValueError(f"preset {preset.name!r} does not read resid_post SAEs from a local "
                         "folder: only such presets are built here")
    if cfg.training.architecture != "batchtopk":
        raise ValueError(f"architecture={cfg.training.architecture!r}: the offline SAEs and "
                         "their card are BatchTopK; pass SAETrainingConfig(architecture="
                         "'batchtopk')")
    out_dir = Path(out_dir) if out_dir is not None else Path(preset.sae_dir).parent
    layers = preset.resid_pre_layers_with_sae()
    generation = dataclasses.replace(cfg.generation, layers=layers)
    if generation.n_chunks <= cfg.n_heldout_chunks:
        raise ValueError(f"{generation.n_chunks} chunks leave none to train on after "
                         f"{cfg.n_heldout_chunks} held out: sample more texts")
    start = time.time()
    chunks = generate(model_source(preset), generation, cache_dir / "generated", log=log)
    seconds = {"generation": round(time.time() - start, 1)}
    train, heldout = chunks[:-cfg.n_heldout_chunks], chunks[-cfg.n_heldout_chunks:]
    lm = load_model(preset, device="cpu")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        saes, rows, folders = {}, [], {}
        for layer in layers:
            block = layer - 1                               # resid_post block = resid_pre - 1
            t = time.time()
            training = dataclasses.replace(cfg.training, seed=cfg.training.seed + layer)
            resid = _masked(train, f"resid_{layer}")
            log(f"layer {layer}: training on {resid.shape[0]} residuals")
            sae = train_sae(resid, f"blocks.{block}.hook_resid_post", training, log=log)
            sae.cfg.metadata.model_name = preset.name
            # measured as saved (matrices in save_dtype), not as trained
            folders[layer] = scratch / "saes" / preset.sae_id.format(layer=block)
            sae = save_sae(sae, folders[layer], training.save_dtype)
            check_sae_site(sae, lm, layer)
            quality = sae_quality(sae, _masked(heldout, f"resid_{layer}"))
            rows.append({"layer": layer, "site": f"resid_post {block}", "d_sae": sae.cfg.d_sae,
                         **quality, "train_tokens": int(resid.shape[0]),
                         "seed": training.seed, "seconds": round(time.time() - t, 1)})
            saes[layer] = sae
            log(f"  FVU {quality['fvu']:.3f}  L0 {quality['l0']:.1f}  "
                f"dead {quality['dead_fraction']:.3f}  ({rows[-1]['seconds']} s)")
        t = time.time()
        ids = torch.cat([chunk["ids"] for chunk in heldout])[:cfg.loss_texts]
        mask = torch.cat([chunk["mask"] for chunk in heldout])[:cfg.loss_texts]
        losses = loss_change(lm, saes, ids, mask)
        seconds["loss_change"] = round(time.time() - t, 1)
        build_record = {**asdict(cfg), "generation": asdict(generation)}
        for row in rows:
            row.update(losses[row["layer"]])
            record = json.dumps({"preset": preset.name, "build": build_record, "card": row},
                                indent=2)
            write_atomic(folders[row["layer"]] / "training.json",
                         lambda tmp, record=record: tmp.write_text(record))

        texts = _texts(lm.tokenizer, heldout)
        (scratch / "corpus.json").write_text(json.dumps(texts, ensure_ascii=False, indent=0) + "\n",
                                             encoding="utf-8")
        seconds["total"] = round(time.time() - start, 1)
        card = {"preset": preset.name, "model": preset.model_id,
                "build": build_record, "saes": rows, "seconds": seconds,
                "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                "train_texts": len(train) * generation.batch_size,
                "heldout_texts": len(texts)}
        (scratch / "card.json").write_text(json.dumps(card, indent=2) + "\n")
        (scratch / "MODEL_CARD.md").write_text(render_card(card, texts))
        _move_into(scratch, out_dir)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch)
    return card


def _move_into(scratch: Path, out_dir: Path) -> None:
    """Each entry of ``scratch`` replaces the one of that name in ``out_dir``; the old one
    survives (as NAME-previous) until the new one is in. Other files are left alone.
    The card files move last, so an interrupted move never leaves a card describing
    SAEs that are not there."""
    out_dir.mkdir(parents=True, exist_ok=True)
    last = ("card.json", "MODEL_CARD.md")
    for entry in sorted(scratch.iterdir(), key=lambda e: (e.name in last, e.name)):
        target = out_dir / entry.name
        backup = out_dir / f"{entry.name}-previous"
        if backup.is_dir():             # left by an interrupted earlier move
            shutil.rmtree(backup)
        elif backup.exists():
            backup.unlink()
        if target.exists():
            target.rename(backup)
        entry.rename(target)
        if backup.is_dir():
            shutil.rmtree(backup)
        elif backup.exists():
            backup.unlink()


def render_card(card: dict, texts: list[str]) -> str:
    gen, train = card["build"]["generation"], card["build"]["training"]
    lines = [
        f"# SAEs of {card['preset']}", "",
        f"Built by `python -m tvlib.offline_saes` in {card['seconds']['total'] / 60:.0f} min on "
        f"{card['torch_threads']} CPU threads (torch {card['torch']}), of which "
        f"{card['seconds']['generation'] / 60:.0f} min sampling text (chunks sampled by an "
        "earlier run are read from `.cache/generated`), "
        f"{card['seconds']['loss_change'] / 60:.0f} min measuring the loss change, the rest "
        "training.", "",
        "## Data", "",
        f"{card['train_texts'] + card['heldout_texts']} texts of {gen['n_tokens']} tokens that the "
        f"model sampled from BOS at temperature {gen['temperature']} (seed {gen['seed']}; chunks "
        f"of {gen['batch_size']}, chunk i seeded with seed * 1000003 + i). Residuals of "
        "BOS, the end-of-text token and anything after it are left out. "
        f"{card['train_texts']} texts train the SAEs; {card['heldout_texts']} held-out texts "
        "measure them and are the corpus for reading features (`corpus.json`).", "",
        "## SAEs", "",
        f"BatchTopK (k = {train['k']}) trained with sae-lens for {train['epochs']} epochs, "
        f"batches of {train['batch_tokens']} residuals, lr {train['lr']} (cosine to a tenth), "
        f"saved as JumpReLU SAEs (weights in {train['save_dtype']}, loaded as float32). "
        "Seed: training seed + resid_pre layer.", "",
        "Measured on the held-out texts. FVU: squared error over the residuals' variance. "
        "Loss: next-token cross-entropy on "
        f"{card['build']['loss_texts']} held-out texts, clean, with the reconstruction "
        "spliced in at every position but BOS, and with the residual zeroed there.", "",
        "| resid_pre | site | width | FVU | L0 | dead | loss clean | loss SAE | Δ loss | "
        "loss zeroed | train tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in card["saes"]:
        lines.append(
            f"| {row['layer']} | {row['site']} | {row['d_sae']} | {row['fvu']:.3f} | "
            f"{row['l0']:.1f} | {row['dead_fraction']:.3f} | {row['loss_clean']:.3f} | "
            f"{row['loss_sae']:.3f} | {row['delta_loss']:+.3f} | {row['loss_zero']:.2f} | "
            f"{row['train_tokens']} |")
    lines += ["", "## Three held-out texts", ""]
    lines += [f"> {text[:300]!r}" + "\n" for text in texts[:3]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tvlib.offline_saes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gemma-3-270m-offline")
    parser.add_argument("--texts", type=int, default=GenerationConfig.n_texts,
                        help="texts to sample (a multiple of the chunk size)")
    parser.add_argument("--epochs", type=int, default=SAETrainingConfig.epochs)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    cfg = BuildConfig(generation=GenerationConfig(n_texts=args.texts),
                      training=SAETrainingConfig(epochs=args.epochs))
    build(args.preset, cfg, args.out)


if __name__ == "__main__":
    main()
