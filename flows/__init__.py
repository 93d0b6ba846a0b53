"""Prefect orchestration of mole: thin tasks around ``mole.stages``, the build flow and its deployments."""

import os

# MLflow's telemetry thread (started by `import mlflow`) fetches its config over the network and, when that
# fails as it does offline, unsets an environment variable while other threads may be iterating os.environ
# (requests does so on every call): a KeyError out of a tracking request. The builds here run offline, so
# telemetry is off unless the user set MLFLOW_DISABLE_TELEMETRY (or DO_NOT_TRACK) themselves. Set here, before
# any module of the package imports mlflow.
if "DO_NOT_TRACK" not in os.environ:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
