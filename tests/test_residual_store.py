"""The residual store: rows cut from texts, recording by prefill, resuming, refusing."""

import json

import pytest
import torch

from tvlib.cache import CacheWarning
from tvlib.paths import TOY_DIR
from tvlib.residual_store import read_layer, record, recording_dtype, store_folder, text_rows

class Interrupted(Exception):
    """Stands for an interrupt or a kill in the middle of a recording."""


TEXTS = json.loads((TOY_DIR / "corpus.json").read_text(encoding="utf-8"))[:40]


def test_text_rows_start_with_bos_and_count_only_text(word_tokenizer):
    rows, mask = text_rows(word_tokenizer, TEXTS, length=16, min_tokens=4)
    tok = word_tokenizer
    assert (rows[:, 0] == tok.bos_token_id).all() and not mask[:, 0].any()
    special = torch.isin(rows, torch.tensor(tok.all_special_ids))
    assert not (mask & special).any()
    pad = rows == tok.pad_token_id
    assert torch.equal(mask | pad | (torch.arange(16) == 0), torch.ones_like(mask))
    assert (mask.sum(1) >= 4).all() and (mask.sum(1) <= 15).all()
    # every token of every text is in exactly one row (the short last pieces aside)
    first = tok(TEXTS[:1], add_special_tokens=False)["input_ids"][0]
    joined = torch.cat([rows[i, 1:][mask[i, 1:]] for i in range(-(-len(first) // 15))])
    assert joined.tolist()[:len(first) - len(first) % 15] == first[:len(first) - len(first) % 15]
    with pytest.raises(ValueError, match="length=1"):
        text_rows(tok, TEXTS, length=1)


def test_recorded_residuals_are_the_models_hidden_states(tmp_path, toy_lm, word_tokenizer):
    rows, mask = text_rows(word_tokenizer, TEXTS, length=24)
    folder = record(toy_lm, rows, mask, [3, 1], tmp_path, batch_size=5, chunk_rows=7,
                    progress=False)
    with torch.no_grad():
        hidden = toy_lm._module(rows, output_hidden_states=True).hidden_states
    for layer in (1, 3):
        stored = read_layer(folder, layer)
        assert stored.dtype == torch.bfloat16 and stored.shape == (mask.sum(), 128)
        expected = hidden[layer][mask].to(torch.bfloat16)          # row-major order
        torch.testing.assert_close(stored.float(), expected.float(), atol=2e-2, rtol=1e-2)
    with pytest.raises(ValueError, match="resid_pre 2 was not recorded"):
        read_layer(folder, 2)
    full = read_layer(folder, 3)
    for limit in (1, 40, full.shape[0], full.shape[0] + 5):     # across chunks, past the end
        assert torch.equal(read_layer(folder, 3, limit=limit), full[:limit])
    with pytest.raises(ValueError, match="limit=0"):
        read_layer(folder, 3, limit=0)


def test_a_chunk_of_the_wrong_shape_is_refused_by_full_and_partial_reads(
        tmp_path, toy_lm, word_tokenizer):
    from safetensors.torch import load_file, save_file
    rows, mask = text_rows(word_tokenizer, TEXTS, length=24)
    folder = record(toy_lm, rows, mask, [3], tmp_path, batch_size=5, chunk_rows=7,
                    progress=False)
    first = folder / "chunk_00000.safetensors"
    resid = load_file(first)["resid_3"]                       # (tokens, 128)
    save_file({"resid_3": resid[:, :64].contiguous()}, first)  # another model's width
    for limit in (None, 1):
        with pytest.raises(ValueError, match="delete the folder and record again"):
            read_layer(folder, 3, limit=limit)
    save_file({"resid_3": resid[:-1].contiguous()}, first)     # a token short
    with pytest.raises(ValueError, match="delete the folder and record again"):
        read_layer(folder, 3)


def test_an_interrupted_recording_resumes_and_damaged_chunks_are_recorded_again(
        tmp_path, toy_lm, word_tokenizer, monkeypatch):
    rows, mask = text_rows(word_tokenizer, TEXTS, length=24)
    from tvlib import residual_store
    calls, armed = [], [True]

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3 and armed:
            armed.clear()
            raise Interrupted
        return real_collect(*args, **kwargs)

    real_collect = residual_store.counted_residuals
    monkeypatch.setattr(residual_store, "counted_residuals", interrupted)
    with pytest.raises(Interrupted):
        record(toy_lm, rows, mask, [2], tmp_path, batch_size=4, chunk_rows=8, progress=False)
    folder = store_folder(toy_lm, rows, mask, [2], tmp_path, 8)
    assert [p.name for p in sorted(folder.glob("chunk_*"))] == ["chunk_00000.safetensors"]
    with pytest.raises(FileNotFoundError, match="not a finished store"):
        read_layer(folder, 2)
    calls.clear()
    record(toy_lm, rows, mask, [2], tmp_path, batch_size=4, chunk_rows=8, progress=False)
    n_chunks = -(-rows.shape[0] // 8)
    assert len(calls) == 2 * (n_chunks - 1)           # the finished chunk was not redone
    complete = read_layer(folder, 2)
    (folder / "chunk_00001.safetensors").write_bytes(b"garbage")
    calls.clear()
    with pytest.warns(CacheWarning, match="chunk_00001.safetensors is damaged"):
        record(toy_lm, rows, mask, [2], tmp_path, batch_size=4, chunk_rows=8, progress=False)
    assert len(calls) == 2 and torch.equal(read_layer(folder, 2), complete)


def test_the_store_is_named_by_everything_it_depends_on(tmp_path, toy_lm, word_tokenizer):
    rows, mask = text_rows(word_tokenizer, TEXTS, length=24)
    base = store_folder(toy_lm, rows, mask, [2], tmp_path, 8)
    other_mask = mask.clone()
    other_mask[0, 1] = False
    assert len({base, store_folder(toy_lm, rows, other_mask, [2], tmp_path, 8),
                store_folder(toy_lm, rows, mask, [2, 3], tmp_path, 8),
                store_folder(toy_lm, rows, mask, [2], tmp_path, 16)}) == 4


def test_bad_rows_are_refused(tmp_path, toy_lm, word_tokenizer):
    rows, mask = text_rows(word_tokenizer, TEXTS, length=24)
    with pytest.raises(ValueError, match="counts position 0"):
        record(toy_lm, rows, torch.ones_like(mask), [2], tmp_path, progress=False)
    with pytest.raises(ValueError, match="one shape"):
        record(toy_lm, rows, mask[:, 1:], [2], tmp_path, progress=False)


def test_recording_dtype_is_a_supported_one():
    assert recording_dtype("cpu") in ("float32", "bfloat16")
    assert recording_dtype("cuda") == "float32"


@pytest.mark.parametrize("small_bf16, full_bf16, expected, timed", [
    (1.0, None, "float32", 2),         # emulated bfloat16: the full-size timing is skipped
    (0.001, 0.2, "float32", 3),        # bfloat16 no faster than float32 / 1.5
    (0.001, 0.05, "bfloat16", 3),      # bfloat16 more than 1.5x faster
])
def test_recording_dtype_times_bfloat16_only_where_it_may_win(monkeypatch, small_bf16,
                                                              full_bf16, expected, timed):
    import tvlib.residual_store as store
    calls = []

    def seconds(a, b, repeats):         # float32: 0.1 s for five full products
        calls.append((a.dtype, a.shape[0]))
        if a.dtype == torch.float32:
            return 0.1
        return small_bf16 if a.shape[0] == 16 else full_bf16

    monkeypatch.setattr(store, "_matmul_seconds", seconds)
    store.recording_dtype.cache_clear()
    try:
        assert store.recording_dtype("cpu") == expected and len(calls) == timed
        assert store.recording_dtype("cpu") == expected and len(calls) == timed   # once
    finally:
        store.recording_dtype.cache_clear()
