"""Residuals of many token rows, recorded by batched prefill into an on-disk store.

What SAEs train on: the residual stream of every counted token of a set of rows, at a
few resid_pre layers. Rows are token ids (N, T), each starting with BOS and padded on
the right; a mask (N, T) marks the positions to record (never BOS, padding or another
special token). ``text_rows`` cuts texts into such rows.

Recording runs the model up to the last layer needed (nnsight stops the pass there),
in bfloat16 where this CPU computes it faster than float32 (``recording_dtype``: a
timed check, since only CPUs with AMX or AVX512-BF16 do), float32 otherwise. Residuals
are stored in bfloat16: Gemma 3's residual has entries near 9e4, past float16's range,
and 10M x 640 residuals in float32 (25.6 GB) would not fit in this machine's memory.

The store is a folder of chunk files, chunk i holding rows [i * chunk_rows, (i + 1) *
chunk_rows) as ``resid_{L}`` (tokens, d) in row-major order. Its name is a digest of
the model's identity, the rows and mask, the layers, the compute dtype and the library
versions, so a store is never read for other weights, text or settings. Each chunk is
written atomically when done: an interrupt or a kill loses at most the chunk in
progress, and a re-run records only the missing or damaged chunks.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
import warnings
from importlib.metadata import version
from pathlib import Path

import torch

from .cache import CacheWarning, write_atomic
from .fingerprints import LIBRARIES, digest

# Bump when what a chunk holds or how it is computed changes: old stores are not read.
STORE_FORMAT = 1
MANIFEST = "store.json"     # written when every chunk is recorded


@functools.cache
def recording_dtype(device: str = "cpu") -> str:
    """"bfloat16" where a bfloat16 matmul beats float32 by 1.5x on ``device``'s CPU,
    else "float32"; on a GPU "float32" (fast enough, and exact). Timed once a process.

    bfloat16 residuals differ from float32 ones by an FVU of about 0.001 on Gemma 3.
    """
    if device != "cpu":
        return "float32"
    a, b = torch.randn(512, 640), torch.randn(640, 2048)
    float32 = _matmul_seconds(a, b, repeats=5)
    # Where bfloat16 is emulated it runs about 200x slower (15 s for the full timing): a
    # 16-row product slower than one full float32 product (32x the work) settles it.
    if _matmul_seconds(a[:16].bfloat16(), b.bfloat16(), repeats=1) > float32 / 5:
        return "float32"
    bfloat16 = _matmul_seconds(a.bfloat16(), b.bfloat16(), repeats=5)
    return "bfloat16" if bfloat16 * 1.5 < float32 else "float32"


def _matmul_seconds(a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
    a @ b                                       # warm-up (kernel selection)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return time.perf_counter() - start


def text_rows(tokenizer, texts: list[str], length: int = 128,
              min_tokens: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts cut into rows of BOS + up to ``length - 1`` tokens: ids (N, length) padded
    on the right, and the mask (N, length) of the tokens to record (BOS and padding
    excluded). A text's last piece is kept if it has ``min_tokens`` tokens or more."""
    if length < 2 or min_tokens < 1:
        raise ValueError(f"length={length} and min_tokens={min_tokens}: a row needs BOS and "
                         "at least one token (length >= 2, min_tokens >= 1)")
    if tokenizer.bos_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no BOS or no padding token: rows start with BOS "
                         "and are padded on the right")
    width = length - 1
    pieces = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        pieces += [ids[i:i + width] for i in range(0, len(ids), width)
                   if len(ids[i:i + width]) >= min_tokens]
    rows = torch.full((len(pieces), length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(pieces), length), dtype=torch.bool)
    rows[:, 0] = tokenizer.bos_token_id
    for i, piece in enumerate(pieces):
        rows[i, 1:1 + len(piece)] = torch.tensor(piece)
        mask[i, 1:1 + len(piece)] = True
    mask &= ~torch.isin(rows, torch.tensor(sorted(tokenizer.all_special_ids)))
    return rows, mask


def _rows_digest(rows: torch.Tensor, mask: torch.Tensor) -> str:
    sha = hashlib.sha256()
    for tensor in (rows.to(torch.int64), mask.to(torch.bool)):
        sha.update(str(tuple(tensor.shape)).encode())
        sha.update(tensor.contiguous().numpy().tobytes())
    return sha.hexdigest()


def store_folder(lm, rows: torch.Tensor, mask: torch.Tensor, layers, cache_dir: Path,
                 chunk_rows: int, batch_size: int | None = None) -> Path:
    """The store of these rows' residuals under this model and these settings (off the
    CPU, the rows per forward too: a GPU's kernels, and so the last bits, depend on it)."""
    from .models import model_device, model_dtype, model_identity

    key = {"format": STORE_FORMAT, "model": model_identity(lm),
           "compute_dtype": str(model_dtype(lm)), "rows": _rows_digest(rows, mask),
           "layers": sorted(layers), "chunk_rows": chunk_rows,
           "libraries": {name: version(name) for name in LIBRARIES}}
    if model_device(lm).type != "cpu":
        key["batch_size"] = batch_size
    return Path(cache_dir) / f"residuals-{digest(key)}"


def _chunk_path(folder: Path, chunk: int) -> Path:
    return folder / f"chunk_{chunk:05d}.safetensors"


def _read_chunk(path: Path, layers, n_tokens: int, d: int) -> dict[str, torch.Tensor] | None:
    """The chunk's tensors, or None (with a warning if the file is damaged)."""
    from safetensors.torch import load_file

    if not path.exists():
        return None
    try:
        tensors = load_file(str(path))
        ok = all(tensors[f"resid_{layer}"].shape == (n_tokens, d)
                 and torch.isfinite(tensors[f"resid_{layer}"]).all() for layer in layers)
    except Exception as error:          # truncated or garbage file: record it again
        warnings.warn(CacheWarning(f"{path} is damaged ({error}); recording it again"))
        return None
    if not ok:
        warnings.warn(CacheWarning(f"{path} holds residuals of other shapes or non-finite "
                                   "values; recording it again"))
        return None
    return tensors


def counted_residuals(lm, ids: torch.Tensor, counted: torch.Tensor,
                      layers) -> list[torch.Tensor]:
    """Per layer of ``layers`` (resid_pre, checked): the residuals (n, d) in bfloat16 of
    the ``counted`` (B, T) positions of ``ids`` (B, T), in row-major order, on the CPU.
    One trace, stopped after the last layer; positions are selected and rounded where
    the model runs, so a GPU sends back only what is kept (a quarter of the float32
    block)."""
    from .models import check_layers, model_device, resid_pre, trace

    layers = check_layers(lm, layers)
    in_order = sorted(set(layers))      # a trace visits modules in forward order
    where = counted.to(model_device(lm))
    saved = []   # filled inside the trace (names bound there are not closure-safe)
    with torch.no_grad():
        with trace(lm, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}) as tracer:
            for layer in in_order:
                saved.append(resid_pre(lm, layer)[where].to(torch.bfloat16).save())
            tracer.stop()
    return [saved[in_order.index(layer)].cpu() for layer in layers]


def record(lm, rows: torch.Tensor, mask: torch.Tensor, layers, cache_dir: Path,
           batch_size: int = 16, chunk_rows: int = 512, progress: bool = True) -> Path:
    """Record the residuals of ``rows`` at resid_pre ``layers`` into the store; returns
    its folder. Finished chunks are kept; missing or damaged ones are recorded."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from .interventions import check_batch_size
    from .models import check_layers, d_model

    layers = check_layers(lm, layers)
    check_batch_size(batch_size)
    check_batch_size(chunk_rows)
    if rows.dim() != 2 or rows.shape != mask.shape:
        raise ValueError(f"rows {tuple(rows.shape)} and mask {tuple(mask.shape)} must be two "
                         "(N, T) tensors of one shape: build them with text_rows")
    if mask[:, 0].any():
        raise ValueError("the mask counts position 0 (BOS): SAEs never see BOS; build rows "
                         "with text_rows")
    folder = store_folder(lm, rows, mask, layers, cache_dir, chunk_rows, batch_size)
    d = d_model(lm)
    n_chunks = -(-rows.shape[0] // chunk_rows)
    todo = [c for c in range(n_chunks) if _read_chunk(
        _chunk_path(folder, c), layers,
        int(mask[c * chunk_rows:(c + 1) * chunk_rows].sum()), d) is None]
    total = int(sum(mask[c * chunk_rows:(c + 1) * chunk_rows].sum() for c in todo))
    bar = tqdm(total=total, unit="tok", unit_scale=True, disable=not progress or not todo,
               desc=f"recording {len(todo)}/{n_chunks} chunks")
    for chunk in todo:
        ids = rows[chunk * chunk_rows:(chunk + 1) * chunk_rows]                 # (R, T)
        counted = mask[chunk * chunk_rows:(chunk + 1) * chunk_rows]
        parts = {layer: [] for layer in layers}
        for start in range(0, ids.shape[0], batch_size):
            part = slice(start, start + batch_size)
            kept = counted_residuals(lm, ids[part], counted[part], layers)
            for layer, resid in zip(layers, kept):
                parts[layer].append(resid)
            bar.update(int(counted[part].sum()))
        tensors = {f"resid_{layer}": torch.cat(parts[layer]).contiguous() for layer in layers}
        for name, tensor in tensors.items():
            if not torch.isfinite(tensor).all():
                raise FloatingPointError(f"{name} of chunk {chunk} is not finite in "
                                         "bfloat16: the model's residual overflowed")
        write_atomic(_chunk_path(folder, chunk), lambda tmp: save_file(tensors, str(tmp)))
    bar.close()
    manifest = {"n_chunks": n_chunks, "n_rows": int(rows.shape[0]),
                "n_tokens": int(mask.sum()), "layers": layers, "d_model": d}
    write_atomic(folder / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest)))
    return folder


def read_layer(folder: Path, layer: int, limit: int | None = None) -> torch.Tensor:
    """Every recorded residual of resid_pre ``layer`` in the store: (N, d) bfloat16; with
    ``limit``, the first ``limit`` of them (only the chunks that hold them are read)."""
    from safetensors import safe_open

    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise FileNotFoundError(f"{folder} is not a finished store (no {MANIFEST}): call "
                                "record, which resumes an interrupted recording")
    manifest = json.loads((folder / MANIFEST).read_text())
    if layer not in manifest["layers"]:
        raise ValueError(f"resid_pre {layer} was not recorded in {folder}: it holds layers "
                         f"{manifest['layers']}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit!r}: pass a positive number of residuals, or None")
    def damaged(shape) -> ValueError:
        return ValueError(f"{folder} holds {tuple(shape)} residuals of resid_pre {layer}, its "
                          f"manifest {manifest['n_tokens']} x {manifest['d_model']}: delete the "
                          "folder and record again")

    parts, count = [], 0
    for chunk in range(manifest["n_chunks"]):
        with safe_open(str(_chunk_path(folder, chunk)), "pt") as f:
            part = f.get_tensor(f"resid_{layer}")     # (tokens of the chunk, d)
        # each chunk is checked as read, so a partial read is refused like a full one
        if part.ndim != 2 or part.shape[1] != manifest["d_model"]:
            raise damaged((count + part.shape[0], *part.shape[1:]))
        parts.append(part)
        count += part.shape[0]
        if count > manifest["n_tokens"]:
            raise damaged((count, manifest["d_model"]))
        if limit is not None and count >= limit:
            return torch.cat(parts)[:limit]
    if count != manifest["n_tokens"]:
        raise damaged((count, manifest["d_model"]))
    return torch.cat(parts)
