"""Every notebook runs top to bottom in smoke mode and writes its figure."""

from pathlib import Path

import pytest

from tvlib.paths import REPO_ROOT

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("0*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_smoke(notebook: Path, tmp_path, monkeypatch):
    import papermill
    monkeypatch.setenv("TVLIB_FIGURES_DIR", str(tmp_path / "figures"))
    monkeypatch.setenv("TVLIB_CACHE_DIR", str(tmp_path / "cache"))
    papermill.execute_notebook(str(notebook), str(tmp_path / notebook.name),
                               parameters={"SMOKE": True}, kernel_name="python3",
                               progress_bar=False, cwd=str(REPO_ROOT / "notebooks"))
    for suffix in ("png", "pdf"):   # "{stem}.png", or "{stem}_{part}.png" for several
        figures = list((tmp_path / "figures").glob(f"{notebook.stem}*.{suffix}"))
        assert figures and all(f.stat().st_size > 1000 for f in figures)
    # the second run reads every result from the cache
    tables = list((tmp_path / "cache").rglob("*.csv"))
    assert tables
