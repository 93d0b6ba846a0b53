"""The MoLE layer: a frozen linear plus a bank of LoRA experts mixed per token by the block's router.

Shapes: B batch, T tokens, E experts, K experts per token, r rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mole.nn.paths import SPARSE_MAX_TOKENS, choose_path, pick, shape_key
from mole.nn.router import RouterOutput

PathChoice = Literal["auto", "dense", "sparse"]
_PATHS = ("auto", "dense", "sparse")
__all__ = ["MoLELinear", "RoutingState", "choose_path"]


@dataclass
class RoutingState:
    """Shared, per-forward routing of one transformer block, read by every MoLELinear of that block."""

    output: RouterOutput | None = None
    sink: torch.Tensor | None = None  # (B, T) bool: tokens that get the shared expert only (MoLESpec.sink_tokens)


class MoLELinear(nn.Module):
    """``y = W x + scale * (B_s A_s x + sum_i w_i * B_i A_i x)`` over E routed LoRA experts and an optional shared one.

    The bank is stored concatenated so forward needs no loop over experts: rows ``[i*r:(i+1)*r]`` of
    ``lora_A`` (S*r, d_in) and columns ``[i*r:(i+1)*r]`` of ``lora_B`` (d_out, S*r) are expert i's peft
    ``lora_A.weight`` (r, d_in) and ``lora_B.weight`` (d_out, r). With ``shared=True`` the bank has S = E + 1
    slots: slot E (``shared_index``) is the shared expert, applied to every token with weight 1 (DeepSeekMoE's
    always-on expert), inside the same two matmuls as the routed ones.

    Args:
        base_layer: the frozen linear W.
        num_experts: E.
        r: LoRA rank of every expert.
        scale: LoRA scaling, ``lora_alpha / r``.
        state: the block's routing, set by the model before every forward.
        path: "dense", "sparse" (gather the top-k experts) or "auto" (see ``choose_path``).
        dropout: dropout on the experts' input, as peft's ``lora_dropout``.
        shared: add a shared expert slot, applied to every token.
    """

    def __init__(
        self,
        *,
        base_layer: nn.Linear,
        num_experts: int,
        r: int,
        scale: float,
        state: RoutingState,
        path: PathChoice = "auto",
        dropout: float = 0.0,
        shared: bool = False,
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if r < 1:
            raise ValueError(f"r must be >= 1, got {r}")
        if path not in _PATHS:
            raise ValueError(f"path must be one of {_PATHS}, got {path!r}")
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        self.num_experts = num_experts
        self.shared = shared
        self.slots = num_experts + int(shared)  # S: routed experts, then the shared one
        self.r = r
        self.scale = scale
        self.state = state
        self.path: PathChoice = path
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._drops = dropout > 0
        # The base weight while a merged one stands in for it, in a tuple: a Parameter attribute would register it.
        self._unmerged: tuple[nn.Parameter] | None = None
        self._routed: tuple[torch.Tensor, torch.Tensor] | None = None  # merged routed columns and weights
        self._bt: tuple | None = None  # the bank as blocks, for one-token steps (``_blocks``)
        w = base_layer.weight
        # Follow the base layer; a quantised base (integer storage) gets float32 adapters, as peft does.
        dtype = w.dtype if w.is_floating_point() else torch.float32
        self.lora_A = nn.Parameter(torch.empty(self.slots * r, self.in_features, device=w.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.slots * r, device=w.device, dtype=dtype))
        # peft initialises each (r, d_in) A with kaiming_uniform_(a=sqrt(5)); its bound depends only on
        # fan_in = d_in, so one call over the concatenated bank draws from the same distribution.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def shared_index(self) -> int | None:
        """The bank slot of the shared expert (E), or None without one."""
        return self.num_experts if self.shared else None

    @property
    def in_features(self) -> int:
        """d_in of the base layer."""
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        """d_out of the base layer."""
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base output plus the routed mixture of experts.

        Args:
            x: (B, T, d_in) input; ``self.state.output`` must route the same B * T tokens (a flattened
                (B * T, d_in) input is accepted).

        Returns:
            (B, T, d_out) in the base layer's output dtype.
        """
        routing = self.state.output
        if routing is not None and routing.lean and self._unmerged is None:  # inference: the lean paths, if they fit
            lean = self._lean_path(x, routing)
            if lean is not None:
                return lean
        if self._unmerged is not None:  # the routed mixture is folded into the base weight (see ``merge``)
            return self.base_layer(x) if self.state.sink is None else self._merged_forward(x)
        if routing is None:
            raise RuntimeError(
                "MoLELinear called with no routing: the model must set state.output (its block's router "
                "output) before the forward pass"
            )
        indices, lead = routing.indices, x.shape[:-1]
        # Some blocks flatten (B, T) before a projection: same tokens in the same order, so only the count must agree.
        if indices.shape[:-1].numel() != lead.numel():
            raise RuntimeError(
                f"routing covers tokens of shape {tuple(indices.shape[:-1])} but the input has {tuple(lead)}"
            )
        y = self.base_layer(x)
        # peft-style: experts run in their own dtype (e.g. fp32 adapters on a bf16 base), result cast back.
        xa = self.dropout(x.to(self.lora_A.dtype))
        y2 = y.reshape(-1, self.out_features)  # (N, d_out)
        path, k = self.path, indices.shape[-1]
        if path == "auto":  # measured once per shape for small steps (mole.nn.paths)
            key = shape_key(xa, slots=self.slots, top_k=k, r=self.r, d_out=self.out_features)
            path = pick(key, lead.numel(), self.num_experts, k, lambda p: self._add_experts(y2, xa, routing, p))
        return self._add_experts(y2, xa, routing, path).view(y.shape)

    def _lean_path(self, x: torch.Tensor, routing: RouterOutput) -> torch.Tensor | None:
        """The output by a lean path, or None where none applies: outside autograd and autocast (``routing.lean``),
        with no dropout and the input in the bank's dtype, one token by its K' slots (a decode step at batch 1) or
        many tokens by the dense bank (a prefill, an evaluation batch).

        Every op and lookup counts at decode size: a step runs this between the base's large matmuls, with cold caches.
        """
        path, n = self.path, routing.tokens
        if n == 1:
            if x.numel() != x.shape[-1] or not (
                path == "sparse" or (path == "auto" and 2 * routing.top_k <= self.num_experts)
            ):
                return None
        elif not (path == "dense" or (path == "auto" and n > SPARSE_MAX_TOKENS)) or x.numel() != n * x.shape[-1]:
            return None
        blocks, a, b = self._bt, self.lora_A, self.lora_B
        if blocks is None or b._version != blocks[1] or b.data_ptr() != blocks[0].data_ptr() or (
                a.data_ptr() != blocks[2].data_ptr()):  # fmt: skip
            blocks = self._blocks()
        a3, bt3 = blocks[2], blocks[3]
        if x.dtype is not a3.dtype or (self._drops and self.training):
            return None
        y = self.base_layer(x)
        if n == 1:  # the token's slots: whole (r, d_in) blocks of A and (r, d_out) blocks of B^T
            sel, w = routing.token_slots(slots=self.slots, r=self.r, scale=self.scale)  # (K',), (1, K'*r)
            h = F.linear(x.reshape(1, -1), a3.index_select(0, sel).view(-1, a3.shape[-1])) * w  # (1, K'*r)
            b = bt3.index_select(0, sel).view(-1, bt3.shape[-1])  # (K'*r, d_out)
        else:  # every slot, each r-slice times the token's weight
            h = F.linear(x.reshape(n, -1), a3.view(-1, a3.shape[-1])) * routing.mix_columns(
                slots=self.slots, r=self.r, scale=self.scale)  # (N, S*r)  # fmt: skip
            b = bt3.view(-1, bt3.shape[-1])  # (S*r, d_out)
        if y.dtype is not h.dtype:
            return y + (h @ b).to(y.dtype).view(y.shape)
        y.view(n, -1).addmm_(h, b)  # into the base layer's fresh output
        return y

    @torch.no_grad()
    def _blocks(self) -> tuple:
        """``(B, its version, A as (S, r, d_in) blocks, B^T as (S, r, d_out) blocks)``, kept in ``_bt``: a view of A and
        a contiguous copy of B^T, made again when ``lora_B`` changes in place (its version counter) or either
        parameter gets new storage. Holding views of both keeps their storage, so a new tensor cannot take its
        address unseen. (Edits through ``.data`` bypass the version counter: change the parameters themselves, e.g.
        with ``set_expert`` or an optimizer, as everything here does.)"""
        a, b = self.lora_A.detach(), self.lora_B.detach()
        self._bt = (b, b._version, a.view(self.slots, self.r, -1), b.t().contiguous().view(self.slots, self.r, -1))
        return self._bt

    def _add_experts(self, y: torch.Tensor, x: torch.Tensor, routing: RouterOutput, path: str) -> torch.Tensor:
        """Base output plus the mixed experts by ``path``: (N, d_out), (…, d_in) -> (N, d_out)."""
        if path == "sparse" and y.shape[0] > 1:
            return y + self._sparse(x, routing).to(y.dtype)
        if path == "sparse":  # one token (a decode step at batch 1): read only its K slots of the bank
            cols, w = routing.slot_columns(slots=self.slots, r=self.r, scale=self.scale)  # (1, K'*r) each
            h = F.linear(x.reshape(1, -1), self.lora_A.index_select(0, cols[0]))  # (1, K'*r)
            h, b = h * w.to(h.dtype), self.lora_B.index_select(1, cols[0])  # b: (d_out, K'*r)
        else:
            h, b = self._dense_mixed(x, routing), self.lora_B  # (N, S*r), (d_out, S*r)
        if h.dtype == y.dtype:
            return torch.addmm(y, h, b.t())  # base output + mixed experts in one kernel
        return y + F.linear(h, b).to(y.dtype)

    def _dense_mixed(self, x: torch.Tensor, routing: RouterOutput) -> torch.Tensor:
        """``x A_cat^T`` with each slot's r-slice times its weight and the scale: (…, d_in) -> (N, S*r)."""
        mix = routing.mix(slots=self.slots, scale=self.scale).reshape(-1, self.slots)  # (N, S), shared by the block
        h = F.linear(x.reshape(-1, self.in_features), self.lora_A)  # (N, S*r)
        # Cast to h's dtype (not x's): under autocast the matmul output is bf16 even for fp32 x.
        return (h.view(-1, self.slots, self.r) * mix.to(h.dtype)[..., None]).view(-1, self.slots * self.r)

    def _sparse(self, x: torch.Tensor, routing: RouterOutput) -> torch.Tensor:
        """Only the top-k slots of each token, gathered from the bank: (…, d_in) -> (N, d_out) scaled delta.

        No (B, T, E) tensor is formed: the token's K slots (plus the shared one) are gathered from A and B.
        """
        cols, w = routing.slot_columns(slots=self.slots, r=self.r, scale=self.scale)  # (N, K'*r) each
        a = self.lora_A[cols]  # (N, K'*r, d_in)
        b = self.lora_B.t()[cols]  # (N, K'*r, d_out)
        h = torch.einsum("nd,nkd->nk", x.reshape(-1, self.in_features), a)  # (N, K'*r)
        return torch.einsum("nk,nko->no", h * w.to(h.dtype), b)  # (N, d_out)

    # ------------------------------------------------------------------------------------------------ merging
    @torch.no_grad()
    def merge(self, slot_weights: torch.Tensor) -> None:
        """Fold ``scale * sum_i w_i B_i A_i`` (and the shared expert) into a new base weight; ``unmerge`` restores.

        The original weight tensor is kept, not recovered by subtraction, so ``unmerge`` gives it back bit for bit.
        Until then forward is the base linear alone, whatever the routing.

        Args:
            slot_weights: (E,) the weight of every routed expert (e.g. one-hot for a sequence routed whole).
        """
        if self.merged:
            raise RuntimeError("MoLELinear is already merged: unmerge it first")
        w = self.base_layer.weight
        if slot_weights.shape != (self.num_experts,):
            raise ValueError(f"slot_weights must have shape ({self.num_experts},), got {tuple(slot_weights.shape)}")
        mix = slot_weights.to(self.lora_B.device, torch.float32) * self.scale
        if self.shared:
            mix = torch.cat([mix, mix.new_full((1,), self.scale)])  # (S,)
        slots = mix.nonzero()[:, 0]  # only the slots in use: one expert costs r, not S*r, in the product below
        cols = (slots[:, None] * self.r + torch.arange(self.r, device=slots.device)).flatten()  # (used*r,)
        w_cols = mix[slots].repeat_interleave(self.r).to(self.lora_B.dtype)  # (used*r,)
        delta = (self.lora_B[:, cols] * w_cols) @ self.lora_A[cols]  # (d_out, d_in)
        self._unmerged = (w,)
        self.base_layer.weight = nn.Parameter(w + delta.to(w.dtype), requires_grad=False)
        routed = slots[slots < self.num_experts]  # the routed slots, for the sink tokens (``_merged_forward``)
        keep = (routed[:, None] * self.r + torch.arange(self.r, device=slots.device)).flatten()
        self._routed = (keep, mix[routed].repeat_interleave(self.r).to(self.lora_B.dtype)) if keep.numel() else None

    def _merged_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The merged base linear, with the routed experts taken back out at the state's sink tokens (exact: the
        merged routed deltas, ``scale * sum_i w_i B_i A_i x``, subtracted there; the shared expert stays)."""
        y, sink = self.base_layer(x), self.state.sink
        if self._routed is None or sink.numel() != x.shape[:-1].numel():
            return y
        rows = sink.reshape(-1).to(x.device).nonzero()[:, 0]  # (M,)
        cols, w = self._routed
        xs = x.reshape(-1, self.in_features)[rows].to(self.lora_A.dtype)  # (M, d_in)
        delta = ((xs @ self.lora_A[cols].t()) * w) @ self.lora_B[:, cols].t()  # (M, d_out)
        y2 = y.reshape(-1, self.out_features)
        return y2.index_put((rows,), y2[rows] - delta.to(y.dtype)).view(y.shape)

    def unmerge(self) -> None:
        """Put back the base weight ``merge`` replaced (the very same tensor)."""
        if self._unmerged is not None:
            self.base_layer.weight = self._unmerged[0]
            self._unmerged = self._routed = None

    @property
    def merged(self) -> bool:
        """Whether the routed mixture is folded into the base weight."""
        return self._unmerged is not None

    def _check_index(self, i: int) -> None:
        if not 0 <= i < self.slots:
            what = (
                f"[0, {self.num_experts}] (the last is the shared expert)"
                if self.shared
                else f"[0, {self.num_experts})"
            )
            raise ValueError(f"expert index must be in {what}, got {i}")

    def expert(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert i's weights as detached copies, laid out like peft's.

        Args:
            i: expert index (``shared_index`` for the shared expert).

        Returns:
            ``(A_i, B_i)`` with shapes (r, d_in) and (d_out, r).
        """
        self._check_index(i)
        sl = slice(i * self.r, (i + 1) * self.r)
        return self.lora_A[sl].detach().clone(), self.lora_B[:, sl].detach().clone()

    @torch.no_grad()
    def set_expert(self, i: int, A: torch.Tensor, B: torch.Tensor) -> None:
        """Overwrite expert i's weights (cast to the bank's device and dtype).

        Args:
            i: expert index.
            A: (r, d_in), e.g. a peft adapter's ``lora_A.weight``.
            B: (d_out, r), e.g. a peft adapter's ``lora_B.weight``.
        """
        self._check_index(i)
        want_a, want_b = (self.r, self.in_features), (self.out_features, self.r)
        if tuple(A.shape) != want_a or tuple(B.shape) != want_b:
            raise ValueError(
                f"expert {i}: expected A {want_a} and B {want_b} (r={self.r}), got A {tuple(A.shape)} "
                f"and B {tuple(B.shape)}"
            )
        sl = slice(i * self.r, (i + 1) * self.r)
        self.lora_A[sl].copy_(A)
        self.lora_B[:, sl].copy_(B)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, num_experts={self.num_experts}, "
            f"shared={self.shared}, r={self.r}, scale={self.scale}, path={self.path!r}"
        )
