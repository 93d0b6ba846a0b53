"""A tiny MoLE model over random peft experts, for the routing tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mole.base import load_base
from mole.nn.adapters import write_adapter
from mole.nn.model import MoLEModel

E, R = 3, 4
TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="session")
def expert_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """E peft adapter dirs with random A and B (non-zero experts, so routing changes the output)."""
    root = tmp_path_factory.mktemp("experts")
    base, _ = load_base("tiny", seed=0)
    gen = torch.Generator().manual_seed(1)
    dirs = []
    modules = {name: m for name, m in base.named_modules() if name.rsplit(".", 1)[-1] in TARGETS}
    for i in range(E):
        tensors = {
            name: (torch.randn(R, m.in_features, generator=gen), torch.randn(m.out_features, R, generator=gen))
            for name, m in modules.items()
        }
        tensors = {name: (0.3 * a, 0.3 * b) for name, (a, b) in tensors.items()}
        dirs.append(write_adapter(root / f"expert_{i:02d}", tensors, r=R, lora_alpha=8.0, target_modules=TARGETS))
    return dirs


@pytest.fixture
def make_mole(expert_dirs: list[Path]) -> Callable[[], MoLEModel]:
    """Builds a fresh top-2 MoLE model on the tiny base from ``expert_dirs`` (as train-router does)."""

    def make() -> MoLEModel:
        base, tok = load_base("tiny", seed=0)
        return MoLEModel.from_experts(base=base, tokenizer=tok, expert_dirs=expert_dirs,
                                      expert_ids=[d.name for d in expert_dirs], base_ref={"name": "tiny", "seed": 0},
                                      top_k=2)  # fmt: skip

    return make
