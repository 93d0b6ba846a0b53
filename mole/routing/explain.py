"""The routing audit (``mole explain``): which experts each token of a prompt and of its completion went to.

A prompt is read the way ``mole predict`` reads it (``MoLEModel.routed_prompts``: the training prompts' ending
appended unless raw; under cluster routing the whole row forced to its nearest centroid's expert) and completed the
way ``MoLEModel.generate_text`` completes it. Prompt + completion then go through the model once and every block's
router output is kept for every token. Routing is causal (a token's hidden state, and so its routing, depends only on
the tokens up to it), so these are the weights each token got while the completion was decoded, up to float
rounding; the last generated token, never read while decoding, is routed as the model would read it next.

Shapes: L blocks, T tokens (prompt + completion), E routed experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mole.data.tokenize import completions, encode_prompts
from mole.nn.model import MoLEModel


@dataclass
class Explanation:
    """The routing of one prompt and its completion, token by token.

    Attributes:
        prompt: the prompt as the model read it (templated unless raw).
        completion: the completion, as ``generate_text`` returns it.
        token_ids: (T,) the prompt's tokens (special ones included), then the completion's.
        tokens: (T,) each token's text.
        n_prompt: ``tokens[:n_prompt]`` are the prompt's, the rest the completion's.
        experts: (E,) the routed experts' ids, in bank order.
        per_block: (L, T, E) float32 router weights per block: zero outside a token's top-k, sum to 1 per token.
        routing: "token_topk" (the token routers) or "cluster" (each row forced to one expert).
        shared: the shared expert's id (applied to every token, beside the routed ones), or None.
    """

    prompt: str
    completion: str
    token_ids: list[int]
    tokens: list[str]
    n_prompt: int
    experts: list[str]
    per_block: np.ndarray
    routing: str
    shared: str | None = None

    @property
    def weights(self) -> np.ndarray:
        """(T, E) each token's weight per expert, the mean over blocks (sums to 1 per token)."""
        return self.per_block.mean(0)

    def ranked(self, k: int, *, block: int | None = None) -> list[list[tuple[int, float]]]:
        """Per token, its at most ``k`` heaviest experts as (expert index, weight), heaviest first; experts of
        weight 0 left out. ``block`` ranks that block's weights; None the mean over blocks."""
        w = self.weights if block is None else self.per_block[block]  # (T, E)
        order = np.argsort(-w, axis=-1, kind="stable")[:, :k]  # (T, k)
        return [[(int(e), float(row[e])) for e in idx if row[e] > 0] for row, idx in zip(w, order, strict=True)]

    def to_dict(self, *, per_block: bool = False) -> dict[str, Any]:
        """A JSON-ready dict at full precision: ``weights`` (T lists of E floats) align with ``tokens`` and
        ``experts``; ``per_block`` adds the (L, T, E) weights of each block."""
        out = {
            "prompt": self.prompt,
            "completion": self.completion,
            "routing": self.routing,
            "experts": list(self.experts),
            "shared": self.shared,
            "tokens": list(self.tokens),
            "token_ids": list(self.token_ids),
            "n_prompt": self.n_prompt,
            "weights": self.weights.tolist(),
        }
        return out | ({"per_block": self.per_block.tolist()} if per_block else {})


@torch.no_grad()
def explain(
    model: MoLEModel,
    prompts: list[str],
    *,
    max_new_tokens: int = 32,
    routing: str | None = None,
    raw: bool = False,
    **generate_kwargs: Any,
) -> list[Explanation]:
    """Complete each prompt and report the routing of every token of prompt and completion.

    Prompts go one at a time, so no padding enters the audit.

    Args:
        model: the MoLE model.
        prompts: the prompts, as a user gives them to ``mole predict``.
        max_new_tokens: tokens generated per prompt.
        routing: "token_topk" or "cluster"; None: the model's own (``spec.routing``).
        raw: read the prompts as given, without the training prompts' ending.
        **generate_kwargs: passed to ``generate`` (greedy unless ``do_sample=True``).

    Returns:
        One :class:`Explanation` per prompt, in order.
    """
    model.eval()
    generate_kwargs.setdefault("do_sample", False)
    dev = next(model.base.parameters()).device
    return [_explain_one(model, p, dev, max_new_tokens, routing, raw, generate_kwargs) for p in prompts]


def _explain_one(
    model: MoLEModel,
    prompt: str,
    dev: torch.device,
    max_new_tokens: int,
    routing: str | None,
    raw: bool,
    generate_kwargs: dict[str, Any],
) -> Explanation:
    texts, route = model.routed_prompts([prompt], routing=routing, raw=raw)
    enc = encode_prompts(model.tokenizer, texts)
    n_prompt = enc["input_ids"].shape[1]
    ids = model.generate(enc["input_ids"].to(dev), enc["attention_mask"].to(dev), route=route,
                         max_new_tokens=max_new_tokens, **generate_kwargs)  # fmt: skip
    res = model(ids, torch.ones_like(ids), route=route)  # (1, T): the routers' own outputs for every token
    per_block = torch.stack([o.weights[0] for o in res.routing]).float().cpu().numpy()  # (L, T, E)
    token_ids = ids[0].tolist()
    return Explanation(
        prompt=texts[0],
        completion=completions(model.tokenizer, texts, ids, n_prompt)[0],
        token_ids=token_ids,
        tokens=[model.tokenizer.decode([t]) for t in token_ids],
        n_prompt=n_prompt,
        experts=list(model.spec.expert_ids),
        per_block=per_block,
        routing="cluster" if route is not None else "token_topk",
        shared=model.spec.shared,
    )
