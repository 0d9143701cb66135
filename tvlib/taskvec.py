"""Task vectors: the mean residual at the separators of few-shot prompts (method.md section 1)."""

from __future__ import annotations

import torch

from .interventions import collect_residuals
from .prompt_batch import PromptBatch


def position_mean(resid: torch.Tensor) -> torch.Tensor:
    """(L, B, S, d) residuals, NaN where a prompt has no S-th position -> (L, d), their
    mean over every position present: the one definition of a mean-residual vector
    (task vectors, detector vectors, notebook 02's TV)."""
    return resid.flatten(1, 2).nanmean(1)


def task_vectors(lm, few_shot: PromptBatch, layers, positions: str = "all",
                 batch_size: int = 64) -> torch.Tensor:
    """Mean resid_pre at separators of the few-shot prompts, for each layer: (n_layers, d).

    positions="all": every separator of every prompt (the writeup's authors);
    positions="last": only each prompt's last separator (Hendel et al.).
    """
    if positions == "all":
        pos = few_shot.separator_pos
    elif positions == "last":
        last = (few_shot.separator_pos >= 0).sum(-1) - 1
        pos = few_shot.separator_pos.gather(1, last.unsqueeze(-1))
    else:
        raise ValueError(f"positions must be 'all' or 'last', not {positions!r}")
    resid = collect_residuals(lm, few_shot.model_inputs(), layers, pos, batch_size)   # (L, B, S, d)
    return position_mean(resid)
