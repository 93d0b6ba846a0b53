"""Extending a saved clustering with new rows (incremental builds): old rows keep their labels, new rows join the
nearest cluster whose radius admits them, and rows no radius admits are clustered among themselves (into the fewest
groups as tight as the old clusters); a group of at least ``min_cluster_size`` rows becomes a new cluster, smaller
groups join their nearest old cluster.

A cluster's radius is a quantile of its rows' squared distances to its centroid, recorded when it was fitted
(:func:`mole.cluster.clustering.cluster_radii`); a clusterer saved without radii gets them from its old rows.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from mole.cluster.clustering import Clusterer, cluster_radii, kmeans, row_text

logger = logging.getLogger(__name__)


def extend_clusters(
    clusterer: Clusterer,
    rows: list[dict[str, Any]],
    old_labels: dict[str, int],
    *,
    min_cluster_size: int,
    quantile: float,
    k_max: int,
    n_init: int,
    seed: int,
) -> tuple[Clusterer, np.ndarray, dict[str, Any]]:
    """Label every row of ``rows`` with the clusters of ``clusterer`` plus any new ones.

    Args:
        clusterer: the previous build's fitted clusterer (k old clusters).
        rows: the current training rows (with ``id``).
        old_labels: row id -> cluster of the previous build's rows.
        min_cluster_size: fewest rows of a new cluster.
        quantile: the radius quantile used when ``clusterer`` has no radii.
        k_max, n_init, seed: how the far rows are clustered: k-means with the fewest groups (at most k_max) each
            as tight as the loosest old cluster.

    Returns:
        (the extended clusterer, labels (n,), info: old/new row counts, the share of old rows the clusterer now
        assigns elsewhere than their labels (``disagreement``), far rows, new cluster ids, the embeddings ``x``).
    """
    k_old, centroids = clusterer.k, clusterer.centroids
    x = clusterer.embedder.encode([row_text(r) for r in rows])  # (n, D)
    d = ((x[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)  # (n, k)
    prev = np.array([old_labels.get(r["id"], -1) for r in rows], dtype=np.int64)
    old = prev >= 0
    disagreement = float((d[old].argmin(1) != prev[old]).mean()) if old.any() else 0.0
    radii = clusterer.radii
    if radii is None or len(radii) != k_old:
        radii = cluster_radii(x[old], prev[old], centroids, quantile) if old.any() else np.full(k_old, np.inf)
    labels = prev.copy()
    new = np.flatnonzero(~old)
    admitted = np.where(d[new] <= radii[None, :], d[new], np.inf)  # (m, k): distances to clusters that admit it
    near = np.isfinite(admitted).any(1)
    labels[new[near]] = admitted[near].argmin(1)
    far = new[~near]
    new_centroids, new_radii, added = [], [], []
    if len(far) >= min_cluster_size:
        groups = _group(x[far], min_cluster_size=min_cluster_size, k_max=k_max, n_init=n_init, seed=seed,
                        quantile=quantile, max_radius=float(np.max(radii)))  # fmt: skip
        for g in range(int(groups.max()) + 1):
            members = far[groups == g]
            center = x[members].mean(0)
            if len(members) < min_cluster_size or (((center - centroids) ** 2).sum(-1) <= radii).any():
                continue  # too few, or centred inside an old cluster: that cluster's outliers, not a new kind of row
            c = k_old + len(added)
            labels[members] = c
            new_centroids.append(center.astype(np.float32))
            new_radii.append(float(np.quantile(((x[members] - center) ** 2).sum(-1), quantile)))
            added.append(c)
    left = np.flatnonzero(labels < 0)  # far rows in groups too small for a cluster: their nearest old cluster
    labels[left] = d[left].argmin(1)
    ext = Clusterer(
        embedder=clusterer.embedder,
        centroids=np.concatenate([centroids, np.stack(new_centroids)]) if new_centroids else centroids,
        radii=np.concatenate([np.asarray(radii, dtype=np.float64), np.asarray(new_radii, dtype=np.float64)]),
    )
    info = {"old_rows": int(old.sum()), "new_rows": len(new), "disagreement": round(disagreement, 4),
            "far_rows": len(far), "new_clusters": added, "x": x}  # fmt: skip
    logger.info("incremental clustering: %d old rows, %d new (%d far from every cluster), new clusters %s",
                info["old_rows"], len(new), len(far), added)  # fmt: skip
    return ext, labels, info


def _group(x: np.ndarray, *, min_cluster_size: int, k_max: int, n_init: int, seed: int, quantile: float,
           max_radius: float) -> np.ndarray:  # fmt: skip
    """Cluster the far rows among themselves into the fewest groups each as tight as the loosest old cluster (its
    radius at most ``max_radius``), so that one new kind of row makes one new cluster, as a full build would.
    All -1 when no such grouping exists: far rows scattered at the edges of old clusters form no cluster."""
    top = min(k_max, len(x) // min_cluster_size)
    labels = np.zeros(len(x), dtype=np.int64)
    for k in range(1, top + 1):
        if k > 1:
            labels, _ = kmeans(x, k, n_init=n_init, seed=seed)
        centers = np.stack([x[labels == g].mean(0) for g in range(k)])
        if (cluster_radii(x, labels, centers, quantile) <= max_radius).all():
            return labels
    return np.full(len(x), -1, dtype=np.int64)
