"""The columns of the experiments' score tables, and the names their rows use.

Every score row has ``task``; ``vector``, the kind of vector (``TV`` or
``DETECTOR``; empty for baselines); ``view``, how it is used (``RAW``, its SAE
reconstruction ``RECON``, ``ON_RECON``, ``ITO``, the cleanup's ``PURSUIT_START``,
``CLEANED``; for a baseline, which one: ``ZERO_SHOT``, ``ONE_SHOT``, ``ICL``);
``k``, the number of features asked of ITO or of the pursuit start (else empty);
``layer`` (empty for baselines); ``nll``, ``accuracy``, ``n_prompts``; and
``method``, the label figures and reports show, made from the others by
``method_label``. Select rows by the columns and these names, not by labels.

The controls beside the cleaned vector (``tvlib.controls``) add the vector
``RANDOM`` (a random direction) and the views ``SCALED`` (times ``scale``, a
column), ``BEST_SCALED`` (times the scale of a grid that is best on the training
prompts), ``AT_CLEANED_NORM`` (rescaled to the cleaned vector's norm; a random
direction has a ``seed`` column), ``TUNED_TOP_COSINE`` and ``TUNED_TOP_ENCODING``
(``k`` features picked by a rule that does not use the loss, then tuned).
"""

from __future__ import annotations

TV, DETECTOR = "TV", "detector"
ZERO_SHOT, ONE_SHOT, ICL = "zero-shot", "one-shot (X -> Y)", "ICL"
RAW, RECON, ON_RECON, ITO, PURSUIT_START, CLEANED = (
    "raw", "recon", "on recon", "ITO", "pursuit start", "cleaned")
BASELINES = (ZERO_SHOT, ONE_SHOT, ICL)
START_VIEWS = (RECON, PURSUIT_START)      # where a cleanup starts: the SAE encoding, or pursuit

# controls (tvlib.controls): a random direction, and views of a vector beside its cleanup
RANDOM = "random"
SCALED, BEST_SCALED, AT_CLEANED_NORM = "scaled", "best scaled", "at cleaned norm"
TUNED_TOP_COSINE, TUNED_TOP_ENCODING = "tuned top-cosine", "tuned top-encoding"
CONTROL_VIEWS = (SCALED, BEST_SCALED, AT_CLEANED_NORM, TUNED_TOP_COSINE, TUNED_TOP_ENCODING)


def method_label(vector: str | None, view: str, k: int | None = None, *,
                 scale: float | None = None, seed: int | None = None) -> str:
    """The label of a row: "zero-shot", "TV", "Recon of TV", "ITO (L0=40)", "cleaned TV",
    "TV x 0.5" (``scale``), "random at cleaned norm (seed 3)" (``seed``), ..."""
    if view in BASELINES:
        return view
    labels = {RAW: vector, RECON: f"Recon of {vector}", ON_RECON: f"{vector} on recon",
              ITO: f"ITO (L0={k})", PURSUIT_START: f"pursuit start (L0={k}) of {vector}",
              CLEANED: f"cleaned {vector}", SCALED: f"{vector} x {scale:g}"
              if scale is not None else None, BEST_SCALED: f"best-scaled {vector}",
              AT_CLEANED_NORM: f"{vector} at cleaned norm"
              + (f" (seed {seed})" if seed is not None else ""),
              TUNED_TOP_COSINE: f"top-cosine features of {vector}, tuned",
              TUNED_TOP_ENCODING: f"top-encoding features of {vector}, tuned"}
    if view not in labels:
        raise ValueError(f"unknown view {view!r}: one of {sorted(labels) + list(BASELINES)}")
    if labels[view] is None:
        raise ValueError(f"view {view!r} is labelled with its scale: pass scale=...")
    return labels[view]


def score_row(task: str, vector: str | None, view: str, layer, scores, k: int | None = None,
              **extra) -> dict:
    """One row of a score table from ``scoring.Scores``; ``extra`` columns after the scores
    (``scale`` and ``seed`` among them go into the label too)."""
    label = method_label(vector, view, k, scale=extra.get("scale"), seed=extra.get("seed"))
    return {"task": task, "method": label, "vector": vector,
            "view": view, "k": k, "layer": layer, "nll": scores.mean_nll(),
            "accuracy": scores.accuracy(), "n_prompts": len(scores.nll), **extra}
