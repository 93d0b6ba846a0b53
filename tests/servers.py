"""Real servers for tests: start a command on 127.0.0.1, wait until it answers, stop it and its children."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, *, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll ``url`` until it answers 200; fail early (with the log's tail) if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}:\n{tail}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as resp:
            if resp.status == 200:
                return
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


def stop(proc: subprocess.Popen) -> None:
    """Terminate a process started with ``start_new_session`` and everything in its group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@contextlib.contextmanager
def serve(cmd: list[str], *, health: str, env: dict[str, str], log: Path, timeout: float = 120) -> Iterator[None]:
    """Run ``cmd`` (its own process group, output to ``log``) until the block ends; ``health`` must answer 200."""
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_http(health, timeout=timeout, proc=proc, log=log)
            yield
        finally:
            stop(proc)


@contextlib.contextmanager
def prefect_server(home: Path, bin_dir: Path) -> Iterator[str]:
    """``prefect server start`` on a free port with its own PREFECT_HOME (a fresh database); yields the API URL."""
    port = free_port()
    home.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    cmd = [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with serve(cmd, health=f"http://127.0.0.1:{port}/api/health", env=env, log=home / "server.log"):
        yield f"http://127.0.0.1:{port}/api"


@contextlib.contextmanager
def mlflow_server(root: Path, bin_dir: Path) -> Iterator[str]:
    """``mlflow server`` on a free port with a sqlite store and artifacts under ``root``; yields its URI."""
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    store = f"sqlite:///{root / 'mlflow.db'}"
    cmd = [str(bin_dir / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", store, "--artifacts-destination", str(root / "art")]  # fmt: skip
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner process for tests
    env.pop("MLFLOW_TRACKING_URI", None)
    uri = f"http://127.0.0.1:{port}"
    with serve(cmd, health=f"{uri}/health", env=env, log=root / "server.log", timeout=180):
        yield uri
