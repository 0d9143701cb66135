"""Retraining the embedded model is deterministic given the seed (on a tiny budget)."""

import torch

from tvlib.toy import ToyConfig, generate_documents, split_pairs, toy_tasks, train_model

TINY = ToyConfig(train_tokens=16_384, n_layers=2, d_model=32, d_mlp=64, batch_size=8,
                 context=64, warmup_steps=4)


def test_training_data_is_seeded_and_holds_pairs_out():
    assert generate_documents(TINY, 50, seed=3) == generate_documents(TINY, 50, seed=3)
    assert generate_documents(TINY, 50, seed=3) != generate_documents(TINY, 50, seed=4)
    docs = "\n".join(generate_documents(TINY, 3000, seed=0))
    task = toy_tasks(TINY)["country_capital"]
    icl, heldout = split_pairs(task, TINY)
    assert heldout and not set(icl) & set(heldout)
    for x, y in heldout:   # held-out pairs appear as facts only, never as "x -> y"
        assert f"{x} -> {y}" not in docs and f"{x}->{y}" not in docs


def test_model_training_is_deterministic(tmp_path):
    stats_a = train_model(TINY, tmp_path / "a", log=lambda _: None)
    stats_b = train_model(TINY, tmp_path / "b", log=lambda _: None)
    assert stats_a["final_loss"] == stats_b["final_loss"]
    from safetensors.torch import load_file
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
