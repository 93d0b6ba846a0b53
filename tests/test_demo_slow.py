"""Slow end-to-end run of the demo preset through the CLI (`make test-slow`): SmolLM2-135M on the demo corpus."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.demo_model]


def test_demo_build_end_to_end(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "mole.cli", "build", "--preset", "demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "data/clusters/report.json").read_text())
    assert report["k"] == 6 and report["ari"] >= 0.9
    index = json.loads((tmp_path / "artifacts/experts/experts.json").read_text())
    assert len(index["experts"]) == 6 and index["baseline"]["id"] == "multitask_lora"
    metrics = json.loads((tmp_path / "artifacts/mole/train_metrics.json").read_text())
    loss = metrics["joint"]["loss"]
    print(
        f"demo: warm-start agreement {metrics['agreement_before_training']:.3f}, "
        f"after joint {metrics['agreement']:.3f}, joint loss {loss[0]:.3f} -> {loss[-1]:.3f}"
    )
    assert metrics["agreement_before_training"] >= 0.9
    assert metrics["first_gate"]["train_accuracy"] >= 0.8  # the first-token gate (0.857 measured on the demo rows)
    ev = json.loads((tmp_path / "reports/eval.json").read_text())
    assert {"base", "multitask_lora", "oracle_experts", "cluster_routing", "mole"} <= set(ev["variants"])
    assert ev["variants"]["mole"]["loss"] < ev["variants"]["base"]["loss"]
    assert ev["routing"]["first_gate_agreement"] >= 0.7  # (0.85 of the demo eval rows when measured)
    merge = json.loads((tmp_path / "reports/merge_prune.json").read_text())
    assert merge["expert_ids_before"] == [e["id"] for e in index["experts"]] and merge["experts_before"] == 6
    assert len(merge["utilization"]) == 6 and abs(sum(merge["utilization"]) - 1) < 1e-6
    for d in merge["decisions"]:  # each decision carries the numbers that justify it
        assert d["utilization"] < d["floor"] if d["action"] == "prune" else d["similarity"] >= d["ceiling"], d
    # Accepted: the merged model (fewer experts) replaced artifacts/mole and was evaluated; rejected: it is untouched.
    mole_dir = tmp_path / "artifacts/mole"
    served = json.loads((mole_dir / "mole_config.json").read_text())["expert_ids"]
    assert merge["experts_after"] == 6 - len(merge["decisions"])  # each prune or pairwise merge drops one expert
    if merge["accepted"]:
        assert merge["decisions"] and len(served) == merge["experts_after"]
        assert (mole_dir / "merged_from.json").is_file() and "mole_merged" in ev["variants"]
    else:
        assert served == merge["expert_ids_before"]
        assert not (mole_dir / "merged_from.json").exists() and "mole_merged" not in ev["variants"]
    # The README's predict example, prompted as a user types it: the model dir applies the training template.
    readme = ["predict", "--model", "artifacts/mole", "--prompt", "Unit conversion: 25000 m equals how many km?",
              "--json", "--preset", "demo"]  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "mole.cli", *readme], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    completion = json.loads(out.stdout)[0]["completion"]
    print(f"README predict example: {completion!r}")
    assert completion.strip()
    # The same prompt through `mlflow models serve` of the version the build registered (workspace's sqlite store)
    served_completion = _serve_and_ask(tmp_path, env, "Unit conversion: 25000 m equals how many km?")
    print(f"mlflow models serve: {served_completion!r}")
    assert served_completion.strip() and served_completion == completion
    print((tmp_path / "reports/eval.md").read_text())


def _serve_and_ask(ws: Path, env: dict[str, str], prompt: str) -> str:
    """Serve version 1 of the build's registered model with `mlflow models serve` and POST ``prompt`` to it."""
    from tests.servers import free_port, serve

    port, bin_dir = free_port(), Path(sys.executable).parent
    uri = f"sqlite:///{ws / 'mlflow.db'}"
    cmd = [str(bin_dir / "mlflow"), "models", "serve", "-m", "models:/mole/1", "--env-manager", "local",
           "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    # the scoring server is `uvicorn` from the environment's bin: on PATH, as in an activated venv
    env = env | {"MLFLOW_TRACKING_URI": uri, "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"}
    with serve(cmd, health=f"http://127.0.0.1:{port}/ping", env=env, log=ws / "serve.log", timeout=300):
        from mole.config import load_config

        tokens = load_config(None, preset="demo").evaluate.max_new_tokens  # what `mole predict` uses by default
        body = json.dumps({"dataframe_records": [{"prompt": prompt}], "params": {"max_new_tokens": tokens}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=300) as resp:
            return json.loads(resp.read())["predictions"][0]
