import os

import pytest
import torch
import yaml

from tvlib.presets import get_preset, PRESETS
from tvlib.saes import check_sae_fits, load_sae


def sae_catalogue():
    import sae_lens
    path = os.path.join(os.path.dirname(sae_lens.__file__), "pretrained_saes.yaml")
    with open(path) as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize("name", [n for n, p in PRESETS.items() if p.sae_release])
def test_public_presets_exist_in_installed_sae_lens_catalogue(name):
    preset = PRESETS[name]
    release = sae_catalogue()[preset.sae_release]
    ids = {entry["id"] for entry in release["saes"]}
    for block in preset.sae_layers:
        assert preset.sae_id.format(layer=block) in ids


def test_neuronpedia_preset_reads_saes_with_neuronpedia_pages():
    preset = PRESETS["gemma-3-270m-neuronpedia"]
    entries = {entry["id"]: entry for entry in sae_catalogue()[preset.sae_release]["saes"]}
    for block in preset.sae_layers:
        entry = entries[preset.sae_id.format(layer=block)]
        assert entry["neuronpedia"] == f"gemma-3-270m/{block}-gemmascope-2-res-16k"


# Blocks per model (the architectures' configs), for checks that need no download.
N_BLOCKS = {"toy": 6, "gpt2": 12, "gemma-2b": 18, "gemma-2b-it-authors": 18,
            "gemma-2b-it-authors-scripts": 18, "gemma-2-2b": 26, "gemma-3-270m": 18,
            "gemma-3-270m-neuronpedia": 18, "gemma-3-270m-offline": 18}


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_layers_are_resid_pre_layers_of_the_model(name):
    preset, n = PRESETS[name], N_BLOCKS[name]
    assert all(0 <= layer < n for layer in preset.resid_pre_layers_with_sae())
    assert {preset.task_layer, preset.detector_layer} <= set(preset.resid_pre_layers_with_sae())
    assert preset.detector_layer < preset.task_layer


def test_resid_post_presets_convert_to_resid_pre():
    gemma = get_preset("gemma-2b")
    assert gemma.sae_site == "resid_post"
    assert gemma.resid_pre_layers_with_sae() == (1, 7, 11, 13)
    assert get_preset("gpt2").resid_pre_layers_with_sae() == tuple(range(12))


def test_toy_saes_load_offline_and_fit(toy_lm):
    for layer in get_preset("toy").sae_layers:
        sae = load_sae("toy", layer)
        check_sae_fits(sae, toy_lm)
        assert sae.cfg.metadata.site == "resid_pre" and sae.cfg.metadata.layer == layer
        assert sae.cfg.architecture() == "gated"
        assert not any(p.requires_grad for p in sae.parameters())   # frozen: never trained
        x = torch.randn(3, sae.cfg.d_in)
        assert sae.decode(sae.encode(x)).shape == x.shape


def test_sae_errors(toy_lm):
    with pytest.raises(ValueError, match="no SAE reading resid_pre 9"):
        load_sae("toy", 9)
    with pytest.raises(ValueError, match="no SAE reading resid_pre 2.*1, 7, 11, 13"):
        load_sae("gemma-2b", 2)
    import dataclasses
    misnamed = dataclasses.replace(get_preset("gpt2"), sae_id="no-such-sae.{layer}")
    with pytest.raises(ValueError, match="has no SAE 'no-such-sae.3' in the installed catalogue"):
        load_sae(misnamed, 3, device="cpu")               # before any hub access
    sae = load_sae("toy", 0)
    sae.cfg.d_in = 64
    with pytest.raises(ValueError, match="SAE input width 64 does not match"):
        check_sae_fits(sae, toy_lm)


def test_toy_preset_matches_how_the_model_was_trained():
    import json

    from tvlib.paths import TOY_DIR
    config = json.loads((TOY_DIR / "training.json").read_text())["config"]
    preset = get_preset("toy")
    assert preset.max_pairs_per_task == config["max_pairs_per_task"]
    assert preset.sae_layers == tuple(range(config["n_layers"]))


def test_tvlib_device_chooses_the_default_device(monkeypatch):
    from tvlib.models import default_device
    monkeypatch.setenv("TVLIB_DEVICE", "cpu")
    assert default_device() == "cpu"
    assert next(load_sae("toy", 3).parameters()).device.type == "cpu"
    monkeypatch.setenv("TVLIB_DEVICE", "gpu")
    with pytest.raises(ValueError, match="TVLIB_DEVICE='gpu': set it to 'cpu' or 'cuda'"):
        default_device()
    monkeypatch.delenv("TVLIB_DEVICE")
    assert default_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TVLIB_DEVICE", "cuda")
        with pytest.raises(RuntimeError, match="torch sees no CUDA GPU"):
            default_device()


def test_a_model_asked_for_on_the_cpu_stays_there_when_a_gpu_is_present(monkeypatch):
    """transformers' pipeline (nnsight loads through it) moves a model it is given no
    device for onto the first accelerator; load_model names the device it was asked
    for. Without a GPU here, a pipeline that believes CUDA is present stands in."""
    import transformers.pipelines.base as pipeline_base
    from tvlib.models import load_model, model_device
    monkeypatch.setattr(pipeline_base, "is_torch_cuda_available", lambda: True)
    lm = load_model("toy", device="cpu")
    assert model_device(lm).type == "cpu"
