import pytest
import torch

from tests.test_sae_views import ARCHITECTURES, random_sae
from tvlib.cleanup import CleanupConfig, CleanupDiverged, _activation, cleanup, initial_theta
from tvlib.models import load_sae
from tvlib.prompts import few_shot_prompts, tokenize_prompts, zero_shot_prompts
from tvlib.taskvec import Steering, score, task_vectors
from tvlib.tasks import load_task

TASK = load_task("antonyms")
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


@pytest.mark.parametrize("architecture", sorted(set(ARCHITECTURES) - {"topk"}))
def test_initial_weights_are_the_sae_encoding(architecture):
    sae = random_sae(architecture)
    tv = torch.randn(128)
    theta0 = initial_theta(sae, tv)
    torch.testing.assert_close(_activation(sae)(theta0), sae.encode(tv[None])[0])


def test_first_step_matches_plain_steering(toy_lm, setup):
    s = setup
    result = cleanup(toy_lm, s["sae"], s["layer"], s["tv"], s["train"], cfg=CleanupConfig(
        max_steps=1, progress=False))
    steered = score(toy_lm, s["train"], Steering(s["layer"], s["sae"].decode(
        result.initial_weights)))
    assert result.nll[0] == pytest.approx(steered.mean_nll(), abs=1e-5)


def test_cleanup_lowers_loss_and_l0_and_keeps_inactive_features_off(toy_lm, setup):
    s = setup
    result = cleanup(toy_lm, s["sae"], s["layer"], s["tv"], s["train"], s["heldout"],
                     CleanupConfig(max_steps=150, lam=0.05, progress=False))
    assert result.loss[-1] < result.loss[0]   # the task loss alone may rise as L1 prunes
    assert result.l0[-1] < result.l0[0]
    inactive = result.initial_weights == 0
    assert (result.weights[inactive] == 0).all()          # never revived
    assert ((result.weights > 0) <= (result.initial_weights > 0)).all()
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


def test_nan_stops_with_clear_error(toy_lm, setup):
    s = setup
    with pytest.raises(CleanupDiverged, match="at step 0 .*layer 3.*lower CleanupConfig.lr"):
        cleanup(toy_lm, s["sae"], s["layer"], torch.full_like(s["tv"], float("nan")),
                s["train"], cfg=FAST)


def test_pursuit_initialisation(setup):
    theta = initial_theta(setup["sae"], setup["tv"], init="pursuit", pursuit_l0=7)
    assert 0 < int((theta > 0).sum()) <= 7
    with pytest.raises(ValueError, match="init must be"):
        initial_theta(setup["sae"], setup["tv"], init="random")
