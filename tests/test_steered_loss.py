"""SteeredNLL against whole-prompt forward passes of the plain Hugging Face model."""

import dataclasses
from pathlib import Path

import pytest
import torch

import tvlib.steered_loss
from tvlib.models import d_model, load_model
from tvlib.prompt_batch import tokenize_prompts
from tvlib.prompts import zero_shot_prompts
from tvlib.standins import make_standin
from tvlib.steered_loss import SteeredNLL

# Answers of one and two tokens and queries of different lengths: steer tokens at
# different positions of the left-padded batch.
PAIRS = [("hot", "cold"), ("france", "north america"), ("up", "down"), ("big", "small")]
LAYER = 2


@pytest.fixture(scope="module")
def models(toy_lm, tmp_path_factory):
    """The toy (Llama) and stand-ins of three other architectures."""
    out = {"toy": toy_lm}
    for name in ("gpt2", "gemma-2-2b", "gemma-3-270m"):       # GPT-2, Gemma 2, Gemma 3
        preset = make_standin(name, tmp_path_factory.mktemp(name))
        out[name] = load_model(str(Path(preset.model_id).parent), device="cpu")
    return out


def hf_blocks(lm):
    inner = lm._module
    return inner.model.layers if hasattr(inner, "model") else inner.transformer.h


def reference_nll(lm, batch, vector):
    """(B,) answer NLLs with ``vector`` added by a forward pre-hook, whole prompts."""
    rows = torch.arange(len(batch))

    def add(module, args, kwargs):
        h = args[0].clone()
        h[rows, batch.steer_pos] += vector
        return (h, *args[1:]), kwargs

    handle = hf_blocks(lm)[LAYER].register_forward_pre_hook(add, with_kwargs=True)
    try:
        logits = lm._module(**batch.model_inputs()).logits                   # (B, T, V)
    finally:
        handle.remove()
    logprobs = logits.float().log_softmax(-1)
    picked = logprobs[rows.unsqueeze(-1), (batch.target_pos - 1).clamp(min=0)].gather(
        -1, batch.targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * (batch.targets >= 0)).sum(-1)


@pytest.mark.parametrize("name", ["toy", "gpt2", "gemma-2-2b", "gemma-3-270m"])
def test_values_and_gradients_equal_whole_prompt_passes(models, name):
    lm = models[name]
    batch = tokenize_prompts(lm.tokenizer, zero_shot_prompts(PAIRS, task="mixed"))
    assert len(set(batch.steer_pos.tolist())) > 1            # the shortcut's hard case
    steered = SteeredNLL(lm, LAYER, batch)
    assert steered.start == int(batch.steer_pos.min()) > 0     # the shortcut is in use
    vector = torch.randn(d_model(lm), generator=torch.Generator().manual_seed(0))
    weights = torch.arange(1.0, len(batch) + 1)                # a gradient per prompt

    fast_v = vector.clone().requires_grad_(True)
    fast = steered(fast_v)
    (fast * weights).sum().backward()
    full_v = vector.clone().requires_grad_(True)
    full = reference_nll(lm, batch, full_v)
    (full * weights).sum().backward()

    torch.testing.assert_close(fast.detach(), full.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_v.grad, full_v.grad, rtol=1e-4, atol=1e-6)
    assert fast_v.grad.norm() > 0


def test_traces_run_only_the_tokens_that_matter(models):
    """Blocks from the layer on see tokens [earliest steer, last predicting] only; the
    unembedding gives one row per scored token."""
    lm = models["toy"]
    batch = tokenize_prompts(lm.tokenizer, zero_shot_prompts(PAIRS, task="mixed"))
    steered = SteeredNLL(lm, LAYER, batch)
    seen = []
    hooks = [hf_blocks(lm)[LAYER].register_forward_hook(
                 lambda m, args, out: seen.append(("block", tuple(args[0].shape)))),
             lm._module.lm_head.register_forward_hook(
                 lambda m, args, out: seen.append(("head", tuple(out.shape))))]
    try:
        steered(torch.zeros(d_model(lm)))
    finally:
        for hook in hooks:
            hook.remove()
    last_predicting = int((batch.target_pos - 1).max())
    width = last_predicting + 1 - int(batch.steer_pos.min())
    assert width < batch.input_ids.shape[1] - 2
    n_scored = int((batch.target_pos >= 0).sum())
    vocab = lm._module.config.vocab_size
    assert seen == [("block", (len(batch), width, d_model(lm))), ("head", (n_scored, vocab))]


def test_a_cache_that_does_not_reproduce_whole_prompts_runs_them_whole(models, monkeypatch):
    lm = models["toy"]
    batch = tokenize_prompts(lm.tokenizer, zero_shot_prompts(PAIRS, task="mixed"))
    prepare = SteeredNLL._prepare

    def broken_cache(self, start):             # keys of the earlier tokens zeroed
        prepare(self, start)
        if self.prefix is not None:
            for layer in self.prefix.layers:
                layer.keys.zero_()

    monkeypatch.setattr(tvlib.steered_loss.SteeredNLL, "_prepare", broken_cache)
    with pytest.warns(UserWarning, match="did not reproduce"):
        steered = SteeredNLL(lm, LAYER, batch)
    assert steered.start == 0 and steered.prefix is None
    vector = torch.randn(d_model(lm), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(steered(vector), reference_nll(lm, batch, vector),
                               rtol=1e-5, atol=1e-5)


def test_an_answer_before_the_steer_token_is_refused(models):
    lm = models["toy"]
    batch = tokenize_prompts(lm.tokenizer, zero_shot_prompts(PAIRS, task="mixed"))
    late = dataclasses.replace(batch, steer_pos=batch.target_pos[:, 0])   # on the answer
    with pytest.raises(ValueError, match="answer token before its steer token"):
        SteeredNLL(lm, LAYER, late)


def test_positions_before_the_traced_tokens_are_refused(models):
    """A trace of the prompts' later tokens cannot steer or score an earlier one: the
    shifted position would be negative and index from the end."""
    from tvlib.interventions import Steering, apply_steering
    from tvlib.scoring import logits_at_targets
    from tvlib.models import trace
    lm = models["toy"]
    batch = tokenize_prompts(lm.tokenizer, zero_shot_prompts(PAIRS, task="mixed"))
    start = int(batch.steer_pos.max()) + 1                 # after every steer token
    inputs = {k: v[:, start:] for k, v in batch.model_inputs().items()}
    inputs["attention_mask"] = batch.attention_mask
    with pytest.raises(ValueError, match="steer token is at position .* before the trace"):
        with trace(lm, inputs):
            apply_steering(lm, Steering(LAYER, torch.zeros(d_model(lm))), batch, start)
    with pytest.raises(ValueError, match="predicts an answer is at position .* before"):
        with trace(lm, inputs):
            logits_at_targets(lm, batch, start)
