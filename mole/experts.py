"""Training one peft LoRA expert per cluster, and the multitask LoRA baseline (stage ``train-experts``).

Every output is written atomically and training checkpoints every ``experts.checkpoint_every`` steps, so the
stage can be killed at any point and re-run: finished experts are reused, an interrupted one resumes from its
last checkpoint and ends with the same adapter as an uninterrupted run.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub.utils import is_jinja_available
from peft import get_peft_model

from mole.adapters import stable_config
from mole.checkpoint import checkpoint_dir, remove_stale_temps, resume, save_checkpoint
from mole.config import BuildConfig, ExpertsConfig, LoraSection
from mole.data.tokenize import train_batches
from mole.io import atomic_dir, read_jsonl, seal, seal_broken, write_json

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
                loss = peft_model(**{k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}).loss
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
            metrics = _metrics(state, rows=rows, lora=lora, cfg=cfg, seed=seed, resumed_from=start)
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
        from peft import set_peft_model_state_dict

        from mole.adapters import read_adapter

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


def _metrics(state: dict, *, rows: list, lora: LoraSection, cfg: ExpertsConfig, seed: int, resumed_from: int) -> dict:
    seconds = state["seconds"]
    return {
        "loss": state["losses"], "final_loss": state["losses"][-1], "steps": state["total_steps"],
        "resumed_from": resumed_from, "rows": len(rows), "tokens": state["tokens"], "seconds": round(seconds, 3),
        "tokens_per_s": round(state["tokens"] / max(seconds, 1e-9), 1), "fingerprint": state["fingerprint"],
        "seed": seed, "lr": cfg.lr, "batch_size": cfg.batch_size, "max_length": cfg.max_length, "r": lora.r,
        "lora_alpha": lora.lora_alpha, "target_modules": list(lora.target_modules),
    }  # fmt: skip


def _fingerprint(
    cfg: BuildConfig, *, kind: str, seed: int, steps: int, row_ids: list[str], extra: dict[str, Any] | None = None
) -> str:
    # Options that cannot change the adapter (where it goes, how often it checkpoints) are left out. `extra` holds
    # what else it depends on: the baseline's own LoRA shape, the shared adapter an expert builds on.
    # `steps` is given on its own (the adapter's own count), so the section's step counts are left out too.
    unused = {"out_dir", "baseline_dir", "checkpoint_every", "multitask_baseline", "multitask_steps", "multitask_r",
              "steps", "shared_steps"} | ({"shared"} if kind == "shared" else set())  # fmt: skip
    payload = {"kind": kind, "experts": cfg.experts.model_dump(mode="json", exclude=unused), "seed": seed,
               "base_model": cfg.base_model.model_dump(mode="json"), "base_seed": cfg.seed, "steps": steps,
               "rows": sorted(row_ids), **(extra or {})}  # fmt: skip
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def load_cluster_rows(cfg: BuildConfig) -> dict[int, list[dict[str, Any]]]:
    """The prepared training rows grouped by cluster, from train.jsonl and assignments.jsonl.

    Raises:
        FileNotFoundError: an input is missing (naming the file and the stage to run).
        ValueError: the assignments do not match the prepared rows (clusters are stale).
    """
    from mole.stages import cluster_paths, prepared_paths  # lazily: mole.stages will import this module

    train_path, assign_path = prepared_paths(cfg)["train"], cluster_paths(cfg)["assignments"]
    for path, stage in ((train_path, "prepare"), (assign_path, "cluster")):
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; run `mole {stage}` first")
    rows = {r["id"]: r for r in read_jsonl(train_path)}
    assignments = read_jsonl(assign_path)
    unknown = [a["id"] for a in assignments if a["id"] not in rows]
    if unknown or len(assignments) != len(rows):
        raise ValueError(
            f"{assign_path}: {len(assignments)} assignments for {len(rows)} rows of {train_path} "
            f"({len(unknown)} unknown ids, e.g. {unknown[:3]}); re-run `mole cluster`"
        )
    groups: dict[int, list[dict[str, Any]]] = {}
    for a in assignments:
        groups.setdefault(int(a["cluster"]), []).append(rows[a["id"]])
    return dict(sorted(groups.items()))


def _kept(cfg: BuildConfig, groups: dict[int, Any]) -> set[str]:
    return {expert_id(c) for c in groups} | ({SHARED_ID} if cfg.experts.shared != "none" else set())


def _remove_stale_experts(experts_dir: Path, keep: set[str]) -> None:
    """Delete expert dirs (and checkpoints) of clusters that no longer exist, e.g. after k went down."""
    if not experts_dir.is_dir():
        return
    for path in [*experts_dir.glob("expert_*"), *experts_dir.glob(f"{SHARED_ID}*")]:
        if path.is_dir() and path.name.removesuffix(".ckpt") not in keep:
            logger.warning("removing stale %s (no such cluster now)", path)
            shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class _Job:
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

    def fingerprint(self, cfg: BuildConfig) -> str:
        extra: dict[str, Any] = {"upstream": self.upstream} if self.upstream else {}
        if self.lora is not None:
            extra["lora"] = self.lora.model_dump(mode="json")
        return _fingerprint(cfg, kind=self.kind, seed=self.seed, steps=self.steps, row_ids=[r["id"] for r in self.rows],
                            extra=extra)  # fmt: skip


def shared_steps(cfg: BuildConfig) -> int:
    """Steps of the shared LoRA: ``experts.shared_steps``; 0 without one (``experts.shared = none``)."""
    return 0 if cfg.experts.shared == "none" else cfg.experts.shared_steps


def _jobs(cfg: BuildConfig, groups: dict[int, list[dict[str, Any]]]) -> list[_Job]:
    """The adapters of the stage, in training order: the shared one (if any), the experts, the baseline."""
    e = cfg.experts
    every_row = [r for rows in groups.values() for r in rows]
    jobs, build_on = [], {}
    steps = e.steps
    if e.shared == "cotrained":  # one run trains them all: each depends on every cluster's rows and the run's steps
        from mole.cotrain import cotrain_steps, run_fingerprint

        run = run_fingerprint(cfg, {c: [r["id"] for r in rows] for c, rows in groups.items()})
        steps = cotrain_steps(cfg, len(groups))
        jobs.append(_Job(SHARED_ID, None, every_row, f"{e.out_dir}/{SHARED_ID}", cfg.seed, steps, "shared",
                         upstream=run))  # fmt: skip
        build_on = {"upstream": run}
    elif e.shared != "none":
        shared = _Job(SHARED_ID, None, every_row, f"{e.out_dir}/{SHARED_ID}", cfg.seed, shared_steps(cfg), "shared")
        jobs.append(shared)
        key = "init_from" if e.shared == "seed" else "under"
        build_on = {key: shared.rel_dir, "upstream": shared.fingerprint(cfg)}
    jobs += [
        _Job(expert_id(c), c, rows, f"{e.out_dir}/{expert_id(c)}", cfg.seed + c, steps, **build_on)
        for c, rows in groups.items()
    ]
    if e.multitask_baseline:
        lora = multitask_lora(cfg, len(groups))
        steps = multitask_steps(cfg, len(groups))
        jobs.append(_Job(BASELINE_ID, None, every_row, e.baseline_dir, cfg.seed, steps, BASELINE_ID, lora))
    return jobs


def _joint_trains_experts(cfg: BuildConfig) -> bool:
    r = cfg.router
    return r.routing == "token_topk" and r.steps > 0 and not r.freeze_experts and r.expert_lr > 0


def mole_training(cfg: BuildConfig, k: int) -> dict[str, int]:
    """Optimizer steps and rows of every phase that trains MoLE's adapters (rows = steps × batch size)."""
    e, r = cfg.experts, cfg.router
    if e.shared == "cotrained":  # one run: its shared-only steps, then all adapters together
        out = {"cotrained_steps": e.shared_steps + k * e.steps, "shared_steps": 0, "expert_steps": 0}
    else:
        out = {"cotrained_steps": 0, "shared_steps": shared_steps(cfg), "expert_steps": k * e.steps}
    out["joint_steps"] = r.steps if _joint_trains_experts(cfg) else 0
    adapter_steps = out["cotrained_steps"] + out["shared_steps"] + out["expert_steps"]
    out["rows"] = adapter_steps * e.batch_size + out["joint_steps"] * r.batch_size
    return out


def multitask_steps(cfg: BuildConfig, k: int) -> int:
    """Steps of the multitask baseline: ``experts.multitask_steps``, else the training MoLE gets.

    That is the rows the whole MoLE build trains its adapters on (the shared LoRA, all k experts, and the joint
    phase when it trains the experts too), in steps of the baseline's batch size, so the baseline sees as many
    training tokens as the mixture (docs/architecture.md, "Evaluation").
    """
    if cfg.experts.multitask_steps is not None:
        return cfg.experts.multitask_steps
    return max(1, math.ceil(mole_training(cfg, k)["rows"] / cfg.experts.batch_size))


def rank_per_token(cfg: BuildConfig, k: int) -> int:
    """The adapter rank MoLE applies to a token: its top-k experts' plus the always-on shared expert's."""
    e = cfg.experts
    return e.lora.r * (min(cfg.router.top_k, k) + (1 if e.shared in SHARED_APPLIED else 0))


def multitask_lora(cfg: BuildConfig, k: int) -> LoraSection:
    """The baseline's LoRA: rank ``experts.multitask_r``, else MoLE's rank per token, at the experts' scale alpha/r.

    Keeping alpha / r fixed keeps the size of each rank direction's update, so the wider adapter is not slowed down.
    """
    lora = cfg.experts.lora
    r = cfg.experts.multitask_r or rank_per_token(cfg, k)
    return lora.model_copy(update={"r": r, "lora_alpha": lora.lora_alpha * r / lora.r})


def _run_job(
    cfg: BuildConfig, job: _Job, get_base: Callable[[], tuple], progress: Callable[[str, int, int, float], None] | None
) -> dict[str, Any]:
    """Train one job's adapter, or reuse it when finished with the same inputs; returns its experts.json entry."""
    out_dir = cfg.path(job.rel_dir)
    fingerprint = job.fingerprint(cfg)
    reused = is_finished(out_dir, fingerprint)
    if reused:
        logger.info("%s: reusing %s (same inputs)", job.name, out_dir)
        shutil.rmtree(checkpoint_dir(out_dir), ignore_errors=True)  # left if killed just after finishing
        metrics = json.loads((out_dir / METRICS).read_text(encoding="utf-8"))
        if progress is not None:
            progress(job.name, job.steps, job.steps, metrics["final_loss"])
    else:
        for dep in (job.init_from, job.under):
            if dep is not None and not (cfg.path(dep) / METRICS).is_file():
                raise FileNotFoundError(f"{job.name}: the shared adapter {cfg.path(dep)} is not trained yet")
        logger.info("%s: training on %d rows for %d steps", job.name, len(job.rows), job.steps)
        step_cb = None if progress is None else lambda s, t, loss: progress(job.name, s, t, loss)
        e = cfg.experts
        dirs = {k: cfg.path(v) if v else None for k, v in (("init_from", job.init_from), ("under", job.under))}
        metrics = train_lora(*get_base(), job.rows, lora=job.lora or e.lora, cfg=e, steps=job.steps, out_dir=out_dir,
                             seed=job.seed, fingerprint=fingerprint, progress=step_cb, **dirs)  # fmt: skip
    entry = {"id": job.name, "cluster": job.cluster, "rows": len(job.rows), "steps": job.steps, "path": job.rel_dir}
    return {**entry, "final_loss": metrics["final_loss"], "seconds": metrics["seconds"], "reused": reused,
            "fingerprint": fingerprint, "kind": job.kind, "tokens": metrics["tokens"],
            "r": metrics["r"]}  # fmt: skip


def job_names(cfg: BuildConfig) -> list[str]:
    """The adapters ``train-experts`` trains, in order: one expert per cluster, then the multitask baseline."""
    return [job.name for job in _jobs(cfg, load_cluster_rows(cfg))]


def train_job(
    cfg: BuildConfig,
    name: str,
    *,
    progress: Callable[[str, int, int, float], None] | None = None,
    get_base: Callable[[], tuple] | None = None,
) -> dict[str, Any]:
    """Train (or reuse) one adapter of ``job_names(cfg)`` on its own; returns its experts.json entry.

    This is the unit of the Prefect flow's expert fan-out: each call loads its own base model (unless
    ``get_base`` is given), so calls may run in parallel threads or processes.

    Raises:
        ValueError: ``name`` is not one of ``job_names(cfg)``.
    """
    jobs = {job.name: job for job in _jobs(cfg, load_cluster_rows(cfg))}
    if name not in jobs:
        raise ValueError(f"no adapter named {name!r} in this build; expected one of {sorted(jobs)}")
    return _run_job(cfg, jobs[name], get_base or functools.cache(lambda: _load_base(cfg)), progress)


def _mark_baseline_not_trained(path: Path) -> None:
    """Leave ``path`` holding only NOT_TRAINED.json (experts.multitask_baseline is false).

    The directory stays an out of the train-experts stage, so ``dvc commit`` finds it, and an adapter left there
    by an earlier build is removed, so evaluate does not report a stale baseline as this build's.
    """
    marker = {"reason": "experts.multitask_baseline is false: the multitask LoRA baseline was not trained"}
    if (path / "NOT_TRAINED.json").is_file() and len(list(path.iterdir())) == 1:
        return
    with atomic_dir(path) as tmp:
        write_json(tmp / "NOT_TRAINED.json", marker)
    logger.info("multitask baseline not trained: %s holds only NOT_TRAINED.json", path)


def write_index(cfg: BuildConfig, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Write artifacts/experts/experts.json from the entries of every job; return the stage summary."""
    groups = load_cluster_rows(cfg)
    experts_dir = cfg.path(cfg.experts.out_dir)
    _remove_stale_experts(experts_dir, keep=_kept(cfg, groups))
    experts = sorted((x for x in entries if x["cluster"] is not None), key=lambda x: x["cluster"])
    baseline = next((x for x in entries if x["id"] == BASELINE_ID), None)
    shared = next((x for x in entries if x["id"] == SHARED_ID), None)
    if baseline is None:
        _mark_baseline_not_trained(cfg.path(cfg.experts.baseline_dir))
    index = {"k": len(groups), "base_model": cfg.base_model.name, "lora": cfg.experts.lora.model_dump(mode="json")}
    index |= {"shared_mode": cfg.experts.shared, "shared": shared, "training": mole_training(cfg, len(groups))}
    write_json(experts_dir / "experts.json", {**index, "experts": experts, "baseline": baseline})
    return {
        "k": len(groups),
        "trained": [x["id"] for x in entries if not x["reused"]],
        "reused": [x["id"] for x in entries if x["reused"]],
        "paths": {
            "experts": str(experts_dir),
            "experts_json": str(experts_dir / "experts.json"),
            "baseline": str(cfg.path(cfg.experts.baseline_dir)) if baseline else None,
        },
    }


def built_adapters(index: dict[str, Any]) -> dict[str, str]:
    """Adapter id -> fingerprint of what a MoLE model is built from (its experts and shared adapter)."""
    return {e["id"]: e.get("fingerprint") for e in [*index.get("experts", []), index.get("shared")] if e}


def current_index(cfg: BuildConfig, *, baseline: bool = False) -> dict[str, Any]:
    """artifacts/experts/experts.json, checked against the current clusters and config.

    Every expert (and the shared adapter; the multitask baseline too with ``baseline``) must be the one
    ``train-experts`` would train now, from the current assignments and settings, and must be intact on disk.

    Raises:
        FileNotFoundError: experts.json is missing (run ``mole train-experts``).
        ValueError: an adapter was trained for other clusters, rows or settings, or is missing or corrupt,
            naming it and the stage to re-run.
    """
    from mole.stages import experts_paths  # lazily: mole.stages imports this module

    path = experts_paths(cfg)["index"]
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run `mole train-experts` first")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); re-run `mole train-experts`") from None
    jobs = [j for j in _jobs(cfg, load_cluster_rows(cfg)) if baseline or j.kind != BASELINE_ID]
    want = {j.name: j.fingerprint(cfg) for j in jobs}
    entries = [*index.get("experts", []), index.get("shared"), index.get("baseline") if baseline else None]
    have = {e["id"]: e for e in entries if e}
    stale = sorted(n for n in want.keys() | have.keys() if want.get(n) != have.get(n, {}).get("fingerprint"))
    if stale:
        why = {n: "not trained" if n not in have else "no such adapter now" if n not in want else "other inputs"
               for n in stale}  # fmt: skip
        what = ", ".join(f"{n} ({why[n]})" for n in stale[:4])
        raise ValueError(
            f"{path}: the adapters were trained for other clusters, rows or settings than the current ones: {what}; "
            "re-run `mole train-experts`"
        )
    for name, entry in have.items():
        out_dir = cfg.path(entry["path"])
        try:
            sealed = json.loads((out_dir / METRICS).read_text(encoding="utf-8")).get("sha256") or {}
        except (OSError, ValueError):
            sealed = None
        problem = f"{out_dir / METRICS} is missing or unreadable" if sealed is None else seal_broken(out_dir, sealed)
        if problem:
            raise ValueError(f"{name}: {problem}; re-run `mole train-experts` to train it again")
    return index


def run_train_experts(cfg: BuildConfig, *, progress: Callable[[str, int, int, float], None] | None = None) -> dict:
    """Train (or reuse) one LoRA expert per cluster and the multitask baseline; write experts.json.

    The base model is loaded once, and only if some adapter needs training. With ``experts.mode == "packed"`` the
    experts are trained together by :func:`mole.packed.run_packed`.

    Args:
        cfg: the build configuration (``workspace``, ``base_model``, ``experts``, ``seed``).
        progress: called as ``progress(name, step, total, loss)`` after every step; once with
            ``step == total`` for a reused adapter.

    Returns:
        A JSON-able summary: k, trained and reused ids, seconds, paths.

    Raises:
        FileNotFoundError: train.jsonl or assignments.jsonl is missing.
        ValueError: the cluster assignments do not match the prepared rows.
    """
    t0 = time.perf_counter()
    groups = load_cluster_rows(cfg)
    _remove_stale_experts(cfg.path(cfg.experts.out_dir), keep=_kept(cfg, groups))
    get_base = functools.cache(lambda: _load_base(cfg))
    jobs, entries = _jobs(cfg, groups), []
    if cfg.experts.shared == "cotrained":  # the shared adapter and the experts in one run, then the baseline
        from mole.cotrain import run_cotrained

        entries = run_cotrained(cfg, [job for job in jobs if job.kind != BASELINE_ID], get_base, progress)
        jobs = [job for job in jobs if job.kind == BASELINE_ID]
    elif cfg.experts.mode == "packed":  # the shared adapter first, then all experts in one run, then the baseline
        from mole.packed import run_packed

        entries = [_run_job(cfg, job, get_base, progress) for job in jobs if job.kind == "shared"]
        entries += run_packed(cfg, [job for job in jobs if job.cluster is not None], get_base, progress)
        jobs = [job for job in jobs if job.kind == BASELINE_ID]
    entries += [_run_job(cfg, job, get_base, progress) for job in jobs]
    return {**write_index(cfg, entries), "seconds": round(time.perf_counter() - t0, 3)}


def _load_base(cfg: BuildConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from mole.base import load_base

    bm = cfg.base_model
    kwargs = {"revision": bm.revision, "trust_remote_code": bm.trust_remote_code, "dtype": bm.dtype}
    return load_base(bm.name, **kwargs, device=bm.device, seed=cfg.seed)
