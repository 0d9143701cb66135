import copy
import math

import pytest
import torch
from sae_lens import SAE, StandardSAEConfig, TopKSAEConfig

import tvlib.feature_weights
import tvlib.pursuit
from tests.test_pursuit import HAND_D, HAND_X
from tests.test_sae_views import ARCHITECTURES, random_sae
from tvlib.cleanup import CleanupConfig, CleanupDiverged, cleanup
from tvlib.feature_weights import (activation_function, feature_units, initial_theta,
                                  sae_threshold)
from tvlib.presets import get_preset
from tvlib.saes import load_sae
from tvlib.prompt_batch import tokenize_prompts
from tvlib.prompts import few_shot_prompts, zero_shot_prompts
from tvlib.pursuit import gradient_pursuit
from tvlib.interventions import Steering
from tvlib.scoring import answer_nll, score
from tvlib.taskvec import task_vectors
from tvlib.tasks import load_task

TASK = load_task("antonyms").head(get_preset("toy").max_pairs_per_task)   # words it knows
TOY_LAYERS = list(get_preset("toy").resid_pre_layers_with_sae())
FAST = CleanupConfig(max_steps=40, patience=200, progress=False)


@pytest.fixture(scope="module")
def setup(toy_lm):
    tok = toy_lm.tokenizer
    few = tokenize_prompts(tok, few_shot_prompts(TASK, 8, 6, seed=0, queries=TASK.pairs[40:],
                                                 demo_pool=TASK.pairs[40:]))
    train = tokenize_prompts(tok, zero_shot_prompts(TASK.pairs[:24]))
    heldout = tokenize_prompts(tok, zero_shot_prompts(TASK.pairs[24:40]))
    layer = 3
    tv = task_vectors(toy_lm, few, [layer])[0]
    return {"train": train, "heldout": heldout, "layer": layer, "tv": tv,
            "sae": load_sae("toy", layer)}


@pytest.mark.parametrize("activation", ["sae", "relu"])
@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_start_weights_are_the_sae_encoding(architecture, activation):
    sae = random_sae(architecture)
    for seed in range(20):
        tv = 3 * torch.randn(128, generator=torch.Generator().manual_seed(seed))
        theta0 = initial_theta(sae, tv, activation=activation)
        assert torch.equal(activation_function(sae, activation)(theta0), sae.encode(tv[None])[0])


# ---------------------------------------------------------------- the gate of gated SAEs

def gated_saes():
    """A random sae-lens GatedSAE and the shipped toy ones (all gated)."""
    return [("random", random_sae("gated"))] + [
        (f"toy L{layer}", load_sae("toy", layer, device="cpu")) for layer in TOY_LAYERS]


def test_gate_as_threshold_reproduces_the_gated_encoder():
    """act(m) = encode(x) on raw pre-activations m, not only on the clamped start."""
    g = torch.Generator().manual_seed(0)
    for name, sae in gated_saes():
        x = sae.b_dec.detach() + 3 * torch.randn(64, sae.cfg.d_in, generator=g)
        with torch.no_grad():
            _, cache = sae.run_with_cache(x)
            m, f = cache["hook_sae_acts_pre"], sae.encode(x)                # (64, F)
            assert torch.equal(activation_function(sae, "sae")(m), f), name
            # plain ReLU keeps features whose gate is closed
            assert (torch.relu(m) != f).any(), name
        threshold = (sae.b_mag - sae.b_gate * sae.r_mag.exp()).clamp(min=0).detach()
        assert torch.equal(sae_threshold(sae), threshold)


def test_start_weights_of_gated_saes_are_the_encoding_and_the_gate_closes():
    g = torch.Generator().manual_seed(1)
    for name, sae in gated_saes():
        tv = sae.b_dec.detach() + 3 * torch.randn(sae.cfg.d_in, generator=g)
        encoding = sae.encode(tv[None])[0].detach()
        for activation in ("sae", "relu"):
            theta0 = initial_theta(sae, tv, activation=activation)
            assert torch.equal(activation_function(sae, activation)(theta0), encoding), name
        # a theta moved below a positive gate threshold: w = 0 under "sae" only
        threshold = sae_threshold(sae)
        gated = int(threshold.argmax())
        assert threshold[gated] > 0, name
        theta = theta0.clone()
        theta[gated] = threshold[gated] / 2
        assert activation_function(sae, "sae")(theta)[gated] == 0, name
        assert activation_function(sae, "relu")(theta)[gated] == threshold[gated] / 2, name
        theta[gated] = threshold[gated] * 2
        assert activation_function(sae, "sae")(theta)[gated] == threshold[gated] * 2, name


def test_topk_activation_is_exact_and_other_architectures_are_refused():
    sae = random_sae("topk")
    theta = torch.randn(256, generator=torch.Generator().manual_seed(0))
    w = activation_function(sae, "sae")(theta)
    assert int((w > 0).sum()) == sae.cfg.k                  # 100 of 256 positive: keep 100
    torch.testing.assert_close(w, sae.activation_fn(theta))
    rescaled = SAE.from_dict(TopKSAEConfig(d_in=128, d_sae=256,
                                           rescale_acts_by_decoder_norm=True).to_dict())
    with pytest.raises(ValueError, match="not this 'topk' SAE: pass CleanupConfig"
                                         r"\(activation='relu'\)"):
        activation_function(rescaled, "sae")
    assert activation_function(rescaled, "relu") is torch.relu


def test_cleanup_uses_the_gate_by_default(toy_lm, setup):
    """Under "relu" the toy gated SAE keeps features its gate closes; "sae" never does."""
    s = setup
    runs = {a: cleanup(toy_lm, s["sae"], s["layer"], s["tv"], s["train"],
                       cfg=CleanupConfig(max_steps=30, lam=0.05, progress=False, activation=a))
            for a in ("sae", "relu")}
    threshold = sae_threshold(s["sae"])
    kept = runs["sae"].weights > 0
    assert (runs["sae"].weights[kept] > threshold[kept]).all()
    below = (runs["relu"].weights > 0) & (runs["relu"].weights <= threshold)
    assert CleanupConfig().activation == "sae"
    assert below.any()          # ReLU lets weights sink under the gate and stay on


# ---------------------------------------------------------------- the L1 term

@pytest.mark.parametrize("units", ["norm_scaled", "sae"])
def test_l1_term_of_the_first_step(toy_lm, setup, units):
    s = setup
    lam = 0.1
    result = cleanup(toy_lm, s["sae"], s["layer"], s["tv"], s["train"],
                     cfg=CleanupConfig(max_steps=1, lam=lam, units=units, progress=False))
    w0 = result.start_weights
    if units == "norm_scaled":
        expected = (w0 * s["sae"].W_dec.detach().norm(dim=-1)).sum() * math.sqrt(128) \
            / s["tv"].norm()
    else:
        expected = w0.sum()
    assert (result.loss[0] - result.nll[0]) == pytest.approx(lam * expected.item(), rel=1e-5)
    assert CleanupConfig().units == "norm_scaled"


def rescaled_features(sae, scales: torch.Tensor):
    """The same gated SAE with feature i's decoder row times scales[i] and its weight divided."""
    other = copy.deepcopy(sae)
    with torch.no_grad():
        other.W_dec.mul_(scales[:, None])
        other.b_mag.div_(scales)
        other.r_mag.sub_(scales.log())
    return other


def test_norm_scaled_units_do_not_depend_on_the_sae_parametrisation(toy_lm, setup):
    """Rescaling feature directions (the SAE computes the same function) leaves the cleanup
    unchanged in "norm_scaled" units, and changes it in the SAE's own units."""
    s = setup
    scales = torch.exp(torch.randn(s["sae"].cfg.d_sae, generator=torch.Generator().manual_seed(3)))
    other = rescaled_features(s["sae"], scales)
    x = s["tv"][None]
    torch.testing.assert_close(other.decode(other.encode(x)), s["sae"].decode(s["sae"].encode(x)),
                               rtol=1e-4, atol=1e-4)
    runs = {}
    for units in ("norm_scaled", "sae"):
        cfg = CleanupConfig(max_steps=30, lam=0.05, lr=0.05, units=units, progress=False)
        runs[units] = [cleanup(toy_lm, sae, s["layer"], s["tv"], s["train"], cfg=cfg)
                       for sae in (s["sae"], other)]
    same, moved = runs["norm_scaled"], runs["sae"]
    assert same[0].l0[-1] < same[0].l0[0]                  # it pruned something
    assert same[0].l0 == same[1].l0
    torch.testing.assert_close(same[0].vector, same[1].vector, rtol=1e-3, atol=1e-3)
    assert moved[0].l0 != moved[1].l0 or not torch.allclose(moved[0].vector, moved[1].vector,
                                                             rtol=1e-3, atol=1e-3)


def test_norm_scaled_step_is_lr_in_norm_units(toy_lm, setup):
    """Adam's first step moves every active theta by lr times its feature's unit."""
    s = setup
    lr = 1e-3
    first = cleanup(toy_lm, s["sae"], s["layer"], s["tv"], s["train"],
                    cfg=CleanupConfig(max_steps=1, lr=lr, progress=False))
    unit = feature_units(s["sae"], s["tv"])
    active = first.start_weights > 0
    assert active.any()
    moved = (first.weights - first.start_weights)[active].abs()
    torch.testing.assert_close(moved, lr * unit[active], rtol=1e-3, atol=1e-6)
    expected = s["tv"].norm() / (math.sqrt(128) * s["sae"].W_dec.detach().norm(dim=-1))
    torch.testing.assert_close(unit, expected)
    assert torch.equal(feature_units(s["sae"], s["tv"], "sae"), torch.ones(s["sae"].cfg.d_sae))


def test_first_step_matches_plain_steering(toy_lm, setup):
    s = setup
    result = cleanup(toy_lm, s["sae"], s["layer"], s["tv"], s["train"], cfg=CleanupConfig(
        max_steps=1, progress=False))
    steered = score(toy_lm, s["train"], Steering(s["layer"], s["sae"].decode(
        result.start_weights)))
    assert result.nll[0] == pytest.approx(steered.mean_nll(), abs=1e-5)


@pytest.mark.parametrize("units", ["sae", "norm_scaled"])
def test_steps_match_a_plain_adam_loop(toy_lm, setup, units):
    """Five steps equal Adam on theta (per-feature lr for "norm_scaled") written with a
    forward pre-hook on the Hugging Face model, whole forward every step."""
    s = setup
    sae, layer, train = s["sae"], s["layer"], s["train"]
    lr, lam, steps = 0.05, 0.05, 5
    result = cleanup(toy_lm, sae, layer, s["tv"], train, cfg=CleanupConfig(
        max_steps=steps, lr=lr, lam=lam, units=units, progress=False))

    act, unit = activation_function(sae), feature_units(sae, s["tv"], units)
    theta = initial_theta(sae, s["tv"]).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([{"params": [theta], "lr": lr}])
    rows = torch.arange(len(train))
    vector = {}

    def add(module, args, kwargs):            # hidden states come first, by position
        h = args[0].clone()
        h[rows, train.steer_pos] += vector["v"]
        return (h, *args[1:]), kwargs

    handle = toy_lm._module.model.layers[layer].register_forward_pre_hook(add, with_kwargs=True)
    losses = []
    try:
        for _ in range(steps):
            w = act(theta)
            vector["v"] = sae.decode(w)
            logits = toy_lm._module(**train.model_inputs()).logits
            nll = answer_nll(logits[rows.unsqueeze(-1), (train.target_pos - 1).clamp(min=0)],
                             train.targets).mean()
            loss = nll + lam * (w / unit).sum()
            optimizer.zero_grad()
            loss.backward()
            # Adam in units of `unit`: its state sees d loss / d (theta / unit), and its
            # step, made in those units, is converted back to theta
            theta.grad *= unit
            before = theta.detach().clone()
            optimizer.step()
            with torch.no_grad():
                theta.copy_(before + (theta - before) * unit)
            losses.append(loss.item())
    finally:
        handle.remove()
    assert result.loss == pytest.approx(losses, rel=1e-4, abs=1e-5)
    torch.testing.assert_close(result.weights, act(theta).detach(), rtol=1e-4, atol=1e-5)


def test_cleanup_lowers_loss_and_l0_and_keeps_inactive_features_off(toy_lm, setup):
    s = setup
    result = cleanup(toy_lm, s["sae"], s["layer"], s["tv"], s["train"], s["heldout"],
                     CleanupConfig(max_steps=150, lam=0.05, progress=False))
    assert result.loss[-1] < result.loss[0]   # the task loss alone may rise as L1 prunes
    assert result.l0[-1] < result.l0[0]
    inactive = result.start_weights == 0
    assert (result.weights[inactive] == 0).all()          # never revived
    assert ((result.weights > 0) <= (result.start_weights > 0)).all()
    torch.testing.assert_close(result.vector, s["sae"].decode(result.weights), rtol=1e-5,
                               atol=1e-5)
    # held-out prompts are disjoint from the training prompts, and scored
    train_inputs = {p.text for p in s["train"].prompts}
    assert not train_inputs & {p.text for p in s["heldout"].prompts}
    assert result.heldout_nll == pytest.approx(score(toy_lm, s["heldout"], Steering(
        s["layer"], result.vector)).mean_nll(), abs=1e-5)


def test_cleanup_without_l1_lowers_the_task_loss(toy_lm, setup):
    s = setup
    result = cleanup(toy_lm, s["sae"], s["layer"], s["tv"], s["train"],
                     cfg=CleanupConfig(max_steps=60, lam=0.0, progress=False))
    assert result.nll[-1] < result.nll[0]


def test_early_stopping_fires(toy_lm, setup):
    s = setup
    result = cleanup(toy_lm, s["sae"], s["layer"], s["tv"], s["train"],
                     cfg=CleanupConfig(max_steps=500, patience=5, lam=0.0, lr=1e-4,
                                       progress=False))
    assert result.stopped_early and result.steps < 500
    assert result.steps <= 6 + result.l0.index(min(result.l0)) + 5


def test_same_seed_same_result(toy_lm, setup):
    s = setup
    a = cleanup(toy_lm, s["sae"], s["layer"], s["tv"], s["train"], cfg=FAST, seed=1)
    b = cleanup(toy_lm, s["sae"], s["layer"], s["tv"], s["train"], cfg=FAST, seed=1)
    assert a.loss == b.loss and torch.equal(a.weights, b.weights)


def test_an_sae_with_nan_weights_is_refused_not_blamed_on_lr(toy_lm, setup):
    s = setup
    broken = copy.deepcopy(s["sae"])
    with torch.no_grad():
        broken.b_dec[0] = float("nan")          # every steering vector would be NaN
    with pytest.raises(ValueError, match="holds 1 NaN or infinite values in b_dec"):
        cleanup(toy_lm, broken, s["layer"], s["tv"], s["train"], cfg=FAST)


def test_a_diverging_cleanup_is_refused_not_returned_as_cleaned(toy_lm, setup):
    s = setup
    with pytest.raises(CleanupDiverged, match="diverged: the training objective .* rose from "
                                              ".*layer 3.*lower CleanupConfig.lr"):
        cleanup(toy_lm, s["sae"], s["layer"], s["tv"], s["train"],
                cfg=CleanupConfig(lr=1e3, max_steps=60, patience=200, progress=False))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_task_vector_is_refused(toy_lm, setup, bad):
    s = setup
    tv = s["tv"].clone()
    tv[5] = bad
    with pytest.raises(ValueError, match="tv holds 1 NaN or infinite.*pass a finite"):
        cleanup(toy_lm, s["sae"], s["layer"], tv, s["train"], cfg=FAST)


def test_a_task_vector_of_the_wrong_shape_is_refused(toy_lm, setup):
    s = setup
    with pytest.raises(ValueError, match=r"tv must be one vector.*shape \(128,\).*shape \(64,\)"):
        cleanup(toy_lm, s["sae"], s["layer"], s["tv"][:64], s["train"], cfg=FAST)
    with pytest.raises(ValueError, match=r"shape \(2, 128\)"):
        cleanup(toy_lm, s["sae"], s["layer"], s["tv"].expand(2, 128), s["train"], cfg=FAST)


def test_the_sae_of_another_layer_is_refused(toy_lm, setup):
    s = setup
    with pytest.raises(ValueError, match="resid_pre 4"):
        cleanup(toy_lm, load_sae("toy", 4, device="cpu"), s["layer"], s["tv"], s["train"],
                cfg=FAST)


@pytest.mark.parametrize("field, value, fix", [
    ("lam", -0.1, "lam=0.02"), ("lam", float("nan"), "lam=0.02"), ("lam", math.inf, "lam=0.02"),
    ("lr", 0.0, "lr=0.01"), ("lr", -1e-3, "lr=0.01"), ("lr", math.inf, "lr=0.01"),
    ("max_steps", 0, "max_steps=1000"), ("patience", 0, "patience=200"),
    ("pursuit_l0", 0, "pursuit_l0=7"), ("max_steps", 2.5, "max_steps=1000"),
    ("init", "random", "one of 'encoder', 'pursuit'; pass e.g. init='encoder'"),
    ("activation", "gelu", "one of 'sae', 'relu'; pass e.g. activation='sae'"),
    ("units", "authors", "one of 'norm_scaled', 'sae'; pass e.g. units='norm_scaled'"),
    ("pursuit_selection", "best",
     "one of 'inactive', 'all'; pass e.g. pursuit_selection='inactive'"),
    ("progress", "false", "True or False; pass e.g. progress=True"),
])
def test_invalid_config_is_refused_with_field_value_and_fix(field, value, fix):
    with pytest.raises(ValueError) as err:
        CleanupConfig(**{field: value})
    message = str(err.value)
    assert f"CleanupConfig.{field}={value!r}" in message and fix in message


def test_pursuit_initialisation(setup):
    theta = initial_theta(setup["sae"], setup["tv"], init="pursuit", pursuit_l0=7)
    assert 0 < int((theta > 0).sum()) <= 7
    with pytest.raises(ValueError, match="init must be"):
        initial_theta(setup["sae"], setup["tv"], init="random")


def test_pursuit_initialisation_takes_the_selection_rule():
    sae = SAE.from_dict(StandardSAEConfig(d_in=2, d_sae=4).to_dict())
    with torch.no_grad():
        sae.W_dec.copy_(HAND_D)                 # where the rules differ (test_pursuit)
    thetas = {}
    for selection in ("inactive", "all"):
        thetas[selection] = initial_theta(sae, HAND_X, init="pursuit", pursuit_l0=3,
                                          pursuit_selection=selection)
        w = gradient_pursuit(HAND_X, HAND_D, 3, selection=selection).weights[0]
        assert torch.equal(thetas[selection], torch.where(w > 0, w, -1.0))
    assert not torch.equal(thetas["inactive"], thetas["all"])


def test_cleanup_passes_the_pursuit_selection_on(toy_lm, setup, monkeypatch):
    s = setup
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("selection"))
        return gradient_pursuit(*args, **kwargs)

    monkeypatch.setattr(tvlib.pursuit, "gradient_pursuit", spy)
    for selection in ("all", "inactive"):
        cleanup(toy_lm, s["sae"], s["layer"], s["tv"], s["train"], cfg=CleanupConfig(
            max_steps=1, init="pursuit", pursuit_selection=selection, progress=False))
    assert seen == ["all", "inactive"]


def test_cleanup_leaves_the_callers_random_state_alone(toy_lm, setup):
    s = setup
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    cleanup(toy_lm, s["sae"], s["layer"], s["tv"], s["train"],
            cfg=CleanupConfig(max_steps=2, progress=False), seed=7)
    assert torch.equal(torch.rand(3), expected)
