"""SAEs for an offline model, built here: a text corpus, residuals, training, a model card.

    python -m tvlib.offline_saes                 # preset gemma-3-270m-offline -> data/gemma-3-270m

1. Corpus: text the model samples from BOS (tvlib.generated_text) mixed with English
   prose that installs as packages (tvlib.prose_text); duplicates dropped, no source
   above ``max_share`` of the training tokens, held-out texts split off by whole
   document (``prose_text.mix_documents``). Two held-out sets: model-written and prose.
2. Residuals of the training rows (``train_tokens``, ``model_share`` of them
   model-written) and of both held-out sets, recorded by batched prefill into
   resumable on-disk stores (tvlib.residual_store).
3. A sweep: each of ``SWEEP``'s settings trained at one layer on part of the training
   tokens, measured on both held-out sets; the best (lowest mean Δ loss) then trains
   one BatchTopK SAE per layer of the preset with sae-lens (tvlib.sae_training), saved
   where the preset reads its SAEs. With ``--curve``, the chosen setting is also trained
   at the sweep's layer on the first n training tokens for each n given (the training-
   token curve: how far more tokens would take the SAEs); ``--curve-only`` adds such a
   curve to the card of SAEs already built, leaving them as they are.
4. On each held-out set: FVU, L0, silent features, and the next-token loss with the
   reconstruction spliced in against clean and mean-ablated; dead features, counted on
   ``dead_tokens`` training residuals (rare features are silent on a held-out set of a
   few tens of thousands of tokens without being dead); the SAEs that were in
   place before are measured the same way, so the card shows both. A sample of the
   held-out texts of both kinds is the corpus the notebooks read features on
   (``corpus.json``): text the SAEs never saw.
Everything is written into a scratch folder and moved into place when complete; other
files in the output folder are left alone. Sampled text and recorded residuals are
cached (``--cache``), and so is each trained SAE as it finishes: an interrupted build
resumes where it stopped.
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

from .cache import write_atomic
from .fingerprints import code_fingerprint, digest
from .generated_text import GenerationConfig, generate, ship
from .models import load_model, model_source
from .paths import REPO_ROOT
from .presets import get_preset
from .residual_store import read_layer, record, recording_dtype, text_rows
from .sae_training import (SAETrainingConfig, feature_density, loss_change, sae_quality,
                           save_sae, train_sae)
from .saes import check_sae_site

MODEL_SOURCE = "model-written"        # the corpus's name for the model's own text
HELDOUT_SETS = ("model-written", "prose")
SHIPPED_TEXTS = "generated"           # the output folder's model-written texts
TRAINED_FORMAT = 1      # bump when training changes: SAEs kept by earlier builds are retrained
MEASURED_FORMAT = 2     # bump when ``_measure`` changes: kept measurements are redone


# Settings measured before the build (``sweep``): the pilot's (4,096 wide, batches of 4,096:
# under a hundred steps per 400k tokens), more steps (smaller batches), a higher learning
# rate, half the width, more active features, two passes over the tokens.
SWEEP = (
    SAETrainingConfig(width=4096, k=40.0, lr=1e-3, batch_tokens=4096, epochs=1),
    SAETrainingConfig(width=4096, k=40.0, lr=1e-3, batch_tokens=1024, epochs=1),
    SAETrainingConfig(width=4096, k=40.0, lr=3e-3, batch_tokens=1024, epochs=1),
    SAETrainingConfig(width=2048, k=40.0, lr=3e-3, batch_tokens=1024, epochs=1),
    SAETrainingConfig(width=4096, k=64.0, lr=3e-3, batch_tokens=1024, epochs=1),
    SAETrainingConfig(width=4096, k=40.0, lr=3e-3, batch_tokens=1024, epochs=2),
)


@dataclass(frozen=True)
class BuildConfig:
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    # used as given when ``sweep`` is empty (else the sweep's best is)
    training: SAETrainingConfig = field(
        default_factory=lambda: SAETrainingConfig(width=4096, k=40.0, epochs=1))
    prose_sources: tuple[str, ...] | None = None   # None: every source of tvlib.prose_text
    max_share: float = 0.4          # no source above this share of the training tokens
    # The model's own text is a small corpus next to the prose (sampling is slow on a
    # CPU), yet the notebooks read the model on text like it: its rows get this share of
    # the training budget, repeated (a new shuffle each pass) when there are fewer.
    model_share: float = 0.3
    sweep: tuple[SAETrainingConfig, ...] = SWEEP   # () to train with ``training`` as given
    sweep_layer: int | None = None  # resid_pre; None: the preset's last SAE layer
    sweep_tokens: int = 400_000     # the sweep trains on this many of the training tokens
    # The training-token curve: the chosen setting trained at ``sweep_layer`` on the first
    # n training tokens for each n here, measured like the layers (() for none)
    curve_tokens: tuple[int, ...] = ()
    heldout_fraction: float = 0.05  # of each source's documents, kept whole
    train_tokens: int = 10_000_000  # training residuals at most (rows drawn at random)
    context: int = 128              # tokens per row, BOS included
    heldout_rows: int = 256         # rows of each held-out set measured (FVU, L0, silent)
    # dead: features that fire on none of this many training residuals (the store's rows
    # are in random order); a held-out set's tens of thousands of tokens miss rare ones
    dead_tokens: int = 1_000_000
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
    return (rows, mask) if budget is None else _first_within(rows, mask, budget)


def _draw_repeated(rows, mask, budget: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows in seeded random orders, pass after pass, as many as fit in ``budget``
    counted tokens: every row is drawn once before any row is drawn again."""
    if budget <= 0 or not rows.shape[0] or not int(mask.sum()):
        return rows[:0], mask[:0]
    passes = -(-budget // int(mask.sum()))                 # ceil: enough passes to fill it
    orders = torch.cat([torch.randperm(rows.shape[0], generator=generator)
                        for _ in range(passes)])
    return _first_within(rows[orders], mask[orders], budget)


def _first_within(rows, mask, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The longest prefix of the rows whose counted tokens fit in ``budget``."""
    keep = int((mask.sum(1).cumsum(0) <= budget).sum())
    return rows[:keep], mask[:keep]


def training_rows(tokenizer, mix: dict, cfg: BuildConfig, generator) -> tuple[dict, dict]:
    """The training rows ((N, context) ids, mask) of ``mix``: the model-written rows take
    ``cfg.model_share`` of ``cfg.train_tokens`` (repeated where there are fewer), prose
    the rest; shuffled together. Also returns what was drawn, per kind."""
    texts = {kind: [t for s, t in mix["train"] if (s == MODEL_SOURCE) == (kind == MODEL_SOURCE)]
             for kind in (MODEL_SOURCE, "prose")}
    model = text_rows(tokenizer, texts[MODEL_SOURCE], cfg.context)
    prose = text_rows(tokenizer, texts["prose"], cfg.context)
    model_budget = round(cfg.model_share * cfg.train_tokens)
    drawn_model = _draw_repeated(*model, model_budget, generator)
    drawn_prose = _draw_rows(*prose, cfg.train_tokens - int(drawn_model[1].sum()), generator)
    rows = torch.cat([drawn_model[0], drawn_prose[0]])
    mask = torch.cat([drawn_model[1], drawn_prose[1]])
    order = torch.randperm(rows.shape[0], generator=generator)
    drawn = {"model-written": {"available_tokens": int(model[1].sum()),
                               "drawn_tokens": int(drawn_model[1].sum())},
             "prose": {"available_tokens": int(prose[1].sum()),
                       "drawn_tokens": int(drawn_prose[1].sum())}}
    for row in drawn.values():
        row["passes"] = round(row["drawn_tokens"] / max(1, row["available_tokens"]), 2)
    return (rows[order], mask[order]), drawn


@dataclass
class Prepared:
    """What the SAEs are trained and measured on: the corpus, its rows and their stores."""

    preset: object
    lm: object
    generation: GenerationConfig
    mix: dict
    records: list
    train_rows: tuple                   # ((N, context) ids, mask)
    drawn: dict                         # per kind: tokens available, drawn, passes
    heldout_texts: dict                 # {held-out set: [text]}
    heldout_rows: dict                  # {held-out set: (ids, mask)}
    stores: dict                        # {"train" or held-out set: store folder}
    dtype: str                          # the recording's
    seconds: dict
    device: str = "cpu"                 # where the model runs and the SAEs train


def prepare(preset, cfg: BuildConfig, cache_dir: Path, device: str = "cpu",
            prose: dict[str, list[str]] | None = None, log=print,
            shipped: Path | None = None, prose_records: list[dict] | None = None) -> Prepared:
    """Steps 1 and 2: the corpus, the training and held-out rows, their residual stores
    (each step cached in ``cache_dir``: a re-run reads them). ``shipped``: the folder of
    shipped model-written texts (tvlib.generated_text.ship), read where they match and
    added to with what is sampled here; None: sampled texts are only cached.
    ``prose_records``: the records of the sources ``prose`` holds (a prose bundle's,
    ``prose_text.read_bundle``); without them given prose is recorded as given."""
    from . import prose_text

    if prose_records is not None and prose is None:
        raise ValueError("prose_records without prose: pass the bundle's documents too "
                         "(prose, prose_records = prose_text.read_bundle(path))")
    if prose is not None and cfg.prose_sources is not None \
            and sorted(cfg.prose_sources) != sorted(prose):
        raise ValueError(f"prose_sources={cfg.prose_sources!r}, but the prose given holds "
                         f"{sorted(prose)}: pass prose_sources=None, or prose of those sources")
    if not 0 <= cfg.model_share <= 1:
        raise ValueError(f"model_share={cfg.model_share!r}: pass the model-written rows' "
                         "share of the training tokens, in [0, 1]")
    layers = preset.resid_pre_layers_with_sae()
    seconds, start = {}, time.time()
    source = model_source(preset)
    generation = _generation(cfg)
    if shipped is None:
        chunks = generate(source, generation, cache_dir / "generated", device=device, log=log)
    else:
        chunks = ship(source, generation, cache_dir / "generated", shipped, device, log)
    seconds["sampling"] = round(time.time() - start, 1)
    lm = load_model(preset, device=device)              # float32 on a CPU: the notebooks'
    tokenizer = lm.tokenizer
    if prose is None:
        names = cfg.prose_sources or tuple(prose_text.PROSE_SOURCES)
        prose_text.install_sources(names)
        prose = {name: prose_text.prose_documents(name) for name in names}
        records = [prose_text.source_record(name) for name in names]
    elif prose_records is not None:
        if sorted(r["name"] for r in prose_records) != sorted(prose):
            raise ValueError(f"prose_records name {sorted(r['name'] for r in prose_records)}, "
                             f"the prose {sorted(prose)}: pass the records of these sources")
        records = prose_records
    else:
        records = [{"name": name, "documents": len(docs), "given": True}
                   for name, docs in prose.items()]
    count = lambda texts: [len(ids) for ids in tokenizer(texts, add_special_tokens=False)  # noqa: E731
                           ["input_ids"]]
    mix = prose_text.mix_documents({**prose, MODEL_SOURCE: _model_texts(tokenizer, chunks)},
                                   count, cfg.max_share, cfg.heldout_fraction, cfg.seed)
    heldout_texts = {"model-written": [t for s, t in mix["heldout"] if s == MODEL_SOURCE],
                     "prose": [t for s, t in mix["heldout"] if s != MODEL_SOURCE]}
    generator = torch.Generator().manual_seed(cfg.seed)
    heldout_rows = {}
    for name, texts in heldout_texts.items():
        rows, mask = _draw_rows(*text_rows(tokenizer, texts, cfg.context), None, generator)
        heldout_rows[name] = (rows[:cfg.heldout_rows], mask[:cfg.heldout_rows])
        if not len(heldout_rows[name][0]):
            raise ValueError(f"no held-out {name} text: sample more texts or raise "
                             "heldout_fraction")
    train_rows, drawn = training_rows(tokenizer, mix, cfg, generator)
    seconds["corpus"] = round(time.time() - start - seconds["sampling"], 1)

    t = time.time()
    dtype = recording_dtype(device)
    recorder = lm if dtype == "float32" else load_model(preset, device=device, dtype=dtype)
    log(f"recording {int(train_rows[1].sum())} training residuals at resid_pre {list(layers)} "
        f"in {dtype}")
    batch = 16 if device == "cpu" else 128      # rows per forward
    stores = {"train": record(recorder, *train_rows, layers, cache_dir / "residuals",
                              batch_size=batch)}
    for name, (rows, mask) in heldout_rows.items():
        stores[name] = record(recorder, rows, mask, layers, cache_dir / "residuals",
                              batch_size=batch)
    seconds["recording"] = round(time.time() - t, 1)
    return Prepared(preset, lm, generation, mix, records, train_rows, drawn, heldout_texts,
                    heldout_rows, stores, dtype, seconds, device)


def trained_folder(store: Path, layer: int, training: SAETrainingConfig, cache_dir: Path,
                   n_residuals: int | None = None) -> Path:
    """Where ``trained_sae`` keeps the SAE these settings give on this store's residuals."""
    key = digest({"format": TRAINED_FORMAT, "training": asdict(training),
                  "hook": f"blocks.{layer - 1}.hook_resid_post", "residuals": n_residuals})
    return Path(cache_dir) / "trained" / f"{Path(store).name}-{key}"


# Beside each trained SAE in the cache: how long it took, so a card built from the cache
# still says what training cost.
TRAINING_RECORD = "trained.json"

# The modules that compute an SAE's measurements (the splice, the losses, FVU): a sweep's
# measurements kept beside a trained SAE are reused while these and the held-out sets hold.
MEASURE_MODULES = ("sae_training.py", "models.py", "architectures.py")


def trained_sae(store: Path, layer: int, training: SAETrainingConfig, cache_dir: Path,
                n_residuals: int | None = None, log=print, device: str = "cpu"):
    """The SAE ``training`` gives on the store's residuals at resid_pre ``layer`` (its first
    ``n_residuals`` only, if given; the store's rows are in random order), trained on
    ``device``. Each trained SAE is kept in ``cache_dir/trained`` as it finishes: an
    interrupted build keeps it."""
    hook = f"blocks.{layer - 1}.hook_resid_post"         # resid_post block = resid_pre - 1
    trained = trained_folder(store, layer, training, cache_dir, n_residuals)
    if is_trained(trained):
        from sae_lens import SAE
        log(f"resid_pre {layer}: trained SAE read from {trained}")
        return SAE.load_from_disk(str(trained), device="cpu")
    resid = read_layer(store, layer)
    if n_residuals is not None:
        if n_residuals > resid.shape[0]:
            raise ValueError(f"n_residuals={n_residuals}: the store holds {resid.shape[0]}")
        resid = resid[:n_residuals]
    log(f"resid_pre {layer}: training on {resid.shape[0]} residuals ({_settings(training)})")
    start = time.time()
    sae = train_sae(resid, hook, training, log=log, device=device)
    sae = save_sae(sae, trained, training.save_dtype)
    record = json.dumps({"seconds": round(time.time() - start, 1), "device": device,
                         "torch_threads": torch.get_num_threads()})
    write_atomic(trained / TRAINING_RECORD, lambda tmp: tmp.write_text(record))
    return sae


def is_trained(folder: Path) -> bool:
    """Whether ``trained_sae`` finished the SAE kept in ``folder`` (its cfg.json is written
    last, atomically)."""
    return (Path(folder) / "cfg.json").is_file()


def training_record(folder: Path) -> dict | None:
    """How long the SAE kept in ``folder`` took to train, and where ({"seconds", "device",
    "torch_threads"}); None where that was not recorded (kept by an older build)."""
    path = Path(folder) / TRAINING_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def _measured_sae(prepared: Prepared, layer: int, training: SAETrainingConfig, n: int,
                  mean: torch.Tensor, code: dict, cfg: BuildConfig, cache_dir: Path,
                  log=print) -> dict:
    """``training`` at resid_pre ``layer`` on the first ``n`` training residuals, measured
    on both held-out sets; kept beside the trained SAE so a resumed build reuses it."""
    t = time.time()
    sae = trained_sae(prepared.stores["train"], layer, training, cache_dir, n, log=log,
                      device=prepared.device)
    record_path = trained_folder(prepared.stores["train"], layer, training, cache_dir,
                                 n) / "measured.json"
    key = {"stores": {name: Path(store).name for name, store in prepared.stores.items()},
           "heldout_rows": cfg.heldout_rows, "loss_rows": cfg.loss_rows, "layer": layer,
           "dead_tokens": cfg.dead_tokens, "format": MEASURED_FORMAT,
           "code": {m: code[m] for m in MEASURE_MODULES}}
    stored = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if stored.get("key") == key:
        return stored["row"]
    measured = _measure(prepared.lm, {layer: sae}, {layer: mean}, prepared.stores,
                        prepared.heldout_rows, cfg)[layer]
    row = {"layer": layer, "train_tokens": n, "training": asdict(training),
           "seconds": round(time.time() - t, 1), **measured}
    write_atomic(record_path, lambda tmp: tmp.write_text(json.dumps(
        {"key": key, "row": row}, indent=2)))
    return row


def _log_row(label: str, row: dict, log=print) -> None:
    log(f"{label}: " + "  ".join(
        f"{name} Δloss {row[name]['delta_loss']:+.3f} FVU {row[name]['fvu']:.3f} "
        f"dead {_dead(row[name]):.3f} silent {row[name]['dead_fraction']:.3f}"
        for name in HELDOUT_SETS))


def sweep(prepared: Prepared, cfg: BuildConfig, cache_dir: Path, log=print) -> list[dict]:
    """Each of ``cfg.sweep``'s settings trained at ``cfg.sweep_layer`` on the first
    ``cfg.sweep_tokens`` training residuals and measured on both held-out sets."""
    layer = cfg.sweep_layer or prepared.preset.resid_pre_layers_with_sae()[-1]
    mean = read_layer(prepared.stores["train"], layer).mean(0, dtype=torch.float32)
    n = min(cfg.sweep_tokens, int(prepared.train_rows[1].sum()))
    # the measuring code as this process runs it (refused if edited on disk since import)
    code = code_fingerprint()
    rows = []
    for training in cfg.sweep:
        rows.append(_measured_sae(prepared, layer, training, n, mean, code, cfg, cache_dir, log))
        _log_row(f"sweep {_settings(training)}", rows[-1], log)
    return rows


def token_curve(prepared: Prepared, training: SAETrainingConfig, cfg: BuildConfig,
                cache_dir: Path, log=print) -> list[dict]:
    """``training`` at ``cfg.sweep_layer`` on the first n training residuals for each n of
    ``cfg.curve_tokens`` (nested: the store's rows are in random order, model-written and
    prose shuffled together), each measured on both held-out sets."""
    available = int(prepared.train_rows[1].sum())
    too_many = [n for n in cfg.curve_tokens if n > available]
    if too_many or any(n <= 0 for n in cfg.curve_tokens):
        raise ValueError(f"curve_tokens={cfg.curve_tokens}: each must be positive and at most "
                         f"the {available} training tokens recorded; raise train_tokens to "
                         f"{max(cfg.curve_tokens)} or drop the larger counts")
    layer = cfg.sweep_layer or prepared.preset.resid_pre_layers_with_sae()[-1]
    training = dataclasses.replace(training, seed=training.seed + layer)   # as the layers'
    mean = read_layer(prepared.stores["train"], layer).mean(0, dtype=torch.float32)
    code = code_fingerprint()
    rows = []
    for n in sorted(cfg.curve_tokens):
        rows.append(_measured_sae(prepared, layer, training, n, mean, code, cfg, cache_dir, log))
        _log_row(f"curve {n} tokens", rows[-1], log)
    return rows


def choose(sweep_rows: list[dict]) -> SAETrainingConfig:
    """The swept setting with the lowest mean Δ loss over the held-out sets."""
    best = min(sweep_rows, key=lambda r: sum(r[n]["delta_loss"] for n in HELDOUT_SETS))
    return SAETrainingConfig(**best["training"])


def _settings(training: SAETrainingConfig | dict) -> str:
    t = training if isinstance(training, dict) else asdict(training)
    return (f"width {t['width']} k {t['k']:g} lr {t['lr']:g} batch {t['batch_tokens']} "
            f"epochs {t['epochs']}")


def build(preset_name: str = "gemma-3-270m-offline", cfg: BuildConfig = BuildConfig(),
          out_dir: Path | None = None, cache_dir: Path = REPO_ROOT / ".cache",
          device: str = "cpu", prose: dict[str, list[str]] | None = None, log=print,
          prose_records: list[dict] | None = None) -> dict:
    """Build the preset's SAEs and corpus into ``out_dir`` (default: the preset's folder).

    With ``cfg.sweep``, its settings are measured first at one layer on part of the
    training tokens and the best (lowest mean Δ loss) trains every layer; without,
    ``cfg.training`` does. prose: {source: documents} instead of the packaged sources
    (your own text, tests; with ``prose_records``, a prose bundle's).
    """
    preset = get_preset(preset_name)
    if preset.sae_dir is None or preset.sae_site != "resid_post":
        raise ValueError(f"preset {preset.name!r} does not read resid_post SAEs from a local "
                         "folder: only such presets are built here")
    for training in (cfg.training, *cfg.sweep):
        if training.architecture != "batchtopk":
            raise ValueError(f"architecture={training.architecture!r}: the offline SAEs and "
                             "their card are BatchTopK; pass SAETrainingConfig(architecture="
                             "'batchtopk')")
    check_curve_tokens(cfg)
    out_dir = Path(out_dir) if out_dir is not None else Path(preset.sae_dir).parent
    layers = preset.resid_pre_layers_with_sae()
    start = time.time()
    prepared = prepare(preset, cfg, cache_dir, device, prose, log, out_dir / SHIPPED_TEXTS,
                       prose_records)
    lm, stores, seconds = prepared.lm, prepared.stores, prepared.seconds

    t = time.time()
    sweep_rows = sweep(prepared, cfg, cache_dir, log) if cfg.sweep else []
    chosen = choose(sweep_rows) if sweep_rows else cfg.training
    seconds["sweep"] = round(time.time() - t, 1)
    t = time.time()
    curve = _curve_record(prepared, chosen, cfg, cache_dir, log) if cfg.curve_tokens else None
    seconds["curve"] = round(time.time() - t, 1)
    log(f"training every layer with {_settings(chosen)}")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    previous = _previous_saes(preset, layers, out_dir / "saes", log)  # the ones replaced
    kept_curves, earlier = _carried(out_dir / "card.json", preset.name)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        # 3. training, one layer at a time (one layer's residuals in memory)
        saes, means, rows_out, folders = {}, {}, [], {}
        t = time.time()
        for layer in layers:
            t_layer = time.time()
            block = layer - 1
            training = dataclasses.replace(chosen, seed=chosen.seed + layer)
            means[layer] = read_layer(stores["train"], layer).mean(0, dtype=torch.float32)
            kept = trained_folder(stores["train"], layer, training, cache_dir)
            from_cache = is_trained(kept)
            sae = trained_sae(stores["train"], layer, training, cache_dir, log=log,
                              device=device)
            trained_in = training_record(kept)
            sae.cfg.metadata.model_name = preset.name
            # measured as saved (matrices in save_dtype), not as trained
            folders[layer] = scratch / "saes" / preset.sae_id.format(layer=block)
            sae = save_sae(sae, folders[layer], training.save_dtype)
            check_sae_site(sae, lm, layer)
            saes[layer] = sae
            rows_out.append({"layer": layer, "site": f"resid_post {block}",
                             "d_sae": sae.cfg.d_sae,
                             "train_tokens": int(prepared.train_rows[1].sum()),
                             "seed": training.seed, "seconds": round(time.time() - t_layer, 1),
                             "read_from_cache": from_cache,
                             "training_seconds": trained_in["seconds"] if trained_in else None})
        seconds["training"] = round(time.time() - t, 1)
        # 4. measurements on both held-out sets, new SAEs and the ones they replace
        t = time.time()
        measured = {"new": _measure(lm, saes, means, stores, prepared.heldout_rows, cfg)}
        if previous:
            measured["previous"] = _measure(lm, previous, means, stores, prepared.heldout_rows,
                                            cfg)
            for layer, sae in previous.items():          # the width column of their table
                measured["previous"][layer]["d_sae"] = sae.cfg.d_sae
        seconds["measuring"] = round(time.time() - t, 1)
        for row in rows_out:
            row.update(measured["new"][row["layer"]])
            log(f"resid_pre {row['layer']}: " + "  ".join(
                f"{name} FVU {row[name]['fvu']:.3f} dead {_dead(row[name]):.3f} "
                f"Δloss {row[name]['delta_loss']:+.3f} recovered {row[name]['recovered']:.3f}"
                for name in HELDOUT_SETS))
        build_record = {**asdict(cfg), "generation": asdict(prepared.generation),
                        "chosen_training": asdict(chosen)}
        for row in rows_out:
            record_json = json.dumps({"preset": preset.name, "build": build_record,
                                      "card": row}, indent=2)
            write_atomic(folders[row["layer"]] / "training.json",
                         lambda tmp, text=record_json: tmp.write_text(text))

        heldout_texts, heldout_rows = prepared.heldout_texts, prepared.heldout_rows
        corpus = [text for name in HELDOUT_SETS for text in heldout_texts[name][:cfg.corpus_texts]]
        (scratch / "corpus.json").write_text(json.dumps(corpus, ensure_ascii=False, indent=0)
                                             + "\n", encoding="utf-8")
        seconds["total"] = round(time.time() - start, 1)
        mix, train_rows = prepared.mix, prepared.train_rows
        card = {"preset": preset.name, "model": preset.model_id, "build": build_record,
                "corpus": {"sources": mix["sources"], "sha256": mix["sha256"],
                           "records": prepared.records, "drawn": prepared.drawn,
                           "train_rows": int(train_rows[0].shape[0]),
                           "train_tokens": int(train_rows[1].sum()),
                           "heldout_rows": {n: int(r[1].shape[0]) for n, r in heldout_rows.items()},
                           "heldout_tokens": {n: int(r[1].sum()) for n, r in heldout_rows.items()},
                           "corpus_json_texts": len(corpus)},
                "recording_dtype": prepared.dtype, "device": device, "sweep": sweep_rows,
                "curves": _with_curve(kept_curves, curve),
                "saes": rows_out, "previous_saes": measured.get("previous"),
                "earlier_saes": earlier, "seconds": seconds,
                "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
        if card["curves"]:
            save_curve_figure(card["curves"], scratch, preset.name)
        (scratch / "card.json").write_text(json.dumps(card, indent=2) + "\n")
        (scratch / "MODEL_CARD.md").write_text(render_card(card, heldout_texts))
        _move_into(scratch, out_dir)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch)
    return card


def _carried(card_path: Path, preset_name: str) -> tuple[list[dict], list[dict]]:
    """What a build keeps from the card it replaces: its training-token curves (each
    records its own setting, corpus and held-out sets) and the SAEs before the replaced
    ones, as that card measured them ({"corpus": ..., "measured": {layer: ...}}, newest
    first). The replaced SAEs themselves are measured again by the build."""
    if not card_path.is_file():
        return [], []
    old = json.loads(card_path.read_text())
    if old.get("preset") != preset_name:
        return [], []
    earlier = list(old.get("earlier_saes") or [])
    if old.get("previous_saes"):
        corpus = old["corpus"]
        earlier.insert(0, {"corpus": {"sha256": corpus["sha256"],
                                      "heldout_tokens": corpus["heldout_tokens"]},
                           "measured": old["previous_saes"]})
    return card_curves(old), earlier


def _recipe(cfg: BuildConfig | dict) -> dict:
    """The settings besides the texts that decide a corpus and its draw."""
    c = asdict(cfg) if isinstance(cfg, BuildConfig) else cfg
    return {key: (list(c[key]) if isinstance(c.get(key), tuple) else c.get(key))
            for key in ("prose_sources", "max_share", "model_share", "heldout_fraction",
                        "context", "seed")}


def _with_curve(curves: list[dict], curve: dict | None) -> list[dict]:
    """``curves`` with ``curve`` added, replacing one of the same texts and setting."""
    if curve is None:
        return list(curves)
    kept = [c for c in curves if (c["model_texts"], c["training"])
            != (curve["model_texts"], curve["training"])]
    return sorted([*kept, curve], key=lambda c: c["model_texts"])


def check_curve_tokens(cfg: BuildConfig) -> None:
    """Refuse curve counts the draw cannot hold before anything is sampled or recorded."""
    bad = [n for n in cfg.curve_tokens if not 0 < n <= cfg.train_tokens]
    if bad:
        raise ValueError(f"curve_tokens {bad}: each must be positive and at most train_tokens="
                         f"{cfg.train_tokens} (the draw holds whole rows, so a little under "
                         "it: leave the largest count a row's length below train_tokens)")


def _curve_record(prepared: Prepared, training: SAETrainingConfig, cfg: BuildConfig,
                  cache_dir: Path, log=print) -> dict:
    """The card's record of ``token_curve``: its rows and the draw they are prefixes of."""
    rows = token_curve(prepared, training, cfg, cache_dir, log)
    return {"layer": rows[0]["layer"], "training": asdict(training),
            "model_texts": prepared.generation.n_texts,
            "draw_tokens": int(prepared.train_rows[1].sum()), "model_share": cfg.model_share,
            "drawn": prepared.drawn, "rows": rows, "recipe": _recipe(cfg),
            "corpus": {"sha256": prepared.mix["sha256"],
                       "heldout_tokens": {n: int(r[1].sum())
                                          for n, r in prepared.heldout_rows.items()}},
            "residuals_per_second": _training_rate(rows)}


def save_curve_figure(curves: list[dict], folder: Path, preset_name: str) -> Path:
    """The curves as ``token_curve.png`` beside the card (linked from MODEL_CARD.md)."""
    import matplotlib.pyplot as plt

    from .plotting import FIGURE_DPI, plot_token_curve

    fig = plot_token_curve(curves, TARGETS, title=f"{preset_name}: training-token curve")
    path = Path(folder) / CURVE_FIGURE
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight",
                                               dpi=FIGURE_DPI))
    plt.close(fig)
    return path


def _training_rate(rows: list[dict]) -> float:
    """Training residuals per second over the curve (training and measuring both counted;
    for the card's estimate of what a larger build costs)."""
    epochs = rows[0]["training"]["epochs"]
    return sum(r["train_tokens"] * epochs for r in rows) / max(1e-9, sum(r["seconds"] for r in rows))


def card_curves(card: dict) -> list[dict]:
    """A card's training-token curves (cards written before there could be several held
    one, under "curve", with the card's count of model-written texts)."""
    if "curves" in card:
        return card["curves"]
    if card.get("curve"):
        return [{"model_texts": card["build"]["generation"]["n_texts"], **card["curve"]}]
    return []


def add_curve(preset_name: str = "gemma-3-270m-offline", cfg: BuildConfig = BuildConfig(),
              out_dir: Path | None = None, cache_dir: Path = REPO_ROOT / ".cache",
              device: str = "cpu", prose: dict[str, list[str]] | None = None,
              log=print, model_texts: int | None = None,
              prose_records: list[dict] | None = None) -> dict:
    """A training-token curve of the SAEs already built in ``out_dir``, added to their
    card: the card's setting at ``cfg.sweep_layer``, on the first n of ``cfg.train_tokens``
    freshly drawn training tokens, from the corpus the card's recipe gives here with
    ``model_texts`` model-written texts (None: the card's count). Where that corpus is not
    the card's (more texts; or text sampled again, as sampling follows the CPU's rounding),
    the curve records its own SHA-256 and held-out sizes and the card says so beside it.
    A curve with the same count of texts and setting is replaced; others are kept. The
    SAEs are left as they are."""
    if not cfg.curve_tokens:
        raise ValueError("curve_tokens=(): pass the training-token counts of the curve")
    check_curve_tokens(cfg)
    preset, out_dir, card = _built_card(preset_name, out_dir)
    built = card["build"]
    cfg = _card_recipe(card, cfg, model_texts)
    prepared = prepare(preset, cfg, cache_dir, device, prose, log, out_dir / SHIPPED_TEXTS,
                       prose_records)
    if prepared.mix["sha256"] != card["corpus"]["sha256"]:
        log(f"the corpus built here ({prepared.mix['sha256'][:12]}) is not the card's "
            f"({card['corpus']['sha256'][:12]}): the curve is measured on its own held-out sets")
    training = SAETrainingConfig(**built.get("chosen_training", built["training"]))
    t = time.time()
    curve = _curve_record(prepared, training, cfg, cache_dir, log)
    card["curves"] = _with_curve(card_curves(card), curve)
    card.pop("curve", None)
    card["seconds"]["curve"] = round(time.time() - t, 1)
    text = json.dumps(card, indent=2) + "\n"
    write_atomic(out_dir / "card.json", lambda tmp: tmp.write_text(text))
    save_curve_figure(card["curves"], out_dir, preset.name)
    rendered = render_card(card, prepared.heldout_texts)
    write_atomic(out_dir / "MODEL_CARD.md", lambda tmp: tmp.write_text(rendered))
    return card


def _built_card(preset_name: str, out_dir: Path | None) -> tuple:
    """(preset, output folder, its card) of SAEs already built; refused without a card of
    that preset."""
    preset = get_preset(preset_name)
    out_dir = Path(out_dir) if out_dir is not None else Path(preset.sae_dir).parent
    card_path = out_dir / "card.json"
    if not card_path.is_file():
        raise FileNotFoundError(f"no card.json in {out_dir}: build the SAEs first "
                                "(python -m tvlib.offline_saes)")
    card = json.loads(card_path.read_text())
    if card["preset"] != preset.name:
        raise ValueError(f"{card_path} describes {card['preset']!r}, not {preset.name!r}")
    return preset, out_dir, card


def _card_recipe(card: dict, cfg: BuildConfig, model_texts: int | None = None) -> BuildConfig:
    """``cfg`` with the card's corpus recipe and held-out sets (``model_texts``: another
    count of model-written texts)."""
    built = card["build"]
    same = {key: built[key] for key in ("max_share", "heldout_fraction", "context",
                                        "heldout_rows", "loss_rows", "seed", "model_share")}
    same["prose_sources"] = tuple(built["prose_sources"]) if built["prose_sources"] else None
    generation = GenerationConfig(**{k: v for k, v in built["generation"].items()
                                     if k in GenerationConfig.__dataclass_fields__})
    if model_texts is not None:
        generation = dataclasses.replace(generation, n_texts=model_texts)
    return dataclasses.replace(cfg, generation=generation, **same)


def check_loss(preset_name: str = "gemma-3-270m-offline", out_dir: Path | None = None,
               cache_dir: Path = REPO_ROOT / ".cache", device: str = "cpu",
               loss_rows: int | None = None, prose: dict[str, list[str]] | None = None,
               log=print, prose_records: list[dict] | None = None) -> dict:
    """The loss change of the SAEs built in ``out_dir`` measured again on the first
    ``loss_rows`` rows of each of the card's held-out sets, or all of a set's rows where it
    has fewer, as the build does (None: every row the card measured FVU on; the rows each
    set gave are recorded), with its standard error over rows, added to the card
    (``loss_check``; written after each set). The card's table scores ``loss_rows`` of the build (48 by default), too few
    to place a Δ loss near a target. Refused where the corpus built here or the SAEs in
    place are not the card's."""
    from .saes import load_sae

    preset, out_dir, card = _built_card(preset_name, out_dir)
    card_path = out_dir / "card.json"
    cfg = _card_recipe(card, BuildConfig(train_tokens=card["build"]["train_tokens"]))
    if loss_rows is not None and loss_rows < 2:
        raise ValueError(f"loss_rows={loss_rows!r}: pass at least 2 rows (a standard error "
                         "needs two), or None for every held-out row")
    in_place = dataclasses.replace(preset, sae_dir=str(out_dir / "saes"))
    saes = {}
    for row in card["saes"]:
        layer = row["layer"]
        folder = out_dir / "saes" / preset.sae_id.format(layer=layer - 1)
        record = folder / "training.json"
        if not record.is_file() or json.loads(record.read_text()).get("card") != row:
            raise ValueError(f"the SAE in {folder} is not the one {card_path} describes: "
                             "build again (python -m tvlib.offline_saes) so card and SAEs agree")
        saes[layer] = load_sae(in_place, layer, device="cpu")
    prepared = prepare(preset, cfg, cache_dir, device, prose, log, out_dir / SHIPPED_TEXTS,
                       prose_records)
    if prepared.mix["sha256"] != card["corpus"]["sha256"]:
        raise ValueError(f"the corpus built here ({prepared.mix['sha256'][:12]}) is not the "
                         f"card's ({card['corpus']['sha256'][:12]}), so neither are its "
                         "held-out sets: check on the machine and cache that built the card")
    means = {layer: read_layer(prepared.stores["train"], layer).mean(0, dtype=torch.float32)
             for layer in saes}
    check = {"loss_rows": loss_rows, "rows": {}, "tokens": {},
             "measured": {layer: {} for layer in saes}, "seconds": {}}
    for name in HELDOUT_SETS:
        rows, mask = prepared.heldout_rows[name]
        rows, mask = rows[:loss_rows], mask[:loss_rows]
        t = time.time()
        losses = loss_change(prepared.lm, saes, rows, mask, means)
        check["rows"][name] = int(rows.shape[0])
        check["tokens"][name] = int((mask[:, :-1] & mask[:, 1:]).sum())   # scored
        check["seconds"][name] = round(time.time() - t, 1)
        for layer in saes:
            check["measured"][layer][name] = losses[layer]
            m = losses[layer]
            log(f"resid_pre {layer} {name}: Δ loss {m['delta_loss']:+.3f} ± "
                f"{m['delta_loss_se']:.3f} recovered {m['recovered']:.3f} on "
                f"{check['rows'][name]} rows")
        card["loss_check"] = check
        text = json.dumps(card, indent=2) + "\n"
        write_atomic(card_path, lambda tmp: tmp.write_text(text))
        rendered = render_card(card, prepared.heldout_texts)
        write_atomic(out_dir / "MODEL_CARD.md", lambda tmp: tmp.write_text(rendered))
    return card


def _generation(cfg: BuildConfig) -> GenerationConfig:
    """The sampling settings of a build: texts as long as a row after its BOS."""
    return dataclasses.replace(cfg.generation, n_tokens=cfg.context - 1)


def ship_texts(preset_name: str = "gemma-3-270m-offline", cfg: BuildConfig = BuildConfig(),
               out_dir: Path | None = None, cache_dir: Path = REPO_ROOT / ".cache",
               device: str = "cpu", log=print) -> Path:
    """Step 1's sampling alone: the build's model-written texts in the output folder's
    ``generated/`` (those shipped there already are read, not sampled again), so that
    sampling can be spread over several runs and a later build reads them. Returns
    that folder."""
    preset = get_preset(preset_name)
    out_dir = Path(out_dir) if out_dir is not None else Path(preset.sae_dir).parent
    folder = out_dir / SHIPPED_TEXTS
    ship(model_source(preset), _generation(cfg), cache_dir / "generated", folder, device, log)
    return folder


def _previous_saes(preset, layers, sae_dir: Path, log=print) -> dict:
    """The SAEs the build replaces: those in ``sae_dir`` (the output's, which need not be
    the preset's own), each loaded with the preset's checks; {} unless every layer has one
    (with a message where one is there but fails those checks)."""
    from .saes import load_sae

    in_place = dataclasses.replace(preset, sae_dir=str(sae_dir))
    try:
        return {layer: load_sae(in_place, layer, device="cpu") for layer in layers}
    except FileNotFoundError:
        return {}
    except ValueError as err:
        log(f"the SAEs in {sae_dir} are not measured as the ones replaced (the card will "
            f"list none): {err}")
        return {}


def _measure(lm, saes: dict, means: dict, stores: dict, heldout_rows: dict,
             cfg: BuildConfig) -> dict[int, dict]:
    """{layer: {held-out set: quality and loss change}} of ``saes``. Each set's entry also
    holds ``dead_in_training``: the fraction of features that fire on none of the first
    ``cfg.dead_tokens`` training residuals, and ``dead_tokens``, how many those were."""
    if cfg.dead_tokens < 1:
        raise ValueError(f"dead_tokens={cfg.dead_tokens!r}: pass a positive number of "
                         "training residuals to count dead features on")
    results = {layer: {} for layer in saes}
    dead = {}
    for layer, sae in saes.items():
        sample = read_layer(stores["train"], layer, limit=cfg.dead_tokens)
        dead[layer] = {"dead_in_training": (feature_density(sae, sample) == 0).float().mean()
                       .item(), "dead_tokens": int(sample.shape[0])}
    for name, (rows, mask) in heldout_rows.items():
        losses = loss_change(lm, saes, rows[:cfg.loss_rows], mask[:cfg.loss_rows], means)
        for layer, sae in saes.items():
            quality = sae_quality(sae, read_layer(stores[name], layer))
            results[layer][name] = {**quality, **losses[layer], **dead[layer]}
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


CURVE_FIGURE = "token_curve.png"
TARGETS = {"delta_loss": 0.5, "recovered": 0.9, "fvu": 0.15, "dead_fraction": 0.10}


def _dead(measure: dict) -> float:
    """The dead fraction a target is read on: on the training sample where measured
    (cards from before measured only the held-out set's silent features)."""
    return measure.get("dead_in_training", measure["dead_fraction"])


def meets_targets(measure: dict) -> bool:
    """The card's targets on one held-out set: Δ loss <= 0.5 nats, recovered >= 0.9,
    FVU <= 0.15, dead <= 10%."""
    return (measure["delta_loss"] <= TARGETS["delta_loss"]
            and measure["recovered"] >= TARGETS["recovered"]
            and measure["fvu"] <= TARGETS["fvu"]
            and _dead(measure) <= TARGETS["dead_fraction"])


def _dead_sentence(rows: list[dict]) -> str:
    """How the card's dead features were counted, from the measures themselves."""
    counts = sorted({row[n]["dead_tokens"] for row in rows for n in HELDOUT_SETS
                     if "dead_tokens" in row[n]})
    if not counts:       # a card from before: the held-out count is all there is
        return ("dead: features that fire on none of the held-out set's tokens (rare "
                "features included; the targets read this count).")
    told = " or ".join(str(n) for n in counts)
    return (f"dead: features that fire on none of the first {told} training residuals "
            "(the targets read this count; the previous SAEs' are counted on this build's); "
            "silent: features that fire on none of the held-out set's tokens (rare "
            "features included).")


def _dead_cells(m: dict) -> str:
    """The table cells 'dead | silent on held-out'."""
    dead = f"{m['dead_in_training']:.3f}" if "dead_in_training" in m else "—"
    return f"{dead} | {m['dead_fraction']:.3f}"


def _table(rows: list[dict]) -> list[str]:
    lines = ["| resid_pre | held-out | width | FVU | L0 | dead | silent | loss clean | loss SAE | "
             "Δ loss | loss mean-ablated | recovered | targets |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for name in HELDOUT_SETS:
            m = row[name]
            lines.append(
                f"| {row['layer']} | {name} | {row.get('d_sae', '')} | {m['fvu']:.3f} | "
                f"{m['l0']:.1f} | {_dead_cells(m)} | {m['loss_clean']:.3f} | "
                f"{m['loss_sae']:.3f} | {m['delta_loss']:+.3f} | {m['loss_mean_ablated']:.2f} | "
                f"{m['recovered']:.3f} | {'met' if meets_targets(m) else 'missed'} |")
    return lines


def _cached_training(rows: list[dict]) -> str:
    """A sentence for the SAEs a build read from the cache instead of training them: its
    training minutes are not theirs."""
    cached = [row for row in rows if row.get("read_from_cache")]
    if not cached:
        return ""
    took = ", ".join(f"resid_pre {row['layer']} (" + (
        f"{row['training_seconds'] / 60:.0f} min" if row.get("training_seconds") is not None
        else "time not recorded") + ")" for row in cached)
    return (" Read from the cache instead of trained, so their training time is not in "
            f"these minutes; an earlier run trained them: {took}.")


def render_card(card: dict, heldout_texts: dict[str, list[str]]) -> str:
    gen, build = card["build"]["generation"], card["build"]
    train = build.get("chosen_training", build["training"])
    corpus, seconds = card["corpus"], card["seconds"]
    lines = [
        f"# SAEs of {card['preset']}", "",
        f"Built by `python -m tvlib.offline_saes` in {seconds['total'] / 60:.0f} min on "
        f"{card['torch_threads']} CPU threads ({card['device']}, torch {card['torch']}): "
        f"{seconds['sampling'] / 60:.0f} min sampling text, {seconds['recording'] / 60:.0f} min "
        f"recording residuals in {card['recording_dtype']} (both cached: a re-run reads them), "
        f"{seconds.get('sweep', 0) / 60:.0f} min sweeping settings, "
        f"{seconds.get('training', 0) / 60:.0f} min training, "
        f"{seconds['measuring'] / 60:.0f} min measuring.{_cached_training(card['saes'])}", "",
        "## Corpus", "",
        f"Model-written text: {gen['n_texts']} texts of up to {gen['n_tokens']} tokens that the "
        f"model sampled from BOS at temperature {gen['temperature']} (seed {gen['seed']}). "
        "English prose that installs as packages (tvlib.prose_text). Exact duplicates "
        f"dropped; {build['heldout_fraction']:.0%} of each source's documents held out whole; "
        f"no source above {build['max_share']:.0%} of the training tokens. Rows of "
        f"{build['context']} tokens (BOS first); BOS, padding and special tokens are never "
        f"recorded. {corpus['train_tokens']} training tokens ({corpus['train_rows']} rows drawn "
        f"at random, seed {build['seed']}, budget {build['train_tokens']}), "
        f"{build.get('model_share', 0):.0%} of the budget for model-written rows "
        "(repeated where there are fewer). Corpus SHA-256: "
        f"`{corpus['sha256']}`.", ""]
    for kind, row in corpus.get("drawn", {}).items():
        lines.append(f"- {kind}: {row['drawn_tokens']} training tokens drawn of "
                     f"{row['available_tokens']} ({row['passes']} passes)")
    lines += ["",
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
        f"FVU: squared error over the residuals' variance; {_dead_sentence(card['saes'])} "
        "Loss: next-token cross-entropy on "
        f"{build['loss_rows']} rows of each set, clean, with the reconstruction spliced in "
        "at every recorded token, and with the training tokens' mean residual there "
        "(mean ablation); recovered = (mean-ablated - SAE) / (mean-ablated - clean). "
        "Targets: Δ loss <= 0.5 nats, recovered >= 0.9, FVU <= 0.15, dead <= 10%.", ""]
    lines += _table(card["saes"])
    lines += _loss_check_lines(card)
    if card.get("sweep"):
        first = card["sweep"][0]
        lines += ["", "## Sweep", "",
                  f"Each setting trained at resid_pre {first['layer']} on the first "
                  f"{first['train_tokens']} training tokens and measured on both held-out sets; "
                  "the one with the lowest mean Δ loss trained every layer on all of them.", "",
                  "| setting | held-out | FVU | L0 | dead | silent | Δ loss | recovered | "
                  "seconds |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in card["sweep"]:
            for name in HELDOUT_SETS:
                m = row[name]
                lines.append(f"| {_settings(row['training'])} | {name} | {m['fvu']:.3f} | "
                             f"{m['l0']:.1f} | {_dead_cells(m)} | "
                             f"{m['delta_loss']:+.3f} | {m['recovered']:.3f} | "
                             f"{row['seconds']:.0f} |")
    curves = card_curves(card)
    if curves:
        lines += ["", "## Training-token curve", "", f"![Training-token curve]({CURVE_FIGURE})"]
        for curve in curves:
            lines += ["", *_curve_lines(curve, card)]
    if card.get("previous_saes"):
        lines += ["", "The SAEs these replaced, measured the same way:", ""]
        lines += _table([{"layer": int(layer), **m} for layer, m in card["previous_saes"].items()])
    for entry in card.get("earlier_saes") or []:
        sizes = ", ".join(f"{n}: {entry['corpus']['heldout_tokens'][n]} tokens"
                          for n in HELDOUT_SETS)
        lines += ["", "The SAEs before those, as the build that replaced them measured them, "
                  f"on its own held-out sets (corpus SHA-256 `{entry['corpus']['sha256']}`; "
                  f"{sizes}):", ""]
        lines += _table([{"layer": int(layer), **m} for layer, m in entry["measured"].items()])
    for name in HELDOUT_SETS:
        lines += ["", f"## Two held-out {name} texts", ""]
        lines += [f"> {text[:300]!r}" + "\n" for text in heldout_texts[name][:2]]
    return "\n".join(lines) + "\n"


def tokens_to_target(rows: list[dict], heldout: str, points: int = 3) -> float | None:
    """Training tokens at which Δ loss on ``heldout`` would reach the target, extrapolated
    on a line in log2(tokens) through the curve's last ``points`` points; None where the
    line does not fall (more tokens alone are not seen to help)."""
    import math
    last = sorted(rows, key=lambda r: r["train_tokens"])[-points:]
    if len(last) < 2:
        return None
    x = [math.log2(r["train_tokens"]) for r in last]
    y = [r[heldout]["delta_loss"] for r in last]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)
    if slope >= 0:
        return None
    return 2 ** (mx + (TARGETS["delta_loss"] - my) / slope)


def _loss_check_lines(card: dict) -> list[str]:
    """The card's loss change measured again on more held-out rows (``check_loss``)."""
    check = card.get("loss_check")
    if not check:
        return []
    table = {row["layer"]: row for row in card["saes"]}
    sizes = ", ".join(f"{n}: {check['rows'][n]} rows, {check['tokens'][n]} scored tokens"
                      for n in HELDOUT_SETS if n in check["rows"])
    lines = ["", "### Δ loss on more held-out rows", "",
             f"The loss change of these SAEs measured again on more rows of the same held-out "
             f"sets ({sizes}; `python -m tvlib.offline_saes --check-loss`), with its standard "
             "error over rows (a text's tokens are not independent samples). The table above "
             f"scores {card['build']['loss_rows']} rows of each set.", "",
             "| resid_pre | held-out | rows | Δ loss ± se | recovered | Δ loss in the table | "
             "Δ loss and recovered targets |", "|---|---|---|---|---|---|---|"]
    for layer, sets in check["measured"].items():
        for name in HELDOUT_SETS:
            if name not in sets:
                continue
            m, before = sets[name], table[int(layer)][name]["delta_loss"]
            met = (m["delta_loss"] <= TARGETS["delta_loss"]
                   and m["recovered"] >= TARGETS["recovered"])
            lines.append(f"| {layer} | {name} | {check['rows'][name]} | "
                         f"{m['delta_loss']:+.3f} ± {m['delta_loss_se']:.3f} | "
                         f"{m['recovered']:.3f} | {before:+.3f} | {'met' if met else 'missed'} |")
    return lines


def _curve_lines(curve: dict, card: dict) -> list[str]:
    t, corpus = curve["training"], card["corpus"]
    own = curve.get("corpus", corpus)
    texts, card_texts = curve["model_texts"], card["build"]["generation"]["n_texts"]
    if own["sha256"] == corpus["sha256"]:
        where = "measured on the same held-out sets"
    else:
        same_recipe = curve.get("recipe") == _recipe(card["build"])   # older curves: unknown
        why = (f"it holds {texts} model-written texts, the card's {card_texts}"
               if texts != card_texts else "the same recipe drew other texts here: sampling "
               "follows the CPU's rounding, and packaged prose may differ" if same_recipe
               else "another recipe, or other texts drawn by it")
        sizes = ", ".join(f"{n}: {own['heldout_tokens'][n]} tokens" for n in HELDOUT_SETS)
        where = ("measured on the held-out sets of a corpus the same recipe gave, not the "
                 f"card's ({why}): SHA-256 `{own['sha256']}`, held-out {sizes}. Compare its "
                 "points with each other, and with the table above only roughly")
    chosen = card["build"].get("chosen_training", card["build"].get("training"))
    setting = (f"The setting above ({_settings(t)})" if t == chosen
               else f"The setting {_settings(t)}" + (" (not the card's)" if chosen else ""))
    lines = [f"### {texts} model-written texts, {_settings(t)}", "",
             f"{setting} trained at resid_pre {curve['layer']} on the "
             f"first n of {curve['draw_tokens']} training tokens drawn like the SAEs' (about "
             f"{curve['model_share']:.0%} model-written rows, shuffled in with the prose; "
             "model-written rows repeat where the draw needs more than were sampled), "
             f"{where}.", "",
             "| train tokens | held-out | FVU | L0 | dead | silent | Δ loss | recovered | "
             "targets |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(curve["rows"], key=lambda r: r["train_tokens"]):
        for name in HELDOUT_SETS:
            m = row[name]
            lines.append(f"| {row['train_tokens']} | {name} | {m['fvu']:.3f} | {m['l0']:.1f} | "
                         f"{_dead_cells(m)} | {m['delta_loss']:+.3f} | "
                         f"{m['recovered']:.3f} | {'met' if meets_targets(m) else 'missed'} |")
    drawn = curve.get("drawn", {}).get(MODEL_SOURCE)
    if drawn:
        lines += ["", f"Model-written text in the draw: {drawn['drawn_tokens']} tokens drawn "
                  f"from {drawn['available_tokens']} sampled ({drawn['passes']} passes)."]
    last = max(curve["rows"], key=lambda r: r["train_tokens"])
    rate = curve["residuals_per_second"]
    lines += ["", f"Shortfall at {last['train_tokens']} tokens, and an extrapolation (a line in "
              "log2 tokens through the last three points; a guide, not a measurement):", ""]
    for name in HELDOUT_SETS:
        delta = last[name]["delta_loss"]
        if delta <= TARGETS["delta_loss"]:
            lines.append(f"- {name}: Δ loss {delta:+.3f}, within the {TARGETS['delta_loss']} "
                         "target")
            continue
        needed = tokens_to_target(curve["rows"], name)
        if needed is None and len(curve["rows"]) < 2:
            lines.append(f"- {name}: Δ loss {delta:+.3f}, {delta - TARGETS['delta_loss']:.3f} "
                         "nats over the target (one point: no line to extrapolate)")
            continue
        if needed is None:
            lines.append(f"- {name}: Δ loss {delta:+.3f}, {delta - TARGETS['delta_loss']:.3f} "
                         "nats over the target; it does not fall over the last points, so more "
                         "tokens of this mix are not seen to reach it")
            continue
        hours = needed * t["epochs"] / rate / 3600
        lines.append(f"- {name}: Δ loss {delta:+.3f}, {delta - TARGETS['delta_loss']:.3f} nats "
                     f"over the target; the line reaches {TARGETS['delta_loss']} at about "
                     f"{needed / 1e6:.1f}M training tokens, about {hours:.1f} h per layer at this "
                     f"curve's {rate:.0f} residuals/s (training and measuring)")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tvlib.offline_saes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gemma-3-270m-offline")
    parser.add_argument("--texts", type=int, default=None,
                        help="model-written texts to sample, a multiple of the chunk size "
                             f"(default: {GenerationConfig.n_texts}; with --curve-only, the "
                             "card's)")
    parser.add_argument("--train-tokens", type=int, default=BuildConfig.train_tokens,
                        help="training residuals at most")
    default = BuildConfig().training
    parser.add_argument("--width", type=int, default=default.width)
    parser.add_argument("--k", type=float, default=default.k)
    parser.add_argument("--epochs", type=int, default=default.epochs)
    parser.add_argument("--lr", type=float, default=default.lr)
    parser.add_argument("--batch-tokens", type=int, default=default.batch_tokens)
    parser.add_argument("--no-sweep", action="store_true",
                        help="train with --width --k --lr --batch-tokens --epochs as given "
                             "(default: measure the SWEEP settings first, train with the best)")
    parser.add_argument("--sweep-tokens", type=int, default=BuildConfig.sweep_tokens)
    parser.add_argument("--curve", type=int, nargs="+", default=(), metavar="N",
                        help="training-token counts of a curve at the sweep layer, with the "
                             "chosen setting (each at most --train-tokens)")
    parser.add_argument("--curve-only", action="store_true",
                        help="add the --curve to the card of the SAEs already built, without "
                             "training the layers again (the corpus must be the card's)")
    parser.add_argument("--check-loss", action="store_true",
                        help="measure the built SAEs' loss change again on --loss-rows rows of "
                             "each of the card's held-out sets, with standard errors, and add "
                             "it to the card")
    parser.add_argument("--loss-rows", type=int, default=None,
                        help="with --check-loss: rows of each held-out set (default: all the "
                             "card measured)")
    parser.add_argument("--texts-only", action="store_true",
                        help="sample --texts model-written texts (reading those shipped or "
                             "cached), ship them to the output folder's generated/, and stop")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--prose-bundle", type=Path, default=None, metavar="FILE",
                        help="read the prose from FILE (python -m tvlib.prose_text --export "
                             "FILE, on a machine with the packages) instead of the packages")
    parser.add_argument("--cache", type=Path, default=REPO_ROOT / ".cache",
                        help="where sampled text and recorded residuals are kept")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.texts_only and args.prose_bundle:
        parser.error("--prose-bundle with --texts-only: sampling reads no prose; drop one")
    texts = args.texts if args.texts is not None else GenerationConfig.n_texts
    cfg = BuildConfig(generation=GenerationConfig(n_texts=texts),
                      training=dataclasses.replace(default, width=args.width, k=args.k,
                                                   epochs=args.epochs, lr=args.lr,
                                                   batch_tokens=args.batch_tokens),
                      sweep=() if args.no_sweep else SWEEP, sweep_tokens=args.sweep_tokens,
                      train_tokens=args.train_tokens, curve_tokens=tuple(args.curve))
    from . import prose_text

    prose, records = (prose_text.read_bundle(args.prose_bundle) if args.prose_bundle
                      else (None, None))
    if args.check_loss:
        check_loss(args.preset, args.out, cache_dir=args.cache, device=args.device,
                   loss_rows=args.loss_rows, prose=prose, prose_records=records)
    elif args.texts_only:
        ship_texts(args.preset, cfg, args.out, cache_dir=args.cache, device=args.device)
    elif args.curve_only:
        add_curve(args.preset, cfg, args.out, cache_dir=args.cache, device=args.device,
                  model_texts=args.texts, prose=prose, prose_records=records)
    else:
        build(args.preset, cfg, args.out, cache_dir=args.cache, device=args.device,
              prose=prose, prose_records=records)


if __name__ == "__main__":
    main()
