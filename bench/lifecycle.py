"""Lifecycle benchmark: does an incremental build touch only what changed, in less time, for the same quality?

Two scenarios on the demo corpus (local files written from ``mole.data.demo``, one fixed eval file):

- ``grow``: a first full build, then ``--grow`` (10 %) more rows, all of ``--grow-skills`` (3) of the six skills, so
  the other clusters keep their rows: an incremental build from the first one, and a full rebuild on the same rows.
  Reported: which experts were reused (byte for byte: the content hash equals the first build's), updated or added,
  the wall time of each build, incremental / full, and the mole loss of each (the issue's goals: at most 40 % of the
  time, within 1 % of the loss).
- ``new-skill``: the first build without one skill, then all skills: the incremental build should add exactly one
  expert; the held-out skill's loss of incremental vs full rebuild (goal: within 5 %), and each old skill's change
  from the first build (goal: none rises more than 1 %).

Each build runs the stages directly (prepare … merge-prune) in its own workspace; tracking and DVC play no part.
Results go to ``bench/results/lifecycle/<preset>.json``. Not part of ``make test``.

    python -m bench.lifecycle                      # both scenarios on the demo preset (hours on 2 CPU cores)
    python -m bench.lifecycle --preset tiny        # the same on the tiny preset (a minute)
    python -m bench.lifecycle --scenario grow --set experts.steps=10
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import console, environment, table, write_result

STAGES = ("prepare", "cluster", "train_experts", "train_router", "evaluate", "merge_prune")
SCENARIOS = ("grow", "new-skill")
EVAL_PER_SKILL = 20  # eval rows per skill, fixed across the builds of a scenario
# One expert per cluster in the first build: an incremental build starts from a model whose experts are unmerged.
FIXED = ["merge.utilization_floor=0", "merge.similarity_ceiling=1", "tracking.enabled=false", "dvc.enabled=false"]


def demo_files(root: Path, *, rows_per_skill: int, grow: float, grow_skills: int, seed: int = 0) -> dict[str, Any]:
    """The scenario files in ``root``: ``eval``; ``week1`` (``rows_per_skill`` per skill); ``week2`` (week1 plus
    ``grow`` × its rows, new rows of its first ``grow_skills`` skills, so the other skills' clusters keep their rows);
    ``without`` (week1 less its last skill, the ``held_out`` one, for ``new-skill``)."""
    from mole.data.demo import generate_demo_corpus

    skills_n = len({r["domain"] for r in generate_demo_corpus(rows_per_skill=1, seed=seed)})
    grow_skills = min(grow_skills, skills_n)
    extra = max(1, round(rows_per_skill * skills_n * grow / grow_skills))  # per growing skill
    by: dict[str, list[dict[str, Any]]] = {}
    for r in generate_demo_corpus(rows_per_skill=rows_per_skill + extra + EVAL_PER_SKILL, seed=seed):
        by.setdefault(r["domain"], []).append(r)
    skills = sorted(by)
    week1 = [r for s in skills for r in by[s][EVAL_PER_SKILL : EVAL_PER_SKILL + rows_per_skill]]
    week2 = week1 + [r for s in skills[:grow_skills] for r in by[s][EVAL_PER_SKILL + rows_per_skill :]]
    random.Random(seed).shuffle(week2)  # new rows spread through the file, as appended data would not be sorted
    files = {"eval": [r for s in skills for r in by[s][:EVAL_PER_SKILL]], "week1": week1, "week2": week2,
             "without": [r for r in week1 if r["domain"] != skills[-1]]}  # fmt: skip
    out: dict[str, Any] = {"held_out": skills[-1], "grown": skills[:grow_skills]}
    for name, rows in files.items():
        out[name] = root / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return out


def build(preset: str, workspace: Path, overrides: list[str], label: str) -> dict[str, Any]:
    """Every stage in ``workspace``; its wall time, mole loss, per-skill mole loss and lifecycle."""
    from mole import stages
    from mole.config import load_config
    from mole.workspace import eval_paths, load_prepared

    cfg = load_config(None, preset=preset, overrides=[f"workspace={workspace}", *FIXED, *overrides])
    seconds: dict[str, float] = {}
    for name in STAGES:
        console.print(f"[bold]{label}[/]: {name} …")
        t0 = time.perf_counter()
        getattr(stages, name)(cfg)
        seconds[name] = round(time.perf_counter() - t0, 1)
    paths = eval_paths(cfg)
    report = json.loads(paths["eval"].read_text(encoding="utf-8"))
    domain = {r["id"]: r.get("domain") for r in load_prepared(cfg)[1]}
    per_skill: dict[str, list[float]] = {}
    for line in paths["rows"].read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        per_skill.setdefault(domain.get(row["id"]) or "?", []).append(row["mole"]["loss"])
    lifecycle = json.loads(paths["lifecycle"].read_text(encoding="utf-8")) if paths["lifecycle"].is_file() else {}
    return {
        "label": label,
        "seconds": seconds,
        "total_s": round(sum(seconds.values()), 1),
        "mole_loss": report["variants"]["mole"]["loss"],
        "per_skill": {s: sum(v) / len(v) for s, v in sorted(per_skill.items())},
        "mode": lifecycle.get("mode"),
        "reason": lifecycle.get("reason"),
        "experts": {
            e["id"]: {k: e.get(k) for k in ("status", "sha256", "rows", "new_rows", "steps")}
            for e in lifecycle.get("experts", [])
        },  # fmt: skip
    }


def scenario(name: str, preset: str, files: dict[str, Any], root: Path, overrides: list[str]) -> dict[str, Any]:
    """The three builds of a scenario (first, incremental from it, full rebuild) and their comparison."""
    from mole.nn.lineage import model_experts

    first_data = files["week1"] if name == "grow" else files["without"]
    after = files["week2"] if name == "grow" else files["week1"]
    data = [f"data.eval_source={files['eval']}", *overrides]
    first = build(preset, root / "first", [f"data.source={first_data}", "build.incremental=never", *data], "first")
    model = root / "first" / "artifacts" / "mole"
    after = [f"data.source={after}", *data]
    incr = build(preset, root / "incremental", [*after, "build.incremental=always", f"build.previous={model}"],
                 "incremental")  # fmt: skip
    full = build(preset, root / "full", [*after, "build.incremental=never"], "full rebuild")
    statuses: dict[str, list[str]] = {}
    for eid, e in incr["experts"].items():
        statuses.setdefault(e["status"], []).append(eid)
    shipped = {eid: e["sha256"] for eid, e in model_experts(model).items()}  # the first build's model, as registered
    reused_same = all(incr["experts"][e]["sha256"] == shipped.get(e) for e in statuses.get("reused", []))
    out = {"scenario": name, "builds": [first, incr, full], "statuses": statuses, "reused_byte_for_byte": reused_same}
    out |= {"time_ratio": incr["total_s"] / full["total_s"], "loss_ratio": incr["mole_loss"] / full["mole_loss"]}
    if name == "new-skill":
        new = files["held_out"]
        out["new_skill"] = new
        out["new_skill_loss_ratio"] = {new: incr["per_skill"][new] / full["per_skill"][new]}
        old = [s for s in first["per_skill"] if s != new]
        out["old_skill_change"] = {s: incr["per_skill"][s] / first["per_skill"][s] - 1 for s in old}
    return out


def show(result: dict[str, Any]) -> None:
    rows = [{"build": b["label"], "mode": b["mode"], "wall s": b["total_s"], "mole loss": round(b["mole_loss"], 4),
             **{s: b["seconds"][s] for s in STAGES}} for b in result["builds"]]  # fmt: skip
    table(f"lifecycle: {result['scenario']}", list(rows[0]), rows)
    console.print(f"experts: {json.dumps(result['statuses'])}; reused byte for byte: {result['reused_byte_for_byte']}")
    console.print(f"incremental / full rebuild: wall time {result['time_ratio']:.3f} (goal <= 0.40), "
                  f"mole loss {result['loss_ratio']:.4f} (goal within 1 %)")  # fmt: skip
    if "new_skill" in result:
        ratios = ", ".join(f"{s} {r:.4f}" for s, r in result["new_skill_loss_ratio"].items())
        worst = max(result["old_skill_change"].values(), default=0.0)
        console.print(f"new skill loss, incremental / full: {ratios} (goal within 5 %); "
                      f"worst old skill change vs the first build {worst:+.2%} (goal <= +1 %)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lifecycle", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="demo", choices=("demo", "tiny"))
    p.add_argument("--scenario", action="append", choices=SCENARIOS, help="default: both")
    p.add_argument("--rows-per-skill", type=int, default=None, help="first build's rows per skill (default: preset's)")
    p.add_argument("--grow", type=float, default=0.1, help="new rows per old row in the second build (grow)")
    p.add_argument("--grow-skills", type=int, default=3, help="how many skills the new rows are of (grow)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--workdir", type=Path, default=None, help="keep the workspaces here (default: a temp dir)")
    args = p.parse_args(argv)
    from mole.config import load_config

    rows = args.rows_per_skill or load_config(None, preset=args.preset).data.demo_rows_per_skill
    results = []
    with tempfile.TemporaryDirectory(prefix="mole-lifecycle-") as tmp:
        root = args.workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        files = demo_files(root, rows_per_skill=rows, grow=args.grow, grow_skills=args.grow_skills)
        for name in args.scenario or SCENARIOS:
            results.append(scenario(name, args.preset, files, root / name, args.overrides))
            show(results[-1])
    out = {"preset": args.preset, "rows_per_skill": rows, "grow": args.grow, "grown_skills": files["grown"],
           "held_out_skill": files["held_out"], "overrides": args.overrides,
           "scenarios": results, "environment": environment()}  # fmt: skip
    write_result(args.preset, "lifecycle", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
