"""Shared fixtures: offline environment, seeding, temporary workspaces."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed() -> None:
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty workspace directory that is also the current directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `prefect server start` on 127.0.0.1 for the whole session; yields its API URL.

    In-process flows reach it through PREFECT_API_URL (set for the session, so Dask workers inherit it);
    results and cache records go to a session directory instead of ~/.prefect.
    """
    import sys

    from tests.servers import prefect_server

    home = tmp_path_factory.mktemp("prefect")
    with prefect_server(home / "server", Path(sys.executable).parent) as url:
        mp = pytest.MonkeyPatch()
        mp.setenv("PREFECT_API_URL", url)
        mp.setenv("PREFECT_LOCAL_STORAGE_PATH", str(home / "storage"))
        from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

        with temporary_settings({PREFECT_API_URL: url, PREFECT_LOCAL_STORAGE_PATH: str(home / "storage")}):
            yield url
        mp.undo()


@pytest.fixture(scope="session")
def tiny_mole_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved MoLE model dir on the tiny base, in seconds: 3 random experts behind random top-2 gates (so tokens take
    different experts), the training prompts' ending "\\nAnswer:" and a tf-idf clusterer (for cluster routing)."""
    import torch

    from mole.base import load_base
    from mole.cluster.clustering import Clusterer
    from mole.cluster.embed import TfidfEmbedder
    from mole.nn.model import MoLEModel
    from mole.nn.spec import MoLESpec

    base, tok = load_base("tiny", seed=0)
    spec = MoLESpec(base_model={"name": "tiny", "seed": 0}, expert_ids=["add", "reverse", "units"], r=4,
                    lora_alpha=8.0, target_modules=["q_proj", "v_proj"], top_k=2, clusters=[0, 1, 2],
                    prompt_suffix="\nAnswer:")  # fmt: skip
    model = MoLEModel(base=base, tokenizer=tok, spec=spec)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.bank.values():
            layer.lora_B.copy_(0.5 * torch.randn(layer.lora_B.shape, generator=gen))
        for router in model.routers:
            router.gate.weight.copy_(torch.randn(router.gate.weight.shape, generator=gen))
    texts = ["Add 2 and 3.", "Add 7 and 1.", "Reverse the word: cat", "Reverse the word: drawer", "25 m in km?",
             "3 kg in g?"]  # fmt: skip
    emb = TfidfEmbedder(dim=4).fit(texts)
    model.clusterer = Clusterer(embedder=emb, centroids=emb.encode([texts[0], texts[2], texts[4]]))
    return model.save_pretrained(tmp_path_factory.mktemp("tiny-mole") / "mole")
