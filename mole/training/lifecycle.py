"""Incremental builds, the training half: the adapters of a build that starts from the previous one, and
reports/lifecycle.json, what became of each expert.

The cluster stage's plan (``data/clusters/incremental.json``, :mod:`mole.stages.incremental`) says per cluster
whether its rows changed. Here that becomes the train-experts jobs:

- reused: the previous build's adapter copied byte for byte (no training);
- updated: fine-tuned from the previous adapter on the cluster's rows, for ``experts.steps`` × new rows / old rows
  steps (at least 1, at most ``experts.steps``);
- added: a new expert, trained as a full build trains one (from or on top of the shared adapter);
- the shared adapter is fine-tuned from the previous one for ``experts.shared_steps`` × new rows / old rows steps
  (reused when no row changed, and with ``experts.shared_update: auto``, the default, when only new clusters got
  rows: the shared adapter is what every kept expert was trained on top of, so moving it moves the old skills' losses
  too); the multitask baseline likewise when the previous build left one.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from mole.config import BuildConfig
from mole.io import atomic_dir, load_safetensors, read_json, write_json
from mole.nn.adapters import CONFIG, WEIGHTS, stable_config
from mole.nn.first_gate import split_router_state
from mole.nn.lineage import adapter_digest, made_by
from mole.nn.spec import read_spec
from mole.training.lora import BASELINE_ID, METRICS, SHARED_ID, Job, seal_adapter
from mole.workspace import UTILIZATION_FILE, cluster_paths, eval_paths

HISTORY_KEPT = 52  # builds of utilization history a model dir keeps (a year of weekly retrains)


def read_plan(cfg: BuildConfig) -> dict[str, Any] | None:
    """The cluster stage's plan (full or incremental, and why); None when the clusters predate plans."""
    path = cluster_paths(cfg)["plan"]
    return read_json(path) if path.is_file() else None


def incremental_plan(cfg: BuildConfig) -> dict[str, Any] | None:
    """The plan when this build is incremental, else None."""
    plan = read_plan(cfg)
    return plan if plan and plan.get("mode") == "incremental" else None


def proportional(steps: int, new: int, old: int) -> int:
    """Fine-tuning steps for ``new`` changed rows over ``old`` rows: ``steps`` × new / old, in [1, steps]."""
    return max(1, min(steps, math.ceil(steps * new / max(1, old))))


def continued_lr(changed: int, old: int) -> float:
    """The lr multiplier of an adapter fine-tuned from its previous weights on ``old`` + ``changed`` rows.

    Training ends with the lr decayed linearly to about 0; restarting at the peak lr (with a fresh optimizer) would
    jolt a trained adapter away from what it learned. So the fine-tune continues as if the schedule had been
    stretched over the rows now: at ``changed / (old + changed)`` of the peak, decaying again to 0.
    """
    return changed / max(1, old + changed)


def incremental_jobs(cfg: BuildConfig, jobs: list[Job], plan: dict[str, Any]) -> list[Job]:
    """The full build's ``jobs`` turned into an incremental build's, as the plan says (module docstring)."""
    e, prev = cfg.experts, plan["previous_dir"]
    expert_scale = e.expert_lr_scale if e.shared == "cotrained" else 1.0  # experts' lr in a full build
    out = []
    for job in jobs:
        digest = None
        if job.kind == "shared" or (
            job.cluster is not None and plan["clusters"][str(job.cluster)]["status"] != "added"
        ):
            src = f"{prev}/experts/{job.name}"
            digest = adapter_digest(cfg.path(src))
            if job.kind == "shared":
                changed, old = plan["new_rows"] + plan["removed_rows"], plan["old_rows"]
                if e.shared_update == "auto" and all(c["status"] != "updated" for c in plan["clusters"].values()):
                    changed = 0  # rows of new kinds only: their experts learn them on the shared adapter as it is
                steps, scale = proportional(e.shared_steps, changed, old), continued_lr(changed, old)
            else:
                c = plan["clusters"][str(job.cluster)]
                changed, old = c["new_rows"] + c["removed_rows"], c["old_rows"]
                steps, scale = proportional(e.steps, changed, old), continued_lr(changed, old) * expert_scale
            job = replace(job, steps=steps if changed else 0, init_from=src if changed else None, parent=digest,
                          copy_from=None if changed else src, status="updated" if changed else "reused",
                          lr_scale=scale if changed else 1.0)  # fmt: skip
        elif job.cluster is not None:  # a kind of row nothing was trained on: as many steps as the shared adapter had
            job = replace(job, status="added", steps=max(job.steps, e.shared_steps if e.shared != "none" else 0))
        elif job.kind == BASELINE_ID and (cfg.path(prev) / "baseline" / WEIGHTS).is_file():
            src = f"{prev}/baseline"
            prev_r = read_json(cfg.path(src) / CONFIG).get("r")
            if prev_r == (job.lora.r if job.lora else e.lora.r):
                changed, old = plan["new_rows"] + plan["removed_rows"], plan["old_rows"]
                job = replace(job, steps=proportional(job.steps, changed, old), init_from=src, status="updated",
                              parent=adapter_digest(cfg.path(src)), lr_scale=continued_lr(changed, old))  # fmt: skip
        out.append(job)
    if SHARED_ID in {j.name for j in out}:  # experts on top of the shared adapter build on the updated one
        shared = next(j for j in out if j.name == SHARED_ID)
        out = [replace(j, upstream=shared.fingerprint(cfg)) if j.upstream and j.kind != "shared" else j for j in out]
    return out


def copy_adapter(cfg: BuildConfig, job: Job, out_dir: Path, fingerprint: str) -> dict[str, Any]:
    """Write the previous build's adapter ``job.copy_from`` to ``out_dir`` unchanged; returns its metrics."""
    src = cfg.path(job.copy_from)
    metrics = {"loss": [], "final_loss": None, "steps": 0, "resumed_from": 0, "rows": len(job.rows), "tokens": 0,
               "seconds": 0.0, "fingerprint": fingerprint, "seed": job.seed, "copied_from": job.copy_from,
               "parent_sha256": job.parent, "r": read_json(src / CONFIG).get("r")}  # fmt: skip
    with atomic_dir(out_dir) as tmp:
        for name in (WEIGHTS, CONFIG):
            shutil.copy2(src / name, tmp / name)
        stable_config(tmp)
        metrics = seal_adapter(tmp, metrics)
        write_json(tmp / METRICS, metrics)  # last: its presence marks the directory complete
    return metrics


def write_lifecycle(cfg: BuildConfig, plan: dict[str, Any] | None, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Write reports/lifecycle.json: full or incremental (and why), and per adapter what became of it, with its
    rows, steps, and training loss before (the first batch, on the previous weights) and after."""
    plan = plan or {"mode": "full", "reason": "the clusters were made before incremental builds"}
    experts = []
    for x in entries:
        try:
            m = json.loads((cfg.path(x["path"]) / METRICS).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            m = {}
        losses = m.get("loss") or []
        cluster = (plan.get("clusters") or {}).get(str(x["cluster"])) if x.get("cluster") is not None else None
        status = x.get("status") or ("trained" if plan["mode"] == "full" else "updated")
        experts.append({"id": x["id"], "kind": x.get("kind"), "status": status, "cluster": x.get("cluster"),
                        "rows": x.get("rows"), "new_rows": (cluster or {}).get("new_rows"),
                        "removed_rows": (cluster or {}).get("removed_rows"), "steps": x.get("steps"),
                        "loss_before": losses[0] if losses else None, "loss_after": m.get("final_loss"),
                        "parent_sha256": x.get("parent_sha256"),
                        "sha256": adapter_digest(cfg.path(x["path"]))})  # fmt: skip
    doc = {k: plan.get(k) for k in ("mode", "reason", "from", "old_rows", "new_rows", "removed_rows", "rows",
                                      "new_fraction", "disagreement", "far_rows", "previous_k", "k")}  # fmt: skip
    doc["experts"] = experts
    write_json(eval_paths(cfg)["lifecycle"], doc)
    return doc


def kept_slots(
    cfg: BuildConfig, index: dict[str, Any], expert_ids: list[str], shared_slot: int | None
) -> dict[int, Path]:
    """Bank slot -> adapter dir of the experts an incremental build reuses unchanged (the joint phase keeps them)."""
    slot = {eid: i for i, eid in enumerate(expert_ids)}
    if shared_slot is not None and index.get("shared"):
        slot[index["shared"]["id"]] = shared_slot
    entries = [*index.get("experts", []), index.get("shared")]
    return {
        slot[e["id"]]: cfg.path(e["path"]) for e in entries if e and e.get("status") == "reused" and e["id"] in slot
    }


def incremental_lineage(records: dict[str, dict], index: dict[str, Any], plan: dict[str, Any]) -> dict[str, dict]:
    """Lineage records of an incremental build: a reused or updated expert's parent is the previous build's expert
    (its content hash); the adapter trained now is kept as ``adapter``. Every record says what became of it."""
    out = {}
    entries = {e["id"]: e for e in [*index.get("experts", []), index.get("shared")] if e}
    for eid, record in records.items():
        e = entries.get(eid, {})
        record = {**record, "lifecycle": e.get("status"), "previous": plan.get("from")}
        if e.get("parent_sha256"):
            prev = {"id": eid, "sha256": e["parent_sha256"], "path": f"{plan['previous_dir']}/experts/{eid}",
                    "build": plan.get("from")}  # fmt: skip
            record = {**record, "parents": [prev], "adapter": record["parents"][0]}
        out[eid] = record
    return out


def previous_gates(cfg: BuildConfig, spec: Any, plan: dict[str, Any]) -> dict[str, Any] | None:
    """The previous build's router state when its experts are this build's first ones (same ids, pooling and
    shared expert): their gate rows stay, and rows for experts added since are fitted (``extend_gates``); None
    when the experts differ otherwise (the gates are warm-started anew)."""
    prev = cfg.path(plan["previous_dir"])
    if not (prev / "router.safetensors").is_file():
        return None
    old = read_spec(prev)
    n = len(old.expert_ids)
    if (old.expert_ids, old.pool, old.shared) != (spec.expert_ids[:n], spec.pool, spec.shared) or n < 2:
        return None
    return split_router_state(load_safetensors(prev / "router.safetensors"))[0]  # (a first-token gate is fitted anew)


def under_floor(history: list[dict[str, Any]], ids: list[str], floor: float) -> np.ndarray:
    """(E,) how many of the last builds in ``history`` (oldest first, each ``{"utilization": {id: u}}``) in a row
    each expert of ``ids`` was used less than ``floor``; a build without the expert ends its run."""
    out = np.zeros(len(ids), dtype=int)
    for i, eid in enumerate(ids):
        for entry in reversed(history):
            u = entry.get("utilization", {}).get(eid)
            if u is None or u >= floor:
                break
            out[i] += 1
    return out


def utilization_history(cfg: BuildConfig, ids: list[str], util: np.ndarray) -> list[dict[str, Any]]:
    """This build's utilization after the history its previous build left (its model dir's utilization.json, when
    this build is incremental: the experts keep their ids and clusters; a full build starts a new history)."""
    history: list[dict[str, Any]] = []
    plan_ = incremental_plan(cfg)
    if plan_ is not None:
        prev = cfg.path(plan_["previous_dir"]) / UTILIZATION_FILE
        if prev.is_file():
            history = json.loads(prev.read_text(encoding="utf-8")).get("history", [])
    entry = {"made_by": made_by(cfg, "merge-prune"), "utilization": dict(zip(ids, map(float, util), strict=True))}
    return [*history, entry][-HISTORY_KEPT:]


def lifecycle_report(cfg: BuildConfig) -> dict[str, Any] | None:
    """reports/lifecycle.json with what an accepted merge-prune then did to the build's experts: a pruned expert is
    ``retired`` (with its utilization and how many builds in a row it stayed under the floor), a merged one
    ``merged`` (with its partner); its status before is kept as ``trained_as``. None when there is no lifecycle.json.
    """
    paths = eval_paths(cfg)
    if not paths["lifecycle"].is_file():
        return None
    doc = json.loads(paths["lifecycle"].read_text(encoding="utf-8"))
    report = json.loads(paths["merge_prune"].read_text(encoding="utf-8")) if paths["merge_prune"].is_file() else {}
    ids = {e["id"] for e in doc.get("experts", [])}
    if not report.get("accepted") or not set(report.get("expert_ids_before", [])) <= ids:  # none, or another build's
        return doc
    fate: dict[str, dict[str, Any]] = {}
    for d in report["decisions"]:
        if d["action"] == "prune":
            fate[d["id"]] = {"status": "retired", "utilization": d["utilization"],
                             "builds_under_floor": d.get("builds_under_floor", 1)}  # fmt: skip
        else:
            a, b = d["ids"]
            fate[a], fate[b] = {"status": "merged", "merged_with": b}, {"status": "merged", "merged_with": a}
    for e in doc["experts"]:
        if e["id"] in fate:
            e.update({"trained_as": e["status"], **fate[e["id"]]})
    return doc
