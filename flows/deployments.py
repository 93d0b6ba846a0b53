"""Runs of registered deployments through the Prefect API: start one now with a config, follow it, link to it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_UI_URL

from mole.config import BuildConfig


def flow_run_url(run_id: object) -> str:
    """The flow run's page in the Prefect UI, or its id when no UI URL is known."""
    ui = PREFECT_UI_URL.value()
    return f"{ui}/runs/flow-run/{run_id}" if ui else str(run_id)


def start_run(cfg: BuildConfig, deployment: str) -> tuple[Any, Any]:
    """Create a run of ``deployment`` (FLOW/NAME) with ``cfg`` as its parameter; returns (flow run, deployment).

    Raises:
        LookupError: the server has no such deployment (or refused the name); the message names it.
    """
    with get_client(sync_client=True) as client:
        try:
            dep = client.read_deployment_by_name(deployment)
        except Exception as exc:  # ObjectNotFound, or the server refusing the name
            raise LookupError(f"deployment {deployment!r}: {exc}") from exc
        run = client.create_flow_run_from_deployment(dep.id, parameters={"config": cfg.model_dump(mode="json")})
    return run, dep


def wait_for_run(run_id: Any, *, timeout: float, on_state: Callable[[str], None]) -> Any:
    """Poll the flow run until it is final; ``on_state`` hears each new state name.

    Raises:
        TimeoutError: still not final after ``timeout`` seconds (the run goes on).
    """
    deadline, last = time.monotonic() + timeout, None
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(run_id)
            name = run.state.name if run.state else "unknown"
            if name != last:
                on_state(name)
                last = name
            if run.state is not None and run.state.is_final():
                return run
            if time.monotonic() > deadline:
                raise TimeoutError(f"still {name} after {timeout:.0f}s; the run goes on")
            time.sleep(3)
