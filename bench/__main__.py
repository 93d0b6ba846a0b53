"""The benchmark suite: ``python -m bench [--quick | --full] [--cases forward,generate,merge,train]``.

Each case prints a table and writes ``bench/results/<mode>/<case>.json``; a summary of the headline ratios against
their goals goes to ``bench/results/<mode>/summary.json``. Forward, generation and merge run in this process on one
loaded model (peers and baselines measured in the same rounds, interleaved); training runs each mode in its own
subprocess so that peak memory is per mode. ``--quick`` (default) takes a few minutes on 2 CPU cores; ``--full``
runs the whole grid with more rounds.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

CASES = ("forward", "generate", "merge", "train")


def _cpu_times() -> list[int] | None:
    """The machine's aggregate CPU jiffies from /proc/stat (user, nice, system, idle, iowait, irq, softirq, steal)."""
    try:
        return [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, ValueError, IndexError):
        return None


def _busy_share(start: list[int] | None, end: list[int] | None) -> dict[str, float] | None:
    """Of the machine's CPU time during the run: the share stolen by the hypervisor, and the share not idle."""
    if not start or not end:
        return None
    d = [b - a for a, b in zip(start, end, strict=True)]
    total = max(sum(d), 1)
    return {"steal": round(d[7] / total, 3), "busy": round(1 - (d[3] + d[4]) / total, 3)}


def _find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def headline(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The ratios the issues set goals for, from whichever cases ran."""
    out = []

    def add(name: str, value: float | None, goal: str, ok: bool | None) -> None:
        out.append({"metric": name, "value": None if value is None else round(value, 3), "goal": goal, "met": ok})

    if "forward" in results:
        rows = results["forward"]["rows"]
        for n, k, r, goal in ((8, 2, 16, 1.10), (4, 1, 8, 1.04)):
            mole = _find(rows, variant=f"mole k={k}", N=n, r=r)
            if mole:
                ratio = mole["ratio_to_base"]
                add(f"MoLE / base prefill time, N={n} k={k} r={r}", ratio, f"<= {goal:.2f}", ratio <= goal)
        mole, xl = _find(rows, variant="mole k=2", N=8, r=16), _find(rows, variant="xlora k=2", N=8, r=16)
        if mole and xl and "ratio_to_base" in xl:
            speedup = xl["ratio_to_base"] / mole["ratio_to_base"]
            add("X-LoRA / MoLE forward time, N=8 k=2 r=16", speedup, ">= 2.5", speedup >= 2.5)
    if "generate" in results:
        rows = results["generate"]["rows"]
        for batch in results["generate"].get("batches", [1]):
            for variant, label in (("mole k=2", "MoLE"), ("mole cluster (merged)", "MoLE cluster-routed (merged)")):
                row = _find(rows, variant=variant, batch=batch)
                if row:
                    speed = row["speed_vs_base"]
                    add(f"{label} / base decode tokens/s, batch {batch}", speed, ">= 0.85", speed >= 0.85)
        mole, xl = _find(rows, variant="mole k=2", batch=1), _find(rows, variant="xlora k=2 (no KV cache)", batch=1)
        if mole and xl:
            add("MoLE / X-LoRA decode tokens/s, batch 1", mole["tokens_per_s"] / xl["tokens_per_s"], "-", None)
    if "train" in results:
        by = {r["mode"]: r for r in results["train"]["rows"]}
        tps = by["packed"]["tokens_per_s"] / by["sequential"]["tokens_per_s"]
        add("packed / sequential training tokens/s", tps, ">= 1.4", tps >= 1.4)
        rss = by["packed"]["peak_rss_mb"] / by["one"]["peak_rss_mb"]
        add("packed peak RSS / one expert's", rss, "<= 1.3", rss <= 1.3)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the chosen cases; return 0."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="a subset with fewer rounds (default)")
    group.add_argument("--full", action="store_true", help="the whole grid, more rounds and experts")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--out", type=Path, default=None, help="results directory (default bench/results)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"--cases: unknown {unknown}; expected a subset of {list(CASES)}")

    from bench import common

    mode, out = ("full" if args.full else "quick"), args.out or common.RESULTS
    t0, load0, cpu0 = time.perf_counter(), os.getloadavg(), _cpu_times()
    results: dict[str, dict[str, Any]] = {}
    in_process = [c for c in cases if c != "train"]
    if in_process:
        model, tok, weights = common.load_model()
        common.console.print(f"[bold]mole bench ({mode})[/]: {weights}; {common.environment()}")
        for case in in_process:
            module = __import__(f"bench.{case}", fromlist=["run"])
            results[case] = module.run(model, tok, mode=mode)
            common.write_result(case, mode, {**results[case], "environment": common.environment(weights)}, out)
    if "train" in cases:
        from bench import train

        results["train"] = train.run(quick=mode == "quick")
        common.write_result("train", mode, {**results["train"], "environment": common.environment()}, out)
    summary = headline(results)
    wall = round(time.perf_counter() - t0, 1)
    common.table(f"headline ({mode}, {wall}s wall)", ["metric", "value", "goal", "met"], summary)
    env = {**common.environment(), "loadavg_start": load0, "loadavg_end": os.getloadavg(),
           "cpu_share_during_run": _busy_share(cpu0, _cpu_times())}  # fmt: skip
    common.write_result("summary", mode, {"cases": cases, "wall_s": wall, "headline": summary, "environment": env}, out)
    if mode == "quick" and out == common.RESULTS:  # the README's tables follow the committed results
        from bench import readme

        readme.main([])
        common.console.print(f"[dim]wrote the benchmark tables of {readme.README}[/]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
