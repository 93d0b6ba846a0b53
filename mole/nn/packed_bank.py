"""The expert bank of packed training: MoLE layers put into a base for the length of a run, and taken out again.

Every target linear becomes a :class:`~mole.nn.layer.MoLELinear` reading one shared, forced routing (each sequence
goes whole to one expert, the same at every block). Expert i's slices of the bank are exposed as views, so that
each expert gets its own optimizer over exactly its own weights.

Shapes: E experts, r rank, B batch, T tokens.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from peft import get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from mole.nn.first_gate import first_positions
from mole.nn.layer import MoLELinear, RoutingState
from mole.nn.router import first_tokens, forced_routing
from mole.sections import LoraSection

PEFT_PREFIX = "base_model.model."

ExpertTensors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A (r, d_in), B (d_out, r))


def peft_init(model: nn.Module, lora: LoraSection, *, seed: int) -> tuple[ExpertTensors, Any]:
    """The initial adapter weights ``train_lora`` would start from with this seed, and peft's LoraConfig.

    peft draws the init itself (seeded as ``train_lora`` seeds it), so the two can never drift apart. ``model``
    is given back as it was (modules, ``requires_grad`` flags, mode). The caller's RNG is advanced.

    Returns:
        ``({module name: (A, B)}, the LoraConfig peft used)``, in the order peft visits the modules.
    """
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, lora.to_peft())
    try:
        tensors = {
            name: (m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone())
            for name, m in model.named_modules()
            if isinstance(m, LoraLayer)
        }
        config = copy.deepcopy(peft_model.peft_config["default"])
    finally:
        peft_model.unload()
        for name, param in model.named_parameters():
            param.requires_grad_(flags[name])
        model.train(was_training)
    return tensors, config


class PackedBank:
    """A context manager that swaps MoLE layers into ``model`` and puts the original linears back on exit.

    Inside the block the base is frozen and in training mode; on exit its modules, ``requires_grad`` flags and
    mode are as they were.

    Args:
        model: the base causal LM.
        lora: rank, alpha and dropout of every expert.
        num_experts: E.
        modules: names (relative to ``model``) of the linears to adapt, e.g. from :func:`peft_init`.
        shared: give the bank a shared slot beneath every expert (see :meth:`set_shared`).
        sink_tokens: the first this many real tokens of every sequence get no routed expert (the shared slot only).
        lead: special tokens (a BOS) before a sequence's first token, for ``route(first=...)``.
    """

    def __init__(
        self,
        model: nn.Module,
        lora: LoraSection,
        *,
        num_experts: int,
        modules: list[str],
        shared: bool = False,
        sink_tokens: int = 0,
        lead: int = 0,
    ) -> None:
        self.model, self.lora, self.num_experts, self.modules = model, lora, num_experts, modules
        self.sink_tokens, self.lead = sink_tokens, lead
        self.shared = shared  # a shared slot under every expert, loaded by set_shared and never stepped
        self.state = RoutingState()
        self.layers: dict[str, MoLELinear] = {}
        self._saved: tuple[dict[str, bool], bool] | None = None

    def __enter__(self) -> PackedBank:
        model = self.model
        bad = [(n, type(m).__name__) for n in self.modules if not isinstance(m := model.get_submodule(n), nn.Linear)]
        if bad:  # checked before anything changes, so a refused bank leaves the model as it was
            name, kind = bad[0]
            raise TypeError(f"packed training adapts nn.Linear modules only; {name} is {kind}")
        self._saved = ({n: p.requires_grad for n, p in model.named_parameters()}, model.training)
        model.requires_grad_(False)
        for name in self.modules:
            base = model.get_submodule(name)
            layer = MoLELinear(base_layer=base, num_experts=self.num_experts, r=self.lora.r, scale=self.lora.scale,
                               state=self.state, path="dense", dropout=self.lora.lora_dropout,
                               shared=self.shared)  # fmt: skip
            if layer.lora_A.dtype in (torch.float16, torch.bfloat16):  # peft keeps half-precision adapters in fp32
                layer.lora_A = nn.Parameter(layer.lora_A.detach().float())
                layer.lora_B = nn.Parameter(layer.lora_B.detach().float())
            self._swap(name, layer)
            self.layers[name] = layer
        model.train()
        return self

    def __exit__(self, *exc: object) -> None:
        for name, layer in self.layers.items():
            self._swap(name, layer.base_layer)
        self.layers = {}
        self.state.output = None
        assert self._saved is not None
        flags, was_training = self._saved
        for name, param in self.model.named_parameters():
            param.requires_grad_(flags[name])
        self.model.train(was_training)

    def _swap(self, name: str, module: nn.Module) -> None:
        parent, _, attr = name.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, attr, module)

    def _slice(self, i: int) -> slice:
        if not 0 <= i < self.num_experts:
            raise ValueError(f"expert index must be in [0, {self.num_experts}), got {i}")
        return slice(i * self.lora.r, (i + 1) * self.lora.r)

    def set_expert(self, i: int, tensors: ExpertTensors) -> None:
        """Load expert i's weights, e.g. from :func:`peft_init`."""
        for name, layer in self.layers.items():
            layer.set_expert(i, *tensors[name])

    def set_shared(self, tensors: ExpertTensors) -> None:
        """Load the shared slot (applied to every sequence, frozen: no optimizer steps it)."""
        for name, layer in self.layers.items():
            layer.set_expert(layer.shared_index, *tensors[name])

    def expert_views(self, i: int) -> dict[str, torch.Tensor]:
        """Expert i's weights as views into the bank, keyed by peft's parameter names.

        The views share storage with the bank, so an optimizer stepping them updates the bank in place; their
        ``.grad`` is set by :meth:`attach_grads`. Keys are ``base_model.model.<module>.lora_{A,B}.default.weight``,
        as in ``train_lora``, so checkpoints have the same layout.
        """
        sl, out = self._slice(i), {}
        for name, layer in self.layers.items():
            out[f"{PEFT_PREFIX}{name}.lora_A.default.weight"] = layer.lora_A.data[sl]  # (r, d_in)
            out[f"{PEFT_PREFIX}{name}.lora_B.default.weight"] = layer.lora_B.data[:, sl]  # (d_out, r)
        return out

    def attach_grads(self, i: int, views: dict[str, torch.Tensor]) -> None:
        """Point each view's ``.grad`` at expert i's slice of the bank gradients (zeros where there is none)."""
        sl = self._slice(i)
        for name, layer in self.layers.items():
            for part, param in (("A", layer.lora_A), ("B", layer.lora_B)):
                view = views[f"{PEFT_PREFIX}{name}.lora_{part}.default.weight"]
                grad = param.grad
                if grad is None:
                    view.grad = torch.zeros_like(view)
                else:
                    view.grad = grad[sl] if part == "A" else grad[:, sl]

    def route(self, experts: torch.Tensor, *, seq_len: int, mask: torch.Tensor | None = None,
              first: torch.Tensor | None = None) -> None:  # fmt: skip
        """Send every token of sequence b to expert ``experts[b]`` in every layer for the next forward.

        Args:
            experts: (B,) long bank index per sequence.
            seq_len: T.
            mask: (B, T) 1 for real tokens, 0 for padding (where the first ``sink_tokens`` real tokens are); None: all
                real.
            first: (B,) the expert of each sequence's first token (after ``lead`` special tokens) instead, as a
                first-token gate routes it in the MoLE model; None: ``experts``.
        """
        out = forced_routing(experts, seq_len=seq_len, num_experts=self.num_experts)
        if first is not None:
            out = out.routed_at(first_positions(out.indices.shape[:2], mask, self.lead), first)
        if self.sink_tokens:
            out = out.without_experts(first_tokens(self.sink_tokens, out.indices.shape[:2], mask)[0])
        self.state.output = out

    def zero_grad(self) -> None:
        """Drop the bank gradients (the next backward starts from nothing)."""
        for layer in self.layers.values():
            layer.lora_A.grad = layer.lora_B.grad = None
