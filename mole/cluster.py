"""Clustering of the training rows: embeddings + k-means with automatic k by silhouette.

A fitted :class:`Clusterer` is saved as ``centroids.npy`` + ``clusterer.json`` + the embedder's files, and
assigns new text to its nearest centroid (used later by the cluster-distance routing baseline).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mole.embed import Embedder, load_embedder

logger = logging.getLogger(__name__)


def row_text(row: dict[str, Any]) -> str:
    """The text a row is clustered and routed by: its prompt, or its text for language-modelling rows."""
    return row["prompt"] if "prompt" in row else row["text"]


def _kmeans(x: np.ndarray, k: int, *, n_init: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(x)
    return km.labels_.astype(np.int64), km.cluster_centers_.astype(np.float32)


def balance(x: np.ndarray, centroids: np.ndarray, *, rounds: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Capacity-constrained re-assignment: each cluster takes at most ceil(n / k) rows.

    Greedy over (row, centroid) pairs by distance, then centroids are re-estimated; a few rounds suffice.
    """
    n, k = len(x), len(centroids)
    cap = math.ceil(n / k)
    for _ in range(rounds):
        dist = ((x[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)  # (n, k)
        labels = np.full(n, -1, dtype=np.int64)
        load = np.zeros(k, dtype=np.int64)
        for flat in np.argsort(dist, axis=None, kind="stable"):
            i, c = divmod(int(flat), k)
            if labels[i] < 0 and load[c] < cap:
                labels[i], load[c] = c, load[c] + 1
        centroids = np.stack([x[labels == c].mean(0) for c in range(k)]).astype(np.float32)
    return labels, centroids


def choose_k(
    x: np.ndarray, *, k_min: int, k_max: int, min_cluster_size: int, n_init: int, seed: int, sample: int
) -> tuple[int, list[dict[str, Any]], dict[int, tuple[np.ndarray, np.ndarray]]]:
    """Try every k in [k_min, k_max]; return the k of best silhouette whose clusters all reach the minimum size.

    Raises:
        ValueError: no k in the range gives clusters of at least ``min_cluster_size`` rows.
    """
    from sklearn.metrics import silhouette_score

    tried: list[dict[str, Any]] = []
    fits: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for k in range(k_min, min(k_max, len(x) - 1) + 1):
        labels, centroids = _kmeans(x, k, n_init=n_init, seed=seed)
        sizes = np.bincount(labels, minlength=k)
        sil = float(silhouette_score(x, labels, sample_size=min(sample, len(x)), random_state=seed))
        ok = int(sizes.min()) >= min_cluster_size
        tried.append({"k": k, "silhouette": round(sil, 4), "min_size": int(sizes.min()), "eligible": ok})
        fits[k] = (labels, centroids)
        logger.info("k=%d silhouette=%.4f smallest=%d%s", k, sil, sizes.min(), "" if ok else " (too small)")
    eligible = [t for t in tried if t["eligible"]]
    if not eligible:
        raise ValueError(
            f"no k in [{k_min}, {k_max}] gives clusters of at least cluster.min_cluster_size={min_cluster_size} "
            f"rows ({len(x)} rows); lower min_cluster_size or add data"
        )
    best = max(eligible, key=lambda t: (t["silhouette"], -t["k"]))
    return best["k"], tried, fits


def top_terms(texts: list[str], labels: np.ndarray, k: int, n_terms: int = 8) -> dict[int, list[str]]:
    """Most distinctive words per cluster by class-based TF-IDF (term share in cluster × rarity across clusters)."""
    from sklearn.feature_extraction.text import CountVectorizer

    try:
        counts = CountVectorizer(stop_words="english", max_features=5000).fit(texts)
        mat = counts.transform(texts)
    except ValueError:  # only stop words or empty vocabulary
        return {c: [] for c in range(k)}
    vocab = np.array(counts.get_feature_names_out())
    per = np.vstack([np.asarray(mat[labels == c].sum(0)).ravel() for c in range(k)]).astype(float)  # (k, V)
    tf = per / np.maximum(per.sum(1, keepdims=True), 1)
    idf = np.log(1 + per.sum(1).mean() / np.maximum(per.sum(0), 1))
    scores = tf * idf
    return {c: vocab[np.argsort(-scores[c])[:n_terms]].tolist() for c in range(k)}


@dataclass
class Clusterer:
    """A fitted embedder + centroids that assigns text to clusters."""

    embedder: Embedder
    centroids: np.ndarray  # (k, D)

    @property
    def k(self) -> int:
        return len(self.centroids)

    def distances(self, texts: list[str]) -> np.ndarray:
        """Squared Euclidean distance of each text's embedding to each centroid, shape (n, k)."""
        x = self.embedder.encode(texts)
        return ((x[:, None, :] - self.centroids[None, :, :]) ** 2).sum(-1)

    def assign(self, texts: list[str]) -> np.ndarray:
        """Nearest centroid of each text, shape (n,)."""
        return self.distances(texts).argmin(1)

    def save(self, directory: str | Path) -> None:
        """Write centroids.npy, clusterer.json and the embedder's files into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / "centroids.npy", self.centroids, allow_pickle=False)
        self.embedder.save(directory)
        (directory / "clusterer.json").write_text(json.dumps({"k": self.k, "embedder": self.embedder.name}))

    @classmethod
    def load(cls, directory: str | Path) -> Clusterer:
        """Load a clusterer saved with :meth:`save`."""
        directory = Path(directory)
        centroids = np.load(directory / "centroids.npy", allow_pickle=False)
        return cls(embedder=load_embedder(directory), centroids=centroids)


def fit_clusters(
    rows: list[dict[str, Any]],
    embedder: Embedder,
    *,
    k: int | None,
    k_min: int,
    k_max: int,
    min_cluster_size: int,
    balanced: bool,
    n_init: int,
    seed: int,
    sample: int = 2000,
) -> tuple[Clusterer, np.ndarray, dict[str, Any]]:
    """Embed rows, pick k (or use the fixed one), fit k-means and describe the result.

    Returns:
        (clusterer, labels of the rows, report dict as written to report.json).
    """
    if k is not None and k > len(rows):
        raise ValueError(f"cluster.k={k} is larger than the number of training rows ({len(rows)})")
    texts = [row_text(r) for r in rows]
    x = embedder.fit(texts).encode(texts)
    tried: list[dict[str, Any]] = []
    if k is None:
        k, tried, fits = choose_k(
            x, k_min=k_min, k_max=k_max, min_cluster_size=min_cluster_size, n_init=n_init, seed=seed, sample=sample
        )
        labels, centroids = fits[k]
    else:
        labels, centroids = _kmeans(x, k, n_init=n_init, seed=seed)
    if balanced and k > 1:
        labels, centroids = balance(x, centroids)
    report = describe(x, labels, k, rows, texts, tried, seed=seed, sample=sample)
    report.update(embedder=embedder.name, balanced=balanced, k_auto=bool(tried))
    return Clusterer(embedder=embedder, centroids=centroids), labels, report


def describe(
    x: np.ndarray,
    labels: np.ndarray,
    k: int,
    rows: list[dict[str, Any]],
    texts: list[str],
    tried: list[dict[str, Any]],
    *,
    seed: int,
    sample: int,
) -> dict[str, Any]:
    """Report: k, silhouette (chosen and every k tried), sizes, top terms, ARI against ``domain`` if present."""
    from sklearn.metrics import adjusted_rand_score, silhouette_score

    sil = float(silhouette_score(x, labels, sample_size=min(sample, len(x)), random_state=seed)) if k > 1 else None
    domains = [r.get("domain") for r in rows]
    has_domain = all(d is not None for d in domains)
    report: dict[str, Any] = {
        "k": k,
        "silhouette": None if sil is None else round(sil, 4),
        "silhouette_per_k": tried,
        "sizes": np.bincount(labels, minlength=k).tolist(),
        "top_terms": {str(c): t for c, t in top_terms(texts, labels, k).items()},
        "ari": round(float(adjusted_rand_score(domains, labels)), 4) if has_domain else None,
    }
    if has_domain:
        majority = {}
        for c in range(k):
            members = [d for d, lab in zip(domains, labels, strict=True) if lab == c]
            majority[str(c)] = max(set(members), key=members.count) if members else None
        report["majority_domain"] = majority
    return report
