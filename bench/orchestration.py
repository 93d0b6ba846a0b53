"""Orchestration overhead: the same build stages called directly vs through the Prefect flow, in fresh workspaces.

    python -m bench.orchestration [--preset tiny|demo] [--runs N]

Each mode runs in its own process (same interpreter, same config; MLflow and DVC off so only Prefect differs):
``direct`` calls the stages in order; ``flow_serial`` runs the flow with one expert at a time, so flow_serial -
direct is the orchestration overhead (including starting Prefect's temporary server when PREFECT_API_URL is
unset); ``flow`` runs it with the config's ``flow.max_workers`` experts in parallel. Writes
bench/results/orchestration_<preset>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).parent / "results"
SETS = ["tracking.enabled=false", "dvc.enabled=false"]

DIRECT = """
import sys
from mole import stages
from mole.config import load_config
cfg = load_config(None, preset=sys.argv[1], overrides=sys.argv[2:])
for stage in (stages.prepare, stages.cluster, stages.train_experts, stages.train_router, stages.evaluate,
              stages.merge_prune):
    stage(cfg)
"""


def _time(cmd: list[str]) -> float:
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    """Run both modes ``--runs`` times, alternating, and report the medians."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "demo"])
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    times: dict[str, list[float]] = {"direct": [], "flow_serial": [], "flow": []}
    for _ in range(args.runs):
        for mode in times:
            with tempfile.TemporaryDirectory(prefix="mole-orch-") as ws:
                sets = [*SETS, f"workspace={ws}"]
                if mode == "direct":
                    cmd = [sys.executable, "-c", DIRECT, args.preset, *sets]
                else:
                    cmd = [sys.executable, "-m", "mole.cli", "build", "--preset", args.preset]
                    cmd += [x for s in sets for x in ("--set", s)]
                    cmd += ["--set", "flow.max_workers=1"] if mode == "flow_serial" else []
                times[mode].append(_time(cmd))
    med = {mode: statistics.median(ts) for mode, ts in times.items()}
    result = {
        "preset": args.preset,
        "runs": args.runs,
        **{f"{mode}_s": [round(t, 1) for t in ts] for mode, ts in times.items()},
        "overhead_s": round(med["flow_serial"] - med["direct"], 1),
        "ratio_flow_serial_vs_direct": round(med["flow_serial"] / med["direct"], 3),
        "ratio_flow_vs_direct": round(med["flow"] / med["direct"], 3),
        "cpu_count": os.cpu_count(),
    }
    table = Table(title=f"orchestration overhead ({args.preset} preset, median of {args.runs})")
    for col in ("direct s", "flow, 1 worker s", "flow s", "overhead s", "flow 1w / direct", "flow / direct"):
        table.add_column(col, justify="right")
    table.add_row(*(f"{med[m]:.1f}" for m in times), f"{result['overhead_s']:.1f}",
                  f"{result['ratio_flow_serial_vs_direct']:.3f}", f"{result['ratio_flow_vs_direct']:.3f}")  # fmt: skip
    Console().print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"orchestration_{args.preset}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
