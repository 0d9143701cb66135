"""The real-model path, offline: stand-ins in the real formats, the authors' SAE
conversion, site conventions, dtypes, remote traces and hub errors."""

import dataclasses
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tvlib import hub
from tvlib.authors_sae import convert_authors_weights, load_authors_sae
from tvlib.cleanup import CleanupConfig, cleanup
from tvlib.experiments import (PromptConfig, SAEViewConfig, SteeringConfig, build_task_prompts,
                               run_cleanup_sweep, run_sae_view_sweep, run_steering_matrix, top_cleaned_features)
from tvlib.features import corpus_texts, read_features, tokenize_corpus
from tvlib.models import blocks, d_model, load_model, model_dtype, n_layers
from tvlib.presets import get_preset, PRESETS
from tvlib.saes import load_sae
from tvlib.saes import check_sae_site, sae_site
from tvlib.standins import ARCHITECTURES, make_standin, sae_architecture
from tvlib.interventions import Steering
from tvlib.scoring import score
from tvlib.taskvec import task_vectors
from tvlib.tasks import load_task

TINY = PromptConfig(n_prompts=3, n_shots=3, n_eval=6, n_train=4)
QUICK = CleanupConfig(max_steps=4, patience=4, progress=False)


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    """One stand-in folder per real-model preset."""
    return {name: make_standin(name, tmp_path_factory.mktemp(name)) for name in ARCHITECTURES}


def folder(preset):
    """The stand-in's folder (the one holding preset.json)."""
    return str(Path(preset.model_id).parent)


def test_every_real_preset_has_a_standin():
    assert set(ARCHITECTURES) == set(PRESETS) - {"toy"}


@pytest.mark.parametrize("name, architecture", [
    ("gemma-3-270m-offline", "jumprelu"),      # as the shipped data/gemma-3-270m SAEs
    ("gemma-3-270m", "jumprelu"), ("gemma-2-2b", "jumprelu"), ("gpt2", "standard")])
def test_standin_saes_have_the_presets_architecture(name, architecture, standins):
    assert sae_architecture(PRESETS[name]) == architecture
    preset = standins[name]
    sae = load_sae(folder(preset), preset.resid_pre_layers_with_sae()[0], device="cpu")
    assert sae.cfg.architecture() == architecture


@pytest.mark.parametrize("name", ["toy", *ARCHITECTURES])
def test_resid_post_is_resid_pre_of_the_next_block(name, standins, toy_lm):
    """The site convention behind every preset: no off-by-one between SAE sites."""
    lm = toy_lm if name == "toy" else load_model(folder(standins[name]), device="cpu")
    inputs = dict(lm.tokenizer(["hot -> cold\nbig -> small\nup ->"], return_tensors="pt"))
    posts, pres = [], []
    with lm.trace(inputs):     # in forward order: output of block L, then input of L+1
        for L in range(n_layers(lm) - 1):
            posts.append(blocks(lm)[L].output.save())
            pres.append(blocks(lm)[L + 1].input.save())
    for post, pre in zip(posts, pres):
        assert isinstance(post, torch.Tensor) and torch.equal(post, pre)
    hidden = lm._module(**inputs, output_hidden_states=True).hidden_states
    for L in range(n_layers(lm) - 1):      # resid_pre L is HF hidden_states[L]
        assert torch.allclose(hidden[L + 1], pres[L], atol=1e-6)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_standin_saes_load_at_their_site(name, standins):
    preset = standins[name]
    lm = load_model(folder(preset), device="cpu")
    assert get_preset(folder(preset)) == preset
    for layer in preset.resid_pre_layers_with_sae():
        sae = load_sae(folder(preset), layer, device="cpu")
        check_sae_site(sae, lm, layer)
        assert sae_site(sae) == ("resid_pre", layer)
        if preset.sae_format == "sae-lens":  # resid_post of block L is resid_pre L+1
            block = layer - (preset.sae_site == "resid_post")
            assert sae.cfg.metadata.hook_name == f"blocks.{block}.hook_{preset.sae_site}"


def test_an_sae_whose_hook_contradicts_the_preset_is_refused(standins):
    wrong = dataclasses.replace(standins["gpt2"], sae_id="blocks.1.hook_resid_pre")
    with pytest.raises(ValueError, match="records resid_pre 1 .*lists it for resid_pre 2"):
        load_sae(wrong, 2, device="cpu")


def test_a_standin_folder_can_be_moved(standins, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(folder(standins["gemma-2b"]), moved)
    preset = get_preset(moved)
    assert preset.model_id == str(moved / "model") and preset.sae_dir == str(moved / "saes")
    assert n_layers(load_model(moved, device="cpu")) == 4


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_standin_runs_every_experiment(name, standins, tmp_path, monkeypatch):
    """The functions the notebooks call, end to end, on the preset's formats."""
    monkeypatch.setenv("TVLIB_CACHE_DIR", str(tmp_path / "cache"))
    preset = standins[name]
    lm = load_model(folder(preset), device="cpu")
    layer, tasks = preset.task_layer, ["antonyms", "en_es"]
    views = run_sae_view_sweep(lm, tasks, [layer], TINY, SAEViewConfig(target_l0=5))
    assert {"TV", "Recon of TV", "TV on recon", "ITO (L0=5)"} <= set(views.method)
    assert views.nll.notna().all()
    cleaned = run_cleanup_sweep(lm, tasks, [layer], TINY, QUICK)
    features = top_cleaned_features(cleaned["features"], layer, 1)
    assert all(features.values())
    grid = run_steering_matrix(lm, tasks, layer, features, TINY, SteeringConfig(scale=5.0))
    assert grid.relative_change.notna().all()
    corpus = tokenize_corpus(lm.tokenizer, corpus_texts(folder(preset))[:8])
    reading = read_features(lm, load_sae(preset, layer, device="cpu"), layer, corpus, [0, 1])
    assert reading.density.shape == (4 * d_model(lm),)


def test_bfloat16_model_with_float32_vectors(standins):
    """The CUDA setting (bf16 weights, float32 SAE and optimisation), on the CPU."""
    preset = standins["gemma-2-2b"]
    lm = load_model(folder(preset), device="cpu", dtype="bfloat16")
    assert model_dtype(lm) == torch.bfloat16
    prompts = build_task_prompts(lm.tokenizer, load_task("antonyms").head(100), TINY)
    layer = preset.task_layer
    tv = task_vectors(lm, prompts.few_shot, [layer])[0]
    assert tv.dtype == torch.float32
    assert math.isfinite(score(lm, prompts.zero_shot, Steering(layer, tv)).mean_nll())
    sae = load_sae(preset, layer, device="cpu")
    result = cleanup(lm, sae, layer, tv, prompts.train, cfg=QUICK)
    assert result.vector.dtype == torch.float32 and all(map(math.isfinite, result.loss))


# ---------------------------------------------------------------- the authors' SAEs

def authors_reference(w: dict, x: torch.Tensor):
    """Their gated encoder and decoder, written out from the formulas."""
    d = w["W_enc"].shape[0]
    n_in = math.sqrt(d) / w["mean_norm"] if "mean_norm" in w else 1.0
    n_out = math.sqrt(d) / w["tgt_mean_norm"] if "tgt_mean_norm" in w else n_in
    s = F.softplus(w["s_gate"]) * w["scaling_factor"]
    xn = x * n_in
    gate = (xn @ w["W_enc"] + w["b_enc"]) > 0
    f = gate * torch.relu((xn @ w["W_enc"]) * s + w["b_gate"])
    return f, (f @ w["W_dec"] + w["b_dec"]) / n_out


@pytest.mark.parametrize("norms", [{}, {"mean_norm": 7.0}, {"mean_norm": 7.0, "tgt_mean_norm": 3.0}])
def test_authors_sae_conversion_is_exact(norms):
    g = torch.Generator().manual_seed(0)
    d, n = 16, 64
    w = {"W_enc": torch.randn(d, n, generator=g), "b_enc": torch.randn(n, generator=g),
         "W_dec": torch.randn(n, d, generator=g), "b_dec": torch.randn(d, generator=g),
         "s_gate": torch.randn(n, generator=g), "b_gate": torch.randn(n, generator=g),
         "scaling_factor": 0.5 + torch.rand(n, generator=g)}
    w.update({k: torch.tensor(v) for k, v in norms.items()})
    sae = convert_authors_weights(w)
    x = 3 * torch.randn(200, d, generator=g)
    f_ref, x_hat_ref = authors_reference(w, x)
    f = sae.encode(x)
    assert 0 < (f_ref > 0).float().mean() < 1        # some features gated off, some on
    assert torch.equal(f > 0, f_ref > 0)
    torch.testing.assert_close(f, f_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sae.decode(f), x_hat_ref, rtol=1e-4, atol=1e-4)


def test_authors_format_errors(tmp_path):
    with pytest.raises(KeyError, match="missing.*s_gate"):
        convert_authors_weights({"W_enc": torch.zeros(2, 3)})
    weights = {k: torch.ones(3) for k in ("b_enc", "s_gate", "b_gate", "scaling_factor")}
    weights.update(W_enc=torch.ones(2, 3), W_dec=torch.ones(3, 2), b_dec=torch.ones(2),
                   mean_norm=torch.ones(2))
    with pytest.raises(ValueError, match="mean_norm should be one number"):
        convert_authors_weights(weights)
    with pytest.raises(FileNotFoundError, match="expected one .safetensors"):
        load_authors_sae(tmp_path)


# ---------------------------------------------------------------- hub and remote

def test_missing_hub_files_give_one_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(hub.HubUnavailableError) as err:
        load_model("gemma-2b", device="cpu")
    message = str(err.value)
    for part in ("'google/gemma-2b'", "licence", "hf auth login", "hf download google/gemma-2b",
                 "HF_HOME", "HF_HUB_OFFLINE", "PRESET = 'toy'", "'gemma-3-270m-offline'"):
        assert part in message
    with pytest.raises(hub.HubUnavailableError, match="jbloom/GPT2-Small-SAEs-Reformatted"):
        load_sae("gpt2", 3, device="cpu")
    with pytest.raises(hub.HubUnavailableError,
                       match='nev/gemma-2b-saex-test --include "it-l12-residual-test-run-1-\\*/\\*"'):
        load_sae("gemma-2b-it-authors", 12, device="cpu")
    with pytest.raises(hub.HubUnavailableError, match="NeelNanda/pile-10k.*--repo-type dataset"):
        corpus_texts("gpt2")


def test_cached_files_without_a_hub_load_offline_for_that_load_only(tmp_path, monkeypatch):
    import datasets.config
    from huggingface_hub import constants
    snapshot = tmp_path / "models--org--model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--org--model" / "refs").mkdir()
    (tmp_path / "models--org--model" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)     # restored after the test
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    with hub.hub_files("org/model", "model"):                  # cached: no error
        assert constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
        assert datasets.config.HF_DATASETS_OFFLINE
    # the process is back online afterwards: a later load asks the hub again
    assert not (constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE
                or datasets.config.HF_DATASETS_OFFLINE)
    with pytest.raises(RuntimeError, match="raised inside"):
        with hub.hub_files("org/model", "model"):
            raise RuntimeError("raised inside")
    assert not constants.HF_HUB_OFFLINE                         # restored after an error too
    with pytest.raises(hub.HubUnavailableError, match="'org/other'"):
        with hub.hub_files("org/other", "model"):
            pass
    # an SAE sweep's repository: its cached snapshot is used as it is, with no network
    (snapshot / "l12-run-1").mkdir()
    (snapshot / "l12-run-1" / "weights.safetensors").write_bytes(b"")
    assert hub.download_first_folder("org/model", "l12-*") == snapshot
    with pytest.raises(hub.HubUnavailableError, match='--include "l13-\\*/\\*"'):
        hub.download_first_folder("org/model", "l13-*")


def test_the_hub_is_asked_again_after_a_minute(monkeypatch):
    from huggingface_hub import constants
    from huggingface_hub import utils as hub_utils
    calls = []

    class Down:
        def head(self, url, timeout):
            calls.append(url)
            raise ConnectionError("no network")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_utils, "get_session", lambda: Down())
    monkeypatch.setattr(hub, "_reachable", {})
    now = [1000.0]
    monkeypatch.setattr(hub, "_now", lambda: now[0])
    assert not hub.hub_reachable() and not hub.hub_reachable()
    assert len(calls) == 1                                      # one request per minute
    now[0] += hub.REACHABLE_TTL_S + 1
    assert not hub.hub_reachable()
    assert len(calls) == 2


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'gemma-7b'.*folder holding a preset.json"):
        get_preset("gemma-7b")


def test_remote_traces_match_local_ones(toy_lm):
    """remote="local" sends every trace through nnsight's remote serialisation."""
    lm = load_model("toy", device="cpu", remote="local")
    prompts = build_task_prompts(lm.tokenizer, load_task("antonyms").head(100), TINY)
    tv_local = task_vectors(toy_lm, prompts.few_shot, [2, 4])
    tv_remote = task_vectors(lm, prompts.few_shot, [2, 4])
    torch.testing.assert_close(tv_remote, tv_local)
    local = score(toy_lm, prompts.zero_shot, Steering(4, tv_local[1])).nll
    torch.testing.assert_close(score(lm, prompts.zero_shot, Steering(4, tv_local[1])).nll, local)


@pytest.mark.parametrize("remote", [True, "local"])
def test_cleanup_refuses_a_remote_model(remote):
    lm = load_model("toy", device="cpu", remote=remote)   # True: no local weights, as with NDIF
    prompts = build_task_prompts(lm.tokenizer, load_task("antonyms").head(100), TINY)
    with pytest.raises(RuntimeError, match="remote traces return saved values"):
        cleanup(lm, load_sae("toy", 4, device="cpu"), 4, torch.zeros(128), prompts.train,
                cfg=QUICK)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("sae_device", ["cpu", "cuda"])
def test_cuda_model_in_bfloat16_with_the_sae_on(sae_device, standins):
    preset = standins["gemma-2-2b"]
    lm = load_model(folder(preset), device="cuda", dtype="bfloat16")
    prompts = build_task_prompts(lm.tokenizer, load_task("antonyms").head(100), TINY)
    layer = preset.task_layer
    tv = task_vectors(lm, prompts.few_shot, [layer])[0]
    assert tv.device.type == "cpu" and tv.dtype == torch.float32
    sae = load_sae(preset, layer, device=sae_device)
    result = cleanup(lm, sae, layer, tv, prompts.train, prompts.zero_shot, QUICK)
    assert math.isfinite(result.heldout_nll) and result.vector.device.type == "cpu"
    reading = read_features(lm, sae, layer, tokenize_corpus(lm.tokenizer, corpus_texts(
        folder(preset))[:8]), [0, 1])
    assert reading.density.device.type == "cpu"


def test_scripts_encoding_preset_loads_the_scripts_encoding(standins):
    """The authors' scripts' encoding is its own preset, and its own cache identity."""
    from tvlib.saes import sae_identity
    scripts, training = standins["gemma-2b-it-authors-scripts"], standins["gemma-2b-it-authors"]
    layer = scripts.task_layer
    sae = load_sae(folder(scripts), layer, device="cpu")
    assert sae.cfg.metadata.authors_encoding == "scripts"
    assert load_sae(folder(training), layer, device="cpu").cfg.metadata.authors_encoding \
        == "training"
    assert sae_identity(scripts, layer)["encoding"] == "scripts"
    assert sae_identity(training, layer)["encoding"] == "training"
    with pytest.raises(ValueError, match="sae_encoding 'scripts'.*authors' format only"):
        dataclasses.replace(standins["gpt2"], sae_encoding="scripts")
