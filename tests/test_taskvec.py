"""Steering, extraction and scoring on the shipped embedded model, checked against
plain PyTorch (forward hooks, ``output_hidden_states``) rather than nnsight itself."""

import pytest
import torch

from tvlib.models import check_layer, load_model, n_layers
from tvlib.prompt_batch import tokenize_prompts
from tvlib.prompts import few_shot_prompts, zero_shot_prompts
from tvlib.interventions import Steering, collect_residuals
from tvlib.scoring import score
from tvlib.taskvec import task_vectors
from tvlib.tasks import load_task

TASK = load_task("antonyms").head(100)   # the pairs the embedded model knows


@pytest.fixture(scope="module")
def zero(toy_lm):
    return tokenize_prompts(toy_lm.tokenizer, zero_shot_prompts(TASK.pairs[:12]))


@pytest.fixture(scope="module")
def few(toy_lm):
    return tokenize_prompts(toy_lm.tokenizer, few_shot_prompts(TASK, 6, 4, seed=0))


def hf_forward(lm, batch, layer=None, edit=None):
    """Reference forward with a raw pre-hook on block ``layer`` applying ``edit(h)``."""
    model = lm._module
    handle = None
    if edit is not None:
        def hook(module, args, kwargs):
            h = args[0].clone()
            edit(h)
            return (h, *args[1:]), kwargs
        handle = model.model.layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            return model(**batch.model_inputs(), output_hidden_states=True)
    finally:
        if handle:
            handle.remove()


def reference_nll(logits, batch):
    logprobs = logits.log_softmax(-1)
    total = torch.zeros(len(batch))
    for row in range(len(batch)):
        for pos in batch.target_pos[row].tolist():
            if pos >= 0:
                total[row] -= logprobs[row, pos - 1, batch.input_ids[row, pos]]
    return total


def test_score_matches_plain_forward(toy_lm, zero):
    scores = score(toy_lm, zero, batch_size=5)   # several chunks
    logits = hf_forward(toy_lm, zero).logits
    torch.testing.assert_close(scores.nll, reference_nll(logits, zero), rtol=1e-4, atol=1e-4)
    first = logits[torch.arange(len(zero)), zero.target_pos[:, 0] - 1].argmax(-1)
    assert scores.correct.tolist() == (first == zero.targets[:, 0]).tolist()


def test_adding_zero_vector_changes_nothing(toy_lm, zero):
    base = score(toy_lm, zero)
    d = toy_lm._module.config.hidden_size
    for layer in (0, n_layers(toy_lm) - 1):
        steered = score(toy_lm, zero, Steering(layer, torch.zeros(d)))
        torch.testing.assert_close(steered.nll, base.nll, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["add", "replace"])
def test_steering_matches_forward_hook(toy_lm, zero, mode):
    layer = 3
    v = torch.randn(toy_lm._module.config.hidden_size, generator=torch.Generator().manual_seed(0))
    rows = torch.arange(len(zero))

    def edit(h):
        if mode == "add":
            h[rows, zero.steer_pos] += v
        else:
            h[rows, zero.steer_pos] = v

    expected = reference_nll(hf_forward(toy_lm, zero, layer, edit).logits, zero)
    steered = score(toy_lm, zero, Steering(layer, v, mode))
    torch.testing.assert_close(steered.nll, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(steered.nll, score(toy_lm, zero).nll)


def test_replace_with_own_residual_is_identity_and_add_equals_replace(toy_lm, zero):
    layer = 2
    h = collect_residuals(toy_lm, zero.model_inputs(), [layer], zero.steer_pos[:, None])[0, :, 0]
    base = score(toy_lm, zero)
    same = score(toy_lm, zero, Steering(layer, h, "replace"))           # per-row vectors
    torch.testing.assert_close(same.nll, base.nll, rtol=1e-5, atol=1e-5)
    v = torch.randn_like(h[0])
    added = score(toy_lm, zero, Steering(layer, v, "add"))
    replaced = score(toy_lm, zero, Steering(layer, h + v, "replace"))
    torch.testing.assert_close(added.nll, replaced.nll, rtol=1e-4, atol=1e-4)


def test_resid_pre_is_hf_hidden_states(toy_lm, few):
    hidden = hf_forward(toy_lm, few).hidden_states        # hidden_states[L] = resid_pre L
    layers = list(range(n_layers(toy_lm)))
    got = collect_residuals(toy_lm, few.model_inputs(), layers, few.separator_pos, batch_size=4)
    rows = torch.arange(len(few)).unsqueeze(-1)
    for layer in layers:
        torch.testing.assert_close(got[layer], hidden[layer][rows, few.separator_pos])
    # a subset out of order (the trace stops after the deepest layer read): same values
    some = collect_residuals(toy_lm, few.model_inputs(), [3, 0], few.separator_pos, batch_size=4)
    assert torch.equal(some[0].nan_to_num(), got[3].nan_to_num())
    assert torch.equal(some[1].nan_to_num(), got[0].nan_to_num())


def test_task_vector_is_mean_over_separators(toy_lm, few):
    hidden = hf_forward(toy_lm, few).hidden_states
    rows = torch.arange(len(few)).unsqueeze(-1)
    tv = task_vectors(toy_lm, few, [1, 4])
    for i, layer in enumerate([1, 4]):
        torch.testing.assert_close(tv[i], hidden[layer][rows, few.separator_pos].mean((0, 1)))
    last = task_vectors(toy_lm, few, [4], positions="last")[0]
    torch.testing.assert_close(last, hidden[4][torch.arange(len(few)), few.steer_pos].mean(0))


def test_bad_layer_and_mode(toy_lm):
    with pytest.raises(ValueError, match="layer 6 is out of range.*0..5"):
        check_layer(toy_lm, 6)
    with pytest.raises(ValueError, match="mode must be"):
        Steering(0, torch.zeros(3), "multiply")
    with pytest.raises(ValueError, match="unknown preset"):
        load_model("gemma-7b")


def test_logits_are_kept_only_on_request(toy_lm, zero):
    assert score(toy_lm, zero).first_logits is None
    kept = score(toy_lm, zero, keep_logits=True)
    assert kept.first_logits.shape == (len(zero), len(toy_lm.tokenizer))
    assert kept.filtered_accuracy(torch.arange(len(toy_lm.tokenizer))) == kept.accuracy()
    with pytest.raises(ValueError, match="keep_logits=True"):
        score(toy_lm, zero).filtered_accuracy(torch.tensor([1]))


def test_logits_only_at_scored_positions_match_full_logits(toy_lm):
    """The unembedding runs on the positions that predict answers only; same numbers."""
    from tvlib.prompts import zero_shot_prompts
    from tvlib.scoring import answer_nll
    batch = tokenize_prompts(toy_lm.tokenizer, zero_shot_prompts(
        [("hot", "cold"), ("france", "north america"), ("up", "down")], task="mixed"))
    seen = []
    hook = toy_lm._module.lm_head.register_forward_hook(
        lambda module, args, out: seen.append(tuple(out.shape)))
    try:
        scores = score(toy_lm, batch)
    finally:
        hook.remove()
    n_scored = int((batch.target_pos >= 0).sum())                 # 1 + 2 + 1 answer tokens
    assert n_scored == 4
    assert seen == [(n_scored, toy_lm._module.config.vocab_size)]   # scored tokens only
    logits = toy_lm._module(**batch.model_inputs()).logits                     # (B, T, V)
    rows = torch.arange(len(batch)).unsqueeze(-1)
    full = answer_nll(logits[rows, (batch.target_pos - 1).clamp(min=0)], batch.targets)
    torch.testing.assert_close(scores.nll, full, atol=1e-5, rtol=1e-5)
