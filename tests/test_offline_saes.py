"""SAEs built here for an offline model: sampled text, recorded residuals, training,
the card's measurements, and the build that writes them beside a preset."""

import dataclasses
import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from tvlib.cache import CacheWarning
from tvlib.generated_text import (SHIPPED_RECORD, GenerationConfig, chunk_folder, generate,
                                  ship, shipped_key)
from tvlib.models import load_model
from tvlib.saes import load_sae
from tvlib.offline_saes import BuildConfig, build, choose, training_rows
from tvlib.paths import TOY_DIR
from tvlib.sae_training import (SAETrainingConfig, feature_density, loss_change, sae_quality,
                                save_sae, train_sae)
from tvlib.standins import make_standin

TOY_MODEL = TOY_DIR / "model"
SMALL = GenerationConfig(n_texts=6, n_tokens=24, batch_size=3)


def test_sampled_texts_are_the_models_and_masked_after_the_end(tmp_path):
    from transformers import AutoTokenizer

    chunks = generate(TOY_MODEL, SMALL, tmp_path)
    assert len(chunks) == 2
    tokenizer = AutoTokenizer.from_pretrained(TOY_MODEL)
    for chunk in chunks:
        ids = chunk["ids"]
        assert ids.shape == chunk["mask"].shape == (3, 25)
        assert (ids[:, 0] == tokenizer.bos_token_id).all()
        special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
        after_eos = torch.cumsum(ids == tokenizer.eos_token_id, 1) > 0
        assert torch.equal(chunk["mask"], ~special & ~after_eos)
    assert not torch.equal(chunks[0]["ids"], chunks[1]["ids"])   # each chunk its own seed


def test_sampling_draws_from_the_softmax():
    from tvlib.generated_text import _sample
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3]])).expand(20000, 3)
    drawn = _sample(logits, 1.0, torch.Generator().manual_seed(0)).flatten()
    shares = torch.bincount(drawn, minlength=3).float() / len(drawn)
    torch.testing.assert_close(shares, torch.tensor([0.1, 0.6, 0.3]), atol=0.015, rtol=0)


def test_sampled_chunks_are_reused_and_damaged_ones_sampled_again(tmp_path):
    first = generate(TOY_MODEL, SMALL, tmp_path)
    messages = []
    again = generate(TOY_MODEL, SMALL, tmp_path, log=messages.append)
    assert messages == [] and all(torch.equal(a["ids"], b["ids"]) for a, b in zip(first, again))
    damaged = chunk_folder(TOY_MODEL, SMALL, tmp_path) / "chunk_0001.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])
    with pytest.warns(CacheWarning, match="chunk_0001.safetensors is damaged"):
        resampled = generate(TOY_MODEL, SMALL, tmp_path, log=messages.append)
    assert messages == ["sampled chunk 2/2 -> chunk_0001.safetensors"]
    assert torch.equal(resampled[1]["ids"], first[1]["ids"])     # same seed, same text
    longer = generate(TOY_MODEL, GenerationConfig(**{**SMALL.__dict__, "n_texts": 9}), tmp_path,
                      log=messages.append)
    assert messages[-1] == "sampled chunk 3/3 -> chunk_0002.safetensors" and len(longer) == 3
    other = GenerationConfig(**{**SMALL.__dict__, "seed": 1})
    assert chunk_folder(TOY_MODEL, other, tmp_path) != chunk_folder(TOY_MODEL, SMALL, tmp_path)


def test_shipped_texts_are_read_instead_of_sampled_and_added_to(tmp_path):
    shipped = tmp_path / "data" / "generated"
    first = ship(TOY_MODEL, SMALL, tmp_path / "cache", shipped)
    record = json.loads((shipped / SHIPPED_RECORD).read_text())
    assert sorted(record["chunks"]) == ["chunk_0000.safetensors", "chunk_0001.safetensors"]
    assert record["texts"] == 6 and record["tokens"] == sum(int(c["mask"].sum()) for c in first)
    assert record["key"] == shipped_key(TOY_MODEL, SMALL)

    # another machine: an empty cache, the shipped texts read, nothing sampled
    messages = []
    read = generate(TOY_MODEL, SMALL, tmp_path / "other-cache", shipped=shipped,
                    log=messages.append)
    assert messages == []
    for a, b in zip(first, read):
        assert torch.equal(a["ids"], b["ids"]) and torch.equal(a["mask"], b["mask"])
        assert b["ids"].dtype == torch.long

    # a longer run samples only the new chunk and ships it beside the others
    kept = (shipped / "chunk_0000.safetensors").stat().st_mtime_ns
    longer = GenerationConfig(**{**SMALL.__dict__, "n_texts": 9})
    ship(TOY_MODEL, longer, tmp_path / "other-cache", shipped, log=messages.append)
    assert messages == ["sampled chunk 3/3 -> chunk_0002.safetensors",
                        f"shipped chunk_0002.safetensors to {shipped}"]

    # an interrupt keeps the chunks shipped before it
    def interrupt(message):
        if message.startswith("sampled chunk 5"):
            raise KeyboardInterrupt
    longest = GenerationConfig(**{**SMALL.__dict__, "n_texts": 15})
    with pytest.raises(KeyboardInterrupt):
        ship(TOY_MODEL, longest, tmp_path / "other-cache", shipped, log=interrupt)
    assert json.loads((shipped / SHIPPED_RECORD).read_text())["texts"] == 12
    assert (shipped / "chunk_0000.safetensors").stat().st_mtime_ns == kept


def test_shipped_texts_that_do_not_match_are_refused_and_sampled(tmp_path):
    shipped = tmp_path / "generated"
    first = ship(TOY_MODEL, SMALL, tmp_path / "cache", shipped)
    # a changed file: refused by its SHA-256, sampled again (same seed, same text)
    changed = shipped / "chunk_0001.safetensors"
    data = bytearray(changed.read_bytes())
    data[-1] ^= 1
    changed.write_bytes(bytes(data))
    messages = []
    with pytest.warns(CacheWarning, match="chunk_0001.safetensors is missing or is not the file"):
        again = generate(TOY_MODEL, SMALL, tmp_path / "empty", shipped=shipped,
                         log=messages.append)
    assert messages == ["sampled chunk 2/2 -> chunk_0001.safetensors"]
    assert torch.equal(again[1]["ids"], first[1]["ids"])
    # other settings: none of the shipped texts is used
    hotter = GenerationConfig(**{**SMALL.__dict__, "temperature": 2.0})
    with pytest.warns(CacheWarning, match="sampled with other temperature"):
        generate(TOY_MODEL, hotter, tmp_path / "hot", shipped=shipped, log=messages.append)
    assert messages[-2:] == ["sampled chunk 1/2 -> chunk_0000.safetensors",
                             "sampled chunk 2/2 -> chunk_0001.safetensors"]
    with pytest.raises(ValueError, match="sampled with other temperature .* would overwrite"):
        ship(TOY_MODEL, hotter, tmp_path / "hot", shipped)
    (shipped / SHIPPED_RECORD).write_text("{not json")
    with pytest.warns(CacheWarning, match="generated.json is unreadable"):
        generate(TOY_MODEL, SMALL, tmp_path / "cache", shipped=shipped)
    with pytest.raises(ValueError, match="generated.json is unreadable .* would overwrite"):
        ship(TOY_MODEL, SMALL, tmp_path / "cache", shipped)


def test_shipped_texts_name_the_models_files_not_its_conversion_record(tmp_path):
    import shutil
    model = tmp_path / "model"
    shutil.copytree(TOY_MODEL, model)
    key = shipped_key(model, SMALL)
    (model / "conversion.json").write_text('{"versions": {"transformers": "another"}}')
    assert shipped_key(model, SMALL) == key
    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes() + b" ")
    assert shipped_key(model, SMALL)["model"] != key["model"]


def test_generation_settings_are_checked():
    with pytest.raises(ValueError, match="n_texts=10 is not a multiple of batch_size=4"):
        GenerationConfig(n_texts=10, batch_size=4)
    with pytest.raises(ValueError, match="temperature=0: must be a finite number > 0"):
        GenerationConfig(temperature=0)


def exact_sae(d: int, hook_name: str):
    """A JumpReLU SAE that reconstructs exactly: features relu(x) and relu(-x)."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d, d_sae=2 * d,
                                        metadata=SAEMetadata(hook_name=hook_name)))
    eye = torch.eye(d)
    sae.load_state_dict({"W_enc": torch.cat([eye, -eye], 1), "W_dec": torch.cat([eye, -eye], 0),
                         "b_enc": torch.zeros(2 * d), "b_dec": torch.zeros(d),
                         "threshold": torch.zeros(2 * d)})
    return sae


def test_card_measurements_on_an_sae_that_reconstructs_exactly(toy_lm):
    sae = exact_sae(128, "model.layers.2.input")
    x = torch.randn(50, 128)
    x[:, :3] = 0                                  # three coordinates never fire
    quality = sae_quality(sae, x, batch=16)
    assert quality["fvu"] < 1e-10 and quality["n_tokens"] == 50
    assert quality["l0"] == pytest.approx((x != 0).sum(1).float().mean().item())
    assert quality["dead_fraction"] == pytest.approx(6 / 256)
    density = feature_density(sae, x, batch=16)
    torch.testing.assert_close(density, (sae.encode(x) > 0).float().mean(0))
    assert (density == 0).sum() == 6
    with pytest.raises(ValueError, match="no residuals"):
        feature_density(sae, x[:0])
    rows = toy_lm.tokenizer(["<bos> hot -> cold \n big -> small \n up -> down"] * 3,
                            add_special_tokens=False, return_tensors="pt")["input_ids"]
    mask = torch.ones_like(rows, dtype=torch.bool)
    mask[:, 0] = False
    mask[1, 6:] = False
    means = {2: torch.zeros(128)}
    losses = loss_change(toy_lm, {2: sae}, rows, mask, means)[2]
    assert losses["delta_loss"] == pytest.approx(0, abs=1e-5)
    assert losses["recovered"] == pytest.approx(1, abs=1e-4)
    assert losses["loss_mean_ablated"] > losses["loss_clean"] + 0.5   # zeroing layer 2 hurts
    with pytest.raises(ValueError, match="SAE .*resid_pre 2.*layer 3|resid_pre 3"):
        loss_change(toy_lm, {3: sae}, rows, mask, {3: torch.zeros(128)})
    with pytest.raises(ValueError, match="no mean residual for resid_pre 2"):
        loss_change(toy_lm, {2: sae}, rows, mask, {})
    with pytest.raises(ValueError, match="mask has shape"):
        loss_change(toy_lm, {2: sae}, rows, mask[:, 1:], means)


def test_the_loss_change_equals_a_direct_computation(toy_lm):
    """Mean ablation of resid_pre 2 at the recorded tokens, by hooks on the model itself."""
    sae = exact_sae(128, "model.layers.2.input")
    rows = toy_lm.tokenizer(["<bos> hot -> cold \n big -> small \n up -> down"] * 2,
                            add_special_tokens=False, return_tensors="pt")["input_ids"]
    mask = torch.ones_like(rows, dtype=torch.bool)
    mask[:, 0] = False
    mask[0, 5:] = False
    mean = torch.randn(128)
    got = loss_change(toy_lm, {2: sae}, rows, mask, {2: mean})[2]
    block = toy_lm._module.model.layers[2]

    def ablate(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        h = torch.where(mask[..., None], mean.expand(h.shape), h)
        return ((h,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})
    handle = block.register_forward_pre_hook(ablate, with_kwargs=True)
    try:
        with torch.no_grad():
            logits = toy_lm._module(rows).logits[:, :-1]
    finally:
        handle.remove()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), rows[:, 1:], reduction="none")
    scored = mask[:, :-1] & mask[:, 1:]
    assert got["loss_mean_ablated"] == pytest.approx(nll[scored].mean().item(), rel=1e-5)
    assert got["delta_loss_se"] == pytest.approx(0, abs=1e-5)       # the SAE is exact


def test_the_standard_error_of_a_per_token_mean_over_rows():
    from tvlib.sae_training import ratio_se
    row_means = torch.tensor([0.2, 0.9, 0.4, 1.3, 0.7])
    equal = ratio_se(row_means * 10, torch.full((5,), 10.0))
    assert equal == pytest.approx((row_means.double().std() / 5 ** 0.5).item())
    # a row without scored tokens is not a sample; one row has no spread to measure
    assert ratio_se(torch.cat([row_means * 10, torch.zeros(1)]),
                    torch.cat([torch.full((5,), 10.0), torch.zeros(1)])) == pytest.approx(equal)
    assert math.isnan(ratio_se(torch.tensor([3.0]), torch.tensor([4.0])))
    # unequal rows: a bootstrap over rows agrees with the delta method
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(20, 120, (200,), generator=g).double()
    sums = counts * torch.rand(200, generator=g, dtype=torch.float64) * 2
    draws = torch.randint(0, 200, (4000, 200), generator=g)
    boot = sums[draws].sum(1) / counts[draws].sum(1)
    assert ratio_se(sums, counts) == pytest.approx(boot.std().item(), rel=0.1)


def test_trained_sae_learns_and_round_trips_through_its_folder(tmp_path, toy_lm):
    from tvlib.residual_store import text_rows
    from tvlib.sae_training import text_residuals
    texts = json.loads((TOY_DIR / "corpus.json").read_text(encoding="utf-8"))[:200]
    rows, _ = text_rows(toy_lm.tokenizer, texts, length=64)
    resid = text_residuals(toy_lm, rows, [3])[3]
    cfg = SAETrainingConfig(width=256, k=16, lr=3e-3, batch_tokens=128, epochs=30, seed=3)
    sae = train_sae(resid, "blocks.2.hook_resid_post", cfg, log=lambda _: None)
    quality = sae_quality(sae, resid)
    assert quality["fvu"] < 0.2 and 4 < quality["l0"] < 64
    assert sae.cfg.architecture() == "jumprelu"
    loaded = save_sae(sae, tmp_path / "sae", cfg.save_dtype)
    from safetensors.torch import load_file
    on_disk = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    assert on_disk["W_enc"].dtype == torch.float16 and on_disk["b_enc"].dtype == torch.float32
    from sae_lens import SAE
    assert torch.equal(SAE.load_from_disk(str(tmp_path / "sae")).W_enc, loaded.W_enc)
    assert loaded.W_enc.dtype == torch.float32
    assert sae_quality(loaded, resid)["fvu"] == pytest.approx(quality["fvu"], rel=1e-2)
    short = dataclasses.replace(cfg, epochs=2)                      # seeded: one run twice
    first, again = (train_sae(resid, "blocks.2.hook_resid_post", short, log=lambda _: None)
                    for _ in range(2))
    assert torch.equal(again.W_dec, first.W_dec)


def test_gated_training_and_unknown_architectures(toy_lm):
    from tvlib.sae_training import text_residuals
    ids = torch.tensor([[toy_lm.tokenizer.bos_token_id] + list(range(10, 40))] * 8)
    resid = text_residuals(toy_lm, ids, [3])[3]
    assert resid.shape == (8 * 30, 128)                            # BOS left out
    hidden = toy_lm._module(ids, output_hidden_states=True).hidden_states[3][:, 1:]
    torch.testing.assert_close(resid, hidden.reshape(-1, 128))    # row-major order
    cfg = SAETrainingConfig(architecture="gated", width=256, l1_coefficient=1.0, lr=3e-3,
                            batch_tokens=60, epochs=3, seed=1, save_dtype="float32")
    sae = train_sae(resid, "model.layers.3.input", cfg, log=lambda _: None)
    assert sae.cfg.architecture() == "gated"
    assert sae_quality(sae, resid)["fvu"] < 1.0
    with pytest.raises(ValueError, match="architecture='topk' is not trained here"):
        train_sae(resid, "model.layers.3.input",
                  SAETrainingConfig(architecture="topk"), log=lambda _: None)
    with pytest.raises(ValueError, match="offline SAEs and their card are BatchTopK"):
        build("gemma-3-270m-offline", BuildConfig(training=cfg))


def test_build_writes_saes_corpus_and_card_beside_the_preset(tmp_path):
    folder = tmp_path / "standin"
    preset = make_standin("gemma-3-270m-offline", folder)
    texts = json.loads((TOY_DIR / "corpus.json").read_text(encoding="utf-8"))
    prose = {"facts": texts[:300], "patterns": texts[300:600]}
    swept = (SAETrainingConfig(width=96, k=8, batch_tokens=64, epochs=1),
             SAETrainingConfig(width=128, k=8, batch_tokens=64, epochs=2))
    cfg = BuildConfig(GenerationConfig(n_texts=16, batch_size=8),
                      SAETrainingConfig(width=128, k=8, batch_tokens=64, epochs=2),
                      max_share=0.7, heldout_fraction=0.2, train_tokens=3000, context=32,
                      heldout_rows=12, loss_rows=4, corpus_texts=3, model_share=0.3,
                      sweep=swept, sweep_tokens=1000)
    replaced_width = load_sae(preset, 1, device="cpu").cfg.d_sae
    card = build(str(folder), cfg, cache_dir=tmp_path / "cache", prose=prose, log=lambda _: None)
    # the sweep: every setting at the last layer on the first 1,000 tokens, the best chosen
    assert [row["training"] for row in card["sweep"]] == [asdict(t) for t in swept]
    assert {row["layer"] for row in card["sweep"]} == {preset.resid_pre_layers_with_sae()[-1]}
    assert {row["train_tokens"] for row in card["sweep"]} == {1000}
    chosen = choose(card["sweep"])
    assert chosen in swept and card["build"]["chosen_training"] == asdict(chosen)
    drawn = card["corpus"]["drawn"]["model-written"]
    assert 0.25 * 3000 < drawn["drawn_tokens"] <= 0.3 * 3000
    assert (folder / "preset.json").exists() and (folder / "model").is_dir()   # kept
    assert [row["layer"] for row in card["saes"]] == list(preset.resid_pre_layers_with_sae())
    assert set(card["corpus"]["sources"]) == {"facts", "patterns", "model-written"}
    assert 2000 < card["corpus"]["train_tokens"] <= 3000
    heldout = card["corpus"]["heldout_rows"]     # the random stand-in ends texts early
    assert heldout["prose"] == 12 and 1 <= heldout["model-written"] <= 12
    corpus = json.loads((folder / "corpus.json").read_text())
    assert len(corpus) == 6 and all(isinstance(text, str) and text for text in corpus)
    lm = load_model(str(folder), device="cpu")
    for row in card["saes"]:
        sae = load_sae(str(folder), row["layer"], device="cpu")     # site checked on load
        assert sae.cfg.metadata.hook_name == f"blocks.{row['layer'] - 1}.hook_resid_post"
        assert sae.cfg.d_sae == chosen.width                        # the stand-in's replaced
        for name in ("model-written", "prose"):
            m = row[name]
            assert 0 <= m["dead_fraction"] <= 1 and m["fvu"] >= 0
            # dead: counted on the first training residuals (all of them here: < 1M)
            assert 0 <= m["dead_in_training"] <= 1
            assert m["dead_tokens"] == card["corpus"]["train_tokens"]
            assert m["recovered"] == pytest.approx(
                (m["loss_mean_ablated"] - m["loss_sae"])
                / (m["loss_mean_ablated"] - m["loss_clean"]))
        assert row["seed"] == chosen.seed + row["layer"]
        site = Path(preset.sae_dir) / preset.sae_id.format(layer=row["layer"] - 1)
        record = json.loads((site / "training.json").read_text())
        assert record["card"] == row and record["preset"] == preset.name
    # the stand-in's own SAEs were measured the same way, before they were replaced
    assert set(card["previous_saes"]) == {row["layer"] for row in card["saes"]}
    assert not list(folder.glob("*-previous"))
    text = (folder / "MODEL_CARD.md").read_text()
    assert f"| 1 | prose | {chosen.width} |" in text and "The SAEs these replaced" in text
    assert replaced_width != chosen.width
    assert all(m["d_sae"] == replaced_width for m in card["previous_saes"].values())
    assert text.split("The SAEs these replaced")[1].count(f"| prose | {replaced_width} |") \
        == len(card["saes"])
    assert "## Sweep" in text and "| dead | silent |" in text
    assert lm.preset.name == "gemma-3-270m-offline-standin"
    shipped = json.loads((folder / "generated" / SHIPPED_RECORD).read_text())
    assert shipped["texts"] == 16 and len(shipped["chunks"]) == 2    # the texts it used
    messages = []    # a re-run elsewhere reads the shipped text; here, also the residuals
    # (with the prose's records, as a prose bundle gives them: they go into the card)
    records = [{"name": name, "kind": "pypi", "packages": {name: "1.0"}, "licence": "MIT",
                "document": "one text", "documents": len(docs), "words": 7}
               for name, docs in prose.items()]
    with pytest.raises(ValueError, match="pass the records of these sources"):
        build(str(folder), cfg, cache_dir=tmp_path / "cache", prose=prose,
              log=messages.append, prose_records=records[:1])
    again = build(str(folder), cfg, cache_dir=tmp_path / "cache", prose=prose,
                  log=messages.append, prose_records=records)
    assert again["corpus"]["records"] == records
    assert "- facts (pypi: facts 1.0): MIT;" in (folder / "MODEL_CARD.md").read_text()
    assert not any("sampled chunk" in m for m in messages)
    assert not any("training on" in m for m in messages)     # trained SAEs kept as finished
    # the first build trained them, the second read them: its card says so, with the time
    # the first took
    assert not any(row["read_from_cache"] for row in card["saes"])
    assert all(row["read_from_cache"] for row in again["saes"])
    assert ([row["training_seconds"] for row in again["saes"]]
            == [row["training_seconds"] for row in card["saes"]])
    assert all(row["training_seconds"] > 0 for row in card["saes"])
    assert "Read from the cache instead of trained" in (folder / "MODEL_CARD.md").read_text()
    assert again["sweep"] == card["sweep"]    # its measurements reused, their seconds too
    assert again["saes"][0]["prose"]["fvu"] == pytest.approx(card["saes"][0]["prose"]["fvu"])


class _WordTokenizer:
    """Whitespace words as ids: enough for text_rows."""
    bos_token_id, pad_token_id, all_special_ids = 1, 0, [0, 1]

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[100 + len(w) for w in t.split()] for t in texts]}


def test_training_rows_give_model_written_text_its_share_repeating_it_evenly():
    model = [" ".join(["m"] * 20)] * 1 + [" ".join(["mm"] * 20)]   # 2 rows of 20 tokens
    prose = [" ".join(["ppp"] * 20) for _ in range(50)]             # 50 rows of 20
    mix = {"train": [("model-written", t) for t in model] + [("prose", t) for t in prose]}
    cfg = BuildConfig(train_tokens=400, model_share=0.5, context=32)
    (rows, mask), drawn = training_rows(_WordTokenizer(), mix, cfg, torch.Generator().manual_seed(0))
    assert drawn["model-written"] == {"available_tokens": 40, "drawn_tokens": 200, "passes": 5.0}
    assert drawn["prose"]["drawn_tokens"] == 200 and int(mask.sum()) == 400
    first = rows[:, 1]
    assert int((first == 101).sum()) == 5 and int((first == 102).sum()) == 5   # 5 passes each
    assert int((first == 103).sum()) == 10                    # prose: distinct rows, no repeat
    assert not (rows[:, 0] != 1).any()                         # BOS first
    # a share of 0 draws only prose; a share above the budget's reach keeps the budget
    _, drawn = training_rows(_WordTokenizer(), mix, BuildConfig(train_tokens=400, model_share=0.0,
                             context=32), torch.Generator().manual_seed(0))
    assert drawn["model-written"]["drawn_tokens"] == 0 and drawn["prose"]["drawn_tokens"] == 400
    again = training_rows(_WordTokenizer(), mix, cfg, torch.Generator().manual_seed(0))[0]
    assert torch.equal(again[0], rows)                         # seeded


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("sae_device", ["cpu", "cuda"])
def test_the_loss_change_on_a_cuda_model_with_the_sae_on(sae_device, toy_lm):
    """``offline_saes --device cuda`` measures a CUDA model with SAEs read from disk onto
    the CPU: the splice runs each SAE where it sits, and the numbers are the CPU's."""
    from tvlib.models import load_model
    from tvlib.saes import load_sae
    rows = toy_lm.tokenizer(["<bos> hot -> cold \n big -> small \n up -> down"] * 2,
                            add_special_tokens=False, return_tensors="pt")["input_ids"]
    mask = torch.ones_like(rows, dtype=torch.bool)
    mask[:, 0] = False
    mean = {2: torch.randn(128, generator=torch.Generator().manual_seed(0))}
    cpu = loss_change(toy_lm, {2: load_sae("toy", 2, "cpu")}, rows, mask, mean)[2]
    gpu = loss_change(load_model("toy", device="cuda"), {2: load_sae("toy", 2, sae_device)},
                      rows, mask, mean)[2]
    for key, value in cpu.items():
        assert gpu[key] == pytest.approx(value, rel=1e-4, abs=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_an_sae_trains_on_a_cuda_gpu_and_comes_back_on_the_cpu(toy_lm):
    from tvlib.sae_training import text_residuals
    ids = torch.tensor([[toy_lm.tokenizer.bos_token_id] + list(range(10, 70))] * 16)
    resid = text_residuals(toy_lm, ids, [3])[3].to(torch.bfloat16)     # as a store holds
    cfg = SAETrainingConfig(width=256, k=16, lr=3e-3, batch_tokens=120, epochs=10, seed=3)
    sae = train_sae(resid, "blocks.2.hook_resid_post", cfg, log=lambda _: None, device="cuda")
    assert sae.W_dec.device.type == "cpu"
    on_cpu = train_sae(resid, "blocks.2.hook_resid_post", cfg, log=lambda _: None)
    fvu = {name: sae_quality(s, resid.float())["fvu"] for name, s in
           (("cuda", sae), ("cpu", on_cpu))}
    assert fvu["cuda"] < 0.5 and fvu["cuda"] == pytest.approx(fvu["cpu"], abs=0.05)


def test_a_card_written_with_one_curve_reads_as_a_list_of_curves():
    from tvlib.offline_saes import card_curves
    old = {"build": {"generation": {"n_texts": 1536}}, "curve": {"layer": 12, "rows": []}}
    assert card_curves(old) == [{"model_texts": 1536, "layer": 12, "rows": []}]
    assert card_curves({"build": {}, "curve": None}) == []
    assert card_curves({"curves": [{"layer": 1}]}) == [{"layer": 1}]


def test_a_one_point_curve_states_its_shortfall_without_a_line():
    from tvlib.offline_saes import _curve_lines
    measure = lambda delta: {"fvu": 0.1, "l0": 40.0, "dead_fraction": 0.05,  # noqa: E731
                             "delta_loss": delta, "recovered": 0.9}
    curve = {"layer": 12, "model_texts": 512, "draw_tokens": 1000, "model_share": 0.3,
             "residuals_per_second": 1000.0,
             "training": asdict(SAETrainingConfig(width=64, k=8)),
             "rows": [{"train_tokens": 1000, "model-written": measure(0.8),
                       "prose": measure(0.3)}]}
    card = {"corpus": {"sha256": "a" * 64}, "build": {"generation": {"n_texts": 512}}}
    lines = _curve_lines(curve, card)
    assert "- model-written: Δ loss +0.800, 0.300 nats over the target (one point: no line to " \
           "extrapolate)" in lines
    assert "- prose: Δ loss +0.300, within the 0.5 target" in lines
    assert lines[2].startswith("The setting width 64 k 8 lr 0.001 batch 4096 epochs 6 trained")
    card["build"]["training"] = curve["training"]                   # the card's own setting
    assert _curve_lines(curve, card)[2].startswith("The setting above (width 64 k 8 ")
    # another corpus with the same texts: the same recipe is said only where recorded
    other = {**curve, "corpus": {"sha256": "b" * 64,
                                 "heldout_tokens": {"model-written": 10, "prose": 20}}}
    assert "another recipe, or other texts drawn by it" in _curve_lines(other, card)[2]
    recipe = {"prose_sources": None, "max_share": 0.4, "model_share": 0.3,
              "heldout_fraction": 0.05, "context": 128, "seed": 0}
    card["build"].update(recipe)
    assert "the same recipe drew other texts here" in \
        _curve_lines({**other, "recipe": recipe}, card)[2]


def test_tokens_to_target_extrapolates_a_line_in_log_tokens():
    from tvlib.offline_saes import tokens_to_target
    rows = [{"train_tokens": 2 ** k, "prose": {"delta_loss": 2.0 - 0.25 * k}} for k in (1, 2, 3)]
    assert tokens_to_target(rows, "prose") == pytest.approx(2 ** 6)     # 2 - 0.25 k = 0.5
    flat = [{"train_tokens": 2 ** k, "prose": {"delta_loss": 1.0}} for k in (1, 2, 3)]
    assert tokens_to_target(flat, "prose") is None


def built_standin(tmp_path):
    """A Gemma 3 stand-in's SAEs built on a tiny budget: (folder, preset, texts, prose,
    cfg, the build's keyword arguments, card)."""
    folder = tmp_path / "standin"
    preset = make_standin("gemma-3-270m-offline", folder)
    texts = json.loads((TOY_DIR / "corpus.json").read_text(encoding="utf-8"))
    prose = {"facts": texts[:300], "patterns": texts[300:600]}
    cfg = BuildConfig(GenerationConfig(n_texts=16, batch_size=8),
                      SAETrainingConfig(width=64, k=8, batch_tokens=64, epochs=1),
                      max_share=0.7, heldout_fraction=0.2, train_tokens=1500, context=32,
                      heldout_rows=12, loss_rows=4, corpus_texts=3, sweep=())
    quiet = dict(cache_dir=tmp_path / "cache", prose=prose, log=lambda _: None)
    card = build(str(folder), cfg, **quiet)
    return folder, preset, texts, prose, cfg, quiet, card


def test_a_curve_is_added_to_a_built_card_on_its_own_heldout_sets(tmp_path):
    """add_curve trains the card's setting on nested prefixes of the training tokens and
    measures them on the card's held-out sets (the same clean loss), writes the table,
    the figure and the shortfall into the card, and says so where its corpus is another."""
    from tvlib.offline_saes import CURVE_FIGURE, add_curve
    folder, preset, texts, prose, cfg, quiet, card = built_standin(tmp_path)
    curve_cfg = dataclasses.replace(cfg, train_tokens=3000, curve_tokens=(2000, 500, 1000))
    with_curve = add_curve(str(folder), curve_cfg, **quiet)
    [curve] = with_curve["curves"]
    layer = preset.resid_pre_layers_with_sae()[-1]
    assert curve["layer"] == layer and curve["training"] == asdict(cfg.training)
    assert curve["model_texts"] == 16
    assert [r["train_tokens"] for r in curve["rows"]] == [500, 1000, 2000]
    assert 2000 < curve["draw_tokens"] <= 3000
    for row in curve["rows"]:
        for name in ("model-written", "prose"):
            assert row[name]["loss_clean"] == pytest.approx(card["saes"][0][name]["loss_clean"])
    assert with_curve["saes"] == card["saes"]                  # the SAEs are left as they are
    assert json.loads((folder / "card.json").read_text())["curves"] == [curve]
    text = (folder / "MODEL_CARD.md").read_text()
    assert "## Training-token curve" in text and "| 2000 | prose |" in text
    assert "### 16 model-written texts" in text and "Shortfall at 2000 tokens" in text
    assert (folder / CURVE_FIGURE).stat().st_size > 1000
    with pytest.raises(ValueError, match=r"curve_tokens \[10000\]: .*at most train_tokens"):
        add_curve(str(folder), dataclasses.replace(curve_cfg, curve_tokens=(10_000,)), **quiet)
    assert curve["draw_tokens"] < 3000          # whole rows: the draw falls short of its budget
    with pytest.raises(ValueError, match="at most the .* training tokens recorded"):
        add_curve(str(folder), dataclasses.replace(curve_cfg, curve_tokens=(3000,)), **quiet)
    assert "measured on the same held-out sets" in text
    # the same texts and setting on another corpus: that curve replaces the first
    other = add_curve(str(folder), curve_cfg, cache_dir=tmp_path / "cache",
                      prose={**prose, "facts": texts[:299]}, log=lambda _: None)
    [replaced] = other["curves"]
    assert replaced["corpus"]["sha256"] != card["corpus"]["sha256"]
    text = (folder / "MODEL_CARD.md").read_text()
    assert "not the card's (the same recipe drew other texts here" in text
    assert replaced["corpus"]["sha256"] in text
    # more model-written texts: a second curve beside the first, one point
    more = add_curve(str(folder), dataclasses.replace(curve_cfg, curve_tokens=(2000,)),
                     model_texts=24, **quiet)
    assert [c["model_texts"] for c in more["curves"]] == [16, 24]
    text = (folder / "MODEL_CARD.md").read_text()
    assert "### 24 model-written texts" in text and "it holds 24 model-written texts" in text
    point = more["curves"][1]["rows"][0]
    over = [n for n in ("model-written", "prose") if point[n]["delta_loss"] > 0.5]
    assert text.count("(one point: no line to extrapolate)") == len(over)
    # a rebuild with another setting keeps the curves (each names its own setting and
    # corpus) and, from the card it replaces, the SAEs that card had replaced
    replaced_previous = more["previous_saes"]
    other_setting = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, k=4))
    rebuilt = build(str(folder), other_setting, **quiet)
    assert rebuilt["curves"] == more["curves"] and (folder / CURVE_FIGURE).exists()
    assert rebuilt["earlier_saes"][0]["measured"] == json.loads(json.dumps(replaced_previous))
    assert rebuilt["earlier_saes"][0]["corpus"]["sha256"] == more["corpus"]["sha256"]
    text = (folder / "MODEL_CARD.md").read_text()
    assert "### 16 model-written texts, width 64 k 8 " in text
    assert "The setting width 64 k 8 lr 0.001 batch 64 epochs 1 (not the card's)" in text
    assert "The SAEs before those, as the build that replaced them measured them" in text
    again = build(str(folder), other_setting, **quiet)       # and so on, newest first
    assert again["earlier_saes"][1:] == rebuilt["earlier_saes"]


def test_targets_read_dead_features_on_the_training_sample_where_measured():
    from tvlib.offline_saes import meets_targets
    held_out = {"fvu": 0.1, "l0": 40.0, "dead_fraction": 0.2, "delta_loss": 0.3,
                "recovered": 0.95}
    assert not meets_targets(held_out)              # an older card: silent on held-out
    assert meets_targets({**held_out, "dead_in_training": 0.01, "dead_tokens": 10**6})
    assert not meets_targets({**held_out, "dead_in_training": 0.11, "dead_tokens": 10**6})
    from tvlib.offline_saes import _dead_sentence
    assert "none of the held-out set's tokens (rare features included; the targets" in \
        _dead_sentence([{"layer": 12, "model-written": held_out, "prose": held_out}])
    new = {**held_out, "dead_in_training": 0.01, "dead_tokens": 5000}
    assert "none of the first 5000 training residuals" in \
        _dead_sentence([{"layer": 12, "model-written": new, "prose": new}])


def test_prose_records_without_their_prose_are_refused(tmp_path):
    from tvlib.offline_saes import prepare
    from tvlib.presets import get_preset
    with pytest.raises(ValueError, match="prose_records without prose"):
        prepare(get_preset("gemma-3-270m-offline"), BuildConfig(), tmp_path,
                prose_records=[{"name": "kjv"}])


def test_prose_sources_that_the_given_prose_does_not_hold_are_refused(tmp_path):
    from tvlib.offline_saes import prepare
    from tvlib.presets import get_preset
    with pytest.raises(ValueError, match=r"prose_sources=\('kjv', 'wordnet'\)"):
        prepare(get_preset("gemma-3-270m-offline"),
                BuildConfig(prose_sources=("kjv", "wordnet")), tmp_path,
                prose={"kjv": ["In the beginning"]})


def test_texts_only_with_a_prose_bundle_is_refused(tmp_path, capsys):
    from tvlib.offline_saes import main
    with pytest.raises(SystemExit):
        main(["--texts-only", "--prose-bundle", str(tmp_path / "prose.json.xz")])
    assert "--prose-bundle with --texts-only" in capsys.readouterr().err


def test_the_replaced_saes_are_the_outputs_not_the_presets(tmp_path):
    """A build written elsewhere (--out) measures the SAEs it replaces there: measuring the
    preset's own would put another folder's SAEs beside the output's carried history."""
    import shutil

    from tvlib.offline_saes import _previous_saes
    preset = make_standin("gemma-3-270m-offline", tmp_path / "standin")
    out = tmp_path / "out"
    shutil.copytree(Path(preset.sae_dir), out / "saes")
    layers = preset.resid_pre_layers_with_sae()
    last = layers[-1]
    weights = out / "saes" / preset.sae_id.format(layer=last - 1) / "sae_weights.safetensors"
    from safetensors.torch import load_file, save_file
    state = load_file(weights)
    state["W_dec"] = state["W_dec"] * 2                     # the output's SAE differs
    save_file(state, weights)
    replaced = _previous_saes(preset, layers, out / "saes")
    own = load_sae(preset, last, device="cpu")
    assert set(replaced) == set(layers)
    assert torch.equal(replaced[last].W_dec, 2 * own.W_dec)
    assert _previous_saes(preset, layers, tmp_path / "empty") == {}
    # one that is there but fails the preset's checks: none, and the log says why
    (out / "saes" / preset.sae_id.format(layer=last - 1) / "cfg.json").write_text("{broken")
    messages = []
    assert _previous_saes(preset, layers, out / "saes", messages.append) == {}
    [message] = messages
    assert str(out / "saes") in message and "cfg.json is broken" in message


def test_the_loss_is_checked_again_on_more_heldout_rows_of_the_card(tmp_path):
    """check_loss measures the built SAEs on the card's held-out sets: on the build's own
    rows it gives the card's numbers, on all rows a standard error beside them; it refuses
    SAEs or a corpus that are not the card's."""
    from tvlib.offline_saes import check_loss
    folder, preset, texts, prose, cfg, quiet, card = built_standin(tmp_path)
    same = check_loss(str(folder), loss_rows=4, **quiet)["loss_check"]
    for row in card["saes"]:
        for name in ("model-written", "prose"):
            m = same["measured"][row["layer"]][name]
            assert m["delta_loss"] == pytest.approx(row[name]["delta_loss"], abs=1e-6)
            assert m["delta_loss_se"] > 0
    every = check_loss(str(folder), **quiet)
    assert every["loss_check"]["rows"] == card["corpus"]["heldout_rows"]
    assert every["saes"] == card["saes"]                       # the table is left as it was
    assert "loss_check" in json.loads((folder / "card.json").read_text())
    text = (folder / "MODEL_CARD.md").read_text()
    assert "### Δ loss on more held-out rows" in text and " ± " in text
    with pytest.raises(ValueError, match="corpus built here .* is not the card's"):
        check_loss(str(folder), cache_dir=tmp_path / "cache",
                   prose={**prose, "facts": texts[:299]}, log=lambda _: None)
    layer = preset.resid_pre_layers_with_sae()[0]
    record = folder / "saes" / preset.sae_id.format(layer=layer - 1) / "training.json"
    edited = json.loads(record.read_text())
    edited["card"]["seed"] += 1
    record.write_text(json.dumps(edited))
    with pytest.raises(ValueError, match="is not the one .*card.json describes"):
        check_loss(str(folder), **quiet)
    with pytest.raises(ValueError, match="loss_rows=1"):
        check_loss(str(folder), loss_rows=1, **quiet)
