"""Report figures of the evaluate stage: training loss curves, per-cluster loss by variant, routing heatmap.

Figures are built with matplotlib's object API on an Agg canvas (no pyplot global state, so safe in threads),
imported lazily so that importing mole stays light; each PNG is written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mole.io import atomic_path


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def loss_curves(expert_metrics: dict[str, list[float]], joint: list[float] | None, path: str | Path) -> Path:
    """Training loss per step of every expert (and baseline), beside the joint router + expert phase.

    Args:
        expert_metrics: name -> per-step training loss (e.g. each expert's train_metrics.json ``loss``).
        joint: per-step loss of joint router training, or None when there was none.
        path: where to write the PNG.

    Returns:
        ``path``.
    """
    fig = _figure(11 if joint else 6.5, 4)
    axes = fig.subplots(1, 2 if joint else 1, squeeze=False)[0]
    for name, losses in expert_metrics.items():
        style = "--" if not name.startswith("expert") else "-"  # baselines dashed
        axes[0].plot(range(1, len(losses) + 1), losses, style, label=name, linewidth=1.4)
    axes[0].set(title="LoRA training (one run per expert)", xlabel="step", ylabel="training loss")
    if expert_metrics:
        axes[0].legend(fontsize="small", ncol=2 if len(expert_metrics) > 6 else 1)
    if joint:
        axes[1].plot(range(1, len(joint) + 1), joint, color="black", linewidth=1.4)
        axes[1].set(title="Joint router + expert training", xlabel="step", ylabel="loss (LM + aux)")
    for ax in axes:
        ax.grid(alpha=0.3)
    return _save(fig, path)


def per_cluster_loss(variants: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """Grouped bars of eval loss: one group per eval cluster, one bar per variant.

    Args:
        variants: name -> metrics with ``per_cluster`` ({cluster: {"loss", "rows", ...}}), as in eval.json.
        path: where to write the PNG.

    Returns:
        ``path``.
    """
    clusters = sorted({c for v in variants.values() for c in v.get("per_cluster", {})}, key=int)
    names = list(variants)
    fig = _figure(max(6.0, 0.25 * len(clusters) * len(names) + 2), 4.2)
    ax = fig.subplots()
    width = 0.8 / max(len(names), 1)
    seen: list[float] = []
    for j, name in enumerate(names):
        per = variants[name].get("per_cluster", {})
        losses = [float("nan") if per.get(c, {}).get("loss") is None else per[c]["loss"] for c in clusters]
        seen += [x for x in losses if x == x]  # NaN != NaN
        ax.bar([i + (j - (len(names) - 1) / 2) * width for i in range(len(clusters))], losses, width, label=name)
    rows = {
        c: next(v["per_cluster"][c]["rows"] for v in variants.values() if c in v.get("per_cluster", {}))
        for c in clusters
    }
    ax.set_xticks(range(len(clusters)), [f"cluster {c}\n({rows[c]} rows)" for c in clusters])
    if seen:  # variants differ by a few percent: zoom on the range instead of starting the axis at 0
        lo, hi = min(seen), max(seen)
        pad = 0.15 * (hi - lo) + 1e-3
        ax.set_ylim(max(0.0, lo - 2 * pad), hi + pad)
    ax.set(title="Eval loss per cluster", ylabel="loss (mean NLL per token; axis not from 0)")
    fig.legend(loc="outside upper center", ncol=min(len(names), 6), fontsize="small", frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def routing_heatmap(util_per_layer: list[list[float]], expert_ids: list[str], path: str | Path) -> Path:
    """Heatmap of expert utilization per block (rows: blocks, columns: experts), values printed in small maps.

    Args:
        util_per_layer: (L, E) mean routing weight of each expert at each block on the eval rows.
        expert_ids: the E expert names, for the column labels.
        path: where to write the PNG.

    Returns:
        ``path``.
    """
    import numpy as np

    util = np.asarray(util_per_layer, dtype=float)  # (L, E)
    if util.ndim != 2 or util.shape[1] != len(expert_ids):
        raise ValueError(f"routing_heatmap: expected (L, {len(expert_ids)}) utilization, got shape {util.shape}")
    n_layers, n_experts = util.shape
    fig = _figure(max(5.0, 0.8 * n_experts + 2.5), max(3.0, 0.35 * n_layers + 1.8))
    ax = fig.subplots()
    im = ax.imshow(util, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(float(util.max()), 1e-9))
    fig.colorbar(im, ax=ax, label="mean routing weight")
    ax.set_xticks(range(n_experts), expert_ids, rotation=45, ha="right")
    step = max(1, n_layers // 16)  # at most ~16 block labels
    ax.set_yticks(range(0, n_layers, step), [f"block {b}" for b in range(0, n_layers, step)])
    ax.set(title="Expert utilization per block (eval rows)", xlabel="expert", ylabel="transformer block")
    if n_layers * n_experts <= 160:
        mid = util.max() / 2
        for (b, e), u in np.ndenumerate(util):
            ax.text(e, b, f"{u:.2f}", ha="center", va="center", fontsize=7, color="black" if u > mid else "white")
    return _save(fig, path)
