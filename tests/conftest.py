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
