"""Tidy result tables stored under a key (``result_keys.result_key``) that covers
everything they depend on: a cache never serves numbers computed from other weights,
SAEs, settings or code. This module only stores and reads.

An entry is ``{cache_dir}/{experiment}/{hash}.{part}.parquet`` beside
``{hash}.json``, the record, written last: it holds the full key and the
SHA-256 of each table file. Parquet keeps every column's type, so a table read
back equals the one computed (a first run returns the stored form too). Reading
checks the record and the hashes; a damaged or incomplete entry is reported
with a warning naming its file and recomputed. Writes go to a temporary file that
is renamed into place; if the cache cannot be written, the result is still
returned, with a warning.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import pandas as pd

from .fingerprints import canonical
from .paths import CACHE_DIR

# Bump when what an entry holds changes (its tables, its record). Edits to the code
# that computes are in the key already (``fingerprints.code_fingerprint``).
RESULT_FORMAT = 5


class CacheWarning(UserWarning):
    """A cache entry was damaged (and is recomputed) or could not be written."""


# ---------------------------------------------------------------- storage

def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)``, then rename the temporary file onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())     # mkstemp creates owner-only files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _entry(key: dict, cache_dir: Path | None) -> tuple[Path, str]:
    folder = Path(cache_dir or CACHE_DIR) / key["experiment"]
    return folder, hashlib.sha256(canonical(key).encode()).hexdigest()[:20]


def _read_entry(folder: Path, name: str, key: dict) -> dict[str, pd.DataFrame] | None:
    """The stored tables, None if absent; raises ValueError naming what is damaged."""
    record_path = folder / f"{name}.json"
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text())
        parts = record["parts"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{record_path} is not a complete record ({err})") from None
    if canonical(record.get("key")) != canonical(key):
        raise ValueError(f"{record_path} holds another key")
    tables = {}
    for part, expected in parts.items():
        path = folder / f"{name}.{part}.parquet"
        try:
            data = path.read_bytes()
        except OSError as err:
            raise ValueError(f"{path} cannot be read ({err})") from None
        if hashlib.sha256(data).hexdigest() != expected:
            raise ValueError(f"{path} does not match its record (truncated or edited)")
        tables[part] = _from_bytes(data)
    return tables


def _to_bytes(table: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    return buffer.getvalue()


def _from_bytes(data: bytes) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(data))


def _write_entry(folder: Path, name: str, key: dict, stored: dict[str, bytes]) -> None:
    for part, data in stored.items():
        write_atomic(folder / f"{name}.{part}.parquet", lambda p, d=data: p.write_bytes(d))
    # the record is written last: it marks the entry complete
    hashes = {part: hashlib.sha256(data).hexdigest() for part, data in stored.items()}
    record = json.dumps({"key": key, "parts": hashes}, indent=2, sort_keys=True)
    write_atomic(folder / f"{name}.json", lambda p: p.write_text(record))


def _lookup(key: dict, cache_dir: Path | None) -> dict[str, pd.DataFrame] | None:
    """The tables stored under ``key``; None if absent or damaged (with a warning)."""
    folder, name = _entry(key, cache_dir)
    try:
        return _read_entry(folder, name, key)
    except ValueError as err:
        warnings.warn(f"damaged cache entry: {err}; recomputing it", CacheWarning, stacklevel=3)
        return None


def _store(key: dict, tables, cache_dir: Path | None) -> dict[str, pd.DataFrame]:
    """Store ``tables`` under ``key``; returns them as a later read returns them."""
    if not isinstance(tables, dict) or not all(isinstance(t, pd.DataFrame)
                                               for t in tables.values()):
        raise TypeError(f"the computation of {key['experiment']!r} must return a dict of "
                        f"DataFrames, not {type(tables).__name__}")
    folder, name = _entry(key, cache_dir)
    stored = {part: _to_bytes(table) for part, table in tables.items()}
    tables = {part: _from_bytes(data) for part, data in stored.items()}   # as a re-run reads them
    try:
        _write_entry(folder, name, key, stored)
    except OSError as err:
        warnings.warn(f"could not write the result to the cache {folder} ({err}); the "
                      "result is returned but not cached. Set TVLIB_CACHE_DIR to a writable "
                      "folder to keep results.", CacheWarning, stacklevel=3)
    return tables


def cached_tables(key: dict, compute: Callable[[], dict[str, pd.DataFrame]],
                  cache_dir: Path | None = None,
                  refresh: bool = False) -> dict[str, pd.DataFrame]:
    """The tables stored under ``key`` (from ``result_key``), computed when missing.

    A damaged entry is recomputed with a warning; an unwritable cache gives a
    warning and the computed tables.
    """
    stored = None if refresh else _lookup(key, cache_dir)
    return stored if stored is not None else _store(key, compute(), cache_dir)


def cached_groups(keys: dict, compute: Callable[[list], Iterable | dict],
                  cache_dir: Path | None = None, refresh: bool = False) -> dict:
    """Several entries at once, ``{id: key}`` -> ``{id: tables}``: stored entries are read,
    the missing ones computed by one call ``compute([ids])`` (e.g. the layers of a sweep
    not yet run) and stored each under its own key.

    ``compute`` returns ``{id: tables}``, or yields ``(id, tables)`` pairs: each is then
    stored as it arrives, so an interrupt or an error keeps the ids finished before it.
    """
    found = {i: None if refresh else _lookup(key, cache_dir) for i, key in keys.items()}
    missing = [i for i, tables in found.items() if tables is None]
    if missing:
        computed = compute(missing)
        pairs = computed.items() if isinstance(computed, dict) else computed
        done = []
        for i, tables in pairs:
            if i not in missing or i in done:
                raise TypeError(f"the computation of {missing} gave {i!r}, which it was not "
                                "asked for or gave twice")
            found[i] = _store(keys[i], tables, cache_dir)
            done.append(i)
        if set(done) != set(missing):
            raise TypeError(f"the computation of {missing} must give each of them once; it "
                            f"gave {done}")
    return found


def cached_table(key: dict, compute: Callable[[], pd.DataFrame], cache_dir: Path | None = None,
                 refresh: bool = False) -> pd.DataFrame:
    """One table stored under ``key``, computed only when missing."""
    return cached_tables(key, lambda: {"table": compute()}, cache_dir, refresh)["table"]
