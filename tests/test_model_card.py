"""The shipped model card's numbers are reproduced by the code, and meet the targets."""

import json

import pytest

from tvlib.toy.card import CardConfig, measure_saes, measure_tasks, summarise
from tvlib.paths import TOY_DIR
from tvlib.toy.data import ToyConfig


@pytest.fixture(scope="module")
def card():
    return json.loads((TOY_DIR / "card.json").read_text())


@pytest.fixture(scope="module")
def toy_cfg(card):
    cfg = card["training"]["config"]
    return ToyConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})


def assert_close_tree(got, expected, tol=1e-4):
    """Equal structure; floats equal within ``tol`` (both sides JSON-normalised)."""
    if isinstance(expected, dict):
        assert got.keys() == expected.keys()
        for key in expected:
            assert_close_tree(got[key], expected[key], tol)
    elif isinstance(expected, list):
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert_close_tree(g, e, tol)
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, abs=tol)
    else:
        assert got == expected


def test_card_summary_is_reproduced(toy_lm, card, toy_cfg):
    summary = summarise(measure_tasks(toy_lm, CardConfig(**card["card_config"]), toy_cfg))
    assert_close_tree(json.loads(json.dumps(summary)), card["summary"])


def test_card_sae_numbers_are_reproduced(toy_lm, card, toy_cfg):
    saes = measure_saes(toy_lm, CardConfig(**card["card_config"]), toy_cfg)
    assert_close_tree(json.loads(json.dumps(saes)), card["saes"])


def test_card_markdown_matches_json(card):
    text = (TOY_DIR / "MODEL_CARD.md").read_text()
    assert f"{card['summary']['icl_heldout_accuracy']:.3f}" in text
    for sae in card["saes"]:
        assert f"{sae['fvu']:.4f}" in text
