"""One figure style; every figure saved as PNG and PDF under ``figures/``.

The matplotlib backend is left alone: in Jupyter, figures show inline; a
headless run picks a non-interactive backend itself (or set MPLBACKEND=Agg).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .cache import write_atomic
from .experiments.schema import (CLEANED, DETECTOR, ICL, ITO, ON_RECON, ONE_SHOT, PURSUIT_START,
                                 RAW, RECON, START_VIEWS, TV, ZERO_SHOT)
from .paths import FIGURES_DIR

STYLE = {
    "figure.dpi": 110, "savefig.dpi": 150, "font.size": 9, "axes.titlesize": 10,
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
    "grid.alpha": 0.3, "legend.frameon": False,
}
# Colours and line styles per (vector, view) of a score row, shared by every figure.
# a cleanup's start view: (legend label, what its weights are called)
START_LABELS = {RECON: ("SAE encoding of TV", "encoding"),
                PURSUIT_START: ("pursuit start of TV", "pursuit")}

VIEW_STYLE = {
    (None, ZERO_SHOT): dict(color="0.5", linestyle=":"),
    (None, ONE_SHOT): dict(color="0.5", linestyle=":"),
    (None, ICL): dict(color="black", linestyle="--"),
    (TV, RAW): dict(color="tab:blue", marker="o", markersize=3),
    (TV, RECON): dict(color="tab:orange", marker="s", markersize=3),
    (TV, ON_RECON): dict(color="tab:green", marker="^", markersize=3),
    (TV, ITO): dict(color="tab:red", marker="d", markersize=3),
    (TV, PURSUIT_START): dict(color="tab:gray", marker="s", markersize=3),
    (TV, CLEANED): dict(color="tab:purple", marker="o", markersize=3),
    (DETECTOR, RAW): dict(color="tab:olive", marker="o", markersize=3),
    (DETECTOR, RECON): dict(color="tab:orange", marker="s", markersize=3),
    (DETECTOR, PURSUIT_START): dict(color="tab:gray", marker="s", markersize=3),
    (DETECTOR, CLEANED): dict(color="tab:brown", marker="o", markersize=3),
}
# Task vectors built or applied as Hendel et al. do (notebook 01's VARIANTS), by mode.
VARIANT_STYLE = {"add": dict(color="tab:blue", marker="o", markersize=3, linestyle="--"),
                 "replace": dict(color="tab:cyan", marker="v", markersize=3)}


@contextmanager
def styled():
    """``STYLE`` while a figure is built, leaving matplotlib's interactive mode as it is then.

    In Jupyter the inline backend switches interactive mode on when the first
    figure is made; a plain ``rc_context`` would switch it off again on exit,
    and no later figure would show.
    """
    with plt.rc_context(STYLE):
        yield
        interactive = matplotlib.is_interactive()
    matplotlib.interactive(interactive)


def row_style(row) -> dict:
    """The style of a score row, from its vector and view (and a task vector's variant)."""
    vector = row["vector"] if isinstance(row["vector"], str) else None
    variant = (row.get("mode", "add"), row.get("positions", "all"))
    if (vector, row["view"]) == (TV, RAW) and isinstance(variant[0], str) \
            and variant != ("add", "all"):
        return VARIANT_STYLE[variant[0]]
    return VIEW_STYLE.get((vector, row["view"]), {})


FIGURE_DPI = 200          # PNGs that read on paper drafts and slides (the PDF is vector)


def save_figure(fig, name: str, out_dir: Path | None = None) -> None:
    """Save ``fig`` as ``{out_dir}/{name}.png`` and ``.pdf`` (default out_dir: ``figures/``).

    Returns nothing, so that a notebook cell ending with it shows the figure, not paths.
    """
    out_dir = Path(out_dir or FIGURES_DIR)
    for suffix in ("png", "pdf"):
        path = out_dir / f"{name}.{suffix}"
        # no creation date in the metadata: the same figure gives the same bytes
        metadata = {"CreationDate": None} if suffix == "pdf" else {}
        write_atomic(path, lambda p, s=suffix, m=metadata: fig.savefig(
            p, format=s, bbox_inches="tight", metadata=m, dpi=FIGURE_DPI))


def plot_loss_vs_layer(results: pd.DataFrame, metric: str = "nll", title: str = ""):
    """One panel per task: ``metric`` vs layer for layered methods, flat lines for baselines.

    ``results`` is a score table (``tvlib.experiments.schema``): task, method, vector,
    view, layer (NaN for baselines) and ``metric``.
    """
    tasks = list(dict.fromkeys(results["task"]))
    with styled():
        fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 2.6), squeeze=False,
                                 sharey=True)
        for ax, task in zip(axes[0], tasks):
            rows = results[results["task"] == task]
            for method, group in rows.groupby("method", sort=False):
                style = row_style(group.iloc[0])
                if group["layer"].isna().all():
                    ax.axhline(group[metric].mean(), label=method, **style)
                else:
                    group = group.sort_values("layer")
                    ax.plot(group["layer"], group[metric], label=method, **style)
            ax.set_title(task)
            ax.set_xlabel("layer (resid_pre)")
        axes[0][0].set_ylabel({"nll": "NLL of answer (first 2 tokens)",
                               "accuracy": "first-token accuracy"}.get(metric, metric))
        axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0))
        if title:
            fig.suptitle(title)
        fig.tight_layout()
    return fig


def plot_ito_sweep(results: pd.DataFrame, title: str = ""):
    """Two panels: NLL and active features vs target L0; TV and Recon of TV as references.

    ``results`` is ``run_ito_sweep``'s table: views RAW, RECON and ITO (with k, its
    target L0), and columns l0, nll.
    """
    with styled():
        fig, (ax_loss, ax_l0) = plt.subplots(1, 2, figsize=(7.5, 2.8))
        for i, (task, rows) in enumerate(results.groupby("task", sort=False)):
            color = f"C{i}"
            ito = rows[rows.view == ITO].sort_values("k")
            ax_loss.plot(ito.k, ito.nll, marker="d", color=color, label=f"{task}: ITO")
            for view, name, style in ((RAW, "TV", "--"), (RECON, "Recon of TV", ":")):
                ref = rows[rows.view == view]
                ax_loss.axhline(ref.nll.iloc[0], color=color, linestyle=style,
                                label=f"{task}: {name}")
            ax_l0.plot(ito.k, ito.l0, marker="d", color=color, label=f"{task}: ITO")
            recon = rows[rows.view == RECON]
            ax_l0.axhline(recon.l0.iloc[0], color=color, linestyle=":",
                          label=f"{task}: SAE encoding")
        for ax in (ax_loss, ax_l0):
            ax.set_xscale("log")
            ax.set_xlabel("target L0")
        ax_loss.set_ylabel("NLL of answer (first 2 tokens)")
        ax_l0.set_ylabel("active features")
        ax_loss.legend(fontsize=6)
        ax_l0.legend(fontsize=6)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
    return fig


def plot_l0_per_task(scores: pd.DataFrame, layer: int, title: str = ""):
    """Active features of the cleanup's start (the SAE encoding, "Recon of TV", or the
    pursuit start with ``init="pursuit"``) vs the cleaned TV, per task."""
    rows = scores[(scores.layer == layer) & (scores.vector == TV)
                  & scores.view.isin([*START_VIEWS, CLEANED])]
    starts = [v for v in START_VIEWS if v in set(rows.view)]
    if len(starts) != 1 or CLEANED not in set(rows.view):
        raise ValueError(f"expected the TV rows of one cleanup at layer {layer} (a start view "
                         f"of {START_VIEWS} and {CLEANED!r}), found views "
                         f"{sorted(set(rows.view))}: pass run_cleanup_sweep's scores")
    start = starts[0]
    table = rows.pivot_table(index="task", columns="view", values="l0", sort=False)
    with styled():
        fig, ax = plt.subplots(figsize=(max(3.5, 0.45 * len(table) + 1.5), 2.8))
        x = range(len(table))
        ax.bar([i - 0.2 for i in x], table[start], 0.4, label=START_LABELS[start][0],
               color="tab:orange")
        ax.bar([i + 0.2 for i in x], table[CLEANED], 0.4, label="cleaned TV",
               color="tab:purple")
        ax.set_xticks(list(x), table.index, rotation=45, ha="right")
        ax.set_ylabel(f"non-zero features (layer {layer})")
        ax.legend()
        if title:
            ax.set_title(title)
        fig.tight_layout()
    return fig


def plot_feature_weights(features: pd.DataFrame, task: str, layer: int, top: int = 40):
    """Normalised feature weights where the cleanup starts (the SAE encoding, or the
    pursuit start) vs once cleaned (one task)."""
    rows = features[(features.task == task) & (features.layer == layer)]
    rows = rows.sort_values("start_weight", ascending=False).head(top)
    start = rows.start_weight / rows.start_weight.abs().max()
    cleaned = rows.cleaned_weight / max(rows.cleaned_weight.abs().max(), 1e-12)
    start_label, weight_name = START_LABELS[rows.start.iloc[0]]
    with styled():
        fig, ax = plt.subplots(figsize=(max(4.0, 0.16 * len(rows) + 1.5), 2.6))
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], start, 0.4, color="tab:blue", label=start_label)
        ax.bar([i + 0.2 for i in x], cleaned, 0.4, color="tab:red", label="cleaned TV")
        ax.set_xticks(list(x), rows.feature.astype(int), rotation=90, fontsize=6)
        ax.set_xlabel(f"feature (sorted by {weight_name} weight)")
        ax.set_ylabel("weight / max weight")
        ax.set_title(f"{task}, layer {layer}")
        ax.legend()
        fig.tight_layout()
    return fig


def plot_lambda_sweep(sweep: pd.DataFrame, title: str = ""):
    """Sparsity / loss trade-off: held-out NLL and active features vs lambda."""
    with styled():
        fig, ax = plt.subplots(figsize=(3.6, 2.6))
        ax.plot(sweep.lam, sweep.nll, marker="o", color="tab:purple", label="held-out NLL")
        ax.set_xscale("log")
        ax.set_xlabel("lambda")
        ax.set_ylabel("held-out NLL")
        twin = ax.twinx()
        twin.plot(sweep.lam, sweep.l0, marker="s", color="tab:gray", label="active features")
        twin.set_ylabel("active features")
        twin.spines["right"].set_visible(True)
        # one legend for both axes, below the plot: above it, it sat on the title
        lines = ax.get_lines() + twin.get_lines()
        ax.legend(lines, [line.get_label() for line in lines], loc="upper center",
                  bbox_to_anchor=(0.5, -0.28), ncols=2, fontsize=7, frameon=False)
        if title:
            ax.set_title(title)
        fig.tight_layout()
    return fig


def _feature_label(feature, feature_task: str) -> str:
    """'feature (task)'; a feature cleaned for several tasks ('a+b') names one per line: on
    one line the rotated label grew long enough to squeeze the heatmap to nothing."""
    tasks = feature_task.replace("+", ",\n")
    return f"{int(feature)} ({tasks})"


def plot_steering_matrix(grid: pd.DataFrame, clip: float = 1.0, title: str = ""):
    """Heatmap of relative loss change (task rows x feature columns), increases clipped; a
    random direction (``feature`` empty, ``seed`` set) is a column "random (seed s)"."""
    tasks = list(dict.fromkeys(grid.task))
    random = grid.feature.isna()
    seeds = grid["seed"] if "seed" in grid else pd.Series(pd.NA, index=grid.index)
    label = pd.Series([f"random (seed {s})" if r else _feature_label(f, t) for r, s, f, t in
                       zip(random, seeds, grid.feature, grid.feature_task)], index=grid.index)
    columns = list(dict.fromkeys(label))
    table = grid.assign(column=label).pivot_table(index="task", columns="column",
                                                  values="relative_change")
    values = table.loc[tasks, columns].clip(upper=clip)
    longest = max(len(line) for column in columns for line in column.split("\n"))
    with styled():
        # at least 6 inches wide, wider for a long title: a narrower axes puts the title
        # over the colorbar's label; taller where the rotated labels are longer than a task
        # name with its feature
        width = max(0.5 * len(columns) + 3.0, 6.0, 0.08 * len(title) + 2.6)
        height = 0.38 * len(tasks) + 1.6 + 0.05 * max(0, longest - 33)
        fig, ax = plt.subplots(figsize=(width, height))
        image = ax.imshow(values.values, cmap="RdBu_r", vmin=-1, vmax=clip, aspect="auto")
        for (row, col), value in np.ndenumerate(values.values):   # each cell's change
            if np.isfinite(value):
                ax.text(col, row, f"{value:+.2f}", ha="center", va="center", fontsize=5.5,
                        color="white" if abs(value) > 0.6 else "black")
        ax.set_xticks(range(len(columns)), columns, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(tasks)), tasks, fontsize=7)
        ax.set_xlabel("steering feature (task it was cleaned for)")
        ax.set_ylabel("evaluated task")
        ax.grid(False)
        fig.colorbar(image, ax=ax, label=f"relative loss change (clipped at {clip:g})")
        if title:
            ax.set_title(title)
        fig.tight_layout()
    return fig


def plot_feature_circuits(nodes: pd.DataFrame, exact: pd.DataFrame, faithfulness: pd.DataFrame,
                          title: str = ""):
    """Notebook 07's figure: (a) node effects estimated against exact ablation, (b) the
    faithfulness and completeness curves per task, (c) where the latents' effects sit:
    the |effect| of the table's latents summed by layer and position group, each layer's
    row normalised."""
    from .prompt_batch import TOKEN_GROUPS

    with styled():
        fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.8))
        ax = axes[0]
        for column, label, marker in (("effect", "attribution patching", "o"),
                                      ("effect_ig", "integrated gradients", "^")):
            if exact[column].notna().any():
                ax.scatter(exact.exact, exact[column], s=12, marker=marker, alpha=0.7,
                           label=label)
        low = float(np.nanmin(exact[["exact", "effect", "effect_ig"]].to_numpy()))
        high = float(np.nanmax(exact[["exact", "effect", "effect_ig"]].to_numpy()))
        ax.plot([low, high], [low, high], color="0.5", linestyle=":", label="y = x")
        ax.set_xlabel("exact effect (node ablated)")
        ax.set_ylabel("estimated effect")
        ax.set_title("(a) top nodes: estimate vs exact")
        ax.legend(fontsize=7, loc="upper left")

        ax = axes[1]
        for i, (task, rows) in enumerate(faithfulness.groupby("task", sort=False)):
            rows = rows[rows.n_nodes > 0]
            color = f"C{i % 10}"
            ax.plot(rows.n_nodes, rows.faithfulness, color=color, marker="o", markersize=3,
                    label=task)
            ax.plot(rows.n_nodes, rows.completeness, color=color, linestyle="--",
                    marker="x", markersize=3)
        ax.set_xscale("log")
        ax.set_xlabel("top nodes n")
        ax.set_ylabel("fraction of the loss gap recovered")
        ax.set_title("(b) keep top n (solid), ablate top n (dashed)")
        ax.legend(fontsize=6, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.2))

        ax = axes[2]
        latents = nodes[nodes.kind == "latent"]
        table = latents.assign(size=latents.effect.abs()).pivot_table(
            index="layer", columns="group", values="size", aggfunc="sum", fill_value=0.0)
        # groups where no latent of the table has an effect (e.g. template text) are left out
        table = table.reindex(columns=[g for g in TOKEN_GROUPS if g in table.columns
                                       and table[g].sum() > 0])
        shares = table.div(table.sum(axis=1).replace(0, np.nan), axis=0)
        image = ax.imshow(shares.values, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        for (row, col), value in np.ndenumerate(shares.values):
            if np.isfinite(value):
                ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if value > 0.6 else "black")
        ax.set_xticks(range(len(shares.columns)), shares.columns, rotation=45, ha="right")
        ax.set_yticks(range(len(shares.index)), [f"layer {i}" for i in shares.index])
        ax.set_title("(c) share of latents' |effect| by position")
        ax.grid(False)
        fig.colorbar(image, ax=ax, fraction=0.046)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
    return fig


def plot_further_experiments(early: pd.DataFrame, sentences: pd.DataFrame | None,
                             title: str = "", note: str = ""):
    """Notebook 08's figure: the early-layer read-back against the task-layer TV's encoding,
    (a) top-k overlap and (b) the weight share of the task features, per task and read;
    (c) sentence translation NLL per target token by condition (``note`` in its place
    when no sentence result exists, e.g. a vocabulary that lacks the words)."""
    with styled():
        fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.6))
        reads = list(dict.fromkeys(early.read))
        tasks = list(dict.fromkeys(early.task))
        width = 0.8 / len(reads)
        for ax, column, label in ((axes[0], "top_k_overlap", "top-k overlap with the TV"),
                                  (axes[1], "task_weight_share",
                                   "weight share of task features")):
            for i, read in enumerate(reads):
                rows = early[early.read == read].set_index("task").reindex(tasks)
                ax.bar(np.arange(len(tasks)) + i * width, rows[column], width, label=read)
            ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks, rotation=20,
                          ha="right")
            ax.set_ylabel(label)
        axes[0].set_title(f"(a) read at layer {int(early.task_layer.iloc[0])}, "
                          f"vector added at {int(early.early_layer.iloc[0])}")
        axes[1].set_title("(b) task features' share of the weight")
        axes[1].legend(fontsize=7)
        ax = axes[2]
        if sentences is None or sentences.empty:
            ax.text(0.5, 0.5, note or "no sentence results", ha="center", va="center",
                    wrap=True, fontsize=8, transform=ax.transAxes)
            ax.set_axis_off()
        else:
            conditions = list(dict.fromkeys(sentences.condition))
            names = list(dict.fromkeys(sentences.task))
            width = 0.8 / len(conditions)
            for i, condition in enumerate(conditions):
                rows = sentences[sentences.condition == condition].set_index("task").reindex(names)
                ax.bar(np.arange(len(names)) + i * width, rows.nll_per_token, width,
                       label=condition)
            ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2,
                          [f"{n} sentences" for n in names])
            ax.set_ylabel("NLL per target token")
            # the legend in a band above the tallest bar: anywhere inside it covered bars
            ax.set_ylim(0, 1.4 * np.nanmax(sentences.nll_per_token.to_numpy(float)))
            ax.legend(fontsize=7, loc="upper center", ncols=2, framealpha=0.9)
        ax.set_title("(c) word-level TV on sentence translation")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
    return fig


def plot_token_curve(curves: list[dict], targets: dict, title: str = ""):
    """An offline SAE build's training-token curves (``offline_saes.token_curve``): Δ loss
    and FVU against training tokens on each held-out set (one colour each), one line style
    per curve (labelled by its count of model-written texts), the card's targets dashed."""
    styles = ("-", "--", ":", "-.")
    settings = {json.dumps(c["training"], sort_keys=True) for c in curves if "training" in c}

    def curve_label(curve):             # the setting named where the curves' differ
        t = curve.get("training")
        width = f", width {t['width']} k {t['k']:g}" if len(settings) > 1 and t else ""
        return f"{curve['model_texts']} model texts{width}"

    everything = sorted({r["train_tokens"] for c in curves for r in c["rows"]})
    with styled():
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        for ax, metric, label in ((axes[0], "delta_loss", "Δ next-token loss (nats)"),
                                  (axes[1], "fvu", "FVU")):
            for index, curve in enumerate(curves):
                rows = sorted(curve["rows"], key=lambda r: r["train_tokens"])
                tokens = [r["train_tokens"] for r in rows]
                heldout = [k for k in rows[0] if isinstance(rows[0][k], dict)
                           and "fvu" in rows[0][k]]
                for colour, name in enumerate(heldout):
                    ax.plot(tokens, [r[name][metric] for r in rows], marker="o",
                            color=f"C{colour}", linestyle=styles[index % len(styles)],
                            label=f"{name}, {curve_label(curve)}")
            ax.axhline(targets[metric], color="grey", linestyle="--", linewidth=1,
                       label="target")
            ax.set_xscale("log", base=2)
            ax.set_xticks(everything, [f"{n / 1e6:g}M" if n >= 1e6 else f"{n / 1e3:g}k"
                                       for n in everything])
            ax.minorticks_off()
            ax.set_xlabel("training tokens")
            ax.set_ylabel(label)
        axes[0].legend(fontsize=6, handlelength=4, markerscale=0.6)   # the dashes show
        layers = sorted({c["layer"] for c in curves})
        axes[0].set_title(f"SAE spliced in at resid_pre {', '.join(map(str, layers))}")
        axes[1].set_title("fraction of variance unexplained")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
    return fig
