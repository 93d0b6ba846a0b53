"""A check shared by the MoLE model's decoding tests."""

from __future__ import annotations

import torch

from mole.nn.model import MoLEModel


def assert_cached_decoding_matches(model: MoLEModel, ids: torch.Tensor, mask: torch.Tensor, new: int = 3) -> None:
    """Greedy decoding with a KV cache gives, at every step, the logits of one full forward over what it generated."""
    out = model.generate(ids, mask, max_new_tokens=new, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)  # fmt: skip
    full_mask = torch.cat([mask, torch.ones(ids.shape[0], new, dtype=torch.long)], 1)
    with torch.no_grad():
        logits = model(out.sequences, full_mask).logits  # (B, T + new, V)
    for step, step_logits in enumerate(out.logits):
        torch.testing.assert_close(step_logits, logits[:, ids.shape[1] - 1 + step], rtol=1e-4, atol=1e-4)
