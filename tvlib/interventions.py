"""Interventions: where a vector enters the model, and where residuals are read.

``Steering`` adds (or writes) a vector into resid_pre ``layer`` at each prompt's steer
token; ``apply_steering`` does it inside a trace. ``collect_residuals`` reads resid_pre
at chosen positions of several layers, stopping the forward pass after the last.
What is measured with the model steered is ``scoring``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral

import torch

from .checks import POSITIVE_INT, check
from .models import check_layers, d_model, resid_pre, trace
from .prompt_batch import PromptBatch


@dataclass(frozen=True)
class Steering:
    """Add (or write) ``vector`` into resid_pre ``layer`` at each prompt's steer token."""

    layer: int
    vector: torch.Tensor     # (d,) or (B, d)
    mode: str = "add"        # "add" or "replace"

    def __post_init__(self):
        if self.mode not in ("add", "replace"):
            raise ValueError(f"steering mode must be 'add' or 'replace', not {self.mode!r}")
        if isinstance(self.layer, bool) or not isinstance(self.layer, Integral):
            raise ValueError(f"steering layer must be an int, not {self.layer!r}")
        if not isinstance(self.vector, torch.Tensor) or self.vector.dim() not in (1, 2):
            shape = tuple(getattr(self.vector, "shape", ()))
            raise ValueError(f"steering vector must be a tensor of shape (d,) or (B, d), not "
                             f"{type(self.vector).__name__} of shape {shape}")
        if self.vector.device.type == "meta":
            raise ValueError(f"the steering vector at layer {self.layer} is on the meta device "
                             "(a shape without values, e.g. from a remote model's skeleton): "
                             "compute it on a real device")
        # vectors under optimisation are checked by their optimiser (cleanup's loss)
        if not self.vector.requires_grad and not torch.isfinite(self.vector).all():
            raise ValueError(f"the steering vector at layer {self.layer} holds NaN or inf "
                             "values: check how it was computed (e.g. a task vector from "
                             "prompts with no separator)")

    def check_fits(self, batch: PromptBatch, width: int) -> None:
        """Fail unless the vector has the model's width and, if stacked, one row per prompt."""
        if self.vector.shape[-1] != width:
            raise ValueError(f"steering vector has width {self.vector.shape[-1]}, but the "
                             f"residual stream has width {width}: use a vector of this model")
        if self.vector.dim() == 2 and self.vector.shape[0] != len(batch):
            raise ValueError(f"a stack of {self.vector.shape[0]} steering vectors for "
                             f"{len(batch)} prompts: give one vector (d,) for all prompts or "
                             "exactly one row per prompt")


def apply_steering(lm, steering: Steering | None, batch: PromptBatch, start: int = 0) -> None:
    """Inside a trace: write the steering into the residual stream.

    ``start``: the batch position of the trace's first token (as above).
    """
    if steering is None:
        return
    h = resid_pre(lm, steering.layer)                  # (B, T, d)
    steering.check_fits(batch, d_model(lm))
    check_start(batch.steer_pos, start, "a steer token")
    rows = torch.arange(len(batch))
    vector = steering.vector.to(device=h.device, dtype=h.dtype)
    if steering.mode == "add":
        h[rows, batch.steer_pos - start] += vector
    else:
        h[rows, batch.steer_pos - start] = vector.expand(len(batch), -1).clone()


def check_start(positions: torch.Tensor, start: int, what: str) -> None:
    """Fail if a position lies before the trace's first token (it would index from the end)."""
    if start and int(positions.min()) < start:
        raise ValueError(f"{what} is at position {int(positions.min())}, before the trace's "
                         f"first token ({start}): start the trace at or before it")


def check_batch_size(batch_size: int) -> None:
    check("batch_size", batch_size, POSITIVE_INT,
          "pass e.g. batch_size=32 (lower it if memory runs out)")


def collect_residuals(lm, inputs: dict[str, torch.Tensor], layers, positions: torch.Tensor,
                      batch_size: int = 64) -> torch.Tensor:
    """Residuals at ``positions`` for several resid_pre layers, one trace per chunk.

    inputs: model inputs (``input_ids`` (B, T), ``attention_mask``, ...).
    positions: (B, S) token indices, -1 where absent.
    Returns (n_layers, B, S, d) in float32; absent entries are NaN.
    """
    layers = check_layers(lm, layers)
    check_batch_size(batch_size)
    in_order = sorted(set(layers))     # a trace must visit modules in forward order
    out = []
    with torch.no_grad():
        for start in range(0, positions.shape[0], batch_size):
            chunk = {k: v[start:start + batch_size] for k, v in inputs.items()}
            pos = positions[start:start + batch_size]
            rows = torch.arange(pos.shape[0]).unsqueeze(-1)
            saved = []   # filled inside the trace (names bound there are not closure-safe)
            with trace(lm, chunk) as tracer:
                for layer in in_order:
                    saved.append(resid_pre(lm, layer)[rows, pos.clamp(min=0)].save())
                tracer.stop()    # the later blocks and the unembedding are not needed
            stacked = torch.stack([saved[in_order.index(layer)].float().cpu()
                                   for layer in layers])
            out.append(stacked.masked_fill((pos < 0)[None, :, :, None], float("nan")))
    return torch.cat(out, dim=1)
