"""Clustering of the training rows: embeddings + k-means with automatic k.

Automatic k (``cluster.k_rule``): ``heldout_lm`` (default) scores each k by the held-out loss of a cheap
per-cluster language model, a smoothed unigram model of each cluster's words, with the held-out rows assigned to
their nearest centroid, as the mixture will route them. A further cluster must lower that loss by more than
``cluster.k_tolerance`` (relative) to be kept, so k stops growing at the first split that no longer pays; k = 1
(no mixture) is a valid answer. ``silhouette`` keeps the k of best silhouette. The chosen clustering can then be
refined (``cluster.refine``) by the same proxy: each row moves to the cluster whose unigram model explains it best,
for a few rounds, and the centroids are re-estimated from the refined clusters.

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

from mole.cluster.embed import Embedder, load_embedder

logger = logging.getLogger(__name__)


def row_text(row: dict[str, Any]) -> str:
    """The text a row is clustered and routed by: its prompt, or its text for language-modelling rows."""
    return row["prompt"] if "prompt" in row else row["text"]


def kmeans(x: np.ndarray, k: int, *, n_init: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
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


# The proxy LM's words: runs of letters, single digits, single other symbols (code and numbers count too).
_PROXY_TOKENS = r"[A-Za-z]+|\d|[^\sA-Za-z\d]"


def proxy_counts(texts: list[str]) -> Any:
    """Word counts of each text for the proxy LM, a sparse (n, V) matrix."""
    from sklearn.feature_extraction.text import CountVectorizer

    return CountVectorizer(token_pattern=_PROXY_TOKENS, lowercase=False).fit_transform(texts).tocsr()


def _unigram_logp(counts: Any, labels: np.ndarray, k: int, background: np.ndarray, mu: float) -> np.ndarray:
    """Per-cluster unigram log-probabilities (V, k), Dirichlet-smoothed towards ``background`` with mass ``mu``."""
    out = np.empty((counts.shape[1], k))
    for c in range(k):
        n = np.asarray(counts[labels == c].sum(0)).ravel()
        out[:, c] = np.log((n + mu * background) / (n.sum() + mu))
    return out


def _background(counts: Any) -> np.ndarray:
    n = np.asarray(counts.sum(0)).ravel() + 0.5  # add-half: a word unseen in these rows keeps a finite loss
    return n / n.sum()


def heldout_lm_loss(x: np.ndarray, counts: Any, k: int, *, folds: int, mu: float, n_init: int, seed: int) -> float:
    """Cross-validated loss per word of the per-cluster unigram LMs, held-out rows assigned by nearest centroid.

    Args:
        x: (n, D) embeddings of the rows. counts: their (n, V) proxy word counts. k: clusters (1: one LM for all).
        folds: cross-validation folds. mu: Dirichlet smoothing mass. n_init, seed: k-means restarts and seed.
    """
    from sklearn.model_selection import KFold

    total, words = 0.0, 0.0
    for train, test in KFold(folds, shuffle=True, random_state=seed).split(x):
        if k == 1:
            lab_train, lab_test = np.zeros(len(train), dtype=np.int64), np.zeros(len(test), dtype=np.int64)
        else:
            lab_train, centroids = kmeans(x[train], k, n_init=n_init, seed=seed)
            lab_test = ((x[test, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
        logp = _unigram_logp(counts[train], lab_train, k, _background(counts[train]), mu)  # (V, k)
        per_row = np.asarray(counts[test] @ logp)  # (n_test, k): each held-out row under every cluster's LM
        scored = per_row[np.arange(len(test)), lab_test].sum()  # ... under its own cluster's
        total, words = total + float(scored), words + float(counts[test].sum())
    return -total / max(words, 1.0)


def refine(counts: Any, labels: np.ndarray, k: int, *, mu: float = 100.0, rounds: int = 10) -> np.ndarray:
    """Move each row to the cluster whose unigram LM (plus log cluster share) explains it best, until stable.

    Clusters are never emptied: a round that would empty one stops the refinement there.
    """
    background = _background(counts)
    for _ in range(rounds):
        logp = _unigram_logp(counts, labels, k, background, mu)  # (V, k)
        prior = np.log(np.bincount(labels, minlength=k) / len(labels))
        new = np.asarray(counts @ logp + prior).argmax(1)
        if (new == labels).all() or len(np.unique(new)) < k:
            break
        labels = new
    return labels


def choose_k(
    x: np.ndarray,
    *,
    k_min: int,
    k_max: int,
    min_cluster_size: int,
    n_init: int,
    seed: int,
    sample: int,
    rule: str = "silhouette",
    counts: Any = None,
    tolerance: float = 0.0025,
    gain_fraction: float = 0.1,
    mu: float = 1000.0,
    folds: int = 5,
) -> tuple[int, list[dict[str, Any]], dict[int, tuple[np.ndarray, np.ndarray]]]:
    """Fit every k in [k_min, k_max] and pick one among those whose clusters all reach the minimum size.

    ``rule="silhouette"``: the k of best silhouette (k >= 2). ``rule="heldout_lm"`` (needs ``counts``): the first
    eligible k whose next eligible k lowers :func:`heldout_lm_loss` by less than ``tolerance`` or than
    ``gain_fraction`` of the first split's gain (relative), see :func:`_diminishing_returns`.

    Raises:
        ValueError: no k in the range gives clusters of at least ``min_cluster_size`` rows.
    """
    from sklearn.metrics import silhouette_score

    if rule == "heldout_lm" and counts is None:
        raise ValueError("choose_k: rule 'heldout_lm' needs the rows' proxy word counts")
    tried: list[dict[str, Any]] = []
    fits: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for k in range(max(k_min, 1 if rule == "heldout_lm" else 2), min(k_max, len(x) - 1) + 1):
        labels, centroids = kmeans(x, k, n_init=n_init, seed=seed) if k > 1 else _one_cluster(x)
        sizes = np.bincount(labels, minlength=k)
        entry: dict[str, Any] = {"k": k, "min_size": int(sizes.min()), "eligible": int(sizes.min()) >= min_cluster_size}
        if k > 1:
            sil = float(silhouette_score(x, labels, sample_size=min(sample, len(x)), random_state=seed))
            entry["silhouette"] = round(sil, 4)
        if rule == "heldout_lm":
            entry["heldout_lm_loss"] = round(
                heldout_lm_loss(x, counts, k, folds=folds, mu=mu, n_init=min(n_init, 3), seed=seed), 5
            )
        tried.append(entry)
        fits[k] = (labels, centroids)
        scores = {n: v for n, v in entry.items() if n in ("silhouette", "heldout_lm_loss")}
        logger.info("k=%d %s smallest=%d%s", k, scores, sizes.min(), "" if entry["eligible"] else " (too small)")
    eligible = [t for t in tried if t["eligible"]]
    if not eligible:
        raise ValueError(
            f"no k in [{k_min}, {k_max}] gives clusters of at least cluster.min_cluster_size={min_cluster_size} "
            f"rows ({len(x)} rows); lower min_cluster_size or add data"
        )
    if rule == "silhouette":
        return max(eligible, key=lambda t: (t["silhouette"], -t["k"]))["k"], tried, fits
    return _diminishing_returns(eligible, tolerance=tolerance, fraction=gain_fraction), tried, fits


def _diminishing_returns(eligible: list[dict[str, Any]], *, tolerance: float, fraction: float) -> int:
    """The first k whose next split gains less than ``max(tolerance, fraction × the first split's gain)``.

    Gains are relative drops of the held-out loss from one eligible k to the next. The first split (from the
    smallest k) sets the scale of what structure in these rows is worth; a split worth under a ``fraction`` of it
    only carves a group into sub-styles, which a shared expert serves as well as two experts would.
    """
    losses = [t["heldout_lm_loss"] for t in eligible]
    gains = [(a - b) / a for a, b in zip(losses, losses[1:], strict=False)]
    if not gains:
        return eligible[0]["k"]
    floor = max(tolerance, fraction * gains[0])
    for i, gain in enumerate(gains):
        eligible[i]["gain_to_next"] = round(gain, 6)
        if gain < floor:
            return eligible[i]["k"]
    return eligible[-1]["k"]


def _one_cluster(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(len(x), dtype=np.int64), x.mean(0, keepdims=True).astype(np.float32)


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
    # (k,) per cluster, a quantile of its rows' squared distances to its centroid: beyond every cluster's, a row is
    # new to the clustering (incremental builds). None for a clusterer saved before radii were recorded.
    radii: np.ndarray | None = None

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
        meta: dict[str, Any] = {"k": self.k, "embedder": self.embedder.name}
        if self.radii is not None:
            meta["radii"] = [float(r) for r in self.radii]
        (directory / "clusterer.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, directory: str | Path, *, trust_remote_code: bool = False) -> Clusterer:
        """Load a clusterer saved with :meth:`save` (``trust_remote_code``: the caller's own permission)."""
        directory = Path(directory)
        centroids = np.load(directory / "centroids.npy", allow_pickle=False)
        meta = (
            json.loads((directory / "clusterer.json").read_text()) if (directory / "clusterer.json").is_file() else {}
        )
        radii = np.asarray(meta["radii"], dtype=np.float64) if meta.get("radii") is not None else None
        embedder = load_embedder(directory, trust_remote_code=trust_remote_code)
        return cls(embedder=embedder, centroids=centroids, radii=radii)


def cluster_radii(x: np.ndarray, labels: np.ndarray, centroids: np.ndarray, quantile: float) -> np.ndarray:
    """Per cluster, the ``quantile`` of its rows' squared distances to its centroid, shape (k,)."""
    d = ((x - centroids[labels]) ** 2).sum(-1)  # (n,)
    return np.array([float(np.quantile(d[labels == c], quantile)) if (labels == c).any() else 0.0
                     for c in range(len(centroids))])  # fmt: skip


MAP_KEY = "map_2d"  # fit_clusters' report: the 2-D map of rows and centroids (the stage writes it beside report.json)


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
    k_rule: str = "silhouette",
    k_tolerance: float = 0.0025,
    k_gain_fraction: float = 0.1,
    refine_rows: bool = False,
    lm_smoothing: float = 1000.0,
    radius_quantile: float = 0.95,
) -> tuple[Clusterer, np.ndarray, dict[str, Any]]:
    """Embed rows, pick k (or use the fixed one), fit k-means, optionally refine, and describe the result.

    Returns:
        (clusterer, labels of the rows, report dict as written to report.json, plus ``MAP_KEY``: the rows and
        centroids in 2-D, from :func:`project_2d`).
    """
    if k is not None and k > len(rows):
        raise ValueError(f"cluster.k={k} is larger than the number of training rows ({len(rows)})")
    texts = [row_text(r) for r in rows]
    x = embedder.fit(texts).encode(texts)
    counts = proxy_counts(texts) if (k_rule == "heldout_lm" and k is None) or refine_rows else None
    tried: list[dict[str, Any]] = []
    if k is None:
        k, tried, fits = choose_k(
            x, k_min=k_min, k_max=k_max, min_cluster_size=min_cluster_size, n_init=n_init, seed=seed, sample=sample,
            rule=k_rule, counts=counts, tolerance=k_tolerance, gain_fraction=k_gain_fraction, mu=lm_smoothing,
        )  # fmt: skip
        labels, centroids = fits[k]
    else:
        labels, centroids = kmeans(x, k, n_init=n_init, seed=seed) if k > 1 else _one_cluster(x)
    refined = 0
    if refine_rows and k > 1:
        new = refine(counts, labels, k)
        refined = int((new != labels).sum())
        if refined and np.bincount(new, minlength=k).min() >= min(min_cluster_size, np.bincount(labels).min()):
            labels = new
            centroids = np.stack([x[labels == c].mean(0) for c in range(k)]).astype(np.float32)
        else:
            refined = 0
    if balanced and k > 1:
        labels, centroids = balance(x, centroids)
    report = describe(x, labels, k, rows, texts, tried, seed=seed, sample=sample)
    report.update(embedder=embedder.name, balanced=balanced, k_auto=bool(tried), refined_rows=refined)
    report["k_rule"] = k_rule if tried else "fixed"
    report[MAP_KEY] = project_2d(x, centroids, seed=seed)
    radii = cluster_radii(x, labels, centroids, radius_quantile)
    return Clusterer(embedder=embedder, centroids=centroids, radii=radii), labels, report


def project_2d(x: np.ndarray, centroids: np.ndarray, *, seed: int) -> dict[str, np.ndarray]:
    """The rows' embeddings and the centroids on the rows' first two principal components, for a map of the
    clusters: {"points": (N, 2), "centers": (k, 2)} (zeros where the embeddings vary in fewer dimensions)."""
    from sklearn.decomposition import PCA

    n = min(2, x.shape[0], x.shape[1])
    points, centers = np.zeros((len(x), 2), np.float32), np.zeros((len(centroids), 2), np.float32)
    if n > 0 and len(x) > 1:
        pca = PCA(n_components=n, random_state=seed).fit(x)
        points[:, :n], centers[:, :n] = pca.transform(x), pca.transform(centroids)
    return {"points": points, "centers": centers}


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
