"""Every notebook runs top to bottom in smoke mode and writes its figure, on the
embedded model and on a stand-in of a real-model preset (changing PRESET only)."""

from pathlib import Path

import pytest

from tvlib.paths import REPO_ROOT

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("0*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.fixture(scope="module")
def gemma2_standin(tmp_path_factory) -> str:
    """A Gemma 2 stand-in with JumpReLU SAEs at resid_post, as Gemma Scope ships them."""
    from tvlib.standins import make_standin
    folder = tmp_path_factory.mktemp("gemma-2-2b")
    make_standin("gemma-2-2b", folder)
    return str(folder)


SMOKE_PRESETS = ["toy", "gemma-2-2b-standin"]


@pytest.fixture(scope="module")
def smoke_runs(request, tmp_path_factory) -> dict:
    """The smoke runs this session selected, two at a time, each in a process of its own
    with its own figure and cache folders: {(notebook stem, preset): (folder, error)}.
    Most of a smoke run is one process importing sae-lens and starting a kernel, which
    leaves the machine's second core idle; one torch thread each keeps two from
    fighting over the cores."""
    import json
    import os
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    jobs = [(item.callspec.params["notebook"], item.callspec.params["preset"])
            for item in request.session.items if item.originalname == "test_notebook_smoke"]
    standin = (request.getfixturevalue("gemma2_standin")
               if any(preset != "toy" for _, preset in jobs) else None)
    root = tmp_path_factory.mktemp("smoke")

    def run(job):
        notebook, preset = job
        folder = root / f"{notebook.stem}-{preset}"
        folder.mkdir()
        env = {**os.environ, "TVLIB_FIGURES_DIR": str(folder / "figures"),
               "TVLIB_CACHE_DIR": str(folder / "cache"), "OMP_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1"}
        parameters = {"SMOKE": True, "PRESET": preset if preset == "toy" else standin}
        done = subprocess.run(
            [sys.executable, "-m", "papermill", "--no-progress-bar", "-k", "python3",
             "--cwd", str(REPO_ROOT / "notebooks"), "-y", json.dumps(parameters),
             str(notebook), str(folder / notebook.name)],
            env=env, capture_output=True, text=True)
        return (notebook.stem, preset), (folder, done.stderr[-4000:] if done.returncode else None)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run, jobs))


@pytest.mark.parametrize("preset", SMOKE_PRESETS)
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_smoke(notebook: Path, preset, smoke_runs):
    folder, error = smoke_runs[(notebook.stem, preset)]
    assert error is None, error
    for suffix in ("png", "pdf"):   # "{stem}.png", or "{stem}_{part}.png" for several
        figures = list((folder / "figures" / "smoke").glob(f"{notebook.stem}*.{suffix}"))
        assert figures and all(f.stat().st_size > 1000 for f in figures)
    # a smoke run never writes where the full run's figures live
    assert [p.name for p in (folder / "figures").iterdir()] == ["smoke"]
    # results were written to the cache as they were computed
    tables = list((folder / "cache").rglob("*.parquet"))
    assert tables
    check_outputs(folder / notebook.name)


def check_outputs(executed: Path) -> None:
    """Figures show inline (not a list of paths) and no widget warning is printed."""
    import nbformat
    cells = [c for c in nbformat.read(executed, as_version=4).cells if c.cell_type == "code"]
    saving = [c for c in cells if "save_figure(" in c.source]
    for cell in saving:
        kinds = {kind for out in cell.outputs for kind in out.get("data", {})}
        assert "image/png" in kinds, cell.source
    streams = "".join(out.get("text", "") for c in cells for out in c.outputs)
    assert "IProgress not found" not in streams
    saved = "".join(out.get("text", "") for c in saving for out in c.outputs)
    assert "figures/" not in saved


def test_zero_shots_in_a_notebook_is_refused_not_replaced(tmp_path, monkeypatch):
    """N_SHOTS = 0 used to become the preset's default through an `or`."""
    import papermill
    monkeypatch.setenv("TVLIB_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(papermill.PapermillExecutionError, match="n_shots=0: must be an int >= 1"):
        papermill.execute_notebook(str(NOTEBOOKS[0]), str(tmp_path / "out.ipynb"),
                                   parameters={"SMOKE": True, "N_SHOTS": 0},
                                   kernel_name="python3", progress_bar=False,
                                   cwd=str(REPO_ROOT / "notebooks"))


def test_a_flag_given_as_text_is_refused(tmp_path, monkeypatch):
    """papermill -p SMOKE false passes the string "false", which Python reads as true:
    it used to run in smoke mode and overwrite the figures."""
    import papermill
    monkeypatch.setenv("TVLIB_FIGURES_DIR", str(tmp_path / "figures"))
    monkeypatch.setenv("TVLIB_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(papermill.PapermillExecutionError, match="SMOKE='false' is a str"):
        papermill.execute_notebook(str(NOTEBOOKS[0]), str(tmp_path / "out.ipynb"),
                                   parameters={"SMOKE": "false"}, kernel_name="python3",
                                   progress_bar=False, cwd=str(REPO_ROOT / "notebooks"))
    assert not (tmp_path / "figures").exists()


@pytest.mark.parametrize("settings", sorted((REPO_ROOT / "notebooks" / "settings").iterdir()),
                         ids=lambda p: p.name)
def test_settings_files_set_parameters_of_their_notebook(settings):
    """`make figures-gemma-3-270m SETTINGS=...` passes these files to papermill, which would
    inject a misspelt name silently: every key must be a parameter of the notebook."""
    import ast

    import nbformat
    import yaml
    files = sorted(settings.glob("*.yaml"))
    assert [f.stem for f in files] == [nb.stem for nb in NOTEBOOKS]
    for file, notebook in zip(files, NOTEBOOKS):
        cell = next(c for c in nbformat.read(notebook, as_version=4).cells
                    if "parameters" in c.metadata.get("tags", []))
        names = {t.id for node in ast.parse(cell.source).body for t in node.targets}
        values = yaml.safe_load(file.read_text())
        assert values and set(values) <= names, (file.name, set(values) - names)


def test_committed_notebooks_hold_no_outputs():
    """Outputs belong to a run, not to the repository: what git holds (the index, which
    the nbstripout filter cleans on add) has no outputs and no execution counts."""
    import json
    import subprocess
    for notebook in NOTEBOOKS:
        relative = notebook.relative_to(REPO_ROOT).as_posix()
        try:
            text = subprocess.run(["git", "show", f":{relative}"], cwd=REPO_ROOT, check=True,
                                  capture_output=True, text=True).stdout
        except (OSError, subprocess.CalledProcessError):     # not a git checkout
            text = notebook.read_text(encoding="utf-8")
        cells = [c for c in json.loads(text)["cells"] if c["cell_type"] == "code"]
        assert all(not c["outputs"] and c["execution_count"] is None for c in cells), relative
