"""The architecture of docs/architecture.md, checked: layers (import-linter), no cycles, no private names across
modules, no deferred imports of the library inside it, small modules, and a library that needs no orchestration."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

from tests.conftest import REPO

PACKAGES = ("mole", "flows", "bench")
MAX_LINES = 400
# The app layer: it alone defers importing the pipeline, flows, bench, torch.
APP = ("mole/cli.py", "mole/audit.py", "mole/diff.py", "mole/add_expert.py", "mole/build.py")
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def _module(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_the_import_contracts_hold() -> None:
    res = _lint_imports(REPO)
    assert res.returncode == 0 and "2 kept, 0 broken" in res.stdout, res.stdout + res.stderr


def test_the_contracts_catch_a_library_module_that_imports_prefect(tmp_path: Path) -> None:
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    router = tmp_path / "mole" / "nn" / "router.py"
    router.write_text(router.read_text() + "\nimport prefect  # noqa: E402\n")
    res = _lint_imports(tmp_path)
    out = " ".join(res.stdout.split())
    assert res.returncode != 0 and "1 broken" in out and "mole.nn.router -> prefect" in out, out


def test_no_import_cycles() -> None:
    graph = grimp.build_graph(*PACKAGES, exclude_type_checking_imports=True)
    cycles = []
    for module in sorted(graph.modules):
        if module.split(".")[0] not in PACKAGES:
            continue
        for imported in graph.find_modules_directly_imported_by(module):
            if imported.split(".")[0] in PACKAGES and graph.chain_exists(importer=imported, imported=module):
                cycles.append(f"{module} -> {imported} -> ... -> {module}")
    assert cycles == [], "\n".join(cycles)


def test_importing_the_library_imports_no_orchestration_package() -> None:
    code = "import mole, mole.stages, sys; print(sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'mlflow', 'dvc', 'flows', 'bench'}))"  # noqa: E501
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr


def _imports(tree: ast.AST) -> list[ast.ImportFrom]:
    """Every absolute ``from X import`` of the module, but those under ``if TYPE_CHECKING:`` (never run)."""
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and ast.unparse(block.test).endswith(
        "TYPE_CHECKING") for stmt in block.body for n in ast.walk(stmt)}  # fmt: skip
    return [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and n.level == 0
            and id(n) not in typing_only]  # fmt: skip


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_module_rules(path: Path) -> None:
    """No private name imported from another module of the project; imports of the project at module level only
    (the app layer excepted); at most MAX_LINES lines."""
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text)
    here = _module(path)
    problems = []
    for node in _imports(tree):
        if node.module.split(".")[0] not in PACKAGES or node.module == here:
            continue
        private = [a.name for a in node.names if a.name.startswith("_")]
        if private:
            problems.append(f"line {node.lineno}: imports private {private} from {node.module}")
        if node.col_offset > 0 and path.relative_to(REPO).as_posix() not in APP and here.split(".")[0] == "mole":
            problems.append(f"line {node.lineno}: imports {node.module} inside a function")
    if (n := len(text.splitlines())) > MAX_LINES:
        problems.append(f"{n} lines (more than {MAX_LINES}): split it by concept")
    assert problems == [], "\n".join(problems)


def test_dvc_yaml_is_the_one_the_stage_registry_generates(tmp_path: Path) -> None:
    from mole.stages import STAGES, dvc_yaml

    assert (REPO / "dvc.yaml").read_text(encoding="utf-8") == dvc_yaml(), "run `mole dvc-yaml` and commit dvc.yaml"
    stale = tmp_path / "dvc.yaml"
    stale.write_text(dvc_yaml().replace("- cluster\n", "- cluster.k\n", 1))
    mole = str(Path(sys.executable).parent / "mole")
    res = subprocess.run([mole, "dvc-yaml", "--check", "--path", str(stale)], capture_output=True, text=True)
    assert res.returncode == 1 and "differs from the stage registry" in " ".join(res.stderr.split()), res.stderr
    res = subprocess.run([mole, "dvc-yaml", "--path", str(stale)], capture_output=True, text=True)
    assert res.returncode == 0 and stale.read_text(encoding="utf-8") == dvc_yaml()
    assert list(STAGES) == ["prepare", "cluster", "train-experts", "train-router", "evaluate", "merge-prune"]


def test_every_registered_stage_is_a_command_and_a_flow_task() -> None:
    from typer.main import get_command

    from flows import tasks
    from mole.cli import app
    from mole.stages import STAGES

    commands = get_command(app).commands
    for name, stage in STAGES.items():
        assert name in commands and commands[name].help == stage.help, name
        assert stage.reads[0] == "seed" and callable(stage.run), name
    assert {t.name for t in vars(tasks).values() if hasattr(t, "fn")} >= set(STAGES) - {"train-experts"}
