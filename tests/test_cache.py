import pandas as pd
import pytest

from tvlib.cache import cached_table, config_key, write_atomic


def test_rerun_reuses_finished_results(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return pd.DataFrame({"task": ["a", "b"], "nll": [1.5, 2.25], "layer": [None, 3]})

    first = cached_table("sweep", {"task": "a", "layers": [1, 2]}, compute, tmp_path)
    second = cached_table("sweep", {"layers": [1, 2], "task": "a"}, compute, tmp_path)
    assert len(calls) == 1                       # key order does not matter
    pd.testing.assert_frame_equal(first, second, check_dtype=False)
    cached_table("sweep", {"task": "a", "layers": [1, 3]}, compute, tmp_path)
    assert len(calls) == 2                       # a new configuration is computed
    cached_table("sweep", {"task": "a", "layers": [1, 3]}, compute, tmp_path, refresh=True)
    assert len(calls) == 3
    assert config_key({"a": 1}) != config_key({"a": 2})


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
        cached_table("sweep", {"x": 1}, compute, tmp_path)
    assert not any(tmp_path.rglob("*.csv"))
