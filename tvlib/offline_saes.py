"""SAEs for an offline model, built here: a text corpus, residuals, training, a model card.

    python -m tvlib.offline_saes                 # preset gemma-3-270m-offline -> data/gemma-3-270m

1. Corpus: text the model samples from BOS (tvlib.generated_text) mixed with English
   prose that installs as packages (tvlib.prose_text); duplicates dropped, no source
   above ``max_share`` of the training tokens, held-out texts split off by whole
   document (``prose_text.mix_documents``). Two held-out sets: model-written and prose.
2. Residuals of the training rows (at most ``train_tokens``) and of both held-out sets,
   recorded by batched prefill into resumable on-disk stores (tvlib.residual_store).
3. One BatchTopK SAE per layer of the preset, trained with sae-lens on the training
   residuals (tvlib.sae_training) and saved where the preset reads its SAEs.
4. On each held-out set: FVU, L0, dead fraction, and the next-token loss with the
   reconstruction spliced in against clean and mean-ablated; the SAEs that were in
   place before are measured the same way, so the card shows both. A sample of the
   held-out texts of both kinds is the corpus the notebooks read features on
   (``corpus.json``): text the SAEs never saw.
Everything is written into a scratch folder and moved into place when complete; other
files in the output folder are left alone. Sampled text and recorded residuals are
cached (``--cache``), so an interrupted build resumes where it stopped.
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

from .cache import digest, write_atomic
from .generated_text import GenerationConfig, generate
from .models import load_model, model_source
from .paths import REPO_ROOT
from .presets import get_preset
from .residual_store import read_layer, record, recording_dtype, text_rows
from .sae_training import SAETrainingConfig, loss_change, sae_quality, save_sae, train_sae
from .saes import check_sae_site

MODEL_SOURCE = "model-written"        # the corpus's name for the model's own text
HELDOUT_SETS = ("model-written", "prose")
TRAINED_FORMAT = 1      # bump when training changes: SAEs kept by earlier builds are retrained


@dataclass(frozen=True)
class BuildConfig:
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    # 4,096 features, k = 40, one pass: a measured pilot's setting (README), not yet a sweep's
    training: SAETrainingConfig = field(
        default_factory=lambda: SAETrainingConfig(width=4096, k=40.0, epochs=1))
    prose_sources: tuple[str, ...] | None = None   # None: every source of tvlib.prose_text
    max_share: float = 0.4          # no source above this share of the training tokens
    heldout_fraction: float = 0.05  # of each source's documents, kept whole
    train_tokens: int = 10_000_000  # training residuals at most (rows drawn at random)
    context: int = 128              # tokens per row, BOS included
    heldout_rows: int = 256         # rows of each held-out set measured (FVU, L0, dead)
    loss_rows: int = 48             # of those, rows scored for the loss change
    corpus_texts: int = 200         # held-out texts of each kind in corpus.json
    seed: int = 0                   # the mix's and the row draw's


def _model_texts(tokenizer, chunks: list[dict]) -> list[str]:
    """The sampled texts, cut at the end-of-text token, special tokens dropped."""
    texts = []
    for chunk in chunks:
        for row, keep in zip(chunk["ids"].tolist(), chunk["mask"].tolist()):
            text = tokenizer.decode([t for t, k in zip(row, keep) if k])
            if text.strip():
                texts.append(text)
    return texts


def _draw_rows(rows, mask, budget: int | None, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows in a seeded random order, as many as fit in ``budget`` counted tokens."""
    order = torch.randperm(rows.shape[0], generator=generator)
    rows, mask = rows[order], mask[order]
    if budget is not None:
        keep = int((mask.sum(1).cumsum(0) <= budget).sum())
        rows, mask = rows[:keep], mask[:keep]
    return rows, mask


def build(preset_name: str = "gemma-3-270m-offline", cfg: BuildConfig = BuildConfig(),
          out_dir: Path | None = None, cache_dir: Path = REPO_ROOT / ".cache",
          device: str = "cpu", prose: dict[str, list[str]] | None = None, log=print) -> dict:
    """Build the preset's SAEs and corpus into ``out_dir`` (default: the preset's folder).

    prose: {source: documents} instead of the packaged sources (your own text, tests).
    """
    from . import prose_text

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
    seconds, start = {}, time.time()

    # 1. corpus
    source = model_source(preset)
    generation = dataclasses.replace(cfg.generation, n_tokens=cfg.context - 1)
    chunks = generate(source, generation, cache_dir / "generated", device=device, log=log)
    seconds["sampling"] = round(time.time() - start, 1)
    lm = load_model(preset, device=device)              # float32 on a CPU: the notebooks'
    tokenizer = lm.tokenizer
    if prose is None:
        names = cfg.prose_sources or tuple(prose_text.PROSE_SOURCES)
        prose_text.install_sources(names)
        prose = {name: prose_text.prose_documents(name) for name in names}
        records = [prose_text.source_record(name) for name in names]
    else:
        records = [{"name": name, "documents": len(docs), "given": True}
                   for name, docs in prose.items()]
    count = lambda texts: [len(ids) for ids in tokenizer(texts, add_special_tokens=False)  # noqa: E731
                           ["input_ids"]]
    mix = prose_text.mix_documents({**prose, MODEL_SOURCE: _model_texts(tokenizer, chunks)},
                                   count, cfg.max_share, cfg.heldout_fraction, cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    train_rows = _draw_rows(*text_rows(tokenizer, [t for _, t in mix["train"]], cfg.context),
                            cfg.train_tokens, generator)
    heldout_texts = {"model-written": [t for s, t in mix["heldout"] if s == MODEL_SOURCE],
                     "prose": [t for s, t in mix["heldout"] if s != MODEL_SOURCE]}
    heldout_rows = {}
    for name, texts in heldout_texts.items():
        rows, mask = _draw_rows(*text_rows(tokenizer, texts, cfg.context), None, generator)
        heldout_rows[name] = (rows[:cfg.heldout_rows], mask[:cfg.heldout_rows])
        if not len(heldout_rows[name][0]):
            raise ValueError(f"no held-out {name} text: sample more texts or raise "
                             "heldout_fraction")
    seconds["corpus"] = round(time.time() - start - seconds["sampling"], 1)

    # 2. residuals
    t = time.time()
    dtype = recording_dtype(device)
    recorder = lm if dtype == "float32" else load_model(preset, device=device, dtype=dtype)
    log(f"recording {int(train_rows[1].sum())} training residuals at resid_pre {list(layers)} "
        f"in {dtype}")
    stores = {"train": record(recorder, *train_rows, layers, cache_dir / "residuals")}
    for name, (rows, mask) in heldout_rows.items():
        stores[name] = record(recorder, rows, mask, layers, cache_dir / "residuals")
    del recorder
    seconds["recording"] = round(time.time() - t, 1)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    previous = _previous_saes(preset, layers, lm)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        # 3. training, one layer at a time (one layer's residuals in memory)
        saes, means, rows_out, folders = {}, {}, [], {}
        for layer in layers:
            t = time.time()
            block = layer - 1                               # resid_post block = resid_pre - 1
            training = dataclasses.replace(cfg.training, seed=cfg.training.seed + layer)
            resid = read_layer(stores["train"], layer)
            means[layer] = resid.float().mean(0)
            hook = f"blocks.{block}.hook_resid_post"
            # each trained SAE is kept as it finishes: an interrupted build keeps its layers
            key = digest({"format": TRAINED_FORMAT, "training": asdict(training), "hook": hook})
            trained = cache_dir / "trained" / f"{stores['train'].name}-{key}"
            if (trained / "cfg.json").is_file():
                from sae_lens import SAE
                sae = SAE.load_from_disk(str(trained), device="cpu")
                log(f"layer {layer}: trained SAE read from {trained}")
            else:
                log(f"layer {layer}: training on {resid.shape[0]} residuals")
                sae = save_sae(train_sae(resid, hook, training, log=log), trained,
                               training.save_dtype)
            del resid
            sae.cfg.metadata.model_name = preset.name
            # measured as saved (matrices in save_dtype), not as trained
            folders[layer] = scratch / "saes" / preset.sae_id.format(layer=block)
            sae = save_sae(sae, folders[layer], training.save_dtype)
            check_sae_site(sae, lm, layer)
            saes[layer] = sae
            rows_out.append({"layer": layer, "site": f"resid_post {block}",
                             "d_sae": sae.cfg.d_sae, "train_tokens": int(train_rows[1].sum()),
                             "seed": training.seed, "seconds": round(time.time() - t, 1)})
        # 4. measurements on both held-out sets, new SAEs and the ones they replace
        t = time.time()
        measured = {"new": _measure(lm, saes, means, stores, heldout_rows, cfg)}
        if previous:
            measured["previous"] = _measure(lm, previous, means, stores, heldout_rows, cfg)
        seconds["measuring"] = round(time.time() - t, 1)
        for row in rows_out:
            row.update(measured["new"][row["layer"]])
            log(f"resid_pre {row['layer']}: " + "  ".join(
                f"{name} FVU {row[name]['fvu']:.3f} dead {row[name]['dead_fraction']:.3f} "
                f"Δloss {row[name]['delta_loss']:+.3f} recovered {row[name]['recovered']:.3f}"
                for name in HELDOUT_SETS))
        build_record = {**asdict(cfg), "generation": asdict(generation)}
        for row in rows_out:
            record_json = json.dumps({"preset": preset.name, "build": build_record,
                                      "card": row}, indent=2)
            write_atomic(folders[row["layer"]] / "training.json",
                         lambda tmp, text=record_json: tmp.write_text(text))

        corpus = [text for name in HELDOUT_SETS for text in heldout_texts[name][:cfg.corpus_texts]]
        (scratch / "corpus.json").write_text(json.dumps(corpus, ensure_ascii=False, indent=0)
                                             + "\n", encoding="utf-8")
        seconds["total"] = round(time.time() - start, 1)
        card = {"preset": preset.name, "model": preset.model_id, "build": build_record,
                "corpus": {"sources": mix["sources"], "sha256": mix["sha256"],
                           "records": records, "train_rows": int(train_rows[0].shape[0]),
                           "train_tokens": int(train_rows[1].sum()),
                           "heldout_rows": {n: int(r[1].shape[0]) for n, r in heldout_rows.items()},
                           "heldout_tokens": {n: int(r[1].sum()) for n, r in heldout_rows.items()},
                           "corpus_json_texts": len(corpus)},
                "recording_dtype": dtype, "device": device, "saes": rows_out,
                "previous_saes": measured.get("previous"), "seconds": seconds,
                "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
        (scratch / "card.json").write_text(json.dumps(card, indent=2) + "\n")
        (scratch / "MODEL_CARD.md").write_text(render_card(card, heldout_texts))
        _move_into(scratch, out_dir)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch)
    return card


def _previous_saes(preset, layers, lm) -> dict:
    """The SAEs in place before the build, where every layer has one (else {})."""
    from .saes import load_sae

    try:
        return {layer: load_sae(preset, layer, device="cpu") for layer in layers}
    except (FileNotFoundError, ValueError):
        return {}


def _measure(lm, saes: dict, means: dict, stores: dict, heldout_rows: dict,
             cfg: BuildConfig) -> dict[int, dict]:
    """{layer: {held-out set: quality and loss change}} of ``saes``."""
    results = {layer: {} for layer in saes}
    for name, (rows, mask) in heldout_rows.items():
        losses = loss_change(lm, saes, rows[:cfg.loss_rows], mask[:cfg.loss_rows], means)
        for layer, sae in saes.items():
            quality = sae_quality(sae, read_layer(stores[name], layer))
            results[layer][name] = {**quality, **losses[layer]}
    return results


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


TARGETS = {"delta_loss": 0.5, "recovered": 0.9, "fvu": 0.15, "dead_fraction": 0.10}


def meets_targets(measure: dict) -> bool:
    """The card's targets on one held-out set: Δ loss <= 0.5 nats, recovered >= 0.9,
    FVU <= 0.15, dead <= 10%."""
    return (measure["delta_loss"] <= TARGETS["delta_loss"]
            and measure["recovered"] >= TARGETS["recovered"]
            and measure["fvu"] <= TARGETS["fvu"]
            and measure["dead_fraction"] <= TARGETS["dead_fraction"])


def _table(rows: list[dict]) -> list[str]:
    lines = ["| resid_pre | held-out | width | FVU | L0 | dead | loss clean | loss SAE | Δ loss | "
             "loss mean-ablated | recovered | targets |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for name in HELDOUT_SETS:
            m = row[name]
            lines.append(
                f"| {row['layer']} | {name} | {row.get('d_sae', '')} | {m['fvu']:.3f} | "
                f"{m['l0']:.1f} | {m['dead_fraction']:.3f} | {m['loss_clean']:.3f} | "
                f"{m['loss_sae']:.3f} | {m['delta_loss']:+.3f} | {m['loss_mean_ablated']:.2f} | "
                f"{m['recovered']:.3f} | {'met' if meets_targets(m) else 'missed'} |")
    return lines


def render_card(card: dict, heldout_texts: dict[str, list[str]]) -> str:
    gen, train, build = card["build"]["generation"], card["build"]["training"], card["build"]
    corpus, seconds = card["corpus"], card["seconds"]
    lines = [
        f"# SAEs of {card['preset']}", "",
        f"Built by `python -m tvlib.offline_saes` in {seconds['total'] / 60:.0f} min on "
        f"{card['torch_threads']} CPU threads ({card['device']}, torch {card['torch']}): "
        f"{seconds['sampling'] / 60:.0f} min sampling text, {seconds['recording'] / 60:.0f} min "
        f"recording residuals in {card['recording_dtype']} (both cached: a re-run reads them), "
        f"{seconds['measuring'] / 60:.0f} min measuring, the rest training.", "",
        "## Corpus", "",
        f"Model-written text: {gen['n_texts']} texts of up to {gen['n_tokens']} tokens that the "
        f"model sampled from BOS at temperature {gen['temperature']} (seed {gen['seed']}). "
        "English prose that installs as packages (tvlib.prose_text). Exact duplicates "
        f"dropped; {build['heldout_fraction']:.0%} of each source's documents held out whole; "
        f"no source above {build['max_share']:.0%} of the training tokens. Rows of "
        f"{build['context']} tokens (BOS first); BOS, padding and special tokens are never "
        f"recorded. {corpus['train_tokens']} training tokens ({corpus['train_rows']} rows drawn "
        f"at random, seed {build['seed']}, budget {build['train_tokens']}). Corpus SHA-256: "
        f"`{corpus['sha256']}`.", "",
        "| source | documents | tokens (train) | duplicates dropped | capped away |",
        "|---|---|---|---|---|"]
    for name, row in corpus["sources"].items():
        lines.append(f"| {name} | {row.get('documents', '')} | {row.get('train_tokens', '')} | "
                     f"{row.get('duplicates', '')} | {row.get('capped_tokens', '')} |")
    lines += ["", "Sources, versions and licences:", ""]
    for rec in corpus["records"]:
        if rec.get("given"):
            lines.append(f"- {rec['name']}: given to the build ({rec['documents']} documents)")
            continue
        packages = ", ".join(f"{name} {ver}" for name, ver in rec["packages"].items())
        lines.append(f"- {rec['name']} ({rec['kind']}: {packages}): {rec['licence']}; "
                     f"{rec['documents']} documents ({rec['document']}), {rec['words']} words")
    sizes = ", ".join(f"{n}: {corpus['heldout_tokens'][n]} tokens" for n in HELDOUT_SETS)
    lines += [
        "", "## SAEs", "",
        f"BatchTopK (k = {train['k']}, width {train['width']}) trained with sae-lens for "
        f"{train['epochs']} epochs, batches of {train['batch_tokens']} residuals, lr "
        f"{train['lr']} (cosine to a tenth), saved as JumpReLU SAEs (weights in "
        f"{train['save_dtype']}, loaded as float32). Seed: training seed + resid_pre layer.", "",
        f"Measured on each held-out set ({sizes}). "
        "FVU: squared error over the residuals' variance; dead: features that fire on none "
        "of the set's tokens. Loss: next-token cross-entropy on "
        f"{build['loss_rows']} rows of each set, clean, with the reconstruction spliced in "
        "at every recorded token, and with the training tokens' mean residual there "
        "(mean ablation); recovered = (mean-ablated - SAE) / (mean-ablated - clean). "
        "Targets: Δ loss <= 0.5 nats, recovered >= 0.9, FVU <= 0.15, dead <= 10%.", ""]
    lines += _table(card["saes"])
    if card.get("previous_saes"):
        lines += ["", "The SAEs these replaced, measured the same way:", ""]
        lines += _table([{"layer": int(layer), **m} for layer, m in card["previous_saes"].items()])
    for name in HELDOUT_SETS:
        lines += ["", f"## Two held-out {name} texts", ""]
        lines += [f"> {text[:300]!r}" + "\n" for text in heldout_texts[name][:2]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tvlib.offline_saes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gemma-3-270m-offline")
    parser.add_argument("--texts", type=int, default=GenerationConfig.n_texts,
                        help="model-written texts to sample (a multiple of the chunk size)")
    parser.add_argument("--train-tokens", type=int, default=BuildConfig.train_tokens,
                        help="training residuals at most")
    default = BuildConfig().training
    parser.add_argument("--width", type=int, default=default.width)
    parser.add_argument("--k", type=float, default=default.k)
    parser.add_argument("--epochs", type=int, default=default.epochs)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--cache", type=Path, default=REPO_ROOT / ".cache",
                        help="where sampled text and recorded residuals are kept")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    cfg = BuildConfig(generation=GenerationConfig(n_texts=args.texts),
                      training=dataclasses.replace(default, width=args.width, k=args.k,
                                                   epochs=args.epochs),
                      train_tokens=args.train_tokens)
    build(args.preset, cfg, args.out, cache_dir=args.cache, device=args.device)


if __name__ == "__main__":
    main()
