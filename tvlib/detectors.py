"""Task detectors (method.md section 4): vectors read at the answers of demonstrations,
steered in at the placeholder answer ``Y`` of one-shot ``X -> Y`` prompts.

The detector vector is the mean resid_pre at the last token of every
demonstration's answer. Cleaning it starts from gradient pursuit with 7 features
(``DETECTOR_CLEANUP``), as the authors' detector script does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .cleanup import CleanupConfig
from .interventions import collect_residuals
from .prompt_batch import PromptBatch
from .prompts import fixed_demo_prompts, Prompt, PromptFormat
from .tasks import Task
from .taskvec import position_mean

PLACEHOLDER_PAIR = ("X", "Y")   # the literal one-shot example of detector prompts

# The authors' detector cleanup: pursuit start with k=7 features, lambda 5e-4.
DETECTOR_CLEANUP = CleanupConfig(init="pursuit", pursuit_l0=7, lam=5e-4)


def detector_prompts(pairs: Sequence[tuple[str, str]] | Task,
                     fmt: PromptFormat | str = "authors",
                     task: Task | str | None = None) -> list[Prompt]:
    """One-shot prompts with the literal placeholder ``X -> Y``, steered at ``Y``."""
    return fixed_demo_prompts(pairs, [PLACEHOLDER_PAIR], fmt, task, steer_at="first_answer")


def detector_vectors(lm, few_shot: PromptBatch, layers, batch_size: int = 64) -> torch.Tensor:
    """Mean resid_pre at the last token of every demonstration's answer: (n_layers, d).

    The "task detector" vector of method.md section 4; it is steered in at the
    placeholder ``Y`` of one-shot prompts (``detector_prompts``).
    """
    resid = collect_residuals(lm, few_shot.model_inputs(), layers, few_shot.answer_end_pos,
                              batch_size)                                 # (L, B, D, d)
    return position_mean(resid)
