import pytest
import torch

from tvlib.detectors import detector_prompts
from tvlib.saes import load_sae
from tvlib.prompt_batch import tokenize_prompts
from tvlib.prompts import zero_shot_prompts
from tvlib.steering import feature_directions, steering_grid, steering_grid_loop
from tvlib.tasks import load_task


@pytest.fixture(scope="module")
def batches(toy_lm):
    tok = toy_lm.tokenizer
    return {name: tokenize_prompts(tok, zero_shot_prompts(load_task(name).pairs[:10]))
            for name in ("antonyms", "en_es")}


def test_scale_zero_reproduces_base_loss(toy_lm, batches):
    grid = steering_grid(toy_lm, batches, 4, load_sae("toy", 4), [1, 2, 3], scale=0.0)
    # equal up to float rounding: the steered pass stacks 3 copies of the prompts, and a
    # matrix product of another height may round its last bit differently
    assert grid.loss.tolist() == pytest.approx(grid.base_loss.tolist(), rel=1e-6, abs=1e-9)
    assert grid.relative_change.abs().max() < 1e-6


def test_batched_grid_equals_per_cell_loop(toy_lm, batches):
    sae, features = load_sae("toy", 4), [5, 77, 300, 901, 1000]
    batched = steering_grid(toy_lm, batches, 4, sae, features, scale=20.0, features_per_pass=2)
    loop = steering_grid_loop(toy_lm, batches, 4, sae, features, scale=20.0)
    assert list(batched.columns) == ["task", "feature", "loss", "base_loss", "relative_change"]
    assert len(batched) == len(batches) * len(features)
    assert batched[["task", "feature"]].equals(loop[["task", "feature"]])
    torch.testing.assert_close(torch.tensor(batched.loss.values),
                               torch.tensor(loop.loss.values), rtol=1e-4, atol=1e-4)
    assert (batched.relative_change != 0).any()


def test_detector_prompts_steer_at_placeholder(toy_lm):
    batch = tokenize_prompts(toy_lm.tokenizer, detector_prompts(load_task("antonyms").pairs[:4]))
    grid = steering_grid(toy_lm, {"antonyms": batch}, 3, load_sae("toy", 3), [10], scale=25.0)
    assert len(grid) == 1


def test_directions_are_unit_and_empty_is_an_error(toy_lm, batches):
    d = feature_directions(load_sae("toy", 2), [0, 5])
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(2))
    with pytest.raises(ValueError, match="no features"):
        steering_grid(toy_lm, batches, 2, load_sae("toy", 2), [], 20.0)
