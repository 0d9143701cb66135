"""Tidy result tables cached by the configuration that produced them.

A table is stored as ``{cache_dir}/{name}/{key}.csv`` beside ``{key}.json``
(the configuration), where ``key`` hashes the configuration. A re-run with the
same configuration reads the table instead of recomputing it. Writes go to a
temporary file first and are renamed into place, so an interrupted run never
leaves a half-written table.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from .paths import CACHE_DIR


def config_key(config: dict) -> str:
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)``, then rename the temporary file onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def cached_table(name: str, config: dict, compute: Callable[[], pd.DataFrame],
                 cache_dir: Path | None = None, refresh: bool = False) -> pd.DataFrame:
    """Return the table for ``config``, computing and storing it only when missing."""
    folder = Path(cache_dir or CACHE_DIR) / name
    key = config_key(config)
    table_path = folder / f"{key}.csv"
    if table_path.is_file() and not refresh:
        return pd.read_csv(table_path)
    table = compute()
    write_atomic(folder / f"{key}.json",
                 lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True, default=str)))
    write_atomic(table_path, lambda p: table.to_csv(p, index=False))
    return table
