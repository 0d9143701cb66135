"""Steering with single SAE features, batched over a (task x feature) grid.

For each task's prompts and each feature f, ``scale * W_dec[f] / ||W_dec[f]||``
is added at the steer token (the separator of zero-shot prompts, or ``Y`` of
detector prompts) and the answer NLL is compared with the unsteered NLL.
Many features share one forward pass: the prompts are repeated once per
feature and each copy gets its own vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from .checks import FINITE, OPTIONAL_INT, POSITIVE_INT, check, validate
from .interventions import Steering
from .scoring import score
from .saes import check_sae_site
from .prompt_batch import PromptBatch
from .sae_views import check_features



@dataclass(frozen=True)
class SteeringConfig:
    """How single features steer (notebook 06): ``scale`` times the feature's unit
    decoder direction, in units of the residual norm the SAE expects; ``random_seed``: a
    random unit direction of that seed at the same scale, the matrix's control column
    (None: no control)."""

    scale: float = 20.0
    random_seed: int | None = 0

    def __post_init__(self):
        validate(self, scale=FINITE, random_seed=OPTIONAL_INT)


TASK_STEERING = SteeringConfig()                  # the writeup's scale for task features
DETECTOR_STEERING = SteeringConfig(scale=25.0)    # and for detector features (layer 11)


def feature_directions(sae, features) -> torch.Tensor:
    """(n_features, d) unit decoder directions."""
    features = check_features(sae, features)
    rows = torch.as_tensor(features, dtype=torch.long, device=sae.W_dec.device)
    W = sae.W_dec.detach()[rows].float().cpu()                             # (n, d)
    norms = W.norm(dim=-1, keepdim=True)
    if (norms == 0).any():
        dead = [f for f, n in zip(features, norms.flatten().tolist()) if n == 0]
        raise ValueError(f"features {dead} have an all-zero decoder row: they have no "
                         "direction to steer with; leave them out")
    return W / norms


def repeat_batch(batch: PromptBatch, times: int) -> PromptBatch:
    """``times`` copies of the batch stacked along rows (copy-major)."""
    index = torch.arange(len(batch)).repeat(times)
    return batch.select(index)


def steering_grid(lm, batches: dict[str, PromptBatch], layer: int, sae, features,
                  scale: float, features_per_pass: int = 16,
                  batch_size: int = 256) -> pd.DataFrame:
    """Relative loss change of each (task, feature) when steering with the feature alone.

    Returns one row per (task, feature): loss, base_loss, relative_change =
    (loss - base_loss) / base_loss.
    """
    features = _check_grid(lm, batches, layer, sae, features, scale)
    check("features_per_pass", features_per_pass, POSITIVE_INT,
          "pass e.g. features_per_pass=16 (lower it if memory runs out)")
    directions = feature_directions(sae, features)                         # (F, d)
    rows = []
    for task, batch in batches.items():
        base = score(lm, batch, batch_size=batch_size).nll.mean().item()
        for start in range(0, len(features), features_per_pass):
            block = directions[start:start + features_per_pass]            # (f, d)
            big = repeat_batch(batch, len(block))                         # (f*B) rows
            vectors = (scale * block).repeat_interleave(len(batch), dim=0)  # (f*B, d)
            nll = score(lm, big, Steering(layer, vectors), batch_size).nll
            for feature, loss in zip(features[start:start + len(block)],
                                     nll.view(len(block), len(batch)).mean(1).tolist()):
                rows.append({"task": task, "feature": feature, "loss": loss,
                             "base_loss": base, "relative_change": (loss - base) / base})
    return pd.DataFrame(rows)


def steering_grid_loop(lm, batches: dict[str, PromptBatch], layer: int, sae, features,
                       scale: float) -> pd.DataFrame:
    """The same grid, one forward pass per cell (the reference for tests and benchmarks)."""
    features = _check_grid(lm, batches, layer, sae, features, scale)
    directions = feature_directions(sae, features)
    rows = []
    for task, batch in batches.items():
        base = score(lm, batch).nll.mean().item()
        for feature, direction in zip(features, directions):
            loss = score(lm, batch, Steering(layer, scale * direction)).nll.mean().item()
            rows.append({"task": task, "feature": feature, "loss": loss, "base_loss": base,
                         "relative_change": (loss - base) / base})
    return pd.DataFrame(rows)


def _check_grid(lm, batches, layer: int, sae, features, scale: float) -> list[int]:
    """The grid's inputs checked: the SAE reads ``layer``, the features are its own."""
    check_sae_site(sae, lm, layer)
    features = check_features(sae, features)
    if not features:
        raise ValueError("no features to steer with: pass at least one feature index")
    if not isinstance(batches, dict) or not batches:
        raise ValueError("batches must be a non-empty dict {task name: PromptBatch}")
    check("scale", scale, FINITE, "pass e.g. scale=20.0 (the writeup: 20 for task features, "
          "25 for detectors)")
    return features
