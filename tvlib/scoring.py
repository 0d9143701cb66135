"""Scoring: the answer NLL and first-token accuracy of a batch of prompts, steered or not.

As method.md states: the negative log-likelihood of the answer summed over its first
``n_first`` tokens (teacher-forced), averaged over prompts, and greedy first-token
accuracy. Only the tokens ``PromptBatch.scored_tokens`` names are scored, each checked
at tokenization to be the answer's; padding never counts. The unembedding runs at the
positions that predict them only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .architectures import architecture, submodule
from .interventions import Steering, apply_steering, check_batch_size, check_start
from .models import d_model, trace
from .prompt_batch import PromptBatch


@dataclass
class Scores:
    """Per-prompt results of one scored batch."""

    nll: torch.Tensor            # (B,) summed over the first n_first answer tokens
    correct: torch.Tensor        # (B,) greedy first answer token is right
    first_targets: torch.Tensor  # (B,) the first answer token
    first_logits: torch.Tensor | None = None   # (B, V), kept only when asked (keep_logits)

    def mean_nll(self) -> float:
        return self.nll.mean().item()

    def accuracy(self) -> float:
        return self.correct.float().mean().item()

    def filtered_accuracy(self, allowed_tokens: torch.Tensor) -> float:
        """First-token accuracy with the argmax restricted to ``allowed_tokens`` (ids)."""
        if self.first_logits is None:
            raise ValueError("scores were computed without logits: call score(..., "
                             "keep_logits=True)")
        allowed_tokens = torch.as_tensor(allowed_tokens, dtype=torch.long)
        vocab = self.first_logits.shape[-1]
        if allowed_tokens.numel() == 0 or allowed_tokens.min() < 0 or allowed_tokens.max() >= vocab:
            raise ValueError(f"allowed_tokens must be a non-empty set of token ids 0..{vocab - 1}")
        masked = torch.full_like(self.first_logits, float("-inf"))
        masked[:, allowed_tokens] = self.first_logits[:, allowed_tokens]
        return (masked.argmax(-1) == self.first_targets).float().mean().item()


def score(lm, batch: PromptBatch, steering: Steering | None = None,
          batch_size: int = 64, keep_logits: bool = False) -> Scores:
    """Score the query answers of ``batch``, optionally steered.

    ``keep_logits`` keeps each prompt's first-token logits (B, V), for
    ``Scores.filtered_accuracy``; off by default, as V can be 256k.
    """
    check_batch_size(batch_size)
    check_scored(batch)
    if steering is not None:
        steering.check_fits(batch, d_model(lm))
    parts = []
    with torch.no_grad():
        for chunk in batch.chunks(batch_size):
            chunk_steering = steering
            if steering is not None and steering.vector.dim() == 2:
                rows = slice(len(parts) * batch_size, len(parts) * batch_size + len(chunk))
                chunk_steering = Steering(steering.layer, steering.vector[rows], steering.mode)
            with trace(lm, chunk.model_inputs()):
                apply_steering(lm, chunk_steering, chunk)
                logits = logits_at_targets(lm, chunk).save()                # (N, V)
            parts.append(score_tokens(logits.cpu(), chunk, keep_logits))
    joined = {f: torch.cat([getattr(p, f) for p in parts])
              for f in ("nll", "correct", "first_targets")}
    logits = torch.cat([p.first_logits for p in parts]) if keep_logits else None
    if not torch.isfinite(joined["nll"]).all():
        raise FloatingPointError(
            f"{int((~torch.isfinite(joined['nll'])).sum())} of {len(batch)} answer NLLs are NaN "
            "or inf: the model's logits are not finite (a steering vector far too large, or "
            "a float16 overflow: use float32 or bfloat16)")
    return Scores(**joined, first_logits=logits)


def check_scored(batch: PromptBatch) -> None:
    """Fail unless every prompt of ``batch`` has an answer token to score."""
    missing = (batch.target_pos[:, 0] < 0).nonzero().flatten().tolist()
    if missing:
        text = batch.prompts[missing[0]].text
        raise ValueError(
            f"{len(missing)} of {len(batch)} prompts have no answer to score (e.g. {text!r}): "
            "build them with the answer in the text (render(..., with_answer=True), as "
            "few_shot_prompts and zero_shot_prompts do)")


def scored_nll(token_logits: torch.Tensor, batch: PromptBatch) -> torch.Tensor:
    """(B,) NLL of each answer summed over its scored tokens (differentiable).

    token_logits: (N, V), the logits predicting each of ``batch.scored_tokens()``
    (what ``logits_at_targets`` returns).
    """
    rows, _, targets = batch.scored_tokens()
    logprobs = token_logits.float().log_softmax(-1)
    rows, targets = rows.to(logprobs.device), targets.to(logprobs.device)
    picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)         # (N,)
    return torch.zeros(len(batch), device=logprobs.device).index_add(0, rows, -picked)


def score_tokens(token_logits: torch.Tensor, batch: PromptBatch,
                 keep_logits: bool = False) -> Scores:
    """Scores from the logits predicting each scored token, (N, V) as above."""
    counts = (batch.target_pos >= 0).sum(-1)                                # (B,)
    # slots fill from the left, so each answer's first token opens its run of rows
    first = token_logits[counts.cumsum(0) - counts].float()                 # (B, V)
    first_targets = batch.targets[:, 0]
    correct = first.argmax(-1) == first_targets.to(first.device)
    return Scores(scored_nll(token_logits, batch), correct.cpu(), first_targets,
                  first if keep_logits else None)


def logits_at_targets(lm, batch: PromptBatch, start: int = 0) -> torch.Tensor:
    """Inside a trace: (N, V) logits predicting each of ``batch.scored_tokens()``.

    The unembedding's input is replaced by the (N, d) final hidden states that
    predict the scored tokens, so the unembedding (and any logit soft-capping
    after it) runs on those alone, as one matrix product: with a 262k-token
    vocabulary it is otherwise the largest cost of a step on small real models.
    ``start``: the batch position of the trace's first token, when the trace runs
    the prompts from there on (``steered_loss``).
    """
    rows, predict_pos, _ = batch.scored_tokens()
    check_start(predict_pos, start, "a token that predicts an answer")
    head = submodule(lm, architecture(lm).unembedding)
    head.input = head.input[rows, predict_pos - start]                      # (N, d)
    return lm.output.logits


def answer_nll(logits_at_targets: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) NLL of each answer summed over its scored tokens (differentiable), from logits
    gathered in the padded layout: the plain-PyTorch reference that tests and benchmarks
    compare ``score`` and ``scored_nll`` with.

    logits_at_targets: (B, n_first, V), the logits at target_pos - 1
    targets: (B, n_first) token ids, -1 where the answer has fewer tokens
    """
    logprobs = logits_at_targets.float().log_softmax(-1)
    targets = targets.to(logprobs.device)      # the last GPU's, under device_map="auto"
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * (targets >= 0)).sum(-1)
