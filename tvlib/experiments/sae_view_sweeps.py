"""Notebooks 02 and 03: the task vector seen through an SAE (Recon of TV, TV on recon,
ITO) at every layer with an SAE, and ITO's loss against its number of features."""

from __future__ import annotations

from typing import Iterator

import pandas as pd

from ..checks import check_config
from ..interventions import Steering, collect_residuals
from ..scoring import score
from ..models import check_layers
from ..saes import SAEShelf, check_sae_site, load_sae, model_shelf
from ..prompt_batch import PromptBatch
from ..sae_views import (ITOSweepConfig, SAEViewConfig, decode, encode, ito, recon_of_tv,
                         tv_on_recon)
from ..taskvec import position_mean, task_vectors
from .prompt_setup import (PromptConfig, TaskPrompts, build_task_prompts, layers_with_sae,
                           model_tasks, prompt_config)
from .runner import run_per_layer, run_per_task
from .schema import ITO, ON_RECON, RAW, RECON, TV, score_row


def run_sae_view_sweep(lm, tasks, layers=None, prompt_cfg: PromptConfig | None = None,
                       view_cfg: SAEViewConfig = SAEViewConfig(), batch_size: int = 32,
                       refresh: bool = False) -> pd.DataFrame:
    """TV, Recon of TV, TV on recon and ITO (``sae_view_layers``) with the zero-shot
    baselines for each task at every layer with an SAE (default), each (task, layer)
    cached."""
    layers = layers_with_sae(lm, layers)
    view_cfg = check_config("view_cfg", view_cfg, SAEViewConfig)
    saes = SAEShelf(lm.preset)              # each layer's SAE loaded once for every task
    return run_per_layer("sae_view_sweep", lm, tasks, layers, prompt_cfg or prompt_config(lm),
                         {"views": view_cfg},
                         lambda p, ls: sae_view_layers(lm, p, ls, view_cfg, batch_size, saes),
                         refresh, batch_size=batch_size)


def separator_residuals(lm, few_shot: PromptBatch, layers, batch_size: int = 32):
    """(L, B, S, d) resid_pre at every separator, NaN where absent."""
    return collect_residuals(lm, few_shot.model_inputs(), layers, few_shot.separator_pos,
                             batch_size)


def sae_view_layers(lm, prompts: TaskPrompts, layers, view_cfg: SAEViewConfig = SAEViewConfig(),
                    batch_size: int = 32,
                    saes: SAEShelf | None = None) -> Iterator[tuple[int, pd.DataFrame]]:
    """TV, Recon of TV, TV on recon and ITO at each layer, scored: yields (layer, rows)
    as each layer finishes.

    saes: the SAEs by layer (default: the preset's, loaded here)."""
    name = prompts.task.name
    saes = model_shelf(lm, saes)
    resid = separator_residuals(lm, prompts.few_shot, layers, batch_size)   # (L, B, S, d)
    tvs = position_mean(resid)                                              # (L, d)
    for layer, layer_resid, tv in zip(layers, resid, tvs):
        sae = saes[layer]
        check_sae_site(sae, lm, layer)
        views = [(RAW, None, tv), (RECON, None, recon_of_tv(sae, tv, layer)),
                 (ON_RECON, None, tv_on_recon(sae, layer_resid, layer)),
                 (ITO, view_cfg.target_l0,
                  ito(sae, tv, layer, view_cfg.target_l0, view_cfg.subtract_b_dec)[0])]
        yield layer, pd.DataFrame([
            score_row(name, TV, view, layer, score(lm, prompts.zero_shot,
                                                   Steering(layer, vector), batch_size), k=k)
            for view, k, vector in views])


def ito_sweep(lm, prompts: TaskPrompts, sae, layer: int,
              sweep_cfg: ITOSweepConfig = ITOSweepConfig(), batch_size: int = 32) -> pd.DataFrame:
    """Loss and active features of ITO for several target L0 at one layer (notebook 03).

    Rows: TV, Recon of TV (its L0 is the SAE encoding's) and ITO per target L0.
    """
    check_sae_site(sae, lm, layer)
    name = prompts.task.name
    tv = task_vectors(lm, prompts.few_shot, [layer], batch_size=batch_size)[0]
    code = encode(sae, tv)
    views = [(RAW, None, None, tv), (RECON, None, int((code > 0).sum()), decode(sae, code))]
    for k in sweep_cfg.target_l0s:
        vector, result = ito(sae, tv, layer, k, sweep_cfg.subtract_b_dec)
        views.append((ITO, k, int((result.weights > 0).sum()), vector))
    rows = []
    for view, k, l0, vector in views:
        scores = score(lm, prompts.zero_shot, Steering(layer, vector.detach()), batch_size)
        rows.append(score_row(name, TV, view, layer, scores, k=k, l0=l0))
    return pd.DataFrame(rows)


def run_ito_sweep(lm, tasks, layer: int, prompt_cfg: PromptConfig | None = None,
                  sweep_cfg: ITOSweepConfig = ITOSweepConfig(), batch_size: int = 32,
                  refresh: bool = False) -> pd.DataFrame:
    """``ito_sweep`` for each task at ``layer``, cached."""
    check_layers(lm, [layer])
    sweep_cfg = check_config("sweep_cfg", sweep_cfg, ITOSweepConfig)
    sae = load_sae(lm.preset, layer)
    settings = {"layer": layer, "ito": sweep_cfg}
    return run_per_task("ito_sweep", lm, tasks, prompt_cfg or prompt_config(lm), settings,
                        lambda p: ito_sweep(lm, p, sae, layer, sweep_cfg, batch_size),
                        refresh, sae_layers=[layer])


def first_pursuit_features(lm, tasks, sae, layer: int, n_features: int, density,
                           prompt_cfg: PromptConfig | None = None,
                           subtract_b_dec: bool = False) -> pd.DataFrame:
    """The features gradient pursuit picks first for each task's TV, with their density."""
    prompt_cfg = prompt_cfg or prompt_config(lm)
    check_sae_site(sae, lm, layer)
    rows = []
    for name, task in model_tasks(lm, tasks).items():
        prompts = build_task_prompts(lm.tokenizer, task, prompt_cfg)
        tv = task_vectors(lm, prompts.few_shot, [layer])[0]
        _, pursuit = ito(sae, tv, layer, n_features, subtract_b_dec)
        for rank, feature in enumerate(pursuit.order[0].tolist()):
            rows.append({"task": name, "rank": rank, "feature": feature,
                         "weight": pursuit.weights[0, feature].item(),
                         "density": density[feature].item()})
    return pd.DataFrame(rows)
