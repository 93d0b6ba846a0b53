"""The router's auxiliary losses: Switch load balancing and the z-loss, over the unmasked tokens.

Shapes: B batch, T tokens, E experts, K experts per token.
"""

from __future__ import annotations

import torch

__all__ = ["load_balancing_loss", "router_z_loss"]


def _token_mask(mask: torch.Tensor | None, lead_shape: torch.Size, device: torch.device) -> torch.Tensor:
    """A float32 (N,) mask over the flattened tokens (all ones when ``mask`` is None)."""
    if mask is None:
        return torch.ones(lead_shape.numel(), device=device, dtype=torch.float32)
    if mask.shape != lead_shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(lead_shape)} (one entry per token)")
    return mask.reshape(-1).to(device=device, dtype=torch.float32)


def load_balancing_loss(
    probs: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor | None, num_experts: int
) -> torch.Tensor:
    """Switch Transformer load-balancing loss ``E * sum_i f_i * P_i``.

    ``f_i`` is the fraction of the (unmasked) top-k assignments that go to expert i (so it sums to 1), and
    ``P_i`` the mean full-softmax probability of expert i over unmasked tokens. The loss is 1.0 when
    routing is perfectly balanced and approaches E when every token goes to one expert. Only ``P``
    carries gradient, as in Switch.

    Args:
        probs: (B, T, E) full softmax over the gate logits.
        indices: (B, T, K) chosen experts.
        mask: (B, T) 1 for real tokens, 0 for padding; None counts every token.
        num_experts: E.

    Returns:
        A float32 scalar.
    """
    lead = probs.shape[:-1]
    if indices.shape[:-1] != lead:
        raise ValueError(f"indices has shape {tuple(indices.shape)}, expected {tuple(lead)} + (K,)")
    m = _token_mask(mask, lead, probs.device)  # (N,)
    n = m.sum().clamp_min(1.0)
    flat_idx = indices.reshape(-1, indices.shape[-1])  # (N, K)
    counts = torch.zeros(flat_idx.shape[0], num_experts, device=probs.device, dtype=torch.float32)
    counts.scatter_add_(-1, flat_idx, torch.ones_like(flat_idx, dtype=torch.float32))  # (N, E)
    f = (counts * m[:, None]).sum(0) / (n * flat_idx.shape[-1])  # (E,)
    p = (probs.reshape(-1, num_experts).float() * m[:, None]).sum(0) / n  # (E,)
    return num_experts * (f * p).sum()


def router_z_loss(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean over unmasked tokens of ``logsumexp(logits) ** 2``.

    Args:
        logits: (B, T, E) gate logits.
        mask: (B, T) 1 for real tokens, 0 for padding; None counts every token.

    Returns:
        A float32 scalar.
    """
    m = _token_mask(mask, logits.shape[:-1], logits.device)  # (N,)
    lse = torch.logsumexp(logits.float(), dim=-1).reshape(-1)  # (N,)
    return (lse.square() * m).sum() / m.sum().clamp_min(1.0)
