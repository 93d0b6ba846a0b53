"""Token routers for the MoLE layer: a learned top-k gate per block, and forced (per-sequence) routing.

Shapes: B batch, T tokens, D hidden, E experts, K experts per token.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from mole.nn.router_losses import load_balancing_loss, router_z_loss

logger = logging.getLogger(__name__)

# Auto-calibrated warm start: the logit margin of a cluster's own expert over another expert, averaged over
# pairs and measured at the cluster means. 2 logits gives ~88 % of a two-way softmax to the own expert:
# decisive enough to route like the clusterer, soft enough that the gate still gets useful gradients.
WARM_START_MARGIN = 2.0


class RouterOutput:
    """The routing of one block for one forward pass.

    The dense weights and the two losses are computed on first access only: decoding reads neither, and a sparse
    (top-k) layer needs no (B, T, E) tensor at all. ``mix`` gives the fused layer its per-slot weights, computed once
    per block and shared by the block's target modules.

    Attributes:
        weights: (B, T, E) float32 dense weights; zero outside the top-k, non-negative, sum to 1 per token.
        indices: (B, T, K) long, the chosen experts.
        topk_weights: (B, T, K) float32, the weights of the chosen experts (sum to 1 per token).
        logits: (B, T, E) float32 gate logits, or None for forced routing.
        aux_loss: scalar Switch load-balancing loss ``E * sum_i f_i * P_i`` (1.0 when perfectly uniform).
        z_loss: scalar router z-loss, mean over unmasked tokens of ``logsumexp(logits) ** 2``.
        carry: with prefix pooling, the running (sum (B, E), count (B,)) of the per-token logits up to the last
            token, for a forward that continues these sequences (decoding with a KV cache); else None.
        top_k, tokens: K and the number of tokens routed (B * T).
        lean: made outside autograd and autocast (the layers' lean inference paths); given, or found out.
    """

    def __init__(
        self,
        weights: torch.Tensor | None,
        indices: torch.Tensor,
        topk_weights: torch.Tensor,
        logits: torch.Tensor | None,
        aux_loss: torch.Tensor | None = None,
        z_loss: torch.Tensor | None = None,
        carry: tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        num_experts: int | None = None,
        mask: torch.Tensor | None = None,
        lean: bool | None = None,
    ) -> None:
        if weights is None and num_experts is None:
            raise ValueError("RouterOutput needs the dense weights or num_experts to build them")
        if (aux_loss is None or z_loss is None) and logits is None:
            raise ValueError("RouterOutput needs the losses or the logits to compute them")
        self.indices, self.topk_weights, self.logits, self.carry = indices, topk_weights, logits, carry
        self.top_k, self.tokens = indices.shape[-1], indices.numel() // max(indices.shape[-1], 1)
        if lean is None:  # the layers' lean paths (the router knows already)
            lean = not torch.is_grad_enabled() and not _autocast_on(indices.device)
        self.lean = lean
        self.num_experts = num_experts if num_experts is not None else weights.shape[-1]
        self._weights, self._aux, self._z, self._mask = weights, aux_loss, z_loss, mask
        self._mix: dict[tuple, torch.Tensor] = {}

    def without_experts(self, where: torch.Tensor) -> RouterOutput:
        """This routing with the routed experts' weights zeroed at the tokens ``where`` (B, T) is true: there only
        the shared expert (if any) applies. Indices, logits and losses are kept."""
        where = where.to(self.topk_weights.device)
        w = self.topk_weights.masked_fill(where[..., None], 0.0)  # (B, T, K)
        weights = None if self._weights is None else self._weights.masked_fill(where[..., None], 0.0)
        aux, z = (None, None) if self.logits is not None else (self._aux, self._z)
        return RouterOutput(weights, self.indices, w, self.logits, aux, z, self.carry, num_experts=self.num_experts,
                            mask=self._mask)  # fmt: skip

    def routed_at(self, where: torch.Tensor, experts: torch.Tensor) -> RouterOutput:
        """This routing with the tokens ``where`` (B, T) is true sent wholly to sequence b's ``experts[b]`` (B,):
        weight 1 on it, 0 on the other K - 1 slots (the experts after it, so no slot repeats). Logits kept."""
        where, k, e = where.to(self.indices.device), self.indices.shape[-1], self.num_experts
        slots = (experts.to(self.indices.device)[:, None] + torch.arange(k, device=where.device)) % e  # (B, K)
        one = torch.zeros(k, device=where.device, dtype=self.topk_weights.dtype)
        one[0] = 1.0
        indices = torch.where(where[..., None], slots[:, None, :], self.indices)  # (B, T, K)
        w = torch.where(where[..., None], one, self.topk_weights)
        aux, z = (None, None) if self.logits is not None else (self._aux, self._z)
        return RouterOutput(None, indices, w, self.logits, aux, z, self.carry, num_experts=e, mask=self._mask,
                            lean=self.lean)  # fmt: skip

    @property
    def weights(self) -> torch.Tensor:
        if self._weights is None:
            zeros = self.topk_weights.new_zeros((*self.indices.shape[:-1], self.num_experts))
            self._weights = zeros.scatter(-1, self.indices, self.topk_weights)  # (B, T, E)
        return self._weights

    @property
    def aux_loss(self) -> torch.Tensor:
        if self._aux is None:
            probs = self.logits.softmax(dim=-1)  # (B, T, E)
            self._aux = load_balancing_loss(probs, self.indices, self._mask, self.num_experts)
        return self._aux

    @property
    def z_loss(self) -> torch.Tensor:
        if self._z is None:
            self._z = router_z_loss(self.logits, self._mask)
        return self._z

    def mix(self, *, slots: int, scale: float) -> torch.Tensor:
        """Per-slot weights times ``scale``, (B, T, S) float32: the routed experts' weights, then (for S = E + 1) the
        shared slot's 1; computed once per block and shared by its modules.

        Args:
            slots: S, E routed slots or E + 1 with a shared expert last.
            scale: the LoRA scaling ``lora_alpha / r``.
        """
        key = (slots, scale)
        if key not in self._mix:
            zeros = self.topk_weights.new_zeros((*self.indices.shape[:-1], slots))
            if slots > self.num_experts:
                zeros[..., self.num_experts :] = scale  # the shared slot: weight 1 for every token
            self._mix[key] = zeros.scatter(-1, self.indices, self.topk_weights * scale)  # (B, T, S)
        return self._mix[key]

    def mix_columns(self, *, slots: int, r: int, scale: float) -> torch.Tensor:
        """``mix`` with each slot's weight repeated over its r columns of the bank, (N, S*r); once per block."""
        key = ("mix_columns", slots, r, scale)
        if key not in self._mix:
            mix = self.mix(slots=slots, scale=scale).reshape(-1, slots, 1)
            self._mix[key] = mix.expand(-1, slots, r).reshape(-1, slots * r)
        return self._mix[key]

    def token_slots(self, *, slots: int, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """A single token's chosen slots (K',) and the weight of each of their r columns times ``scale`` (1, K'*r)
        (``_chosen``); computed once per block. r is the rank of every expert, ``scale`` the LoRA scaling."""
        key = ("token", slots, r, scale)
        if key not in self._mix:
            idx, w = self._chosen(slots, scale)  # (1, K') each
            self._mix[key] = (idx[0], w[..., None].expand(-1, -1, r).reshape(1, -1))
        return self._mix[key]

    def slot_columns(self, *, slots: int, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's bank columns and their weights times ``scale``, (N, K'*r) each: the r rows of A (columns of B)
        of every chosen slot (``_chosen``); computed once per block.

        Args:
            slots: S.
            r: rank of every expert.
            scale: the LoRA scaling ``lora_alpha / r``.
        """
        key = ("columns", slots, r, scale)
        if key not in self._mix:
            idx, w = self._chosen(slots, scale)  # (N, K')
            cols = (idx[..., None] * r + torch.arange(r, device=idx.device)).flatten(1)  # (N, K'*r)
            self._mix[key] = (cols, w[..., None].expand(-1, -1, r).flatten(1))
        return self._mix[key]

    def _chosen(self, slots: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's chosen slots and their weights times ``scale``, (N, K') each: its top-k experts, then, when
        ``slots`` (S) = E + 1, the shared slot with weight ``scale`` (K' = K + 1)."""
        k = self.indices.shape[-1]
        idx, w = self.indices.reshape(-1, k), self.topk_weights.reshape(-1, k) * scale  # (N, K)
        if slots > self.num_experts:  # the shared slot joins every token's top-k with weight 1
            idx = torch.cat([idx, idx.new_full((idx.shape[0], 1), self.num_experts)], dim=1)  # (N, K')
            w = torch.cat([w, w.new_full((w.shape[0], 1), scale)], dim=1)
        return idx, w


POOLS = ("token", "prefix")


def first_tokens(
    n: int, shape: torch.Size, mask: torch.Tensor | None, seen: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which tokens are among the first ``n`` real tokens of their sequence, and how many real tokens each sequence
    has had after these.

    Args:
        n: how many first tokens.
        shape: (B, T) of the tokens of this forward.
        mask: (B, T) 1 for real tokens, 0 for padding (left or right); None: all real.
        seen: (B,) real tokens of each sequence before these (a continued sequence: decoding with a KV cache), or
            None (these start the sequences).

    Returns:
        ``(first (B, T) bool, seen (B,) long)``; padding is never among the first tokens.
    """
    real = torch.ones(shape, dtype=torch.long) if mask is None else mask.long()
    before = real.cumsum(1) - real  # (B, T) real tokens before each token
    if seen is not None:
        before = before + seen.to(before.device)[:, None]
    return (before < n) & (real > 0), before[:, -1] + real[:, -1]


def prefix_mean(
    logits: torch.Tensor, mask: torch.Tensor | None, carry: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Causal running mean of per-token logits: token t's pooled logits average those of its real tokens <= t.

    Causal, so a decoded token is routed as it was in training; padding adds nothing.

    Args:
        logits: (B, T, E) float32.
        mask: (B, T) 1 for real tokens, 0 for padding; None: all real.
        carry: (sum (B, E), count (B,)) of the tokens before these (a continued sequence), or None.

    Returns:
        The pooled (B, T, E) logits and the carry after the last token.
    """
    m = torch.ones(logits.shape[:2], device=logits.device) if mask is None else mask.to(logits.device).float()
    total = (logits * m[..., None]).cumsum(1)  # (B, T, E)
    count = m.cumsum(1)  # (B, T)
    if carry is not None:
        total, count = total + carry[0][:, None], count + carry[1][:, None]
    pooled = total / count.clamp(min=1.0)[..., None]  # before a sequence's first real token: 0
    return pooled, (total[:, -1].detach(), count[:, -1].detach())


def _autocast_on(device: torch.device) -> bool:
    """Whether autocast is on for ``device``'s type (False for a type autocast does not know, e.g. meta)."""
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:
        return False


class TokenTopKRouter(nn.Module):
    """Token-choice top-k router: one linear gate, logits in fp32, softmax over the chosen k.

    Args:
        dim: hidden size D of the block input.
        num_experts: E.
        top_k: K, experts per token, 1 <= K <= E.
        bias: whether the gate has a bias (the warm start uses it to centre the hidden states).
        pool: "token" routes each token by its own gate logits; "prefix" by the running mean of the logits of the
            sequence so far (causal), so a token is routed by all the evidence before it.
    """

    def __init__(self, *, dim: int, num_experts: int, top_k: int, bias: bool = True, pool: str = "token") -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.pool = pool
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got top_k={top_k}")
        self.dim = dim
        self.num_experts = num_experts
        self.top_k = top_k
        self.gate = nn.Linear(dim, num_experts, bias=bias)

    def forward(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None = None,
        carry: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> RouterOutput:
        """Route every token to its top-k experts.

        Note that with K = 1 the chosen weight is always 1, so the gate learns only through the aux/z losses.

        Args:
            hidden: (B, T, D) block input, any float dtype.
            mask: (B, T) 1 for real tokens, 0 for padding; padding is left out of the aux and z losses.
            carry: with ``pool="prefix"``, the previous forward's ``RouterOutput.carry`` when these tokens continue
                its sequences; None starts them afresh.

        Returns:
            The routing, with dense (B, T, E) weights and (B, T, K) indices / top-k weights.
        """
        gate = self.gate
        w, b, f32 = gate.weight, gate.bias, torch.float32
        if w.dtype != f32:  # (every call costs in a decode step: no casts of what is float32 already)
            w, b = w.float(), None if b is None else b.float()
        x = hidden if hidden.dtype == f32 else hidden.float()
        autocast = _autocast_on(hidden.device)
        if autocast:  # logits stay in float32 under mixed precision
            with torch.autocast(device_type=hidden.device.type, enabled=False):
                logits = F.linear(x, w, b)  # (B, T, E)
        else:  # no autocast context to enter
            logits = F.linear(x, w, b)
        new_carry = None
        if self.pool == "prefix":
            logits, new_carry = prefix_mean(logits, mask, carry)
        top_logits, indices = logits.topk(self.top_k, dim=-1)  # (B, T, K)
        topk_weights = top_logits.softmax(dim=-1)  # (B, T, K)
        # Dense weights and losses on first access (RouterOutput): a decode step needs neither.
        return RouterOutput(None, indices, topk_weights, logits, carry=new_carry, num_experts=self.num_experts,
                            mask=mask, lean=not autocast and not torch.is_grad_enabled())  # fmt: skip

    @torch.no_grad()
    def warm_start(self, means: torch.Tensor, overall: torch.Tensor, *, temperature: float | None = None) -> None:
        """Initialise the gate so that, before training, it routes each token to its nearest cluster mean.

        With centred means ``c_i = means[i] - overall`` and a centred token ``h - overall``, the nearest-mean
        rule ``argmin_i ||h - overall - c_i||^2`` equals ``argmax_i c_i . h - c_i . overall - ||c_i||^2 / 2``:
        a linear gate with row i = ``c_i`` (as the design asks) and bias i = ``-c_i . overall - ||c_i||^2 / 2``
        (the gate sees un-centred h, so the centring is folded into the bias). Rows and bias are then
        divided by ``temperature``, which leaves the argmax unchanged and sets the logit range. With
        ``temperature=None`` it is calibrated so that, at the cluster means, a cluster's own expert leads
        another by ``WARM_START_MARGIN`` logits on average (that lead is ``||c_i - c_j||^2 / 2`` before
        scaling). Without a gate bias only the rows are set, which routes by ``c_i . h`` and is only right
        when the hidden states are centred.

        Args:
            means: (E, D) mean hidden state of each cluster's tokens at this block's input.
            overall: (D,) mean hidden state over all tokens.
            temperature: divisor of the logits; None calibrates it as above.
        """
        e, d = self.num_experts, self.dim
        if means.shape != (e, d):
            raise ValueError(f"means has shape {tuple(means.shape)}, expected (num_experts, dim) = {(e, d)}")
        if overall.shape != (d,):
            raise ValueError(f"overall has shape {tuple(overall.shape)}, expected (dim,) = {(d,)}")
        if temperature is not None and temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        # float64: hidden states can carry large shared offsets that cancel in c_i and in the bias.
        means64, overall64 = means.double(), overall.double()
        c = means64 - overall64  # (E, D)
        bias = -(c @ overall64) - 0.5 * c.square().sum(-1)  # (E,)
        if temperature is None:
            temperature = self._auto_temperature(c)
        self.gate.weight.copy_(c / temperature)
        if self.gate.bias is not None:
            self.gate.bias.copy_(bias / temperature)
        else:
            logger.warning("router gate has no bias: warm start sets rows only, correct only for centred inputs")
        logger.debug("router warm start: E=%d D=%d temperature=%.4g", e, d, temperature)

    @staticmethod
    def _auto_temperature(c: torch.Tensor) -> float:
        """Temperature giving a mean pairwise margin of WARM_START_MARGIN logits at the cluster means."""
        e = c.shape[0]
        if e < 2:
            return 1.0
        half_sq = 0.5 * torch.cdist(c, c).square()  # (E, E), zero diagonal
        mean_margin = float(half_sq.sum() / (e * (e - 1)))
        return mean_margin / WARM_START_MARGIN if mean_margin > 0 else 1.0


def forced_routing(expert_ids: torch.Tensor, *, seq_len: int, num_experts: int) -> RouterOutput:
    """Route every token of sequence b entirely to ``expert_ids[b]`` (cluster-distance / oracle routing).

    Args:
        expert_ids: (B,) long expert per sequence.
        seq_len: T.
        num_experts: E.

    Returns:
        The routing with K = 1, one-hot (B, T, E) weights, no logits and zero losses.
    """
    if expert_ids.dim() != 1:
        raise ValueError(f"expert_ids must have shape (B,), got {tuple(expert_ids.shape)}")
    if expert_ids.dtype.is_floating_point or expert_ids.dtype == torch.bool:
        raise TypeError(f"expert_ids must be an integer tensor, got {expert_ids.dtype}")
    if expert_ids.numel() and (int(expert_ids.min()) < 0 or int(expert_ids.max()) >= num_experts):
        raise ValueError(f"expert_ids must be in [0, {num_experts}), got {expert_ids.tolist()}")
    device = expert_ids.device
    indices = expert_ids.long()[:, None, None].expand(-1, seq_len, 1)  # (B, T, 1)
    topk_weights = torch.ones(indices.shape, device=device, dtype=torch.float32)  # (B, T, 1)
    weights = F.one_hot(indices[..., 0], num_experts).float()  # (B, T, E)
    zero = torch.zeros((), device=device, dtype=torch.float32)
    return RouterOutput(weights, indices, topk_weights, None, zero, zero.clone())
