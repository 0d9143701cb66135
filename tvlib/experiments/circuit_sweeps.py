"""Notebook 07: each task's feature circuit over the SAE layers, and how it compares with
the features cleanup keeps."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from ..checks import check_config
from ..circuits import CircuitConfig, feature_circuit
from ..saes import model_shelf
from .prompt_setup import PromptConfig, layers_with_sae, prompt_config
from .runner import run_per_task


def run_circuit_sweep(lm, tasks, layers=None, prompt_cfg: PromptConfig | None = None,
                      circuit_cfg: CircuitConfig | None = None,
                      refresh: bool = False) -> dict[str, pd.DataFrame]:
    """``circuits.feature_circuit`` of each task on its few-shot prompts, with the SAEs of
    ``layers`` (None: every layer with an SAE) spliced in; cached per task.

    Returns the tables ``nodes``, ``exact``, ``faithfulness``, ``totals`` (each with a
    ``task`` column) and ``cost`` (seconds per task, as computed; a cached task keeps
    the seconds of the run that computed it).
    """
    prompt_cfg = prompt_cfg or prompt_config(lm)
    circuit_cfg = circuit_cfg or CircuitConfig()
    check_config("circuit_cfg", circuit_cfg, CircuitConfig)
    layers = layers_with_sae(lm, layers)
    shelf = model_shelf(lm)

    def compute(prompts):
        start = time.perf_counter()
        tables = feature_circuit(lm, prompts.few_shot, {layer: shelf[layer] for layer in layers},
                                 circuit_cfg)
        seconds = time.perf_counter() - start
        name = prompts.task.name
        out = {part: table.assign(task=name) for part, table in tables.items()}
        out["cost"] = pd.DataFrame([{"task": name, "seconds": seconds,
                                     "n_prompts": len(prompts.few_shot)}])
        return out

    return run_per_task("feature_circuits", lm, tasks, prompt_cfg,
                        {"layers": layers, "circuit": circuit_cfg}, compute, refresh,
                        sae_layers=layers)


def attribution_agreement(exact: pd.DataFrame) -> pd.DataFrame:
    """Per estimator (attribution patching, integrated gradients), how its node effects
    agree with exact ablation over the ``exact`` table's nodes: Pearson correlation, the
    share of nodes whose sign it gets right, and the worst absolute error."""
    rows = []
    for column, name in (("effect", "attribution patching"),
                         ("effect_ig", "integrated gradients")):
        pairs = exact[[column, "exact"]].dropna()
        if pairs.empty:
            continue
        error = (pairs[column] - pairs.exact).abs()
        rows.append({"estimator": name, "n_nodes": len(pairs),
                     "correlation": pairs[column].corr(pairs.exact),
                     "sign_agrees": float((np.sign(pairs[column]) == np.sign(pairs.exact))
                                          .mean()),
                     "worst_error": float(error.max())})
    return pd.DataFrame(rows)
