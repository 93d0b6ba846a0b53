"""Expert training throughput and peak memory: one expert, N sequential runs, N runs in parallel threads, packed.

Each mode runs in its own subprocess (``python -m bench.train --worker MODE``), so its peak RSS is its own. The
base is loaded before the clock starts (in parallel mode one base per worker, as the flow's tasks each load
theirs); the peak is the process's resident high-water mark over the training, base included (``VmHWM`` reset
after loading where Linux allows, else ``ru_maxrss`` of the whole process). Training uses the demo preset's
expert settings on the demo corpus, one skill per expert.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

MODES = ("one", "sequential", "parallel", "packed")


def _rows(n: int, per_skill: int) -> list[list[dict[str, Any]]]:
    """Demo-corpus rows, one skill per expert (skills reused round-robin beyond the six there are)."""
    from mole.data.demo import generate_demo_corpus

    rows = generate_demo_corpus(rows_per_skill=per_skill, seed=0)
    skills = sorted({r["domain"] for r in rows})
    groups = [[r for r in rows if r["domain"] == skills[i % len(skills)]] for i in range(n)]
    return [g[i // len(skills) :: 1 + (n - 1) // len(skills)] for i, g in enumerate(groups)]


def _reset_peak() -> bool:
    try:  # "5" resets the VmHWM peak-RSS counter of this process (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_mb(reset: bool) -> float:
    if reset:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(mode: str, *, n: int, steps: int, per_skill: int) -> dict[str, Any]:
    """Train in one mode in this process; return tokens, seconds, tokens/s and peak RSS (MiB)."""
    import torch

    from bench.common import load_model
    from mole.config import load_config
    from mole.training.experts import train_lora
    from mole.training.packed import PackedExpert, train_packed

    cfg = load_config(None, preset="demo")
    e = cfg.experts.model_copy(update={"steps": steps})
    groups = _rows(n, per_skill)[: 1 if mode == "one" else n]
    workers = cfg.flow.max_workers if mode == "parallel" else 1
    bases = [load_model()[:2] for _ in range(workers)]
    if mode == "parallel":  # as the flow does: torch threads split between the workers
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    tmp = Path(tempfile.mkdtemp(prefix="mole-bench-train-"))
    reset = _reset_peak()
    t0 = time.perf_counter()
    if mode == "packed":
        experts = [PackedExpert(f"e{i}", g, tmp / f"e{i}", cfg.seed + i, steps, "bench") for i, g in enumerate(groups)]
        metrics = list(train_packed(*bases[0], experts, lora=e.lora, cfg=e).values())
    else:
        pool: queue.Queue = queue.Queue()
        for b in bases:
            pool.put(b)

        def job(i: int) -> dict[str, Any]:
            model, tok = pool.get()
            try:
                return train_lora(model, tok, groups[i], lora=e.lora, cfg=e, steps=steps, out_dir=tmp / f"e{i}",
                                  seed=cfg.seed + i, fingerprint="bench")  # fmt: skip
            finally:
                pool.put((model, tok))

        with ThreadPoolExecutor(max_workers=workers) as ex:
            metrics = list(ex.map(job, range(len(groups))))
    seconds = time.perf_counter() - t0
    tokens = sum(m["tokens"] for m in metrics)
    peak = {"peak_rss_mb": round(_peak_mb(reset), 1), "peak_from": "VmHWM after load" if reset else "ru_maxrss"}
    return {"mode": mode, "experts": len(groups), "workers": workers, "torch_threads": torch.get_num_threads(),
            "steps": steps, "tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
            **peak}  # fmt: skip


def _spawn(mode: str, *, n: int, steps: int, per_skill: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.train", "--worker", mode, "--experts", str(n), "--steps", str(steps),
           "--per-skill", str(per_skill)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"bench.train worker {mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(*, quick: bool) -> dict[str, Any]:
    """All modes, each in a fresh subprocess, repeated and interleaved; medians per mode."""
    from bench.common import median, table

    n, steps, reps = (4, 4, 1) if quick else (6, 10, 2)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    for _ in range(reps):
        for mode in MODES:
            runs[mode].append(_spawn(mode, n=n, steps=steps, per_skill=40))
    rows = []
    for mode in MODES:
        rs = runs[mode]
        rows.append({**rs[0], **{k: median([r[k] for r in rs]) for k in ("tokens_per_s", "seconds", "peak_rss_mb")}})
    by = {r["mode"]: r for r in rows}
    for r in rows:
        r["tps_vs_sequential"] = round(r["tokens_per_s"] / by["sequential"]["tokens_per_s"], 3)
        r["rss_vs_one"] = round(r["peak_rss_mb"] / by["one"]["peak_rss_mb"], 3)
    cols = ["mode", "experts", "workers", "torch_threads", "tokens", "seconds", "tokens_per_s", "tps_vs_sequential",
            "peak_rss_mb", "rss_vs_one"]  # fmt: skip
    table(f"expert training: {n} experts x {steps} steps (demo preset settings), {reps} run(s) per mode", cols, rows)
    return {"experts": n, "steps": steps, "reps": reps, "rows": rows, "runs": runs}


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.train [--full]``, or ``--worker MODE`` for one subprocess."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=MODES)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--per-skill", type=int, default=40)
    parser.add_argument("--full", action="store_true")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, n=args.experts, steps=args.steps, per_skill=args.per_skill)), flush=True)
        return
    from bench.common import environment, write_result

    mode = "full" if args.full else "quick"
    write_result("train", mode, {**run(quick=not args.full), "environment": environment()})


if __name__ == "__main__":
    main()
