"""The writeup's early-layer experiment (method.md section 6): a task vector cleaned at an
early layer, added to zero-shot prompts there, read back at the task layer at the same
token and seen through that layer's SAE, beside the plain task-layer TV's encoding.

If the cleaned vector drives the model's own task representation, its read-back shares the
TV's top features and weighs the task features more; if it were a fine-tune that happens
to work, it need not. Controls: the same read with the uncleaned early TV, and with no
vector.
"""

from __future__ import annotations

import torch

from .interventions import Steering, apply_steering, check_batch_size
from .models import check_layer, resid_pre, trace
from .prompt_batch import PromptBatch
from .saes import check_sae_site


def read_through(lm, batch: PromptBatch, steering: Steering | None, read_layer: int,
                 batch_size: int = 32) -> torch.Tensor:
    """Mean resid_pre ``read_layer`` at each prompt's steer token, with ``steering`` (at an
    earlier layer, the same token) applied: (d,) float32 on the CPU."""
    check_layer(lm, read_layer)
    check_batch_size(batch_size)
    if steering is not None and steering.layer > read_layer:
        raise ValueError(f"the vector enters at layer {steering.layer}, after the read at "
                         f"layer {read_layer}: read at or after the layer it enters")
    total = None
    with torch.no_grad():
        for chunk in batch.chunks(batch_size):
            rows = torch.arange(len(chunk))
            with trace(lm, chunk.model_inputs()) as tracer:
                apply_steering(lm, steering, chunk)
                saved = resid_pre(lm, read_layer)[rows, chunk.steer_pos].save()   # (b, d)
                tracer.stop()
            part = saved.float().sum(0).cpu()
            total = part if total is None else total + part
    return total / len(batch)


def encode(sae, layer: int, vector: torch.Tensor) -> torch.Tensor:
    """The SAE encoding (F,) of a vector read at resid_pre ``layer``, float32 on the CPU."""
    check_sae_site(sae, None, layer)
    with torch.no_grad():
        return sae.encode(vector.to(sae.W_dec)[None])[0].float().cpu()


def top_features(weights: torch.Tensor, k: int) -> list[int]:
    """The ``k`` largest positive weights' features, largest first (fewer if fewer are
    active)."""
    order = weights.argsort(descending=True)[:k]
    return [int(i) for i in order if weights[i] > 0]


def compare_encodings(read: torch.Tensor, reference: torch.Tensor, task_features, k: int
                      ) -> dict:
    """How an encoding ``read`` (F,) relates to ``reference`` (F,) (the task-layer TV's):
    the share of the reference's top ``k`` features among read's top ``k``, the Pearson
    correlation of the weights over the features active in either, and how much of
    read's weight sits on ``task_features`` (those cleanup keeps at the task layer), with
    how many of them are in its top ``k``."""
    task_features = sorted({int(f) for f in task_features})
    top_read, top_ref = top_features(read, k), top_features(reference, k)
    active = ((read > 0) | (reference > 0)).nonzero().flatten()
    pair = torch.stack([read[active], reference[active]])
    correlation = float(torch.corrcoef(pair)[0, 1]) if len(active) > 1 else float("nan")
    total = float(read.sum())
    on_task = float(read[task_features].sum()) if task_features else 0.0
    return {"top_k_overlap": len(set(top_read) & set(top_ref)) / max(len(top_ref), 1),
            "weight_correlation": correlation,
            "task_weight_share": on_task / total if total > 0 else float("nan"),
            "task_features_in_top_k": len(set(top_read) & set(task_features)),
            "active_features": int((read > 0).sum())}
