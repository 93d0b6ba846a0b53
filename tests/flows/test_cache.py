"""flows.cache: content hashes and the build tasks' cache keys (what re-runs a stage and what lets it be skipped)."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from flows import tasks
from flows.cache import content_hash, outputs_exist, source_hash
from mole.config import BuildConfig


def _tree(root: Path) -> Path:
    (root / "a" / "sub").mkdir(parents=True)
    (root / "a" / "x.txt").write_text("hello")
    (root / "a" / "sub" / "y.bin").write_bytes(b"\x00\x01")
    return root / "a"


def _key(task: Any, cfg: BuildConfig, **upstream: Any) -> str:
    # Prefect calls a cache_key_fn with the task run's context; the key reads only the context's task.
    return task.cache_key_fn(SimpleNamespace(task=task), {"config": cfg, **upstream})


def _with(cfg: BuildConfig, section: str, **changes: Any) -> BuildConfig:
    return cfg.model_copy(update={section: getattr(cfg, section).model_copy(update=changes)})


def test_content_hash_follows_names_and_bytes(tmp_path: Path) -> None:
    a = _tree(tmp_path / "one")
    h = content_hash([a])
    assert len(h) == 32 and int(h, 16) >= 0
    assert content_hash([a]) == h
    (a / "sub" / "y.bin").write_bytes(b"\x00\x02")  # one byte, deep in the tree
    assert content_hash([a]) != h
    changed = content_hash([a])
    (a / "x.txt").rename(a / "z.txt")  # same bytes, another name
    assert content_hash([a]) not in (h, changed)


def test_content_hash_with_a_root_ignores_where_the_tree_lives(tmp_path: Path) -> None:
    one, two = _tree(tmp_path / "one"), tmp_path / "two" / "a"
    shutil.copytree(one, two)
    assert content_hash([one], root=tmp_path / "one") == content_hash([two], root=tmp_path / "two")
    assert content_hash([one]) != content_hash([two])  # without a root the absolute paths count


def test_content_hash_is_order_free_and_counts_missing_paths(tmp_path: Path) -> None:
    f, g = tmp_path / "f", tmp_path / "g"
    f.write_text("ab")
    g.write_text("c")
    both = content_hash([f, g])
    assert content_hash([g, f]) == both
    f.write_text("a")
    g.write_text("bc")  # the same bytes in sequence, split differently between the files
    assert content_hash([f, g]) != both
    missing = tmp_path / "missing"
    absent = content_hash([missing])
    assert content_hash([missing]) == absent
    missing.write_text("")
    assert content_hash([missing]) != absent  # an empty file is not an absent one


def test_source_hash_reads_local_data_and_names_the_rest(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a"}\n')
    cfg = BuildConfig(workspace=str(tmp_path), data={"source": "d.jsonl"})
    first = source_hash(cfg)
    data.write_text('{"text": "b"}\n')
    assert source_hash(cfg) != first
    demo, hub = BuildConfig(data={"source": "demo"}), BuildConfig(data={"source": "org/dataset"})
    assert source_hash(demo) == source_hash(BuildConfig(data={"source": "demo"})) != source_hash(hub)
    with_eval = BuildConfig(workspace=str(tmp_path), data={"source": "d.jsonl", "eval_source": "d.jsonl"})
    assert source_hash(with_eval) != source_hash(cfg)


def test_stage_key_covers_the_sections_a_stage_reads(tmp_path: Path) -> None:
    cfg = BuildConfig(workspace=str(tmp_path))
    up = {"prepared": {"hash": "h1", "train_rows": 10}}
    key = _key(tasks.cluster, cfg, **up)
    assert len(key) == 64 and _key(tasks.cluster, BuildConfig(workspace=str(tmp_path)), **up) == key
    assert _key(tasks.cluster, _with(cfg, "cluster", k=3), **up) != key  # the stage's own section
    assert _key(tasks.cluster, cfg.model_copy(update={"seed": 1}), **up) != key  # always read
    assert _key(tasks.cluster, _with(cfg, "base_model", name="other/model"), **up) != key  # always read
    assert _key(tasks.cluster, _with(cfg, "experts", steps=99), **up) == key  # a section it does not read
    assert _key(tasks.cluster, _with(cfg, "router", lr=0.5), **up) == key
    assert _key(tasks.cluster, cfg.model_copy(update={"workspace": str(tmp_path / "w2")}), **up) != key
    assert _key(tasks.evaluate, cfg, **up) != key  # another task, the same inputs


def test_stage_key_follows_the_upstream_content_hash_only(tmp_path: Path) -> None:
    cfg = BuildConfig(workspace=str(tmp_path))
    key = _key(tasks.cluster, cfg, prepared={"hash": "h1", "seconds": 1.5, "pid": 11})
    assert _key(tasks.cluster, cfg, prepared={"hash": "h1", "seconds": 9.0, "pid": 12}) == key
    assert _key(tasks.cluster, cfg, prepared={"hash": "h2", "seconds": 1.5, "pid": 11}) != key
    # Lists of results (the experts fan-out) count by their members' hashes; a plain value counts as it is.
    experts = [{"hash": "e0", "seconds": 1.0}, {"hash": "e1", "seconds": 2.0}]
    listed = _key(tasks.evaluate, cfg, experts=experts)
    assert _key(tasks.evaluate, cfg, experts=[{**e, "seconds": 0.0} for e in experts]) == listed
    assert _key(tasks.evaluate, cfg, experts=experts[::-1]) != listed
    assert _key(tasks.evaluate, cfg, experts=["e0", "e1"]) == listed


def test_prepare_key_hashes_the_data_source(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n')
    cfg = BuildConfig(workspace=str(tmp_path), data={"source": "d.jsonl"})
    prepare, cluster = _key(tasks.prepare, cfg), _key(tasks.cluster, cfg, prepared={"hash": "h"})
    (tmp_path / "d.jsonl").write_text('{"text": "b"}\n')  # new data under the same name
    assert _key(tasks.prepare, cfg) != prepare
    assert _key(tasks.cluster, cfg, prepared={"hash": "h"}) == cluster  # it sees new data through prepare's hash


@pytest.mark.parametrize(("name", "reads_router"), [("multitask_lora", True), ("expert_00", False)])
def test_adapter_key_of_the_baseline_also_reads_router(tmp_path: Path, name: str, reads_router: bool) -> None:
    cfg = BuildConfig(workspace=str(tmp_path))
    up = {"name": name, "clusters": {"hash": "c"}}
    key = _key(tasks.train_expert, cfg, **up)
    assert (_key(tasks.train_expert, _with(cfg, "router", steps=99), **up) != key) is reads_router
    assert _key(tasks.train_expert, _with(cfg, "experts", steps=99), **up) != key
    assert _key(tasks.train_expert, _with(cfg, "evaluate", batch_size=99), **up) == key
    assert _key(tasks.train_expert, cfg, **{**up, "name": "expert_07"}) != key  # each adapter its own entry


def test_outputs_exist(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    assert outputs_exist([tmp_path / "f", str(tmp_path / "d")])
    assert not outputs_exist([tmp_path / "f", tmp_path / "missing"])
    assert outputs_exist([])
