"""One figure style; every figure saved as PNG and PDF under ``figures/``."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .cache import write_atomic  # noqa: E402
from .paths import FIGURES_DIR  # noqa: E402

STYLE = {
    "figure.dpi": 110, "savefig.dpi": 150, "font.size": 9, "axes.titlesize": 10,
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
    "grid.alpha": 0.3, "legend.frameon": False,
}
# Colours and line styles per method, shared by every notebook's figure.
METHOD_STYLE = {
    "zero-shot": dict(color="0.5", linestyle=":"),
    "ICL": dict(color="black", linestyle="--"),
    "TV": dict(color="tab:blue", marker="o", markersize=3),
}


def save_figure(fig, name: str, out_dir: Path | None = None) -> list[Path]:
    """Save ``fig`` as ``{name}.png`` and ``{name}.pdf``; return the paths."""
    out_dir = Path(out_dir or FIGURES_DIR)
    paths = []
    for suffix in ("png", "pdf"):
        path = out_dir / f"{name}.{suffix}"
        write_atomic(path, lambda p, s=suffix: fig.savefig(p, format=s, bbox_inches="tight"))
        paths.append(path)
    return paths


def plot_loss_vs_layer(results: pd.DataFrame, metric: str = "nll", title: str = ""):
    """One panel per task: ``metric`` vs layer for layered methods, flat lines for baselines.

    ``results`` has columns task, method, layer (NaN for baselines) and ``metric``.
    """
    tasks = list(dict.fromkeys(results["task"]))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 2.6), squeeze=False,
                                 sharey=True)
        for ax, task in zip(axes[0], tasks):
            rows = results[results["task"] == task]
            for method, group in rows.groupby("method", sort=False):
                style = METHOD_STYLE.get(method, {})
                if group["layer"].isna().all():
                    ax.axhline(group[metric].mean(), label=method, **style)
                else:
                    group = group.sort_values("layer")
                    ax.plot(group["layer"], group[metric], label=method, **style)
            ax.set_title(task)
            ax.set_xlabel("layer (resid_pre)")
        axes[0][0].set_ylabel({"nll": "NLL of answer (first 2 tokens)",
                               "accuracy": "first-token accuracy"}.get(metric, metric))
        axes[0][-1].legend(loc="best")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
    return fig
