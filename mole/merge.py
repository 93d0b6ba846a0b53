"""Merge and prune experts: factored similarity, utilization, the plan, the new bank, and the acceptance gate.

Shapes: E experts, r rank, L blocks. Expert i of a layer is ``ΔW_i = B_i A_i``, A_i (r, d_in), B_i (d_out, r); all
products here stay in factored form: no d_out x d_in matrix is ever built.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from mole.base import loadable_base
from mole.config import BuildConfig
from mole.io import atomic_dir, sha256_file, write_json
from mole.nn.adapters import write_adapter
from mole.nn.first_gate import PREFIX
from mole.nn.lineage import made_by, write_lineage
from mole.nn.logistic import NEVER
from mole.nn.model import MoLEModel
from mole.nn.spec import ROUTER_FILE, SPEC_FILE
from mole.routing.diagnostics import expert_usage, row_routing, rows_digest
from mole.routing.train import joint_train
from mole.routing.warm_start import eval_loss
from mole.sections import MergeConfig
from mole.training.lifecycle import under_floor, utilization_history
from mole.workspace import UTILIZATION_FILE, eval_paths, load_prepared, mole_paths

logger = logging.getLogger(__name__)
Decision = dict[str, Any]
Rows = list[dict[str, Any]]
_CORE_FILES = (SPEC_FILE, ROUTER_FILE, "experts")  # what apply_plan writes itself; other entries are carried


def factored_inner(A_i: torch.Tensor, B_i: torch.Tensor, A_j: torch.Tensor, B_j: torch.Tensor) -> torch.Tensor:
    """Frobenius inner product ``<B_i A_i, B_j A_j>`` as ``sum((B_i^T B_j) * (A_i A_j^T))``, in float64.

    Args:
        A_i, A_j: (r, d_in); B_i, B_j: (d_out, r) (the two ranks may differ).

    Returns:
        A float64 scalar.
    """
    return ((B_i.double().T @ B_j.double()) * (A_i.double() @ A_j.double().T)).sum()


@torch.no_grad()
def expert_similarity(model: MoLEModel) -> np.ndarray:
    """Cosine of ΔW_i and ΔW_j per bank layer, averaged over the layers; 0 where either norm is 0.

    All pairs of a layer at once: ``(B^T B) * (A A^T)`` over the concatenated bank is (E*r, E*r), and its r x r
    block (i, j) summed is :func:`factored_inner` of experts i and j.

    Returns:
        (E, E) float64 symmetric matrix.
    """
    e, r = model.spec.num_experts, model.spec.r
    total = torch.zeros(e, e, dtype=torch.float64)
    for layer in model.bank.values():
        # The routed experts only: a shared slot (after them) is never merged or pruned.
        a = layer.lora_A[: e * r].detach().double().cpu()  # (E*r, d_in)
        b = layer.lora_B[:, : e * r].detach().double().cpu()  # (d_out, E*r)
        gram = ((b.T @ b) * (a @ a.T)).reshape(e, r, e, r).sum(dim=(1, 3))  # (E, E) of <ΔW_i, ΔW_j>
        norms = gram.diagonal().clamp_min(0).sqrt()  # (E,)
        denom = norms[:, None] * norms[None, :]
        total += torch.where(denom > 0, gram / denom.clamp_min(1e-300), torch.zeros_like(gram))
    return (total / len(model.bank)).numpy()


def merge_factored(
    A_i: torch.Tensor, B_i: torch.Tensor, A_j: torch.Tensor, B_j: torch.Tensor, w_i: float, w_j: float, r: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r approximation (Eckart-Young) of ``w_i B_i A_i + w_j B_j A_j``, in factored form.

    The sum is ``[w_i B_i, w_j B_j] @ [A_i; A_j]``. With ``Q_b R_b = [w_i B_i, w_j B_j]`` and ``Q_a R_a = [A_i; A_j]^T``
    it equals ``Q_b (R_b R_a^T) Q_a^T``; the SVD ``U S V^T`` of the small (<= 2r x 2r) core gives the truncation,
    and ``sqrt(S)`` is split between the factors so both keep comparable norms. Weights are normalised to sum 1.

    Args:
        A_i, A_j: (r, d_in); B_i, B_j: (d_out, r).
        w_i, w_j: non-negative merge weights (not both 0). r: rank of the result.

    Returns:
        ``(A, B)`` with shapes (r, d_in) and (d_out, r), in A_i's dtype and device.
    """
    if w_i < 0 or w_j < 0 or w_i + w_j <= 0:
        raise ValueError(f"merge weights must be >= 0 and not both 0, got w_i={w_i}, w_j={w_j}")
    w_i, w_j = w_i / (w_i + w_j), w_j / (w_i + w_j)
    b_cat = torch.cat([w_i * B_i.double(), w_j * B_j.double()], dim=1)  # (d_out, 2r)
    a_cat = torch.cat([A_i.double(), A_j.double()], dim=0)  # (2r, d_in)
    q_b, r_b = torch.linalg.qr(b_cat)  # (d_out, m), (m, 2r)
    q_a, r_a = torch.linalg.qr(a_cat.T)  # (d_in, n), (n, 2r)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)  # core (m, n)
    k = min(r, s.shape[0])  # a core smaller than r (tiny layers) leaves zero columns / rows
    root = s[:k].sqrt()
    B = torch.cat([q_b @ (u[:, :k] * root), b_cat.new_zeros(b_cat.shape[0], r - k)], dim=1)  # (d_out, r)
    A = torch.cat([(root[:, None] * vh[:k]) @ q_a.T, a_cat.new_zeros(r - k, a_cat.shape[1])])  # (r, d_in)
    return A.to(A_i), B.to(B_i)  # A_i's dtype and device


def utilization(
    model: MoLEModel, rows: Rows, *, batch_size: int = 8, max_length: int = 128, recorded: Path | None = None
) -> np.ndarray:
    """Mean routing weight of each expert over the rows (each row's tokens averaged) and the blocks.

    ``recorded``: a model dir's train_metrics.json, whose ``utilization_all_tokens`` train-router measured in its
    last routing pass; used, with no pass of its own, when it is for the same experts and the same rows.

    Returns:
        (E,) non-negative, sums to 1.
    """
    record = json.loads(recorded.read_text(encoding="utf-8")).get("utilization_all_tokens") if recorded else None
    fits = record is not None and record["expert_ids"] == list(model.spec.expert_ids)
    if fits and record["rows"] == rows_digest(rows):
        u = np.asarray(record["mean"], dtype=np.float64)
    else:
        weights, _ = row_routing(model, rows, batch_size=batch_size, max_length=max_length, prompt_only=False)
        u = expert_usage(weights)
    return u / u.sum()


def plan(
    util: np.ndarray,
    sim: np.ndarray,
    cfg: MergeConfig,
    *,
    ids: list[str] | None = None,
    streak: np.ndarray | None = None,
) -> list[Decision]:
    """Decide what to prune and merge, each decision with the numbers behind it.

    Experts used less than ``cfg.utilization_floor`` in at least ``cfg.retire_after`` builds in a row (``streak``)
    are pruned, least used first, keeping at least one; a pruned expert's clusters go to the most similar kept
    expert (``clusters_to``). Then the most similar kept pairs with cosine >= ``cfg.similarity_ceiling`` merge
    greedily, each expert at most once, weighted by utilization. Experts are referred to by index; ``ids`` adds
    their names.

    Args:
        util: (E,) utilization. sim: (E, E) similarity. cfg: the merge section. ids: expert names.
        streak: (E,) builds in a row, this one included, each expert stayed under the floor (:func:`under_floor`);
            None: this build's alone (1 under the floor, else 0).

    Returns:
        Prune decisions, then merge decisions.
    """
    name = (lambda i: ids[i]) if ids is not None else str
    if streak is None:
        streak = (np.asarray(util) < cfg.utilization_floor).astype(int)
    order = sorted(range(len(util)), key=lambda i: (util[i], i))
    low = [i for i in order if util[i] < cfg.utilization_floor and streak[i] >= cfg.retire_after]
    pruned = low[: len(util) - 1]  # keep at least one expert
    alive = [i for i in range(len(util)) if i not in pruned]
    decisions: list[Decision] = []
    for i in pruned:
        to = max(alive, key=lambda j: (sim[i, j], -j))
        u, f = float(util[i]), cfg.utilization_floor
        decisions.append({"action": "prune", "expert": i, "id": name(i), "utilization": u, "floor": f,
                          "builds_under_floor": int(streak[i]), "clusters_to": to})  # fmt: skip
    pairs = sorted(((float(sim[a, b]), a, b) for a in alive for b in alive if a < b), key=lambda t: (-t[0], t[1:]))
    used: set[int] = set()
    for s, a, b in pairs:
        if s < cfg.similarity_ceiling or a in used or b in used:
            continue
        used |= {a, b}
        tot = float(util[a] + util[b])
        w = [float(util[a]) / tot, float(util[b]) / tot] if tot > 0 else [0.5, 0.5]
        c, names = cfg.similarity_ceiling, [name(a), name(b)]
        decisions.append(
            {"action": "merge", "experts": [a, b], "ids": names, "similarity": s, "ceiling": c, "weights": w}
        )
    return decisions


def _new_bank(num_experts: int, decisions: list[Decision]) -> tuple[list[list[int]], list[int]]:
    """The old experts forming each new one (in order: a merge sits where its first expert was), and old -> new."""
    pruned = {d["expert"]: d["clusters_to"] for d in decisions if d["action"] == "prune"}
    partner = {d["experts"][1]: d["experts"][0] for d in decisions if d["action"] == "merge"}
    named = [*pruned, *partner, *partner.values()]
    if len(set(named)) != len(named) or not set(pruned).isdisjoint(pruned.values()):
        raise ValueError(f"decisions must name each expert once and send clusters to a kept one, got {decisions}")
    gone = {*pruned, *partner}
    groups = [[i, *(b for b, a in partner.items() if a == i)] for i in range(num_experts) if i not in gone]
    new_of = {i: n for n, g in enumerate(groups) for i in g}
    return groups, [new_of[i] if i in new_of else new_of[pruned[i]] for i in range(num_experts)]


@torch.no_grad()
def apply_plan(
    model: MoLEModel,
    decisions: list[Decision],
    directory: str | Path,
    *,
    extra_files: dict[str, Path] | None = None,
    build: dict[str, Any] | None = None,
) -> Path:
    """Write the pruned and merged model as a MoLE model dir (same format as ``MoLEModel.save_pretrained``).

    Pruned experts and their gate rows are dropped (their clusters go to ``clusters_to``). A merged pair (a, b) becomes
    expert ``"<a>+<b>"`` serving both clusters, with ``merge_factored`` weights and as gate row the mean of the two
    rows, ``+ log 2`` on the bias: ``exp(logit)`` is then ``exp(l_a) + exp(l_b)`` (the pair's softmax mass) where the
    two logits agree, and by Jensen a lower bound elsewhere, left to the re-fit. ``top_k`` drops to at most E'.

    Args:
        model: the source model (not modified). decisions: from :func:`plan`. directory: the new model dir
            (written atomically). extra_files: name -> file or dir copied in, e.g. the clusterer.
        build: which build merges (``mole.nn.lineage.made_by``), recorded in a merged expert's lineage.json; a
            kept expert keeps its own record.

    Returns:
        ``directory``.
    """
    spec = model.spec
    groups, new_of = _new_bank(spec.num_experts, decisions)
    weights = {tuple(d["experts"]): d["weights"] for d in decisions if d["action"] == "merge"}
    flat = [c if isinstance(c, list) else [c] for c in spec.clusters]
    served = [sorted(x for i, c in enumerate(flat) if new_of[i] == n for x in c) for n in range(len(groups))]
    clusters = [c[0] if len(c) == 1 else c for c in served] if spec.clusters else []
    ids = ["+".join(spec.expert_ids[i] for i in g) for g in groups]
    new_spec = replace(spec, expert_ids=ids, top_k=min(spec.top_k, len(groups)), clusters=clusters)
    lora = {"r": spec.r, "lora_alpha": spec.lora_alpha, "target_modules": spec.target_modules}
    with atomic_dir(directory) as tmp:
        (tmp / SPEC_FILE).write_text(json.dumps(asdict(new_spec), indent=2))
        for n, (eid, g) in enumerate(zip(new_spec.expert_ids, groups, strict=True)):
            tensors = {}
            for name, layer in model.bank.items():
                parts = [t for i in g for t in layer.expert(i)]  # A_a, B_a[, A_b, B_b]
                tensors[name] = parts if len(g) == 1 else merge_factored(*parts, *weights[tuple(g)], r=spec.r)
            write_adapter(tmp / "experts" / eid, tensors, **lora, base_model=loadable_base(spec.base_model.get("name")))
            record = _merged_lineage(model, eid, g, clusters[n] if clusters else None, weights.get(tuple(g)), build)
            if record is not None:
                write_lineage(tmp / "experts" / eid, record)
        if spec.shared is not None:  # the shared expert is carried over as it is
            model.export_expert(model.shared_index, tmp / "experts" / spec.shared)
            if spec.shared in model.lineage:
                write_lineage(tmp / "experts" / spec.shared, model.lineage[spec.shared])
        save_file(_router_state(model, groups), str(tmp / ROUTER_FILE), metadata={"format": "pt"})
        for name, src in (extra_files or {}).items():
            (shutil.copytree if Path(src).is_dir() else shutil.copy2)(src, tmp / name)
    return Path(directory)


def _merged_lineage(
    model: MoLEModel, eid: str, group: list[int], cluster: Any, weights: Any, build: dict[str, Any] | None
) -> dict[str, Any] | None:
    """The lineage record of new expert ``eid`` made of ``group``: a kept expert's own record (None without one);
    a merged one's names its parents (their ids and content hashes) and the merge weights."""
    records = [model.lineage.get(model.spec.expert_ids[i]) or {} for i in group]
    if len(group) == 1:
        return records[0] or None
    rows = [r.get("rows") for r in records]
    parents = [{"id": model.spec.expert_ids[i], "sha256": r.get("sha256")} for i, r in zip(group, records, strict=True)]
    return {"id": eid, "kind": "expert", "cluster": cluster, "rows": None if None in rows else sum(rows),
            "steps": None, "joint_steps": None, "made_by": build or {"stage": "merge-prune"}, "parents": parents,
            "merge_weights": list(weights) if weights is not None else None}  # fmt: skip


def _router_state(model: MoLEModel, groups: list[list[int]]) -> dict[str, torch.Tensor]:
    """Router tensors of the new bank (``_gate_state`` of every block's gate, and of the first-token gate's)."""
    gates = {f"{b}.": router.gate for b, router in enumerate(model.routers)}
    if model.first_gate is not None:  # its rows go as the routers' do
        gates[PREFIX] = model.first_gate.gate
    return {prefix + k: v for prefix, gate in gates.items() for k, v in _gate_state(gate, groups).items()}


def _gate_state(gate: torch.nn.Linear, groups: list[list[int]]) -> dict[str, torch.Tensor]:
    """A gate's tensors for the new bank: kept rows as they are, a merged group's mean row (+ log |group| bias). A row
    the first-token gate had no rows to fit (bias ``NEVER``) leaves a merged group, so its partner keeps its route."""
    w, bias = gate.weight.detach().cpu(), gate.bias
    if bias is not None:
        groups = [[i for i in g if bias[i] > NEVER / 2] or g for g in groups]
    state = {"gate.weight": torch.stack([w[g].mean(0) for g in groups]).contiguous()}  # (E', D)
    if bias is not None:
        state["gate.bias"] = torch.stack([bias[g].mean() + math.log(len(g)) for g in groups]).detach().cpu()
    return state


def _adapter_mb(directory: Path) -> float:
    """Size of the experts and router files in MiB (as in reports/eval.json)."""
    files = [*(directory / "experts").rglob("*"), directory / ROUTER_FILE]
    return sum(p.stat().st_size for p in files if p.is_file()) / 2**20


def _metrics_file(model_dir: Path) -> Path | None:
    """The model dir's train_metrics.json (train-router's), if it has one."""
    path = model_dir / "train_metrics.json"
    return path if path.is_file() else None


def run_merge_prune(cfg: BuildConfig) -> dict[str, Any]:
    """Stage ``merge-prune``: plan, build and re-fit a candidate, keep it only if eval loss rises < tolerance.

    Accepted: artifacts/mole moves to ``cfg.merge.keep_dir`` and the candidate takes its place (renames).
    Rejected or failed: artifacts/mole keeps its model (only its utilization.json gains this build's utilization) and
    the candidate is removed. Writes reports/merge_prune.json.
    """
    src = mole_paths(cfg)["dir"]
    if not (src / SPEC_FILE).exists():  # the model dir is all it reads: evaluate checked it against its experts
        raise FileNotFoundError(f"{src / SPEC_FILE} does not exist; run `mole train-router` first")
    _unmerge(src, cfg.path(cfg.merge.keep_dir))
    train, evals = load_prepared(cfg)
    kw = {"batch_size": cfg.evaluate.batch_size, "max_length": cfg.experts.max_length}
    model = MoLEModel.from_pretrained(src, trust_remote_code=cfg.base_model.trust_remote_code)
    util, sim = utilization(model, evals, **kw, recorded=_metrics_file(src)), expert_similarity(model)
    history = utilization_history(cfg, model.spec.expert_ids, util)
    streak = under_floor(history, model.spec.expert_ids, cfg.merge.utilization_floor)
    write_json(src / UTILIZATION_FILE, {"floor": cfg.merge.utilization_floor, "history": history})
    decisions = plan(util, sim, cfg.merge, ids=model.spec.expert_ids, streak=streak)
    report = {"decisions": decisions, "utilization": util.tolist(), "similarity": sim.round(6).tolist()}
    report |= {"expert_ids_before": model.spec.expert_ids, "experts_before": model.spec.num_experts}
    report |= {"adapter_mb_before": _adapter_mb(src), "config": cfg.merge.model_dump(mode="json")}
    if not decisions:
        report |= {"accepted": False, "reason": "nothing to prune or merge", "experts_after": model.spec.num_experts}
    else:
        loss_before = eval_loss(model, evals, **kw)
        tmp = Path(tempfile.mkdtemp(prefix=f".mole-tmp-merge-{src.name}.", dir=src.parent))
        try:
            extra = {p.name: p for p in src.iterdir() if p.name not in _CORE_FILES}
            build = made_by(cfg, "merge-prune")  # recorded in the lineage of merged experts
            cand_dir = apply_plan(model, decisions, tmp / "candidate", extra_files=extra, build=build)
            del model  # the candidate loads its own base: free the original first
            report |= _refit_score(cfg, cand_dir, train, evals, loss_before, extra)
            if report["accepted"]:
                write_json(cand_dir / MERGED_FROM, {"router_sha256": sha256_file(src / ROUTER_FILE)})
                _swap_in(cand_dir, src, cfg.path(cfg.merge.keep_dir), trash=tmp / "old_keep")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    path = write_json(eval_paths(cfg)["merge_prune"], report)
    logger.info("merge-prune: accepted=%s, %d decisions: %s", report["accepted"], len(decisions), report["reason"])
    keys = ("accepted", "reason", "experts_before", "experts_after", "loss_before", "loss_after", "relative_change")
    return {k: report.get(k) for k in keys} | {"decisions": len(decisions), "report": str(path)}


def _refit_score(cfg: BuildConfig, cand_dir: Path, train: Rows, evals: Rows, loss_before: float, extra: dict) -> dict:
    """Re-fit the candidate's routers (experts frozen), save it in place, score it and apply the gate."""
    m, kw = cfg.merge, {"batch_size": cfg.evaluate.batch_size, "max_length": cfg.experts.max_length}
    cand, out = MoLEModel.from_pretrained(cand_dir, trust_remote_code=cfg.base_model.trust_remote_code), {}
    if m.refit_steps > 0:
        rcfg = cfg.router.model_copy(update={"steps": m.refit_steps, "freeze_experts": True, "lr": m.refit_lr})
        refit = joint_train(cand, train, rcfg, max_length=cfg.experts.max_length, seed=cfg.seed)
        out["refit"] = {k: refit[k] for k in ("steps", "loss", "seconds")}
        cand.save_pretrained(cand_dir, extra_files=extra)
    loss_after = eval_loss(cand, evals, **kw)
    rel = (loss_after - loss_before) / loss_before
    ok = rel < m.tolerance
    reason = f"eval loss changed by {rel:+.3%}, {'<' if ok else '>='} tolerance {m.tolerance:.3%}"
    out |= {"loss_before": loss_before, "loss_after": loss_after, "relative_change": rel, "tolerance": m.tolerance}
    out |= {"accepted": ok, "reason": reason, "experts_after": cand.spec.num_experts}
    return out | {"expert_ids_after": cand.spec.expert_ids, "adapter_mb_after": _adapter_mb(cand_dir)}


MERGED_FROM = "merged_from.json"  # in a merged model: which unmerged model (kept in merge.keep_dir) it came from


def _unmerge(src: Path, keep: Path) -> None:
    """Put the unmerged model back in ``src`` when ``src`` is the merge of ``keep``: the stage then runs from the
    train-router output again, so a re-run (or one after a kill) gives what one run gives, not a merge of a merge."""
    try:
        marker = json.loads((src / MERGED_FROM).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if (keep / ROUTER_FILE).is_file() and marker.get("router_sha256") == sha256_file(keep / ROUTER_FILE):
        logger.info("%s is the merge of %s: merging again from the unmerged model", src, keep)
        trash = src.with_name(f".mole-tmp-{src.name}.merged")
        os.replace(src, trash)
        os.replace(keep, src)
        shutil.rmtree(trash, ignore_errors=True)


def _swap_in(candidate: Path, target: Path, keep: Path, *, trash: Path) -> None:
    """Move ``target`` to ``keep`` (an old ``keep`` to ``trash``), then ``candidate`` to ``target``, by renames."""
    keep.parent.mkdir(parents=True, exist_ok=True)
    if keep.exists():
        os.replace(keep, trash)
    os.replace(target, keep)
    try:
        os.replace(candidate, target)
    except OSError:
        os.replace(keep, target)  # put the original back rather than leave no model at all
        raise
