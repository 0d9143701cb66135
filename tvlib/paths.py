"""One place for every path the project reads or writes.

``TVLIB_FIGURES_DIR`` and ``TVLIB_CACHE_DIR`` redirect outputs (the test suite
uses them so that smoke runs never touch the real figures or cache).
"""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "data"
TASKS_DIR = DATA_DIR / "tasks"
TOY_DIR = DATA_DIR / "toy"            # the embedded model, tokenizer and SAEs
FIGURES_DIR = Path(os.environ.get("TVLIB_FIGURES_DIR", REPO_ROOT / "figures"))
CACHE_DIR = Path(os.environ.get("TVLIB_CACHE_DIR", REPO_ROOT / ".cache" / "results"))
