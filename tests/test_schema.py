"""Score tables carry explicit columns (vector, view, k) and labels made from them."""

import math

import pytest

from tvlib.cleanup import CleanupConfig
from tvlib.experiments import (CLEANED, DETECTOR, ICL, ITO, ON_RECON, ONE_SHOT, PURSUIT_START,
                               RAW, RECON, TV, ZERO_SHOT, PromptConfig, method_label,
                               SAEViewConfig, run_detector_sweep, run_sae_view_sweep)

TINY = PromptConfig(n_prompts=3, n_shots=3, n_eval=6, n_train=4)


def labels_match(table):
    for row in table.itertuples():
        vector = row.vector if isinstance(row.vector, str) else None
        k = None if row.k is None or (isinstance(row.k, float) and math.isnan(row.k)) \
            else int(row.k)
        assert row.method == method_label(vector, row.view, k)


def test_labels():
    assert method_label(None, ZERO_SHOT) == "zero-shot" and method_label(None, ICL) == "ICL"
    assert method_label(TV, RAW) == "TV" and method_label(TV, RECON) == "Recon of TV"
    assert method_label(TV, ON_RECON) == "TV on recon" and method_label(TV, ITO, 40) == "ITO (L0=40)"
    assert method_label(DETECTOR, PURSUIT_START, 7) == "pursuit start (L0=7) of detector"
    assert method_label(DETECTOR, CLEANED) == "cleaned detector"
    with pytest.raises(ValueError, match="unknown view"):
        method_label(TV, "reconstructed")


def test_sweep_rows_have_columns_and_labels_from_them(toy_lm, tmp_path, monkeypatch):
    monkeypatch.setattr("tvlib.cache.CACHE_DIR", tmp_path / "cache")
    views = run_sae_view_sweep(toy_lm, ["antonyms"], [4], TINY, SAEViewConfig(target_l0=5))
    assert list(views.view) == [ZERO_SHOT, ICL, RAW, RECON, ON_RECON, ITO]
    assert views[views.view == ITO].k.tolist() == [5]
    labels_match(views)
    detectors = run_detector_sweep(toy_lm, ["antonyms"], [3], TINY,
                                   CleanupConfig(init="pursuit", lam=5e-4, max_steps=3,
                                                 progress=False))["scores"]
    assert list(detectors.view) == [ONE_SHOT, ICL, RAW, PURSUIT_START, CLEANED]
    assert set(detectors.vector.dropna()) == {DETECTOR}
    labels_match(detectors)
