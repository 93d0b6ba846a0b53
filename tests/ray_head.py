"""A real local Ray head for tests: ``ray start --head`` on free ports, stopped by PID.

Not ``ray stop``: it ends every Ray process of the machine by name, other people's clusters included. The head's
processes are found instead by a token in their environment (read raw from /proc: Ray's agents and workers write
their titles over the start of it, where psutil stops reading) or by the head's temp dir in their command line.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.servers import free_port

TOKEN_VAR = "MOLE_RAY_HEAD_TOKEN"
# Stop order of `ray stop`: the raylet first (its agents and workers follow it), the GCS last.
FIRST, LAST = "raylet", "gcs_server"


@dataclass
class RayHead:
    address: str  # what ray.init / flow.address take: 127.0.0.1:<gcs port>
    temp_dir: Path
    token: str
    seen: dict[tuple[int, float], str] = field(default_factory=dict)  # (pid, create time) -> command line

    def _ours(self, p: psutil.Process) -> bool:
        with contextlib.suppress(psutil.Error, OSError):
            if p.status() == psutil.STATUS_ZOMBIE:
                return False
            if str(self.temp_dir) in " ".join(p.cmdline()):
                return True
            raw = Path(f"/proc/{p.pid}/environ").read_bytes()
            return f"{TOKEN_VAR}={self.token}".encode() in raw.split(b"\0")
        return False

    def processes(self) -> list[psutil.Process]:
        """The head's live processes: GCS, raylet, agents, dashboard, monitors and workers."""
        return [p for p in psutil.process_iter() if p.pid != os.getpid() and self._ours(p)]

    def snapshot(self) -> None:
        """Remember the head's processes alive now (all must be gone after teardown)."""
        for p in self.processes():
            with contextlib.suppress(psutil.Error):
                self.seen[(p.pid, p.create_time())] = " ".join(p.cmdline())[:400] or p.name()

    def alive(self) -> list[str]:
        """Processes of the head, or seen by ``snapshot`` (same pid and start time), still alive."""
        left = {f"{p.pid}: {' '.join(p.cmdline())[:160]}" for p in self.processes()}
        for (pid, created), cmd in self.seen.items():
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    left.add(f"{pid}: {cmd}")
        return sorted(left)


def _stop(procs: list[psutil.Process], grace_s: float) -> None:
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=10)


def stop(head: RayHead, grace_s: float = 10.0) -> None:
    """End the head's processes by PID in `ray stop`'s order (raylet, the rest, GCS), SIGKILL after ``grace_s``."""
    head.snapshot()
    for part in ("first", "rest", "last"):
        procs = head.processes()
        names = {p.pid: p.name() for p in procs if p.is_running()}
        pick = {
            "first": [p for p in procs if names.get(p.pid) == FIRST],
            "rest": [p for p in procs if names.get(p.pid) not in (FIRST, LAST)],
            "last": procs,
        }[part]
        _stop(pick, grace_s)


@contextlib.contextmanager
def ray_head(*, num_cpus: int, env: dict[str, str], bin_dir: Path) -> Iterator[RayHead]:
    """``ray start --head`` with ``num_cpus`` CPUs (no GPU) and ``env`` (its workers inherit it), every port free."""
    # Short: Ray's unix sockets live under it, and a socket path must fit 107 bytes.
    temp = Path(tempfile.mkdtemp(prefix="mole-ray-", dir="/tmp"))
    token = uuid.uuid4().hex
    port = free_port()
    ports = {
        "--port": port,
        "--ray-client-server-port": free_port(),
        "--dashboard-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
    }
    # Ray 2.60 takes --node-ip-address 127.0.0.1 as "this host" and advertises the host's address instead; the
    # GCS listens on every interface, so 127.0.0.1:<port> reaches it.
    cmd = [str(bin_dir / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus),
           "--num-gpus", "0", "--dashboard-host", "127.0.0.1", "--include-dashboard", "false",
           "--disable-usage-stats", "--temp-dir", str(temp), *(str(x) for kv in ports.items() for x in kv)]  # fmt: skip
    log = temp / "ray-start.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, env={**env, TOKEN_VAR: token}, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    head = RayHead(address=f"127.0.0.1:{port}", temp_dir=temp, token=token)
    try:
        rc = proc.wait(timeout=180)  # `ray start` returns once the head's daemons answer
        assert rc == 0, f"ray start exited {rc}:\n{log.read_text(errors='replace')[-4000:]}"
        head.snapshot()
        yield head
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stop(head)
        left = head.alive()
        print(f"ray head {head.address}: {len(head.seen)} processes seen, {len(left)} left after teardown")
        if not left:
            shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"processes of the Ray head still alive after teardown: {left}"
