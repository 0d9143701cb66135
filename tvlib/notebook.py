"""What a notebook does with its parameters before it computes anything.

Papermill's ``-p NAME value`` passes text: ``-p SMOKE false`` arrives as the string
"false", which Python reads as true. Flags are therefore checked to be real booleans
once, at the top of each notebook, and a smoke run writes its figures into a folder
of its own, never over the figures a full run made.
"""

from __future__ import annotations

from pathlib import Path

from .paths import FIGURES_DIR

SMOKE_FOLDER = "smoke"          # under the figures folder; git-ignored


def check_flags(**flags) -> None:
    """Refuse a flag that is not a bool (the string "false" is true in Python)."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(
                f"{name}={value!r} is a {type(value).__name__}, not True or False: with "
                f"papermill pass -p {name} True (capitalised, read as a bool) or "
                f"-y '{name}: false'; in the notebook write {name} = False")


def figures_dir(smoke: bool, base: Path | None = None) -> Path:
    """Where a notebook saves its figures: ``base`` (default ``figures/``), or its
    ``smoke/`` subfolder for a smoke run."""
    check_flags(SMOKE=smoke)
    base = Path(base or FIGURES_DIR)
    return base / SMOKE_FOLDER if smoke else base
