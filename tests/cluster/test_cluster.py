from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mole import stages
from mole.cluster.clustering import Clusterer, balance, choose_k, fit_clusters, top_terms
from mole.cluster.embed import TfidfEmbedder, load_embedder
from mole.config import load_config


def _blobs(sizes: list[int], dim: int = 8, spread: float = 0.05, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(len(sizes), dim)) * 3
    x = np.concatenate([c + spread * rng.normal(size=(n, dim)) for c, n in zip(centers, sizes, strict=True)])
    return x.astype(np.float32), np.repeat(np.arange(len(sizes)), sizes)


def test_auto_k_recovers_separated_blobs() -> None:
    x, _ = _blobs([30, 30, 30, 30])
    k, tried, _ = choose_k(x, k_min=2, k_max=8, min_cluster_size=5, n_init=5, seed=0, sample=500)
    assert k == 4
    assert [t["k"] for t in tried] == list(range(2, 9))


def test_auto_k_honours_min_cluster_size() -> None:
    x, _ = _blobs([40, 40, 40, 6])  # the 4th blob is smaller than the floor
    k, tried, _ = choose_k(x, k_min=2, k_max=6, min_cluster_size=10, n_init=5, seed=0, sample=500)
    assert k == 3
    assert not next(t for t in tried if t["k"] == 4)["eligible"]
    with pytest.raises(ValueError, match="min_cluster_size=100"):
        choose_k(x, k_min=2, k_max=4, min_cluster_size=100, n_init=2, seed=0, sample=500)


def test_balanced_assignment_caps_cluster_sizes() -> None:
    x, _ = _blobs([60, 20, 20], spread=1.5)
    centroids = np.stack([x[:60].mean(0), x[60:80].mean(0), x[80:].mean(0)])
    labels, new_centroids = balance(x, centroids)
    assert np.bincount(labels).max() <= 34 and len(set(labels.tolist())) == 3
    assert new_centroids.shape == centroids.shape


def test_top_terms_pick_distinctive_words() -> None:
    texts = ["convert meters to feet"] * 5 + ["reverse the string please"] * 5
    terms = top_terms(texts, np.array([0] * 5 + [1] * 5), 2, n_terms=3)
    assert "meters" in terms[0] and "reverse" in terms[1] and "meters" not in terms[1]


def test_tfidf_embedder_and_clusterer_round_trip(tmp_path: Path) -> None:
    rows = [{"text": f"{w} number {i}", "domain": w} for w in ("apple", "train", "violin") for i in range(12)]
    clusterer, labels, report = fit_clusters(
        rows, TfidfEmbedder(dim=8), k=3, k_min=2, k_max=4, min_cluster_size=2, balanced=False, n_init=5, seed=0
    )
    assert report["ari"] == 1.0 and report["k"] == 3 and sum(report["sizes"]) == 36
    clusterer.save(tmp_path)
    loaded = Clusterer.load(tmp_path)
    texts = [r["text"] for r in rows]
    np.testing.assert_array_equal(load_embedder(tmp_path).encode(texts), clusterer.embedder.encode(texts))
    np.testing.assert_array_equal(loaded.assign(texts), labels)
    assert loaded.assign(["violin number 999"])[0] == labels[-1]


def test_fixed_k_larger_than_rows_is_an_error() -> None:
    rows = [{"text": f"row {i}"} for i in range(5)]
    with pytest.raises(ValueError, match=r"cluster\.k=9 is larger than the number of training rows \(5\)"):
        fit_clusters(
            rows, TfidfEmbedder(dim=2), k=9, k_min=2, k_max=4, min_cluster_size=1, balanced=False, n_init=1, seed=0
        )


def test_minilm_auto_k_recovers_demo_skills(workspace: Path) -> None:
    """Acceptance: on the demo corpus with MiniLM and automatic k, k == number of skills and ARI >= 0.9."""
    from mole.data.demo import SKILLS

    cfg = load_config(None, preset="demo")
    stages.prepare(cfg)
    res = stages.cluster(cfg)
    report = json.loads((workspace / "data" / "clusters" / "report.json").read_text())
    assert report == {k: v for k, v in res.items() if k != "paths"}
    print(
        f"demo corpus: k={report['k']} (skills {len(SKILLS)}), ari={report['ari']}, silhouette={report['silhouette']}"
    )
    assert report["k"] == len(SKILLS)
    assert report["ari"] >= 0.9
    assigned = [json.loads(line) for line in (workspace / "data/clusters/assignments.jsonl").read_text().splitlines()]
    assert len(assigned) == sum(report["sizes"]) and {a["cluster"] for a in assigned} == set(range(report["k"]))
    for name in ("centroids.npy", "clusterer.json", "embedder.json", "eval_assignments.jsonl"):
        assert (workspace / "data" / "clusters" / name).exists()


def test_base_model_embedder_clusters_rows(tmp_path: Path) -> None:
    from mole.cluster.embed import BaseModelEmbedder

    rows = [{"text": w * 6, "domain": w} for w in ("aaaa ", "zzzz ", "0000 ") for _ in range(4)]
    rows = [{**r, "text": r["text"] + str(i)} for i, r in enumerate(rows)]
    emb = BaseModelEmbedder(base_spec="tiny", batch_size=4, max_length=32)
    x = emb.encode([r["text"] for r in rows])
    assert x.shape == (12, 64)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    clusterer, labels, report = fit_clusters(
        rows, emb, k=3, k_min=2, k_max=4, min_cluster_size=2, balanced=False, n_init=5, seed=0
    )
    assert report["ari"] == 1.0
    clusterer.save(tmp_path)
    np.testing.assert_array_equal(Clusterer.load(tmp_path).assign([r["text"] for r in rows]), labels)


def test_atomic_outputs_get_ordinary_permissions(tmp_path: Path) -> None:
    import os

    from mole.io import atomic_dir, write_json

    write_json(tmp_path / "a.json", {"x": 1})
    with atomic_dir(tmp_path / "d") as d:
        (d / "f").write_text("x")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~mask


def _worded_blobs(k: int, *, n: int = 40, seed: int = 0) -> tuple[np.ndarray, list[str], np.ndarray]:
    """k Gaussian blobs of embeddings, each with texts drawn from a vocabulary of its own plus common words."""
    rng = np.random.default_rng(seed)
    x, labels = _blobs([n] * k, spread=0.3, seed=seed)
    common = [f"the{i}" for i in range(20)]
    own = [[f"w{c}x{i}" for i in range(30)] for c in range(k)]
    texts = [" ".join(rng.choice(common + own[c] * 2, size=25)) for c in labels]
    return x, texts, labels


@pytest.mark.parametrize("k_true", [2, 3, 5])
def test_heldout_lm_rule_recovers_k_of_worded_blobs(k_true: int) -> None:
    from mole.cluster.clustering import proxy_counts

    x, texts, _ = _worded_blobs(k_true, seed=k_true)
    k, tried, _ = choose_k(x, k_min=1, k_max=8, min_cluster_size=5, n_init=3, seed=0, sample=500,
                           rule="heldout_lm", counts=proxy_counts(texts))  # fmt: skip
    assert k == k_true
    losses = [t["heldout_lm_loss"] for t in tried]
    assert losses[k_true - 1] < losses[0]  # the split into the true groups pays on held-out rows


def test_heldout_lm_rule_answers_one_cluster_for_one_blob() -> None:
    from mole.cluster.clustering import proxy_counts

    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 8)).astype(np.float32)  # one blob: any split is arbitrary
    vocab = [f"w{i}" for i in range(60)]
    texts = [" ".join(rng.choice(vocab, size=25)) for _ in range(120)]
    k, tried, _ = choose_k(x, k_min=1, k_max=6, min_cluster_size=5, n_init=3, seed=0, sample=500,
                           rule="heldout_lm", counts=proxy_counts(texts))  # fmt: skip
    assert k == 1 and tried[0]["k"] == 1


def test_refine_moves_rows_to_the_cluster_whose_words_they_use() -> None:
    from mole.cluster.clustering import proxy_counts, refine

    _, texts, truth = _worded_blobs(3, seed=7)
    noisy = truth.copy()
    noisy[:6] = (noisy[:6] + 1) % 3  # six rows start in the wrong cluster
    fixed = refine(proxy_counts(texts), noisy, 3, mu=100.0)
    assert (fixed == truth).all()
