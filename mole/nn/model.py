"""MoLEModel: a frozen base causal LM with an expert bank in its target linears and one router per block.

Surgery: every target ``nn.Linear`` of block b becomes a :class:`~mole.nn.layer.MoLELinear` that reads the routing
of block b from a shared :class:`~mole.nn.layer.RoutingState`; a forward pre-hook on the block computes that
routing from the block's input hidden states (one pass, no second forward). Routing is per token, so
generation with a KV cache routes each new token from its own hidden state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from mole.base import loadable_base
from mole.cluster.clustering import Clusterer
from mole.data.tokenize import completions, encode_prompts, row_losses
from mole.io import atomic_dir, load_safetensors
from mole.nn.adapters import adapter_keys, adapter_scale, fit_rank, module_name, read_adapter, write_adapter
from mole.nn.decode import FirstTokens, compile_blocks, continues, merged, one_expert
from mole.nn.first_gate import PREFIX, FirstTokenGate, split_router_state
from mole.nn.layer import MoLELinear, RoutingState
from mole.nn.lineage import read_lineage, write_lineage
from mole.nn.router import RouterOutput, TokenTopKRouter, forced_routing
from mole.nn.spec import ROUTER_FILE, SPEC_FILE, MoLEOutput, MoLESpec, find_blocks, load_spec_base, read_spec

logger = logging.getLogger(__name__)


class MoLEModel(nn.Module):
    """A base causal LM with MoLE expert banks and per-block token routers."""

    def __init__(self, *, base: nn.Module, tokenizer: Any, spec: MoLESpec) -> None:
        super().__init__()
        self.base = base
        self.tokenizer = tokenizer
        self.spec = spec
        for p in base.parameters():
            p.requires_grad_(False)
        blocks = find_blocks(base)
        e, k, dim, dev = spec.num_experts, spec.top_k, base.config.hidden_size, next(base.parameters()).device
        self.routers = nn.ModuleList(TokenTopKRouter(dim=dim, num_experts=e, top_k=k, pool=spec.pool) for _ in blocks)
        self.routers.to(dev)
        self.states = [RoutingState() for _ in blocks]
        self._carry: list[Any] = [None] * len(blocks)  # prefix pooling: each block's running logits, for decoding
        self._first = FirstTokens(spec.sink_tokens, len(blocks)) if spec.sink_tokens else None
        self.first_gate = FirstTokenGate.of(tokenizer, dim, e, device=dev) if spec.first_gate else None
        self._needs_cache = spec.pool == "prefix" or self._first is not None  # whether a hook reads the KV cache
        self.bank: dict[str, MoLELinear] = {}
        self._forced: torch.Tensor | None = None  # (B,) expert per sequence, when routing is forced
        self._mask: torch.Tensor | None = None  # (B, T) attention mask of the current full forward
        self._outputs: list[RouterOutput] | None = None  # the routing of each block, collected during ``forward``
        self.merge_forced = True  # generate merges the experts once when one expert routes the whole batch
        self.clusterer: Any = None  # a mole.cluster.clustering.Clusterer, for cluster-distance routing
        self.lineage: dict[str, dict[str, Any]] = {}  # expert id -> its lineage.json record (mole.nn.lineage)
        for b, block in enumerate(blocks):
            self._inject(block, self.states[b], prefix=module_name(base, block))
            block.register_forward_pre_hook(self._make_hook(b), with_kwargs=True)
        if not self.bank:
            raise ValueError(f"no module of the base matches target_modules={spec.target_modules}")
        self._layers = list(self.bank.values())  # a plain list: the layers are registered once, inside the base

    def _inject(self, block: nn.Module, state: RoutingState, *, prefix: str) -> None:
        scale = self.spec.lora_alpha / self.spec.r
        for name, module in list(block.named_modules()):
            if name.split(".")[-1] in self.spec.target_modules and isinstance(module, nn.Linear):
                parent = block.get_submodule(name.rsplit(".", 1)[0]) if "." in name else block
                layer = MoLELinear(
                    base_layer=module,
                    num_experts=self.spec.num_experts,
                    r=self.spec.r,
                    scale=scale,
                    state=state,
                    path=self.spec.path,
                    shared=self.spec.shared is not None,
                )
                setattr(parent, name.split(".")[-1], layer)
                self.bank[f"{prefix}.{name}"] = layer

    def _make_hook(self, b: int):  # noqa: ANN202 - a closure over the block index
        router, state = self.routers[b], self.states[b]  # looked up once: a decode step pays for every lookup

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden, first, continued = args[0] if args else kwargs["hidden_states"], None, False  # (B, T, D)
            merged = self._layers[0]._unmerged is not None  # the experts are in the base weights: nothing to route
            mask = self._mask if self._mask is not None and self._mask.shape == hidden.shape[:2] else None
            if self._needs_cache and (self._first is not None or not (merged or self._forced is not None)):
                continued = continues(kwargs, b)  # a decode step after earlier tokens
                # the sink tokens (spec.sink_tokens): only the shared expert, also where the experts are merged
                first = self._first.mark(b, hidden.shape[:2], mask, continued) if self._first is not None else None
            state.sink = first
            if merged:
                return
            if self._forced is not None:
                out = forced_routing(self._forced.to(hidden.device), seq_len=hidden.shape[1],
                                     num_experts=self.spec.num_experts)  # fmt: skip
            else:
                out = router(hidden, mask, self._carry[b] if continued else None)
                self._carry[b] = out.carry
                if self.first_gate is not None:  # each sequence's first token: the first-token gate's expert
                    if b == 0:  # (where the first tokens are, and their experts: once per forward)
                        self.first_gate.start(hidden, mask, continues(kwargs, 0))
                    out = self.first_gate.route(out)
            state.output = out = out if first is None else out.without_experts(first)
            if self._outputs is not None:
                self._outputs.append(out)

        return hook

    # ----------------------------------------------------------------------------------------------- running
    @contextlib.contextmanager
    def forced_route(self, expert_ids: torch.Tensor | None) -> Iterator[None]:
        """Route every token of sequence b to expert ``expert_ids[b]`` inside the block (None: the routers)."""
        old, self._forced = self._forced, expert_ids
        try:
            yield
        finally:
            self._forced = old

    @contextlib.contextmanager
    def _running(self, mask: torch.Tensor | None, route: torch.Tensor | None) -> Iterator[list[RouterOutput]]:
        """One full forward inside: the padding mask for the hooks, ``route`` forced (None: as set), and the list
        that collects each block's routing."""
        self._outputs, self._mask = [], mask
        try:
            with self.forced_route(route if route is not None else self._forced):
                yield self._outputs
        finally:
            self._outputs, self._mask = None, None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, *, route: torch.Tensor | None = None, aux_loss_coef: float = 0.0,
                z_loss_coef: float = 0.0, **kwargs: Any) -> MoLEOutput:  # fmt: skip
        """Run the model. input_ids (B, T); labels (B, T) with -100 ignored; route (B,) forces experts."""
        with self._running(attention_mask, route) as routing:
            out = self.base(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        res = MoLEOutput(logits=out.logits, loss=None, lm_loss=out.loss, routing=routing,
                         past_key_values=getattr(out, "past_key_values", None))  # fmt: skip
        if out.loss is not None:  # the router losses only when a loss is asked for: inference never computes them
            res.loss = out.loss + aux_loss_coef * res.aux_loss + z_loss_coef * res.z_loss
        return res

    def merged(self, expert_weights: torch.Tensor) -> contextlib.AbstractContextManager:
        """A context in which every token is computed as if routed with ``expert_weights`` (E,), at base speed: the
        experts are folded into the base weights (``W + scale * sum_i w_i B_i A_i``), routers do not run, and on exit
        each layer gets its original weight tensor back (kept, not recovered by subtraction)."""
        return merged(self._layers, expert_weights)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        route: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """``base.generate`` with MoLE routing active (KV cache on by default); returns (B, T + new) ids.

        Prompts of different lengths go in one batch, left-padded, with their ``attention_mask``. When ``route``
        sends every sequence to the same expert (cluster routing of one prompt), that expert is merged into the
        base weights for the request (``merged``; off with ``merge_forced = False``) and decoding runs at base speed.
        """
        self._mask = attention_mask  # the prompt's padding, for prefix pooling (decode steps add real tokens only)
        route = route if route is not None else self._forced
        merge = one_expert(route, self._layers, self.spec.num_experts) if self.merge_forced else None
        with self.forced_route(route), merge or contextlib.nullcontext():
            out = self.base.generate(
                input_ids=input_ids, attention_mask=attention_mask, pad_token_id=self.tokenizer.pad_token_id, **kwargs
            )
        self._mask = None
        return out

    def compile_blocks(self, **options: Any) -> None:
        """``torch.compile`` every block (``dynamic=True`` unless given): eager's outputs up to float rounding, hooks
        eager; each new shape compiles on first use (minutes on CPU): worth it for long generations only."""
        compile_blocks(find_blocks(self.base), **options)

    def route_by_cluster(self, texts: list[str]) -> torch.Tensor:
        """Cluster-distance routing (c-BTM style): each text's expert is its nearest centroid's, shape (B,)."""
        if self.clusterer is None:
            raise RuntimeError("cluster routing needs the clusterer saved with the model (clusterer/ in its dir)")
        expert_of = self.spec.expert_of_cluster()
        return torch.tensor([expert_of[int(c)] for c in self.clusterer.assign(texts)])

    def routed_prompts(
        self, prompts: list[str], *, routing: str | None = None, route: torch.Tensor | None = None, raw: bool = False
    ) -> tuple[list[str], torch.Tensor | None]:
        """The prompts as the model reads them (templated unless ``raw``) and the expert each is forced to, (B,):
        ``route`` when given, the nearest centroid's with ``routing="cluster"`` (default: the spec's), else None."""
        prompts = prompts if raw else [self.spec.templated(p) for p in prompts]
        if route is None and (routing or self.spec.routing) == "cluster":
            route = self.route_by_cluster(prompts)
        return prompts, route

    @torch.no_grad()
    def generate_text(
        self,
        prompts: list[str],
        *,
        max_new_tokens: int = 32,
        routing: str | None = None,
        route: torch.Tensor | None = None,
        raw: bool = False,
        **kwargs: Any,
    ) -> list[str]:
        """Greedy (or sampled, via kwargs) completions of prompts; ``routing`` defaults to the spec's.

        Each prompt gets the training prompts' ending (``MoLESpec.templated``) unless ``raw``.

        Prompts are left-padded together; ``route`` (B,) forces each prompt to one expert; with
        ``routing="cluster"`` each prompt is routed whole to the expert of its nearest cluster centroid;
        otherwise the token routers route every token.
        """
        prompts, route = self.routed_prompts(prompts, routing=routing, route=route, raw=raw)
        enc = encode_prompts(self.tokenizer, prompts)
        dev = next(self.base.parameters()).device
        kwargs.setdefault("do_sample", False)
        out = self.generate(enc["input_ids"].to(dev), enc["attention_mask"].to(dev), route=route,
                            max_new_tokens=max_new_tokens, **kwargs)  # fmt: skip
        return completions(self.tokenizer, prompts, out, enc["input_ids"].shape[1])

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, *,
              route: torch.Tensor | None = None, routing: list[RouterOutput] | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Summed negative log-likelihood of the labelled tokens of each row and their count, each (B,); the LM head
        runs at the labelled positions only (``row_losses``). ``routing``, when given, gets each block's routing."""
        with self._running(attention_mask, route) as outputs:
            out = row_losses(self.base, input_ids, attention_mask, labels)
        if routing is not None:
            routing.extend(outputs)
        return out

    @torch.no_grad()
    def routing(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                route: torch.Tensor | None = None) -> list[RouterOutput]:  # fmt: skip
        """Each block's routing of a batch (``route`` as in ``forward``), from the base's decoder alone: no LM head."""
        with self._running(attention_mask, route) as outputs:
            self.base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return outputs

    def expert_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.bank.values() for p in (layer.lora_A, layer.lora_B)]

    def router_parameters(self) -> list[nn.Parameter]:
        return list(self.routers.parameters())

    # ------------------------------------------------------------------------------------- experts in / out
    @property
    def shared_index(self) -> int | None:  # the bank slot of the shared expert (after the E routed ones), or None
        return self.spec.num_experts if self.spec.shared is not None else None

    def load_expert(self, i: int, directory: str | Path) -> None:
        """Load expert i (``shared_index``: the shared one) from a peft adapter dir: the bank's modules, rank <= r."""
        config, tensors = read_adapter(directory)
        if int(config.get("r", 0)) > self.spec.r:
            raise ValueError(f"{directory}: adapter r={config.get('r')} is above the bank's r={self.spec.r}")
        # Another rank or scale (a gallery expert) is padded to the bank's rank and rescaled, exactly (fit_rank).
        bank_scale = self.spec.lora_alpha / self.spec.r
        same = config.get("r") == self.spec.r and adapter_scale(config) == bank_scale
        scales = {"scale": adapter_scale(config), "bank_r": self.spec.r, "bank_scale": bank_scale}
        for name, layer in self.bank.items():
            key_a, key_b = adapter_keys(name)
            if key_a not in tensors or key_b not in tensors:
                raise ValueError(f"{directory}: adapter has no weights for module {name}")
            a, b = tensors[key_a], tensors[key_b]
            layer.set_expert(i, *((a, b) if same else fit_rank(a, b, **scales)))

    def export_expert(self, i: int, directory: str | Path) -> Path:
        """Write expert i (``shared_index``: the shared one) as a standard peft adapter dir."""
        tensors = {name: layer.expert(i) for name, layer in self.bank.items()}
        return write_adapter(directory, tensors, r=self.spec.r, lora_alpha=self.spec.lora_alpha,
                             target_modules=self.spec.target_modules,
                             base_model=loadable_base(self.spec.base_model.get("name")))  # fmt: skip

    # ------------------------------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | Path, *, extra_files: dict[str, Path] | None = None,
                        extra_json: dict[str, Any] | None = None) -> Path:  # fmt: skip
        """Write mole_config.json, router.safetensors and experts/<id>/ atomically into ``directory``.

        ``extra_files`` (name -> file or dir) are copied in and ``extra_json`` (name -> object) written beside. An
        expert with a record in ``self.lineage`` gets its lineage.json, with the content hash of what was written.
        """
        with atomic_dir(directory) as tmp:
            (tmp / SPEC_FILE).write_text(json.dumps(asdict(self.spec), indent=2))
            gate = {} if self.first_gate is None else {PREFIX + k: v for k, v in self.first_gate.state_dict().items()}
            state = {k: v.detach().contiguous().cpu() for k, v in {**self.routers.state_dict(), **gate}.items()}
            save_file(state, str(tmp / ROUTER_FILE), metadata={"format": "pt"})
            for i, eid in enumerate(self.spec.expert_ids):
                self.export_expert(i, tmp / "experts" / eid)
            if self.spec.shared is not None:
                self.export_expert(self.shared_index, tmp / "experts" / self.spec.shared)
            for eid in (e for e in [*self.spec.expert_ids, self.spec.shared] if e in self.lineage):
                write_lineage(tmp / "experts" / eid, self.lineage[eid])
            for name, src in (extra_files or {}).items():
                (shutil.copytree if Path(src).is_dir() else shutil.copy2)(src, tmp / name)
            if self.clusterer is not None and not (tmp / "clusterer").exists():  # cluster routing survives a round trip
                self.clusterer.save(tmp / "clusterer")
            for name, obj in (extra_json or {}).items():
                (tmp / name).write_text(json.dumps(obj, indent=2))
        return Path(directory)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        *,
        base: nn.Module | None = None,
        tokenizer: Any = None,
        device: str | None = None,
        trust_remote_code: bool = False,
    ) -> MoLEModel:
        """Load a saved MoLE model; the base is loaded from the reference in mole_config.json unless given.

        A model directory is data, not code: its saved ``trust_remote_code`` is honoured only when the caller's own
        ``trust_remote_code`` (the user's config or flag) allows it, and refused otherwise (see ``remote_code``).
        """
        directory = Path(directory)
        spec = read_spec(directory)
        if base is None:
            base, tokenizer = load_spec_base(
                spec.base_model, device=device, trust_remote_code=trust_remote_code, source=directory / SPEC_FILE
            )
        model = cls(base=base, tokenizer=tokenizer, spec=spec)
        for i, eid in enumerate(spec.expert_ids):
            model.load_expert(i, directory / "experts" / eid)
        if spec.shared is not None:
            model.load_expert(model.shared_index, directory / "experts" / spec.shared)
        found = {e: read_lineage(directory / "experts" / e) for e in [*spec.expert_ids, spec.shared] if e is not None}
        model.lineage = {e: record for e, record in found.items() if record is not None}
        routers, gate = split_router_state(load_safetensors(directory / ROUTER_FILE))
        try:
            model.routers.load_state_dict(routers)
            if model.first_gate is not None or gate:  # (a first-token gate the spec does not name: refused too)
                (nn.Module() if model.first_gate is None else model.first_gate).load_state_dict(gate)
        except RuntimeError as exc:  # missing keys or shapes that do not fit the spec
            raise ValueError(f"{directory / ROUTER_FILE}: does not fit {directory / SPEC_FILE}: {exc}") from None
        if (directory / "clusterer" / "centroids.npy").exists():
            model.clusterer = Clusterer.load(directory / "clusterer", trust_remote_code=trust_remote_code)
        return model.eval()

    @classmethod
    def from_experts(
        cls,
        *,
        base: nn.Module,
        tokenizer: Any,
        expert_dirs: list[Path],
        expert_ids: list[str],
        base_ref: dict[str, Any],
        top_k: int,
        routing: str = "token_topk",
        path: str = "auto",
        clusters: list[int] | None = None,
        shared_dir: Path | None = None,
        shared_id: str = "shared",
        pool: str = "token",
        sink_tokens: int = 0,
        first_gate: bool = False,
    ) -> MoLEModel:
        """Build a bank from trained peft adapter dirs (all with the same r, alpha and target modules).

        ``shared_dir`` (a peft adapter dir, saved as ``experts/<shared_id>``) becomes the shared expert, applied to
        every token beside the routed top-k. ``first_gate``: the model gets a first-token gate (to be fitted).
        """
        config, _ = read_adapter(expert_dirs[0])
        targets = config["target_modules"]
        spec = MoLESpec(
            base_model=base_ref,
            expert_ids=list(expert_ids),
            r=int(config["r"]),
            lora_alpha=float(config["lora_alpha"]),
            target_modules=sorted(targets if isinstance(targets, list) else [targets]),
            top_k=min(top_k, len(expert_dirs)),
            routing=routing, path=path,
            clusters=list(clusters) if clusters is not None else list(range(len(expert_dirs))),
            shared=shared_id if shared_dir is not None else None,
            pool=pool, sink_tokens=sink_tokens, first_gate=first_gate,
        )  # fmt: skip
        model = cls(base=base, tokenizer=tokenizer, spec=spec)
        for i, d in enumerate(expert_dirs):
            model.load_expert(i, d)
        if shared_dir is not None:
            model.load_expert(model.shared_index, shared_dir)
        return model
