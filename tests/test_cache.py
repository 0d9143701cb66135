"""The results cache: one key covering everything a result depends on; damaged
entries recomputed; an unwritable cache never loses a finished computation."""

import dataclasses
import shutil

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from tvlib.cache import CacheWarning, cached_table, cached_tables, write_atomic
from tvlib.fingerprints import digest
from tvlib.result_keys import result_key
from tvlib.experiments import PromptConfig, SAEViewConfig, run_sae_view_sweep
from tvlib.models import load_model
from tvlib.presets import get_preset, preset_to_json, PRESETS
from tvlib.paths import TOY_DIR

KEY = {"experiment": "sweep", "format": 3, "config": {"task": "a", "layers": [1, 2]}}


def table():
    return pd.DataFrame({"task": ["a", "b"], "nll": [1.5, 2.25], "layer": [None, 3]})


class Counter:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return table()


def entry_files(cache_dir):
    return sorted(p for p in (cache_dir / "sweep").iterdir())


def test_rerun_reuses_finished_results(tmp_path):
    compute = Counter()
    first = cached_table(KEY, compute, tmp_path)
    reordered = {"config": {"layers": [1, 2], "task": "a"}, "format": 3, "experiment": "sweep"}
    second = cached_table(reordered, compute, tmp_path)
    assert compute.calls == 1                       # key order does not matter
    pd.testing.assert_frame_equal(first, second, check_dtype=False)
    cached_table({**KEY, "config": {"task": "a", "layers": [1, 3]}}, compute, tmp_path)
    assert compute.calls == 2                       # a new configuration is computed
    cached_table(KEY, compute, tmp_path, refresh=True)
    assert compute.calls == 3
    assert digest({"a": 1}) != digest({"a": 2})


@pytest.mark.parametrize("damage", ["truncate_table", "empty_table", "garbage_table",
                                    "delete_table",
                                    "truncate_json", "empty_json", "other_key"])
def test_damaged_entries_are_recomputed_with_a_warning(tmp_path, damage):
    compute = Counter()
    cached_table(KEY, compute, tmp_path)
    csv, record = [p for p in entry_files(tmp_path) if p.suffix == ".parquet"][0], \
        [p for p in entry_files(tmp_path) if p.suffix == ".json"][0]
    if damage == "truncate_table":
        csv.write_bytes(csv.read_bytes()[:-6])      # a partial table
    elif damage == "empty_table":
        csv.write_text("")
    elif damage == "garbage_table":
        csv.write_bytes(b"\x00\xff garbage")
    elif damage == "delete_table":
        csv.unlink()
    elif damage == "truncate_json":
        record.write_text(record.read_text()[:40])
    elif damage == "empty_json":
        record.write_text("")
    else:
        record.write_text(record.read_text().replace('"task": "a"', '"task": "z"'))
    with pytest.warns(CacheWarning, match=f"damaged cache entry.*{tmp_path}"):
        again = cached_table(KEY, compute, tmp_path)
    assert compute.calls == 2
    pd.testing.assert_frame_equal(again, table())
    assert cached_table(KEY, compute, tmp_path).equals(pd.read_parquet(csv))   # repaired
    assert compute.calls == 2


def test_a_cached_table_equals_the_computed_one(tmp_path):
    """Strings that look like numbers or NA, booleans, empty parts: read back unchanged."""
    odd = pd.DataFrame({"task": ["NA", "01", "1e3", "null"], "flag": [True, False, True, False],
                        "l0": [None, 3, None, 4]})
    compute = lambda: {"scores": odd, "features": pd.DataFrame()}   # noqa: E731
    first = cached_tables(KEY, compute, tmp_path)
    again = cached_tables(KEY, lambda: pytest.fail("recomputed"), tmp_path)
    for part in ("scores", "features"):
        pd.testing.assert_frame_equal(first[part], again[part])
    assert again["scores"].task.tolist() == ["NA", "01", "1e3", "null"]
    assert again["scores"].flag.tolist() == [True, False, True, False]


def test_numpy_scalars_are_keyed_like_numbers():
    import numpy as np
    assert digest({"steps": np.int64(2), "lam": np.float32(0.5)}) == digest({"steps": 2,
                                                                           "lam": 0.5})


def test_unwritable_cache_warns_and_returns_the_result(tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")
    compute = Counter()
    with pytest.warns(CacheWarning, match="could not write.*TVLIB_CACHE_DIR"):
        result = cached_tables(KEY, lambda: {"scores": compute()}, blocked)
    pd.testing.assert_frame_equal(result["scores"], table())


def test_failed_write_leaves_previous_file(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old")

    def broken(path):
        path.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]   # no temporary left


def test_failed_compute_writes_nothing(tmp_path):
    def compute():
        raise ValueError("NaN in loss")

    with pytest.raises(ValueError):
        cached_table(KEY, compute, tmp_path)
    assert not any(tmp_path.rglob("*.parquet"))


@pytest.fixture()
def toy_copy(tmp_path):
    """The embedded preset with its SAEs copied to a folder the test may change."""
    shutil.copytree(TOY_DIR / "saes", tmp_path / "saes")
    preset = dataclasses.replace(PRESETS["toy"], name="toy-copy", sae_dir=str(tmp_path / "saes"))
    preset_to_json(preset, tmp_path / "preset.json")
    return tmp_path


def scale_decoder(sae_folder, factor):
    """Stand-in for retraining an SAE: its weights file is rewritten."""
    path = sae_folder / "sae_weights.safetensors"
    weights = load_file(str(path))
    weights["W_dec"] = weights["W_dec"] * factor
    save_file(weights, str(path))


def test_key_covers_model_files_saes_dtype_and_config(toy_copy):
    lm = load_model(str(toy_copy), device="cpu")
    base = result_key("sweep", lm, [4], prompts=PromptConfig())
    assert result_key("sweep", lm, [4], prompts=PromptConfig()) == base
    assert result_key("sweep", lm, [3], prompts=PromptConfig()) != base
    assert result_key("sweep", lm, [4], prompts=PromptConfig(seed=1)) != base
    assert base["model"]["device"] == "cpu" and base["model"]["dtype"] == "float32"
    bf16 = load_model(str(toy_copy), device="cpu", dtype="bfloat16")
    assert result_key("sweep", bf16, [4], prompts=PromptConfig()) != base
    scale_decoder(toy_copy / "saes" / "layer_4", 2.0)
    assert result_key("sweep", lm, [4], prompts=PromptConfig()) != base
    assert set(base) >= {"format", "model", "saes", "libraries", "config"}


def test_replacing_an_sae_recomputes_the_results_it_changes(toy_copy, tmp_path, monkeypatch):
    """The stale-cache case: an SAE retrained after its results were cached."""
    monkeypatch.setenv("TVLIB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr("tvlib.cache.CACHE_DIR", tmp_path / "cache")
    lm = load_model(str(toy_copy), device="cpu")
    cfg = PromptConfig(n_prompts=4, n_shots=4, n_eval=6)
    before = run_sae_view_sweep(lm, ["antonyms"], [4], cfg, SAEViewConfig(target_l0=5))
    scale_decoder(toy_copy / "saes" / "layer_4", 3.0)
    after = run_sae_view_sweep(lm, ["antonyms"], [4], cfg, SAEViewConfig(target_l0=5))
    recon = lambda t: t[t.method == "Recon of TV"].nll.item()   # noqa: E731
    assert recon(after) != pytest.approx(recon(before), abs=1e-3)
    tv = lambda t: t[t.method == "TV"].nll.item()                # noqa: E731
    assert tv(after) == pytest.approx(tv(before), abs=1e-6)      # the TV has no SAE
    assert get_preset(str(toy_copy)).name == "toy-copy"
    assert torch.isfinite(torch.tensor(after.nll.tolist())).all()


def test_task_vector_variants_are_labelled_when_computed_and_when_cached(toy_lm, tmp_path,
                                                                         monkeypatch):
    """The label is applied after the cache, so a cached table can never carry another
    variant's name; the writeup's variant keeps the plain "TV"."""
    from tvlib.experiments import run_task_vector_sweep
    monkeypatch.setattr("tvlib.cache.CACHE_DIR", tmp_path / "cache")
    cfg = PromptConfig(n_prompts=4, n_shots=4, n_eval=6)
    for mode, positions, label in (("add", "all", "TV"), ("replace", "last", "TV (replace, last)")):
        first = run_task_vector_sweep(toy_lm, ["antonyms"], [4], cfg, positions, mode)
        again = run_task_vector_sweep(toy_lm, ["antonyms"], [4], cfg, positions, mode)
        for table in (first, again):
            assert set(table.method) == {"zero-shot", "ICL", label}
        assert first.equals(again)


def test_task_vector_variants_in_one_table_with_the_baselines_once(toy_lm, tmp_path,
                                                                   monkeypatch):
    from tvlib.experiments import run_task_vector_sweep, run_task_vector_variants
    monkeypatch.setattr("tvlib.cache.CACHE_DIR", tmp_path / "cache")
    cfg = PromptConfig(n_prompts=4, n_shots=4, n_eval=6)
    both = run_task_vector_variants(toy_lm, ["antonyms"], [3, 4], cfg,
                                    [["add", "all"], ["replace", "last"]])
    assert list(both.method.value_counts().sort_index().items()) == [
        ("ICL", 1), ("TV", 2), ("TV (replace, last)", 2), ("zero-shot", 1)]
    hendel = run_task_vector_sweep(toy_lm, ["antonyms"], [3, 4], cfg, "last", "replace")
    rows = both[both.method == "TV (replace, last)"].reset_index(drop=True)
    assert rows.equals(hendel[hendel.method == "TV (replace, last)"].reset_index(drop=True))
    for bad in ([], [["add", "all"], ["add", "all"]], [["add"]]):
        with pytest.raises(ValueError, match="distinct \\(mode, positions\\) pairs"):
            run_task_vector_variants(toy_lm, ["antonyms"], [4], cfg, bad)


def test_sweeps_cache_each_task_and_layer_and_share_the_baselines(toy_lm, tmp_path,
                                                                 monkeypatch):
    """A sweep over other layers reuses the layers already run; the zero-shot and ICL rows
    are computed once for every experiment on the same prompts; the cached table equals
    the uncached sweep."""
    import tvlib.experiments.cleanup_sweeps as cleanup_sweeps
    import tvlib.experiments.runner as runner
    from tvlib.cleanup import CleanupConfig
    from tvlib.experiments import (build_task_prompts, model_tasks, run_cleanup_sweep,
                                   run_task_vector_sweep, task_vector_sweep)
    monkeypatch.setattr("tvlib.cache.CACHE_DIR", tmp_path / "cache")
    calls = {"cleanup": [], "baselines": 0}
    cleanup_layers, baseline_table = cleanup_sweeps.cleanup_layers, runner.baseline_table

    def count_layers(lm, prompts, layers, *args):
        calls["cleanup"].append(list(layers))
        return cleanup_layers(lm, prompts, layers, *args)

    def count_baselines(*args, **kwargs):
        calls["baselines"] += 1
        return baseline_table(*args, **kwargs)

    monkeypatch.setattr(cleanup_sweeps, "cleanup_layers", count_layers)
    monkeypatch.setattr(runner, "baseline_table", count_baselines)
    cfg = PromptConfig(n_prompts=4, n_shots=4, n_eval=6, n_train=6)
    quick = CleanupConfig(max_steps=3, progress=False)

    wide = run_cleanup_sweep(toy_lm, ["antonyms"], [3, 4], cfg, quick)
    narrow = run_cleanup_sweep(toy_lm, ["antonyms"], [4, 5], cfg, quick)
    assert calls["cleanup"] == [[3, 4], [5]]              # layer 4 came from the cache
    pd.testing.assert_frame_equal(
        wide["scores"][wide["scores"].layer == 4].reset_index(drop=True),
        narrow["scores"][narrow["scores"].layer == 4].reset_index(drop=True))
    tv = run_task_vector_sweep(toy_lm, ["antonyms"], [2, 4], cfg)
    assert calls["baselines"] == 1                        # shared by both experiments
    base = lambda t: t[t.layer.isna()].reset_index(drop=True)   # noqa: E731
    shared = [c for c in tv.columns if c in wide["scores"].columns]
    pd.testing.assert_frame_equal(base(tv)[shared], base(wide["scores"])[shared])

    prompts = build_task_prompts(toy_lm.tokenizer, model_tasks(toy_lm, ["antonyms"])["antonyms"],
                                 cfg)
    labelled = ["mode", "positions"]            # run_task_vector_sweep names the variant
    pd.testing.assert_frame_equal(tv.drop(columns=labelled),
                                  task_vector_sweep(toy_lm, prompts, [2, 4]),
                                  check_exact=False, rtol=1e-6)


@pytest.fixture
def sae_loads(monkeypatch) -> list:
    """The layers ``tvlib.saes.load_sae`` is called for, in order."""
    import tvlib.saes as saes
    loads, load_sae = [], saes.load_sae

    def counted(preset, layer, device=None):
        loads.append(layer)
        return load_sae(preset, layer, device)

    monkeypatch.setattr(saes, "load_sae", counted)
    return loads


def test_a_sweep_loads_each_layers_sae_once_for_all_tasks(toy_lm, tmp_path, monkeypatch,
                                                         sae_loads):
    monkeypatch.setattr("tvlib.cache.CACHE_DIR", tmp_path / "cache")
    cfg = PromptConfig(n_prompts=4, n_shots=4, n_eval=6, n_train=6)
    table = run_sae_view_sweep(toy_lm, ["antonyms", "en_fr"], [2, 4], cfg)
    assert set(table.task) == {"antonyms", "en_fr"}
    assert sorted(sae_loads) == [2, 4]                   # not once per task


def test_the_shelf_keeps_saes_up_to_its_byte_budget(sae_loads):
    from tvlib.saes import SAEShelf
    one = sum(t.numel() * t.element_size()
              for t in SAEShelf("toy", "cpu")[2].state_dict().values())
    sae_loads.clear()
    roomy, tight = SAEShelf("toy", "cpu"), SAEShelf("toy", "cpu", max_bytes=one)
    for shelf in (roomy, tight):
        for layer in (2, 4, 2, 4):
            assert shelf[layer].cfg.metadata.layer == layer
    assert sae_loads == [2, 4] + [2, 4, 2, 4]       # the tight shelf holds one SAE at a time


def test_a_shelf_of_another_presets_saes_is_refused(toy_lm):
    from tvlib.experiments import build_task_prompts, model_tasks
    from tvlib.experiments.sae_view_sweeps import sae_view_layers
    from tvlib.saes import SAEShelf
    other = dataclasses.replace(get_preset("toy"), name="toy-elsewhere")
    prompts = build_task_prompts(toy_lm.tokenizer, model_tasks(toy_lm, ["antonyms"])["antonyms"],
                                 PromptConfig(n_prompts=4, n_shots=4, n_eval=6, n_train=6))
    with pytest.raises(ValueError, match="preset 'toy-elsewhere'.*loaded as preset 'toy'"):
        dict(sae_view_layers(toy_lm, prompts, [2], saes=SAEShelf(other, "cpu")))
