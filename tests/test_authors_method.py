"""The method as its authors ran it (github.com/neverix/micrlhf-progress), as options:
their scripts' SAE encoding, their L1 units, on their converted gated SAEs."""

import math

import pytest
import torch
import torch.nn.functional as F

from tvlib.authors_sae import convert_authors_weights, load_authors_sae
from tvlib.cleanup import CleanupConfig, cleanup
from tvlib.presets import get_preset
from tvlib.prompt_batch import tokenize_prompts
from tvlib.prompts import few_shot_prompts, zero_shot_prompts
from tvlib.standins import random_sae_weights, save_authors_sae
from tvlib.taskvec import task_vectors
from tvlib.tasks import load_task

NORMS = [{}, {"mean_norm": 7.0}, {"mean_norm": 7.0, "tgt_mean_norm": 3.0}]


def random_authors_weights(d=16, n=64, seed=0, **norms):
    g = torch.Generator().manual_seed(seed)
    w = {"W_enc": torch.randn(d, n, generator=g), "b_enc": torch.randn(n, generator=g),
         "W_dec": torch.randn(n, d, generator=g), "b_dec": torch.randn(d, generator=g),
         "s_gate": torch.randn(n, generator=g), "b_gate": torch.randn(n, generator=g),
         "scaling_factor": 0.5 + torch.rand(n, generator=g)}
    w.update({k: torch.tensor(v) for k, v in norms.items()})
    return w


def norm_factors(w):
    d = w["W_enc"].shape[0]
    n_in = math.sqrt(d) / float(w["mean_norm"]) if "mean_norm" in w else 1.0
    n_out = math.sqrt(d) / float(w["tgt_mean_norm"]) if "tgt_mean_norm" in w else n_in
    return n_in, n_out


def scripts_reference(w, x):
    """Their sae_encode_gated (micrlhf/utils/load_sae.py), written out in torch."""
    n_in, n_out = norm_factors(w)
    s = F.softplus(w["s_gate"]) * w["scaling_factor"]
    pre = ((x * n_in) @ w["W_enc"] + w["b_enc"]) * s
    post = torch.relu(pre)
    threshold = torch.clamp(w["b_gate"] - w["b_enc"] * s, min=0)
    f = (post > threshold) * post
    return f, (f @ w["W_dec"] + w["b_dec"]) / n_out


def training_reference(w, x):
    """The encoder their SAEs were trained with (neverix/saex, SAE.encode, gated)."""
    n_in, n_out = norm_factors(w)
    s = F.softplus(w["s_gate"]) * w["scaling_factor"]
    xn = x * n_in
    f = ((xn @ w["W_enc"] + w["b_enc"]) > 0) * torch.relu((xn @ w["W_enc"]) * s + w["b_gate"])
    return f, (f @ w["W_dec"] + w["b_dec"]) / n_out


REFERENCES = {"training": training_reference, "scripts": scripts_reference}


@pytest.mark.parametrize("norms", NORMS)
def test_scripts_encoding_is_exact(norms):
    w = random_authors_weights(**norms)
    sae = convert_authors_weights(w, encoding="scripts")
    x = 3 * torch.randn(300, 16, generator=torch.Generator().manual_seed(1))
    f_ref, x_hat_ref = scripts_reference(w, x)
    f = sae.encode(x)
    assert 0 < (f_ref > 0).float().mean() < 1         # some features gated off, some on
    assert torch.equal(f > 0, f_ref > 0)
    torch.testing.assert_close(f, f_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sae.decode(f), x_hat_ref, rtol=1e-4, atol=1e-4)
    # decoding is the same in both encodings
    training = convert_authors_weights(w)
    assert torch.equal(training.W_dec, sae.W_dec) and torch.equal(training.b_dec, sae.b_dec)


@pytest.mark.parametrize("mean_norm", [None, 2 * math.sqrt(16)])
def test_load_authors_sae_files_in_both_encodings(tmp_path, mean_norm):
    g = torch.Generator().manual_seed(3)
    save_authors_sae(tmp_path, random_sae_weights(16, 64, g), g, mean_norm=mean_norm)
    from safetensors.torch import load_file
    w = load_file(str(tmp_path / "sae_weights.safetensors"))
    x = 4 * torch.randn(200, 16, generator=g)
    for encoding, reference in REFERENCES.items():
        sae = load_authors_sae(tmp_path, layer=5, encoding=encoding)
        assert sae.cfg.metadata.authors_encoding == encoding
        assert (sae.cfg.metadata.site, sae.cfg.metadata.layer) == ("resid_pre", 5)
        f_ref, _ = reference(w, x)
        assert (f_ref > 0).any()
        assert torch.equal(sae.encode(x) > 0, f_ref > 0), encoding
        torch.testing.assert_close(sae.encode(x), f_ref, rtol=1e-4, atol=1e-4)
    assert load_authors_sae(tmp_path).cfg.metadata.authors_encoding == "training"


def test_the_two_encodings_differ_unless_b_gate_is_b_enc_times_s():
    w = random_authors_weights(mean_norm=7.0)
    x = 3 * torch.randn(300, 16, generator=torch.Generator().manual_seed(2))
    training = convert_authors_weights(w, encoding="training").encode(x)
    scripts = convert_authors_weights(w, encoding="scripts").encode(x)
    assert not torch.allclose(training, scripts)
    # with b_gate = b_enc * s the shift u = b_gate - b_enc * s is 0: the same function
    w["b_gate"] = w["b_enc"] * F.softplus(w["s_gate"]) * w["scaling_factor"]
    torch.testing.assert_close(convert_authors_weights(w, encoding="training").encode(x),
                               convert_authors_weights(w, encoding="scripts").encode(x),
                               rtol=1e-4, atol=1e-4)


def test_unknown_encoding_is_refused(tmp_path):
    w = random_authors_weights()
    with pytest.raises(ValueError, match="encoding='train' is not.*encoding='training'.*"
                                         "encoding='scripts'"):
        convert_authors_weights(w, encoding="train")
    with pytest.raises(ValueError, match="encoding='jax'"):
        load_authors_sae(tmp_path, encoding="jax")


# ---------------------------------------------------------------- their L1, their units

@pytest.fixture(scope="module")
def antonyms_tv(toy_lm):
    task = load_task("antonyms").head(get_preset("toy").max_pairs_per_task)
    few = tokenize_prompts(toy_lm.tokenizer, few_shot_prompts(
        task, 8, 6, seed=0, queries=task.pairs[40:], demo_pool=task.pairs[40:]))
    train = tokenize_prompts(toy_lm.tokenizer, zero_shot_prompts(task.pairs[:24]))
    return task_vectors(toy_lm, few, [3])[0], train


@pytest.mark.parametrize("encoding", ["training", "scripts"])
def test_authors_l1_is_lambda_times_their_f(toy_lm, antonyms_tv, encoding):
    """On their converted SAE the cleanup weights are their f; units "sae" penalises sum f."""
    tv, train = antonyms_tv
    w = random_authors_weights(d=128, n=512, seed=4, mean_norm=float(tv.norm()) * 2)
    sae = convert_authors_weights(w, layer=3, encoding=encoding)
    f_ref, _ = REFERENCES[encoding](w, tv[None])
    assert 0 < int((f_ref > 0).sum()) < 512
    lam = 0.05
    result = cleanup(toy_lm, sae, 3, tv, train, cfg=CleanupConfig(
        max_steps=1, lam=lam, units="sae", progress=False))
    torch.testing.assert_close(result.start_weights, f_ref[0], rtol=1e-4, atol=1e-4)
    assert result.loss[0] - result.nll[0] == pytest.approx(lam * f_ref.sum().item(), rel=1e-4)
