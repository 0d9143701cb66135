"""The answer NLL of one batch under many steering vectors at one layer (cleanup's loss).

Cleanup scores the same prompts hundreds of times, each time with another
vector added at the same layer and tokens. What does not depend on the vector
is computed once:

- the blocks before the layer: their output is cached, and every trace skips them;
- the tokens before the earliest steer token: attention is causal, so in every
  block their keys and values do not depend on the vector. They are computed
  once, into the model's own key/value cache, and each trace runs only the
  tokens from the earliest steer token to the last one that predicts an answer
  (on zero-shot prompts, often one token of ten);
- the unembedding, only at the positions that predict scored tokens.

The shortcut is checked once, unsteered, against plain forward passes of the
whole prompts; where the model's cache does not reproduce them, every trace runs
the whole prompts instead (with a warning).
"""

from __future__ import annotations

import copy
import warnings

import torch

from .interventions import Steering, apply_steering, collect_residuals
from .models import blocks, check_layer, d_model, model_device, model_dtype, trace
from .prompt_batch import PromptBatch
from .scoring import check_scored, logits_at_targets, score, scored_nll


class SteeredNLL:
    """``SteeredNLL(lm, layer, batch)(vector)``: the (B,) answer NLLs with ``vector``
    (d,) or (B, d) added to resid_pre ``layer`` at each prompt's steer token,
    differentiable with respect to the vector."""

    def __init__(self, lm, layer: int, batch: PromptBatch):
        check_layer(lm, layer)
        check_scored(batch)
        rows, predict_pos, _ = batch.scored_tokens()
        early = predict_pos < batch.steer_pos[rows]
        if early.any():
            i = int(rows[early][0])
            raise ValueError(f"prompt {batch.prompts[i].text!r} has an answer token before its "
                             "steer token, which could not be steered: put the steer token "
                             "before the answer (the query's separator)")
        self.lm, self.layer, self.batch = lm, layer, batch
        self.end = int(predict_pos.max()) + 1         # later tokens predict nothing scored
        self._prepare(start=int(batch.steer_pos.min()))
        if self.start > 0 and not self._matches_full_prompts():
            warnings.warn(f"{type(lm._module).__name__}'s key/value cache did not reproduce "
                          "the unsteered answer NLLs of whole prompts: every step runs the "
                          "whole prompts instead (slower, same results)", stacklevel=2)
            self._prepare(start=0)

    def _prepare(self, start: int) -> None:
        """Cache what does not depend on the vector, for traces of tokens [start, end)."""
        self.start = start
        inputs = self.batch.model_inputs()
        self.resid = None
        if self.layer > 0:            # resid_pre ``layer`` of tokens [start, end): (B, T', d)
            positions = torch.arange(start, self.end).expand(len(self.batch), -1)
            resid = collect_residuals(self.lm, inputs, [self.layer], positions,
                                      len(self.batch))[0]
            self.resid = resid.to(device=model_device(self.lm), dtype=model_dtype(self.lm))
        self.prefix = None
        if start > 0:                 # keys and values of tokens [0, start), every block
            prefix = {k: v[:, :start] for k, v in inputs.items()}
            # logits_to_keep=1: the prefix's logits are never used, unembed only one position
            with torch.no_grad(), trace(self.lm, {**prefix, "use_cache": True,
                                                  "logits_to_keep": 1}):
                output = self.lm.output.save()
            self.prefix = output.past_key_values

    def __call__(self, vector: torch.Tensor) -> torch.Tensor:
        inputs = {k: v[:, self.start:self.end] for k, v in self.batch.model_inputs().items()}
        inputs["attention_mask"] = self.batch.attention_mask[:, :self.end]   # past and present
        if self.prefix is not None:    # a copy: the trace appends to the cache it is given
            inputs.update(past_key_values=copy.deepcopy(self.prefix), use_cache=True)
        saved = {}
        with trace(self.lm, inputs):
            if self.resid is not None:
                start = self.resid.clone()     # edited in place by the steering
                for block in blocks(self.lm)[:self.layer]:
                    block.skip(start)
            apply_steering(self.lm, Steering(self.layer, vector), self.batch, self.start)
            saved["nll"] = scored_nll(logits_at_targets(self.lm, self.batch, self.start),
                                      self.batch).save()
        return saved["nll"]

    def _matches_full_prompts(self) -> bool:
        with torch.no_grad():
            fast = self(torch.zeros(d_model(self.lm))).cpu()
        full = score(self.lm, self.batch, batch_size=len(self.batch)).nll
        tolerance = 1e-4 if model_dtype(self.lm) == torch.float32 else 1e-2
        return torch.allclose(fast, full, rtol=tolerance, atol=tolerance)
