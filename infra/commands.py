"""The server commands of the mole stack, in one place.

``infra/docker-compose.yml`` runs these commands in containers; the end-to-end test starts the same ones as
processes on 127.0.0.1. ``tests/test_infra.py`` checks that the compose file's ``command`` entries equal what
these functions return, so the two cannot drift apart.

This file is loaded by path (``infra/`` is not an installed package) and needs nothing beyond the standard library.
"""

from __future__ import annotations

PREFECT_PORT = 4200  # prefect server's default port, inside the container and on 127.0.0.1
MLFLOW_PORT = 5000  # mlflow server's default port
MINIO_PORT = 9000  # minio's S3 API port
WORKER_HEALTH_PORT = 8080  # prefect worker --with-healthcheck (PREFECT_WORKER_WEBSERVER_PORT)
WORK_POOL = "mole-process"  # the process work pool of the `scheduled-retrain` deployment in prefect.yaml


def prefect_server(*, host: str = "127.0.0.1", port: int = PREFECT_PORT) -> list[str]:
    """``prefect server start``: API, UI and background services in one process.

    The database comes from ``PREFECT_API_DATABASE_CONNECTION_URL`` (postgres in compose, sqlite by default).
    """
    return ["prefect", "server", "start", "--host", host, "--port", str(port)]


def prefect_worker(*, pool: str = WORK_POOL, healthcheck: bool = False) -> list[str]:
    """A process worker polling ``pool``; it creates the pool on first start. Needs ``PREFECT_API_URL``."""
    cmd = ["prefect", "worker", "start", "--pool", pool, "--type", "process"]
    if healthcheck:
        cmd.append("--with-healthcheck")  # serves GET /health on PREFECT_WORKER_WEBSERVER_PORT (8080)
    return cmd


def mlflow_server(
    *,
    backend_store_uri: str,
    artifacts_destination: str,
    allowed_hosts: str,
    host: str = "127.0.0.1",
    port: int = MLFLOW_PORT,
    workers: int = 2,
) -> list[str]:
    """``mlflow server`` with a database backend store and proxied artifacts (``mlflow-artifacts:/``).

    Clients then need only ``MLFLOW_TRACKING_URI``: the server reads and writes ``artifacts_destination``
    (``s3://…`` in compose, with ``MLFLOW_S3_ENDPOINT_URL`` and AWS keys in its environment; a local directory in
    the end-to-end test). ``allowed_hosts`` is the comma-separated list of Host headers it answers (``host:port``,
    wildcards allowed); the health endpoint is exempt.
    """
    return [
        "mlflow",
        "server",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--backend-store-uri",
        backend_store_uri,
        "--serve-artifacts",
        "--artifacts-destination",
        artifacts_destination,
        "--allowed-hosts",
        allowed_hosts,
    ]
