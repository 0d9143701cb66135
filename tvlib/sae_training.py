"""SAEs trained here with sae-lens on recorded residuals, and how good they are.

The one training path of every SAE built here (the embedded model's and the offline
Gemma's): residuals (N, d) of a layer go to ``train_sae``, which fits a sae-lens
training SAE with ``SAETrainer`` on them, shuffled with a seeded generator:

- ``architecture="batchtopk"``: BatchTopK with ``k`` active features per token on
  average; sae-lens saves it as a JumpReLU SAE whose threshold is the one BatchTopK
  learned (the offline Gemma SAEs);
- ``architecture="gated"``: a gated SAE with an L1 penalty (the embedded model's, the
  architecture of the writeup authors' SAEs).

``save_sae`` stores it in sae-lens's folder format, its matrices in ``save_dtype``
(loaded as float32), with the site it reads written into its metadata.
``text_residuals`` records what a model's SAEs train and are measured on, from text:
the residual of every token but the special ones. ``sae_quality`` and ``loss_change``
measure what a model card reports: FVU, L0 and dead fraction on held-out residuals,
and the change in next-token loss when the SAE's reconstruction replaces the residual
stream.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch


@dataclass(frozen=True)
class SAETrainingConfig:
    """Every setting of an SAE's training (the seed included)."""

    architecture: str = "batchtopk"  # or "gated"
    width: int = 3072               # features (d_sae)
    k: float = 40.0                 # BatchTopK: mean active features per token
    l1_coefficient: float = 4.0     # gated: the L1 penalty's weight
    lr: float = 1e-3
    threshold_lr: float = 0.05      # BatchTopK's running threshold (sae-lens default 0.01:
                                    # too slow to settle in a few hundred steps)
    batch_tokens: int = 4096
    epochs: int = 6                 # passes over the training residuals
    seed: int = 0
    save_dtype: str = "float16"     # matrices on disk (biases float32); loaded as float32


def residual_batches(resid: torch.Tensor, batch_tokens: int,
                     generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless float32 batches of rows of ``resid`` (N, d), reshuffled every pass."""
    n = resid.shape[0]
    if n < batch_tokens:
        raise ValueError(f"{n} residuals are fewer than one batch of {batch_tokens}: sample "
                         "more text or lower batch_tokens")
    while True:
        # drawn on the CPU whatever ``resid``'s device: the same order everywhere
        order = torch.randperm(n, generator=generator).to(resid.device)
        for start in range(0, n - batch_tokens + 1, batch_tokens):
            yield resid[order[start:start + batch_tokens]].float()


ARCHITECTURES = ("batchtopk", "gated")


def _training_sae(cfg: SAETrainingConfig, d_in: int):
    """The untrained sae-lens training SAE for ``cfg``; inputs are scaled to mean norm
    sqrt(d) in training, the scale folded into the saved weights."""
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig

    if cfg.architecture == "batchtopk":
        return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(
            d_in=d_in, d_sae=cfg.width, k=cfg.k, topk_threshold_lr=cfg.threshold_lr,
            normalize_activations="expected_average_only_in"))
    if cfg.architecture == "gated":
        return GatedTrainingSAE(GatedTrainingSAEConfig(
            d_in=d_in, d_sae=cfg.width, l1_coefficient=cfg.l1_coefficient,
            normalize_activations="expected_average_only_in", apply_b_dec_to_input=True))
    raise ValueError(f"architecture={cfg.architecture!r} is not trained here: pass one of "
                     f"{ARCHITECTURES}")


def train_sae(resid: torch.Tensor, hook_name: str, cfg: SAETrainingConfig, log=print,
              device: str = "cpu"):
    """An SAE trained on ``resid`` (N, d) on ``device`` ("cuda": the residuals move there
    whole, in their own dtype); returns the inference SAE on the CPU (BatchTopK is saved
    as JumpReLU, gated stays gated)."""
    os.environ.setdefault("WANDB_MODE", "disabled")
    from sae_lens import SAE
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(cfg.seed)
    d_in = resid.shape[1]
    sae = _training_sae(cfg, d_in).to(device)
    sae.cfg.metadata.hook_name = hook_name
    steps = cfg.epochs * (resid.shape[0] // cfg.batch_tokens)
    generator = torch.Generator().manual_seed(cfg.seed)
    sample = resid[torch.randperm(resid.shape[0], generator=generator)[:65536]].float()
    resid = resid.to(device)
    trainer = SAETrainer(
        cfg=SAETrainerConfig(
            total_training_samples=steps * cfg.batch_tokens,
            train_batch_size_samples=cfg.batch_tokens, lr=cfg.lr, lr_end=cfg.lr / 10,
            lr_scheduler_name="cosineannealing", lr_warm_up_steps=min(100, steps // 10),
            lr_decay_steps=0, device=device, dead_feature_window=max(50, steps // 10),
            feature_sampling_window=max(100, steps // 5), n_batches_for_norm_estimate=20,
            logger=LoggingConfig(log_to_wandb=False)),
        sae=sae,
        data_provider=residual_batches(resid, cfg.batch_tokens, generator))
    # sae-lens scales inputs to mean norm sqrt(d) and starts b_dec at zero. Gemma's
    # residual is ~90% one constant direction (its mean), which Adam's small steps on
    # b_dec would take thousands of steps to reach: start b_dec at the (scaled) mean.
    scaling = d_in ** 0.5 / sample.norm(dim=-1).mean().item()
    trainer.activation_scaler.scaling_factor = scaling
    with torch.no_grad():
        sae.b_dec.copy_(sample.mean(0).to(device) * scaling)
    trained = trainer.fit()
    log(f"  {hook_name}: {steps} steps of {cfg.batch_tokens} residuals")
    # through sae-lens's own inference format: BatchTopK becomes JumpReLU there
    with tempfile.TemporaryDirectory() as tmp:
        trained.save_inference_model(tmp)
        return SAE.load_from_disk(tmp, device="cpu")


def save_sae(sae, folder: Path, save_dtype: str = "float16"):
    """``sae`` in sae-lens's folder format, matrices in ``save_dtype``, config float32;
    returns the SAE read back from the folder (what is shipped, to be measured)."""
    from safetensors.torch import save_file
    from sae_lens import SAE

    from .cache import write_atomic

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, save_dtype)         # matrices only: biases and thresholds
    state = {name: tensor.detach().to(dtype if tensor.dim() == 2 else torch.float32).contiguous()
             for name, tensor in sae.state_dict().items()}      # are small, kept exact
    for name, tensor in state.items():
        if not torch.isfinite(tensor).all():
            raise FloatingPointError(f"{name} does not fit in {save_dtype}: save in float32")
    write_atomic(folder / "sae_weights.safetensors", lambda tmp: save_file(state, str(tmp)))
    config = sae.cfg.to_dict()
    config["dtype"] = "float32"     # computations stay float32 whatever the file holds
    write_atomic(folder / "cfg.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2)))
    return SAE.load_from_disk(str(folder), device="cpu")


def text_residuals(lm, ids: torch.Tensor, layers, batch_size: int = 64) -> dict[int, torch.Tensor]:
    """{resid_pre layer: (N, d) float32}: the residual at every token of ``ids`` (B, T)
    that is not a special token (BOS, end of text, padding), in row-major order."""
    from .interventions import collect_residuals

    special = torch.tensor(sorted(lm.tokenizer.all_special_ids))
    keep = ~torch.isin(ids, special)                                    # (B, T)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    resid = collect_residuals(lm, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                              list(layers), positions, batch_size)     # (L, B, T, d)
    return {layer: resid[i][keep] for i, layer in enumerate(layers)}


@torch.no_grad()
def sae_quality(sae, resid: torch.Tensor, batch: int = 8192) -> dict:
    """FVU, mean L0 and dead fraction of ``sae`` on residuals ``resid`` (N, d).

    FVU: squared reconstruction error over the residuals' total variance around their
    mean. Dead: features that fire on none of the ``N`` residuals.
    """
    error = total = l0 = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    mean = resid.float().mean(0)
    for start in range(0, resid.shape[0], batch):
        x = resid[start:start + batch].float()
        f = sae.encode(x)
        error += ((x - sae.decode(f)) ** 2).sum().item()
        total += ((x - mean) ** 2).sum().item()
        l0 += (f > 0).sum().item()
        fired |= (f > 0).any(0)
    return {"fvu": error / total, "l0": l0 / resid.shape[0],
            "dead_fraction": 1 - fired.float().mean().item(), "n_tokens": int(resid.shape[0])}


@torch.no_grad()
def feature_density(sae, resid: torch.Tensor, batch: int = 8192) -> torch.Tensor:
    """(d_sae,) the fraction of the residuals ``resid`` (N, d) each feature fires on.
    Dead features are those at zero on many tokens: a feature that fires once in 100k
    tokens is silent on most held-out sets of a few tens of thousands."""
    if resid.shape[0] == 0:
        raise ValueError("no residuals: a density needs at least one")
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long)
    device = sae.W_dec.device
    for start in range(0, resid.shape[0], batch):
        x = resid[start:start + batch].to(device, torch.float32)
        fired += (sae.encode(x) > 0).sum(0).cpu()
    return fired / resid.shape[0]


@torch.no_grad()
def loss_change(lm, saes: dict, rows: torch.Tensor, mask: torch.Tensor,
                means: dict[int, torch.Tensor], batch_size: int = 4) -> dict[int, dict]:
    """Next-token loss with resid_pre ``layer`` replaced by its SAE's reconstruction, and
    with it replaced by the layer's mean residual (mean ablation: the scale the change
    is read against).

    saes: {resid_pre layer: SAE}, each checked to read that layer; means: {layer: (d,)}
    the mean residual of the SAE's training tokens. rows (N, T) start with BOS, mask
    (N, T) marks the recorded tokens (``residual_store.text_rows``): their residuals are
    replaced, and each next token that is also recorded is scored.
    Per layer: the mean loss clean, spliced, mean-ablated; ``delta_loss`` (spliced -
    clean) with ``delta_loss_se``, its standard error over the rows, and ``recovered``,
    the fraction of the mean-ablation gap the SAE keeps: (mean-ablated - spliced) /
    (mean-ablated - clean).
    """
    from .interventions import check_batch_size
    from .models import resid_pre, trace
    from .saes import check_sae_site

    check_batch_size(batch_size)
    for layer, sae in saes.items():
        check_sae_site(sae, lm, layer)
        if layer not in means:
            raise ValueError(f"no mean residual for resid_pre {layer}: pass means[{layer}]")
    if rows.dim() != 2 or mask.shape != rows.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}; rows {tuple(rows.shape)} need "
                         "a mask of their own shape (build both with text_rows)")
    scored = mask[:, :-1] & mask[:, 1:]                    # (N, T - 1): predicts token p + 1
    if not scored.any():
        raise ValueError("no token to score: every row needs two recorded tokens in a row")
    runs = [("clean", None)] + [(kind, layer) for layer in saes for kind in ("sae", "mean")]
    losses = {run: [] for run in runs}
    for start in range(0, rows.shape[0], batch_size):
        x, m = rows[start:start + batch_size], mask[start:start + batch_size]
        inputs = {"input_ids": x, "attention_mask": torch.ones_like(x)}
        targets = x[:, 1:]
        for kind, layer in runs:
            with trace(lm, inputs):
                if layer is not None:
                    h = resid_pre(lm, layer)                              # (B, T, d)
                    sae = saes[layer]
                    x = h.to(sae.W_dec.device, torch.float32)  # the SAE may sit elsewhere
                    new = (sae.decode(sae.encode(x)) if kind == "sae"
                           else means[layer].float().expand(h.shape))
                    h[:] = torch.where(m[..., None].to(h.device), new.to(h.device, h.dtype), h)
                logits = lm.output.logits[:, :-1]                         # (B, T - 1, V)
                nll = torch.nn.functional.cross_entropy(
                    logits.float().transpose(1, 2), targets.to(logits.device),
                    reduction="none").save()                              # (B, T - 1)
            row_scored = scored[start:start + batch_size]
            losses[(kind, layer)].append((nll.cpu().double() * row_scored).sum(1))  # (B,)
    counts = scored.sum(1).double()                                  # (N,) tokens per row
    sums = {run: torch.cat(values) for run, values in losses.items()}   # (N,) nats per row
    mean = {run: (row_sums.sum() / counts.sum()).item() for run, row_sums in sums.items()}
    clean = mean[("clean", None)]
    results = {}
    for layer in saes:
        spliced, ablated = mean[("sae", layer)], mean[("mean", layer)]
        results[layer] = {"loss_clean": clean, "loss_sae": spliced, "loss_mean_ablated": ablated,
                          "delta_loss": spliced - clean,
                          "delta_loss_se": ratio_se(sums[("sae", layer)] - sums[("clean", None)],
                                                    counts),
                          "recovered": (ablated - spliced) / (ablated - clean)}
    return results


def ratio_se(sums: torch.Tensor, counts: torch.Tensor) -> float:
    """Standard error of sum(sums) / sum(counts), a per-token mean over rows of unequal
    length, with the rows as the sampled units (tokens of one text are not independent):
    the delta method's sqrt(N / (N - 1) * sum((s_i - mean * n_i)^2)) / sum(n_i). With
    equal counts it is the standard deviation of the row means over sqrt(N). Rows with
    no count are left out; NaN where fewer than two remain."""
    kept = counts > 0
    sums, counts = sums[kept].double(), counts[kept].double()       # (N,), (N,)
    n = sums.shape[0]
    if n < 2:
        return float("nan")
    mean = sums.sum() / counts.sum()
    spread = ((sums - mean * counts) ** 2).sum() * n / (n - 1)
    return (spread.sqrt() / counts.sum()).item()
