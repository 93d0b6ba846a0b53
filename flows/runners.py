"""The expert fan-out's task runners (threads, a Dask or a Ray cluster) and what each expert task asks Ray for."""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from typing import Any

from prefect.task_runners import ThreadPoolTaskRunner

from mole.sections import FlowConfig


def task_runner(f: FlowConfig) -> Any:
    """The expert fan-out's task runner: threads, or a Dask / Ray cluster (local, or the one at ``f.address``)."""
    if f.runner == "threads":
        return ThreadPoolTaskRunner(max_workers=f.max_workers)
    if f.runner == "dask":
        from prefect_dask import DaskTaskRunner

        if f.address:
            return DaskTaskRunner(address=f.address)
        local = {"n_workers": f.max_workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
        return DaskTaskRunner(cluster_kwargs=local)
    try:
        from prefect_ray import RayTaskRunner
    except ImportError:
        raise RuntimeError("flow.runner = 'ray' needs prefect-ray: pip install 'mole[ray]'") from None
    if f.address:
        return RayTaskRunner(address=f.address)
    # A local cluster just big enough for max_workers experts at once.
    return RayTaskRunner(init_kwargs={"num_cpus": math.ceil(f.max_workers * f.cpus_per_expert)})


@contextlib.contextmanager
def expert_resources(f: FlowConfig) -> Iterator[None]:
    """What the expert tasks submitted in the block take to Ray: their CPU and GPU requests (prefect-ray's remote
    options) and the flow's Prefect API. Nothing for other runners.

    Enter it in the fan-out flow, where the Ray task runner has started: the requests are checked against the
    cluster's nodes first.

    Raises:
        ValueError: no node of the Ray cluster has the CPUs and GPUs one expert asks for.
    """
    if f.runner != "ray":
        yield
        return
    from prefect_ray.context import remote_options

    _check_fits(f)
    with _flow_api(), remote_options(num_cpus=f.cpus_per_expert, num_gpus=f.gpus_per_expert):
        yield


@contextlib.contextmanager
def _flow_api() -> Iterator[None]:
    """The flow's Prefect API URL in the settings submitted tasks carry. A Ray worker runs its task with the settings
    of the flow that submitted it, not its own environment's: with PREFECT_API_URL unset (the flow on a temporary
    server, as `mole build` runs by default) each worker would start a temporary server of its own: seconds and a
    process per worker, and on another machine task runs that the flow's server never sees."""
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_API_URL, temporary_settings

    ctx = FlowRunContext.get()
    if PREFECT_API_URL.value() or ctx is None or ctx.client is None:
        yield
        return
    with temporary_settings({PREFECT_API_URL: str(ctx.client.api_url)}):
        yield


def _check_fits(f: FlowConfig) -> None:
    """Ray does not refuse a task no node can run: it keeps it pending (the autoscaler logs "No available node types
    can fulfill resource request") and the build would wait forever. So refuse it here, unless the cluster
    autoscales (it declares node groups to the GCS; it may start a node that fits)."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if any(n.get("CPU", 0) >= f.cpus_per_expert and n.get("GPU", 0) >= f.gpus_per_expert for n in nodes):
        return
    with contextlib.suppress(Exception):  # a private accessor (Ray 2.60): if it moves, check the live nodes only
        if ray._private.state.state.get_cluster_config() is not None:
            return
    have = "; ".join(f"CPU {n.get('CPU', 0):g}, GPU {n.get('GPU', 0):g}" for n in nodes) or "none alive"
    raise ValueError(
        f"flow.cpus_per_expert = {f.cpus_per_expert:g} and flow.gpus_per_expert = {f.gpus_per_expert:g}: no node of "
        f"the Ray cluster at {f.address or '(local)'} has that many (its nodes: {have}); Ray would keep the expert "
        "tasks pending forever. Lower the requests or add a node that fits."
    )


def ray_resources() -> dict[str, float] | None:
    """The resources Ray reserved for the running task when it runs in a Ray worker; None elsewhere."""
    ray = sys.modules.get("ray")  # a Ray worker has imported it; never import it here (threads, Dask)
    # ray.get_runtime_context() would start a local Ray instance in a process that has none: check first.
    if ray is None or not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return None
    return ray.get_runtime_context().get_assigned_resources()
