"""The CLI's help and introspection: usage examples, readable option types, shell completion, config sources, -v."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from mole.cli import app
from mole.config import config_sources, load_config
from mole.console import setup_logging
from tests.test_pipeline_cli import ENV, MOLE

COMMANDS = sorted(c.name for c in typer.main.get_command(app).commands.values())  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_an_example_and_readable_types(name: str) -> None:
    res = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"}, terminal_width=200)
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert f"Example: mole {name}" in text
    assert "list[str]" not in text and "<path>" not in text.lower()
    if "--set" in text:
        assert "KEY=VALUE" in text and "--config -c FILE" in text


def test_top_level_help_offers_shell_completion() -> None:
    res = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"}, terminal_width=200)
    assert "--install-completion" in res.output and "--show-completion" in res.output


def test_config_sources_name_the_layer_that_set_each_value(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("seed: 7\ncluster:\n  k: 5\n  k_max: 6\n", encoding="utf-8")
    src = config_sources(params, preset="tiny", overrides=["cluster.k=3", "router.top_k=2"])
    cfg = load_config(params, preset="tiny", overrides=["cluster.k=3", "router.top_k=2"])
    assert src["seed"] == (7, str(params))
    assert src["cluster.k"] == (3, "--set cluster.k=3")  # params.yaml said 5; --set comes last
    assert src["router.top_k"] == (2, "--set router.top_k=2")
    assert src["base_model.name"] == ("tiny", "preset tiny")
    assert src["cluster.k_max"][1] == "preset tiny"  # the preset sets it over the file's 6
    assert src["merge.tolerance"] == (cfg.merge.tolerance, "default")
    # every resolved value is listed, each with the value the config really has
    flat = {f"{s}.{k}" for s, sec in cfg.model_dump().items() if isinstance(sec, dict) for k in sec}
    assert all(k in src or any(s.startswith(k + ".") for s in src) for k in flat)  # nested sections by leaf
    assert all(src[f"experts.{k}"][0] == v for k, v in cfg.experts.model_dump(mode="json").items() if k != "lora")


def test_show_config_sources_prints_a_table(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("seed: 11\n", encoding="utf-8")
    cmd = [*MOLE, "show-config", "--preset", "tiny", "--set", "cluster.k=3", "--sources"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split("│")[1].strip(): line.split("│")[3].strip() for line in proc.stdout.splitlines()
            if line.count("│") == 4}  # fmt: skip
    assert rows["seed"] == "params.yaml" and rows["cluster.k"] == "--set cluster.k=3"
    assert rows["data.source"] == "preset tiny" and rows["merge.tolerance"] == "default"


def test_verbose_debugs_mole_only() -> None:
    root, ours = logging.getLogger(), logging.getLogger("mole")
    saved = (root.level, list(root.handlers), ours.level)
    try:
        setup_logging(True)
        assert logging.getLogger("mole.training.lora").isEnabledFor(logging.DEBUG)
        assert logging.getLogger("flows.tracking").isEnabledFor(logging.DEBUG)
        for other in ("transformers", "asyncio", "some.library"):
            assert not logging.getLogger(other).isEnabledFor(logging.DEBUG), other
        setup_logging(False)
        assert not logging.getLogger("mole.training.lora").isEnabledFor(logging.DEBUG)
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        ours.setLevel(saved[2])
        logging.getLogger("flows").setLevel(logging.NOTSET)
        logging.getLogger("bench").setLevel(logging.NOTSET)


def test_module_entry_point_still_runs() -> None:
    out = subprocess.run([*MOLE, "show-config", "--help"], env=ENV, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--sources" in out.stdout and sys.executable


def test_summary_values_are_rounded_for_people() -> None:
    from mole.console import rounded

    assert rounded({"loss": 0.73137612345, "tiny": 0.000123456, "n": 3, "xs": [1.234567, "a"]}) == {
        "loss": 0.7314, "tiny": 0.0001235, "n": 3, "xs": [1.2346, "a"]}  # fmt: skip


def test_build_steps_and_training_runs_reach_the_terminal_bars() -> None:
    from flows import build, tasks
    from mole.console import ProgressHandler, log_bars

    with log_bars("flows.progress") as bars:
        build._step("index-experts")  # the fan-out's index counts as train-experts
        tasks.report_progress("expert_01", 3, 10, "loss 1.2345")
        logging.getLogger("flows.progress").info("no progress attached")  # ignored
    tasks_ = {t.description: t for t in bars.progress.tasks}
    assert tasks_["build"].completed == build.STEPS.index("train-experts") and tasks_["build"].total == len(build.STEPS)
    assert tasks_["build"].fields["note"] == "train-experts"
    assert (tasks_["expert_01"].completed, tasks_["expert_01"].total) == (3, 10)
    assert not [h for h in logging.getLogger("flows.progress").handlers if isinstance(h, ProgressHandler)]  # detached
