"""The MoLE model's saved form and shapes: its spec (mole_config.json), forward output, and loading its base."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mole.base import load_base
from mole.nn.router import RouterOutput
from mole.trust import remote_code
from mole.workspace import SPEC_FILE

ROUTER_FILE = "router.safetensors"


@dataclass
class MoLESpec:
    """Everything needed to rebuild a MoLE model on its base (written as mole_config.json)."""

    base_model: dict[str, Any]
    expert_ids: list[str]
    r: int
    lora_alpha: float
    target_modules: list[str]
    top_k: int = 2
    routing: str = "token_topk"  # token_topk | cluster
    path: str = "auto"
    # The cluster(s) each expert serves, same order as expert_ids: an int, or a list after a merge.
    clusters: list[int | list[int]] = field(default_factory=list)
    # The id of the shared expert (a dir under experts/ like the routed ones), applied to every token; None: none.
    shared: str | None = None
    # What every training prompt ended with (e.g. "\nAnswer:"): appended to a prompt that lacks it, unless raw.
    prompt_suffix: str | None = None
    # How a token router pools gate logits: "token" (its own) or "prefix" (running mean over the sequence so far).
    pool: str = "token"
    # The first this many real tokens of every sequence get no routed expert, only the shared one (experts.sink_tokens:
    # the experts were co-trained so); 0 in models built before the option.
    sink_tokens: int = 0
    # Whether a first-token gate (mole.nn.first_gate, first_gate.safetensors) routes every sequence's first token;
    # False in models built before it.
    first_gate: bool = False

    def templated(self, prompt: str) -> str:
        """``prompt`` as the model was trained on it: ending with ``prompt_suffix`` (added when missing)."""
        s = self.prompt_suffix
        if not s or prompt.endswith(s) or prompt.rstrip().endswith(s.strip()):
            return prompt
        return prompt.rstrip() + s

    def expert_of_cluster(self) -> dict[int, int]:
        """Cluster id -> index of the expert that serves it."""
        out: dict[int, int] = {}
        for i, c in enumerate(self.clusters):
            for cid in c if isinstance(c, list) else [c]:
                out[int(cid)] = i
        return out

    @property
    def num_experts(self) -> int:
        return len(self.expert_ids)


@dataclass
class MoLEOutput:
    """Forward result: ``loss`` = lm_loss + aux_coef·aux_loss + z_coef·z_loss (when labels are given).

    ``aux_loss`` and ``z_loss`` (means over the blocks) are computed on first access: inference reads neither.
    """

    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None
    lm_loss: torch.Tensor | None
    routing: list[RouterOutput]  # one per block, in block order
    past_key_values: Any = None

    @property
    def aux_loss(self) -> torch.Tensor:
        return self._mean([o.aux_loss for o in self.routing])

    @property
    def z_loss(self) -> torch.Tensor:
        return self._mean([o.z_loss for o in self.routing])

    def _mean(self, losses: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(losses).mean() if losses else self.logits.new_zeros((), dtype=torch.float32)


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a causal LM: the ModuleList with ``config.num_hidden_layers`` entries."""
    n = model.config.num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the {n} transformer blocks of {type(model).__name__}")


def read_spec(directory: str | Path) -> MoLESpec:
    """The MoLESpec of a model dir's mole_config.json; errors name the file."""
    path = Path(directory) / SPEC_FILE
    if not path.exists():
        raise FileNotFoundError(f"{directory}: no {SPEC_FILE}; not a MoLE model directory")
    try:
        return MoLESpec(**json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
        raise ValueError(f"{path}: not a valid MoLE model config: {exc}") from None


def load_spec_base(
    ref: dict[str, Any],
    *,
    device: str | None = None,
    trust_remote_code: bool = False,
    source: str | Path = SPEC_FILE,
) -> tuple[nn.Module, Any]:
    """Load the base model a MoLE spec refers to (name, revision, dtype, device, seed).

    The spec's ``trust_remote_code`` takes effect only where ``trust_remote_code`` allows it (``remote_code``).
    """

    return load_base(
        ref["name"],
        revision=ref.get("revision"),
        trust_remote_code=remote_code(ref.get("trust_remote_code", False), trust_remote_code, source),
        dtype=ref.get("dtype", "float32"),
        device=device or ref.get("device", "cpu"),
        seed=ref.get("seed", 0),
    )
