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


def cluster_map(
    points: Any, clusters: list[int], path: str | Path, *, domains: list[str] | None = None, centers: Any = None
) -> Path:
    """The training rows' embeddings in 2-D (their first two principal components), coloured by cluster, and in a
    second panel by the data's ``domain`` when the rows have one (so a user sees whether clusters are domains).

    Args:
        points: (N, 2) coordinates of the rows.
        clusters: each row's cluster.
        path: where to write the PNG.
        domains: each row's domain, or None.
        centers: (k, 2) coordinates of the cluster centroids, marked and labelled; or None.

    Returns:
        ``path``.
    """
    import numpy as np

    xy = np.asarray(points, dtype=float)
    if xy.ndim != 2 or xy.shape != (len(clusters), 2):
        raise ValueError(f"cluster_map: expected ({len(clusters)}, 2) points, got shape {xy.shape}")
    panels = [("cluster", [f"cluster {c}" for c in clusters])] + ([("domain", domains)] if domains else [])
    fig = _figure(5.5 * len(panels), 4.8)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, labels) in zip(axes, panels, strict=True):
        names = sorted(set(labels), key=lambda s: (len(s), s))
        cmap = _colours(len(names))
        for i, name in enumerate(names):
            mask = np.array([label == name for label in labels])
            ax.scatter(xy[mask, 0], xy[mask, 1], s=9, alpha=0.7, color=cmap[i], label=f"{name} ({int(mask.sum())})")
        if centers is not None and title == "cluster":
            c = np.asarray(centers, dtype=float)
            ax.scatter(c[:, 0], c[:, 1], marker="X", s=90, color="black", label="centroid")
            for j, (cx, cy) in enumerate(c):
                ax.annotate(str(j), (cx, cy), textcoords="offset points", xytext=(5, 5), fontsize="small")
        ax.set(title=f"Training rows by {title}", xlabel="PC 1", ylabel="PC 2")
        ax.legend(fontsize="x-small", markerscale=1.5, loc="best")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def variant_bars(variants: dict[str, dict[str, Any]], path: str | Path, *, baseline: str = "multitask_lora") -> Path:
    """Every variant's eval loss and exact match side by side (two panels; one when no variant has exact match),
    the baseline's value as a dashed line.

    Args:
        variants: name -> metrics with ``loss`` and ``exact_match`` (None when not generated), as in eval.json.
        path: where to write the PNG.
        baseline: the variant drawn as the reference line.

    Returns:
        ``path``.
    """
    names = list(variants)
    panels = [("loss", "eval loss (lower is better)")]
    if any(v.get("exact_match") is not None for v in variants.values()):  # text-only data has no answers to match
        panels.append(("exact_match", "exact match"))
    fig = _figure(max(4.0, 0.65 * len(names) + 1.5) * len(panels), 4.2)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    cmap = _colours(len(names))
    for ax, (key, label) in zip(axes, panels, strict=True):
        values = [variants[n].get(key) for n in names]
        shown = [float("nan") if v is None else float(v) for v in values]
        bars = ax.bar(range(len(names)), shown, color=cmap)
        for bar, v in zip(bars, values, strict=True):
            text = "n/a" if v is None else (f"{v:.4f}" if key == "loss" else f"{v:.3f}")
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, 0 if v is None else v), ha="center",
                        va="bottom", fontsize="small", textcoords="offset points", xytext=(0, 2))  # fmt: skip
        ref = variants.get(baseline, {}).get(key)
        if ref is not None:
            ax.axhline(float(ref), linestyle="--", color="black", linewidth=1, label=f"{baseline} {ref:.4g}")
            ax.legend(fontsize="small", loc="upper right")
        known = [v for v in shown if v == v]
        if key == "loss" and known:  # variants differ by a few percent: zoom, as per_cluster_loss does
            lo, hi = min(known), max(known)
            pad = 0.15 * (hi - lo) + 1e-3
            ax.set_ylim(max(0.0, lo - 2 * pad), hi + 3 * pad)  # room for the values and the legend
        elif key == "exact_match":
            ax.set_ylim(0, 1.05)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set(title=label, ylabel=key + (" (axis not from 0)" if key == "loss" else ""))
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def token_routing(
    explanations: list[Any], path: str | Path, *, per_block: bool = False, max_tokens: int | None = None
) -> Path:
    """Per-token routing as heatmaps (experts × tokens, the mean over blocks; ``per_block``: one more per block),
    one per prompt, a white line where the completion starts.

    Args:
        explanations: :class:`mole.routing.explain.Explanation` of each prompt.
        path: where to write the PNG.
        per_block: add a panel per block.
        max_tokens: show at most this many tokens of each prompt: its last ones, where the completion starts.

    Returns:
        ``path``.
    """
    import json

    panels = [(i, exp, b) for i, exp in enumerate(explanations)
              for b in [None, *(range(len(exp.per_block)) if per_block else [])]]  # fmt: skip
    start = {i: max(0, len(exp.tokens) - max_tokens) if max_tokens else 0 for i, exp in enumerate(explanations)}
    width = max(6.0, 0.28 * max(len(exp.tokens) - start[i] for i, exp in enumerate(explanations)) + 2)
    fig = _figure(width, sum(0.35 * len(exp.experts) + 1.2 for _, exp, _ in panels))
    for ax, (i, exp, b) in zip(fig.subplots(len(panels), 1, squeeze=False)[:, 0], panels, strict=True):
        first = start[i]
        w = (exp.weights if b is None else exp.per_block[b])[first:]  # (T, E)
        im = ax.imshow(w.T, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_yticks(range(len(exp.experts)), exp.experts, fontsize=8)
        labels = [json.dumps(t, ensure_ascii=False)[1:-1] for t in exp.tokens[first:]]  # newlines shown as \n
        ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=90)
        ax.axvline(exp.n_prompt - first - 0.5, color="white", linewidth=1.5)  # where the completion starts
        cut = f" (its last {len(labels)} tokens)" if first else ""
        ax.set_title(f"prompt {i + 1}{cut}: " + ("mean over blocks" if b is None else f"block {b}"), fontsize=9)
        fig.colorbar(im, ax=ax, label="weight")
    return _save(fig, path)


def _colours(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]
