"""Training one peft LoRA adapter (an expert, the shared adapter or the multitask baseline), and what every
training path shares: adapter names, fingerprints of a run's inputs, the metrics file, sealing and reuse checks.

Every output is written atomically and training checkpoints every ``experts.checkpoint_every`` steps, so a run
can be killed at any point and re-run: a finished adapter is reused, an interrupted one resumes from its last
checkpoint and ends with the same adapter as an uninterrupted run.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub.utils import is_jinja_available
from peft import get_peft_model, set_peft_model_state_dict
from safetensors.torch import save_file

from mole.config import BuildConfig
from mole.data.tokenize import row_losses, train_batches
from mole.io import atomic_dir, seal, seal_broken, write_json
from mole.nn.adapters import WEIGHTS, read_adapter, stable_config
from mole.sections import ExpertsConfig, LoraSection
from mole.training.checkpoint import checkpoint_dir, remove_stale_temps, resume, save_checkpoint

# huggingface_hub caches package versions in a dict it fills non-atomically ("N/A" first, then the version). Two
# expert threads saving their first adapter (peft writes a model card, which checks for jinja2) can read "N/A" and
# fail with "requires Jinja2 to be installed". Filling the cache here, at import (under Python's import lock,
# before any thread trains), removes that race.
is_jinja_available()

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

METRICS = "train_metrics.json"
BASELINE_ID = "multitask_lora"
SHARED_ID = "shared"
SHARED_APPLIED = ("residual", "cotrained")  # experts.shared modes whose MoLE applies the shared adapter to every token


def expert_id(cluster: int) -> str:
    """The name of cluster ``cluster``'s expert: ``expert_00``, ``expert_01``, ..."""
    return f"expert_{cluster:02d}"


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier of 0-based optimizer step ``step``: linear warmup, then linear decay (never 0)."""
    if step < warmup:
        return (step + 1) / warmup
    return (total - step) / max(1, total - warmup)


SEALED = ("adapter_model.safetensors", "adapter_config.json")  # their digests go into train_metrics.json


def seal_adapter(directory: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` with the SHA-256 of the adapter files just written to ``directory`` (checked on reuse)."""
    return {**metrics, "sha256": seal(directory, SEALED)}


def is_finished(out_dir: Path, fingerprint: str) -> bool:
    """Whether ``out_dir`` holds a complete, intact adapter trained with ``fingerprint``.

    Intact: its files have the digests recorded when they were written, so a truncated or altered adapter is
    trained again rather than reused (a warning says which file).
    """
    try:
        metrics = json.loads((Path(out_dir) / METRICS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if metrics.get("fingerprint") != fingerprint:
        return False
    sealed = metrics.get("sha256")
    if not isinstance(sealed, dict):  # written before adapters were sealed: can't vouch for it
        logger.warning("%s: no digests recorded; training it again", out_dir)
        return False
    if (problem := seal_broken(out_dir, sealed)) is not None:
        logger.warning("%s: %s; training it again", Path(out_dir).name, problem)
        return False
    return True


def train_lora(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict[str, Any]],
    *,
    lora: LoraSection,
    cfg: ExpertsConfig,
    steps: int,
    out_dir: Path,
    seed: int,
    fingerprint: str,
    progress: Callable[[int, int, float], None] | None = None,
    init_from: Path | None = None,
    under: Path | None = None,
) -> dict[str, Any]:
    """Train one LoRA adapter on ``rows`` and write it to ``out_dir`` as a standard peft adapter dir.

    Two ways to build on a shared adapter (``experts.shared``): ``init_from`` starts the adapter as a copy of that
    adapter dir (a branched expert, BTM/BTX's "seed"), ``under`` keeps that adapter frozen and active beneath the
    trained one (a residual expert, applied on top of the shared one as the MoLE layer applies both).

    The adapter is injected into ``model`` for the duration of the call and removed again (also on error), so
    the same base model object serves the next expert with its weights, ``requires_grad`` flags and mode as they
    were. Resumes from ``<out_dir>.ckpt`` when that checkpoint has the same ``fingerprint`` and ``steps``.

    Args:
        model: the base causal LM (any device and dtype; peft keeps fp16/bf16 adapters in fp32).
        tokenizer: its tokenizer, with a pad or eos token.
        rows: prepared rows (``prompt`` + ``completion``, or ``text``).
        lora: LoRA options (rank, alpha, dropout, target modules).
        cfg: optimizer, batching and checkpoint options; ``cfg.steps`` is ignored in favour of ``steps``.
        steps: optimizer steps to train.
        out_dir: the adapter directory to write (replaced atomically).
        seed: seeds the adapter init, dropout and the batch order; the same seed gives the same adapter.
        fingerprint: identifies this run's inputs; stored in the metrics and checkpoints.
        progress: called as ``progress(step, steps, loss)`` after every optimizer step (``step`` from 1).
        init_from: a peft adapter dir (same rank and modules) whose weights the adapter starts from.
        under: a peft adapter dir applied, frozen, beneath the trained adapter (saved without it).

    Returns:
        The metrics written to ``out_dir/train_metrics.json``.
    """
    out_dir, ckpt_path = Path(out_dir), checkpoint_dir(Path(out_dir))
    remove_stale_temps(out_dir)
    device = next(model.parameters()).device
    grad_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    # A private RNG stream: the run is reproducible and the caller's global RNG is left as it was.
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, lora.to_peft())
        try:
            _build_on(peft_model, init_from=init_from, under=under)
            params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
            optimizer = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
            state = resume(ckpt_path, params=params, optimizer=optimizer, device=device, fingerprint=fingerprint,
                           total_steps=steps)  # fmt: skip
            start = 0 if state is None else state["step"]
            if state is None:
                state = {"step": 0, "total_steps": steps, "losses": [], "tokens": 0, "seconds": 0.0}
            else:
                logger.info("%s: resuming from its checkpoint at step %d/%d", out_dir.name, start, steps)
            state["fingerprint"] = fingerprint
            batches = train_batches(rows, tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length,
                                    seed=seed, steps=steps)  # fmt: skip
            warmup, t0 = min(cfg.warmup_steps, steps), time.perf_counter() - state["seconds"]
            peft_model.train()
            # The batch stream is deterministic in `seed`: skipping the consumed batches puts a resumed run in step.
            for step, batch in enumerate(itertools.islice(batches, start, None), start=start):
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr * lr_factor(step, steps, warmup)
                ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
                # the model's own mean next-token loss, with the LM head run at the labelled positions only
                nll, count = row_losses(peft_model, ids, mask, labels)  # (B,) each
                loss = nll.sum() / count.sum().clamp(min=1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params.values(), cfg.grad_clip)
                optimizer.step()
                state["losses"].append(float(loss.detach()))
                state["tokens"] += int(batch["attention_mask"].sum())
                state["step"], state["seconds"] = step + 1, time.perf_counter() - t0
                if state["step"] % cfg.checkpoint_every == 0 and state["step"] < steps:
                    save_checkpoint(ckpt_path, adapter=params, optimizer=optimizer, device=device, state=state)
                if progress is not None:
                    progress(state["step"], steps, state["losses"][-1])
            peft_model.eval()
            metrics = run_metrics(state, rows=rows, lora=lora, cfg=cfg, seed=seed, resumed_from=start)
            with atomic_dir(out_dir) as tmp:
                peft_model.save_pretrained(str(tmp), selected_adapters=["default"])
                stable_config(tmp)
                metrics = seal_adapter(tmp, metrics)
                write_json(tmp / METRICS, metrics)  # last: its presence marks the directory complete
            shutil.rmtree(ckpt_path, ignore_errors=True)
        finally:
            peft_model.unload()  # puts the original modules back into `model`
            for name, param in model.named_parameters():
                param.requires_grad_(grad_flags[name])
            model.train(was_training)
    logger.info("%s: %d steps, final loss %.4f, %.1fs", out_dir.name, steps, metrics["final_loss"], metrics["seconds"])
    return metrics


def _build_on(peft_model: Any, *, init_from: Path | None, under: Path | None) -> None:
    """Start the ``default`` adapter from ``init_from``'s weights; activate ``under`` frozen beneath it."""
    if init_from is not None:
        _, tensors = read_adapter(init_from)
        result = set_peft_model_state_dict(peft_model, tensors, adapter_name="default")
        missing = [k for k in result.missing_keys if ".default." in k]
        if missing or result.unexpected_keys:
            raise ValueError(f"{init_from}: adapter does not fit the expert's modules (missing {missing[:2]}, "
                             f"unexpected {result.unexpected_keys[:2]})")  # fmt: skip
    if under is not None:
        peft_model.load_adapter(str(under), adapter_name=SHARED_ID, is_trainable=False)
        peft_model.base_model.set_adapter(["default", SHARED_ID])  # both active: outputs add up
        for name, param in peft_model.named_parameters():  # set_adapter makes every active adapter trainable
            if f".{SHARED_ID}." in name:
                param.requires_grad_(False)


def run_metrics(
    state: dict, *, rows: list, lora: LoraSection, cfg: ExpertsConfig, seed: int, resumed_from: int
) -> dict:
    """The train_metrics.json of a finished run from its training ``state`` (losses, tokens, seconds, fingerprint)."""
    seconds = state["seconds"]
    return {
        "loss": state["losses"], "final_loss": state["losses"][-1], "steps": state["total_steps"],
        "resumed_from": resumed_from, "rows": len(rows), "tokens": state["tokens"], "seconds": round(seconds, 3),
        "tokens_per_s": round(state["tokens"] / max(seconds, 1e-9), 1), "fingerprint": state["fingerprint"],
        "seed": seed, "lr": cfg.lr, "batch_size": cfg.batch_size, "max_length": cfg.max_length, "r": lora.r,
        "lora_alpha": lora.lora_alpha, "target_modules": list(lora.target_modules),
    }  # fmt: skip


def adapter_fingerprint(
    cfg: BuildConfig, *, kind: str, seed: int, steps: int, row_ids: list[str], extra: dict[str, Any] | None = None
) -> str:
    # Options that cannot change the adapter (where it goes, how often it checkpoints) are left out. `extra` holds
    # what else it depends on: the baseline's own LoRA shape, the shared adapter an expert builds on.
    # `steps` is given on its own (the adapter's own count), so the section's step counts are left out too.
    unused = {"out_dir", "baseline_dir", "checkpoint_every", "multitask_baseline", "multitask_steps", "multitask_r",
              "steps", "shared_steps", "gallery", "shared_update"}  # fmt: skip
    unused |= {"shared"} if kind == "shared" else set()
    # experts.first_gate: the co-training run's fingerprint (each co-trained adapter's upstream) carries it where it
    # applies; other adapters do not depend on it, and with it off the fingerprints of builds from before it stay
    unused |= {"first_gate"}
    payload = {"kind": kind, "experts": cfg.experts.model_dump(mode="json", exclude=unused), "seed": seed,
               "base_model": cfg.base_model.model_dump(mode="json"), "base_seed": cfg.seed, "steps": steps,
               "rows": sorted(row_ids), **(extra or {})}  # fmt: skip
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Job:
    """One adapter of the train-experts stage: its rows, output dir, seed, steps and what it builds on."""

    name: str
    cluster: int | None  # None for the shared adapter and the multitask baseline
    rows: list[dict[str, Any]]
    rel_dir: str  # workspace-relative output dir, as recorded in experts.json
    seed: int
    steps: int
    kind: str = "expert"  # expert | shared | multitask_lora
    lora: LoraSection | None = None  # None: experts.lora
    init_from: str | None = None  # workspace-relative adapter dir the adapter starts from (experts.shared = seed)
    under: str | None = None  # workspace-relative adapter dir kept frozen beneath it (experts.shared = residual)
    upstream: str | None = None  # fingerprint of the shared adapter it builds on
    # Incremental builds (mole.training.lifecycle): the content hash of the previous build's adapter it starts
    # from, and whether it is that adapter copied unchanged (copy_from: its workspace-relative dir).
    parent: str | None = None
    copy_from: str | None = None
    status: str | None = None  # reused | updated | added (incremental builds); None in a full build
    lr_scale: float = 1.0  # its lr is experts.lr times this (an updated adapter continues a decayed schedule)

    @property
    def parent_dir(self) -> str | None:
        """The previous build's adapter an updated adapter starts from (its ``init_from``), else None."""
        return self.init_from if self.parent is not None else None

    def fingerprint(self, cfg: BuildConfig) -> str:
        extra: dict[str, Any] = {"upstream": self.upstream} if self.upstream else {}
        if self.parent is not None:
            extra |= {"parent": self.parent, "copy": self.copy_from is not None}
        if self.lora is not None:
            extra["lora"] = self.lora.model_dump(mode="json")
        if self.lr_scale != 1.0:
            extra["lr_scale"] = self.lr_scale
        row_ids = [r["id"] for r in self.rows]
        return adapter_fingerprint(cfg, kind=self.kind, seed=self.seed, steps=self.steps, row_ids=row_ids, extra=extra)

    def entry(self, fingerprint: str, metrics: dict[str, Any], *, reused: bool) -> dict[str, Any]:
        """This adapter's experts.json entry, from the train_metrics.json of its run."""
        return {"id": self.name, "cluster": self.cluster, "rows": len(self.rows), "steps": self.steps,
                "path": self.rel_dir, "final_loss": metrics["final_loss"], "seconds": metrics["seconds"],
                "reused": reused, "fingerprint": fingerprint, "kind": self.kind, "tokens": metrics["tokens"],
                "r": metrics["r"],
                **({"status": self.status, "parent_sha256": self.parent} if self.status else {})}  # fmt: skip


def write_sealed_adapter(out_dir: Path, tensors: dict[str, torch.Tensor], peft_config: Any,
                         metrics: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Write a standard peft adapter dir atomically: ``tensors`` (peft's key -> weight) and ``peft_config``, then
    train_metrics.json last with the files' digests (its presence marks the directory complete)."""
    config = copy.deepcopy(peft_config)
    config.inference_mode = True  # as PeftModel.save_pretrained writes it
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
        stable_config(tmp)
        metrics = seal_adapter(tmp, metrics)
        write_json(tmp / METRICS, metrics)
    return metrics


def finished_metrics(out_dir: Path) -> dict[str, Any]:
    """The train_metrics.json of a finished adapter dir."""
    return json.loads((Path(out_dir) / METRICS).read_text(encoding="utf-8"))


def reuse(out_dir: Path, fingerprint: str, name: str, steps: int, progress: Callable | None) -> dict[str, Any] | None:
    """The metrics of ``out_dir`` when it holds an intact adapter trained with ``fingerprint`` (it is reused, and
    a checkpoint a kill just after finishing left is removed); None when it must be trained."""
    if not is_finished(out_dir, fingerprint):
        return None
    logger.info("%s: reusing %s (same inputs)", name, out_dir)
    shutil.rmtree(checkpoint_dir(out_dir), ignore_errors=True)
    metrics = finished_metrics(out_dir)
    if progress is not None:
        progress(name, steps, steps, metrics["final_loss"])
    return metrics
