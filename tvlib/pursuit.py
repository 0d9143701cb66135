"""Gradient pursuit: sparse non-negative codes of vectors in an SAE's dictionary.

Inference-time optimisation (ITO) in method.md, batched over many vectors. With
dictionary D = W_dec (rows are features), weights w = 0 and an empty active set,
repeat ``target_l0`` times:

1. residual r = x - w D
2. correlations c = r D^T
3. pick a feature (``selection``, below) and add it to the active set
4. gradient g = c restricted to the active set
5. step size eta = <g D, r> / ||g D||^2 (exact line search along g)
6. w = max(w + eta g, 0)

``selection`` (step 3):

- ``"inactive"`` (default): the inactive feature with the largest c. The active
  set is kept between steps (a weight clipped to 0 stays in it), so it grows by
  exactly one feature per step and the pick order lists ``target_l0`` distinct
  features.
- ``"all"``: the argmax of c over ALL features, as method.md writes it and as the
  authors' code does. Their ``grad_pursuit_update_step`` in
  ``micrlhf/utils/ito.py`` of github.com/neverix/micrlhf-progress recomputes the
  active set every step as ``weights != 0`` plus the argmax
  (``selected_features = (weights != 0)``; ``idx = jnp.argmax(inner_products)``),
  so when the argmax is already active the set does not grow, and a weight
  clipped to 0 leaves the set (it can be picked again later). ``order`` then
  holds each step's argmax, possibly repeated; the final L0 can be below
  ``target_l0``. Their scripts call it as ``grad_pursuit(tv, sae["W_dec"], 20)``
  for task vectors and ``grad_pursuit(tv, sae["W_dec"], 7)`` for detectors
  (``sprint/run_task_vector_cleaning.py``, ``..._detectors.py``).

``step`` (step 6):

- ``"feasible"`` (default): step 6 as written can increase the reconstruction
  error, when clipping a weight at zero moves w off the search line. eta is
  therefore shortened to the largest step that keeps every weight non-negative;
  the error along the line is a convex quadratic that decreases up to the optimal
  eta, so the error never increases.
- ``"clip"``: step 6 exactly as written, the rule of the authors' code
  (``weights = jnp.maximum(weights + step_size * grad, 0)`` with their default
  ``pos_only=True``). ``selection="all", step="clip"`` is their whole algorithm.

Their code codes the raw vector (no b_dec subtracted, and it returns
``w W_dec`` without b_dec) with the raw decoder of their files; the result is
the same with tvlib's converted decoder (W_dec / n_out): scaling the whole
dictionary by a constant scales the weights by its inverse and leaves the picks
and the reconstruction unchanged.

``sae_pursuit`` is the one entry point from an SAE, for both of its uses:
``sae_views.ito`` (the ITO view) and ``feature_weights.initial_theta`` (the
pursuit start of a cleanup, for detectors). ``subtract_b_dec`` (default False, as
the authors did): whether to code ``x - b_dec`` rather than ``x``. Task vectors
are means of residuals, which already contain the mean that b_dec models, so the
default codes the vector as it is. How the weights are decoded is the caller's:
ITO steers with ``w W_dec`` (plus b_dec when it was subtracted); a cleanup decodes
every vector, its start included, with the SAE's decoder, ``w W_dec + b_dec``, as
the authors' cleanup does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STEPS = ("feasible", "clip")
SELECTIONS = ("inactive", "all")


@dataclass
class PursuitResult:
    weights: torch.Tensor        # (B, F) non-negative, at most target_l0 non-zero per row
    errors: torch.Tensor         # (n_iter + 1, B) squared reconstruction error per iteration
    order: torch.Tensor          # (B, target_l0) the feature picked at each step


def gradient_pursuit(x: torch.Tensor, dictionary: torch.Tensor, target_l0: int,
                     step: str = "feasible", selection: str = "inactive") -> PursuitResult:
    """Sparse non-negative codes of ``x`` (B, d) or (d,) in ``dictionary`` (F, d)."""
    if step not in STEPS:
        raise ValueError(f"step={step!r} is not a step rule: pass step='feasible' (never "
                         "increases the error) or step='clip' (the authors' rule)")
    if selection not in SELECTIONS:
        raise ValueError(f"selection={selection!r} is not a selection rule: pass "
                         "selection='inactive' (best inactive feature) or selection='all' "
                         "(argmax over all features, the authors' rule)")
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() != 2 or dictionary.dim() != 2:
        raise ValueError(f"x must have shape (d,) or (B, d) and the dictionary (F, d), not "
                         f"{tuple(x.shape)} and {tuple(dictionary.shape)}")
    if x.shape[-1] != dictionary.shape[-1]:
        raise ValueError(f"vectors have width {x.shape[-1]} but the dictionary's features have "
                         f"width {dictionary.shape[-1]}")
    if isinstance(target_l0, bool) or not isinstance(target_l0, int) \
            or not 1 <= target_l0 <= dictionary.shape[0]:
        raise ValueError(f"target_l0 must be an int between 1 and {dictionary.shape[0]} (the "
                         f"dictionary's features), not {target_l0!r}")
    for name, tensor in (("x", x), ("dictionary", dictionary)):
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{name} holds {int((~torch.isfinite(tensor)).sum())} NaN or "
                             f"infinite values: pass finite {name} (a NaN task vector comes "
                             "from prompts without a separator)")
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
        if selection == "inactive":
            pick = c.masked_fill(active, float("-inf")).argmax(-1)     # (B,)
        else:
            # the authors' rule: argmax over all features; the active set is
            # the non-zero weights plus this pick, recomputed every step
            pick = c.argmax(-1)
            active = w != 0
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


def sae_pursuit(sae, x: torch.Tensor, target_l0: int, step: str = "feasible",
                selection: str = "inactive", subtract_b_dec: bool = False) -> PursuitResult:
    """Gradient pursuit of ``x`` (d,) or (B, d) in the SAE's decoder rows ``W_dec`` (F, d),
    of ``x - b_dec`` when ``subtract_b_dec``; on the SAE's device, weights on the CPU."""
    D = sae.W_dec.detach().float()                                   # (F, d)
    b_dec = sae.b_dec.detach().float() if subtract_b_dec else 0
    return gradient_pursuit(x.detach().to(D) - b_dec, D, target_l0, step=step,
                            selection=selection)
