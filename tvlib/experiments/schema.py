"""The columns of the experiments' score tables, and the names their rows use.

Every score row has ``task``; ``vector``, the kind of vector (``TV`` or
``DETECTOR``; empty for baselines); ``view``, how it is used (``RAW``, its SAE
reconstruction ``RECON``, ``ON_RECON``, ``ITO``, the cleanup's ``PURSUIT_START``,
``CLEANED``; for a baseline, which one: ``ZERO_SHOT``, ``ONE_SHOT``, ``ICL``);
``k``, the number of features asked of ITO or of the pursuit start (else empty);
``layer`` (empty for baselines); ``nll``, ``accuracy``, ``n_prompts``; and
``method``, the label figures and reports show, made from the others by
``method_label``. Select rows by the columns and these names, not by labels.
"""

from __future__ import annotations

TV, DETECTOR = "TV", "detector"
ZERO_SHOT, ONE_SHOT, ICL = "zero-shot", "one-shot (X -> Y)", "ICL"
RAW, RECON, ON_RECON, ITO, PURSUIT_START, CLEANED = (
    "raw", "recon", "on recon", "ITO", "pursuit start", "cleaned")
BASELINES = (ZERO_SHOT, ONE_SHOT, ICL)
START_VIEWS = (RECON, PURSUIT_START)      # where a cleanup starts: the SAE encoding, or pursuit


def method_label(vector: str | None, view: str, k: int | None = None) -> str:
    """The label of a row: "zero-shot", "TV", "Recon of TV", "ITO (L0=40)", "cleaned TV", ..."""
    if view in BASELINES:
        return view
    labels = {RAW: vector, RECON: f"Recon of {vector}", ON_RECON: f"{vector} on recon",
              ITO: f"ITO (L0={k})", PURSUIT_START: f"pursuit start (L0={k}) of {vector}",
              CLEANED: f"cleaned {vector}"}
    if view not in labels:
        raise ValueError(f"unknown view {view!r}: one of {sorted(labels) + list(BASELINES)}")
    return labels[view]


def score_row(task: str, vector: str | None, view: str, layer, scores, k: int | None = None,
              **extra) -> dict:
    """One row of a score table from ``engine.Scores``."""
    return {"task": task, "method": method_label(vector, view, k), "vector": vector,
            "view": view, "k": k, "layer": layer, "nll": scores.mean_nll(),
            "accuracy": scores.accuracy(), "n_prompts": len(scores.nll), **extra}
