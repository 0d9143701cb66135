"""Gradient pursuit: sparse non-negative codes of vectors in an SAE's dictionary.

Inference-time optimisation (ITO) in method.md, batched over many vectors. With
dictionary D = W_dec (rows are features), weights w = 0 and an empty active set,
repeat ``target_l0`` times:

1. residual r = x - w D
2. correlations c = r D^T
3. add the best inactive feature (largest c) to the active set
4. gradient g = c restricted to the active set
5. step size eta = <g D, r> / ||g D||^2 (exact line search along g)
6. w = max(w + eta g, 0)

Step 6 as written can increase the reconstruction error, when clipping a
weight at zero moves w off the search line. By default (``step="feasible"``)
eta is therefore shortened to the largest step that keeps every weight
non-negative; the error along the line is a convex quadratic that decreases
up to the optimal eta, so the error never increases. ``step="clip"`` is the
authors' exact rule.

``subtract_b_dec`` (default False, as the authors did): whether to code
``x - b_dec`` rather than ``x``. Task vectors are means of residuals, which
already contain the mean that b_dec models, so the default codes the vector as
it is; set it to True to decompose only the part b_dec does not explain (then
decode with ``w D + b_dec``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PursuitResult:
    weights: torch.Tensor        # (B, F) non-negative, at most target_l0 non-zero per row
    errors: torch.Tensor         # (n_iter + 1, B) squared reconstruction error per iteration
    order: torch.Tensor          # (B, target_l0) features in the order they were picked


def gradient_pursuit(x: torch.Tensor, dictionary: torch.Tensor, target_l0: int,
                     step: str = "feasible") -> PursuitResult:
    """Sparse non-negative codes of ``x`` (B, d) in ``dictionary`` (F, d)."""
    if step not in ("feasible", "clip"):
        raise ValueError(f"step must be 'feasible' or 'clip', not {step!r}")
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.shape[-1] != dictionary.shape[-1]:
        raise ValueError(f"vectors have width {x.shape[-1]} but the dictionary's features have "
                         f"width {dictionary.shape[-1]}")
    if not 1 <= target_l0 <= dictionary.shape[0]:
        raise ValueError(f"target_l0 must be between 1 and {dictionary.shape[0]}, got {target_l0}")
    D = dictionary.float()
    x = x.to(D)                                              # the dictionary's device
    B, F = x.shape[0], D.shape[0]
    rows = torch.arange(B, device=D.device)
    w = torch.zeros(B, F, device=D.device)
    active = torch.zeros(B, F, dtype=torch.bool, device=D.device)
    order = torch.empty(B, target_l0, dtype=torch.long, device=D.device)
    errors = [(x ** 2).sum(-1)]
    for i in range(target_l0):
        r = x - w @ D                                        # (B, d)
        c = r @ D.T                                          # (B, F)
        pick = c.masked_fill(active, float("-inf")).argmax(-1)
        active[rows, pick] = True
        order[:, i] = pick
        g = c * active                                       # (B, F)
        gD = g @ D                                           # (B, d)
        eta = (gD * r).sum(-1) / (gD ** 2).sum(-1).clamp(min=1e-12)   # (B,)
        if step == "feasible":
            # largest step keeping w + eta g >= 0 for weights moving down
            shrinking = (g < 0) & (w > 0)
            limit = torch.where(shrinking, w / (-g).clamp(min=1e-12), torch.inf).amin(-1)
            eta = torch.minimum(eta, limit)
        w = (w + eta[:, None] * g).clamp(min=0)
        errors.append(((x - w @ D) ** 2).sum(-1))
    return PursuitResult(w.cpu(), torch.stack(errors).cpu(), order.cpu())
