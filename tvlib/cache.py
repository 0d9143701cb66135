"""Tidy result tables cached by the configuration that produced them.

A table is stored as ``{cache_dir}/{name}/{key}.{part}.csv`` beside
``{key}.json`` (the configuration, written last), where ``key`` hashes the
configuration. A re-run with the
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
        os.chmod(tmp, 0o666 & ~_umask())     # mkstemp creates owner-only files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def cached_tables(name: str, config: dict, compute: Callable[[], dict[str, pd.DataFrame]],
                  cache_dir: Path | None = None, refresh: bool = False) -> dict[str, pd.DataFrame]:
    """Several tables from one computation, stored as ``{key}.{part}.csv``."""
    folder = Path(cache_dir or CACHE_DIR) / name
    key = config_key(config)
    done = folder / f"{key}.json"
    if done.is_file() and not refresh:
        parts = json.loads(done.read_text())["parts"]
        return {part: pd.read_csv(folder / f"{key}.{part}.csv") for part in parts}
    tables = compute()
    for part, table in tables.items():
        write_atomic(folder / f"{key}.{part}.csv", lambda p, t=table: t.to_csv(p, index=False))
    # the configuration file is written last: it marks the entry complete
    record = {"config": config, "parts": list(tables)}
    write_atomic(done, lambda p: p.write_text(json.dumps(record, indent=2, sort_keys=True,
                                                         default=str)))
    return tables


def cached_table(name: str, config: dict, compute: Callable[[], pd.DataFrame],
                 cache_dir: Path | None = None, refresh: bool = False) -> pd.DataFrame:
    """Return the table for ``config``, computing and storing it only when missing."""
    return cached_tables(name, config, lambda: {"table": compute()}, cache_dir,
                         refresh)["table"]
