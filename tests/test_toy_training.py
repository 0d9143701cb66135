"""Retraining the embedded model is deterministic given the seed (on a tiny budget)."""

import torch

from tvlib.toy.data import ToyConfig, generate_documents, split_pairs, toy_tasks
from tvlib.toy.training import train_model

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


def test_list_tasks_draw_fresh_lists_never_held_out():
    import random

    from tvlib.toy.data import fresh_list_pairs, is_heldout
    pairs = fresh_list_pairs(random.Random(0), "list_last", 500, TINY)
    assert len({x for x, _ in pairs}) == 500
    assert not any(is_heldout(x, TINY) for x, _ in pairs)
    assert all(x.split()[-1] == y for x, y in pairs)
    held = split_pairs(toy_tasks(TINY)["list_last"], TINY)[1]
    lines = {line for doc in generate_documents(TINY, 3000, seed=0) for line in doc.splitlines()}
    assert held and not any({f"{x} -> {y}", f"{x}->{y}"} & lines for x, y in held)


def test_model_training_is_deterministic(tmp_path):
    stats_a = train_model(TINY, tmp_path / "a", log=lambda _: None)
    stats_b = train_model(TINY, tmp_path / "b", log=lambda _: None)
    assert stats_a["final_loss"] == stats_b["final_loss"]
    from safetensors.torch import load_file
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
