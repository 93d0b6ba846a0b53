"""The gallery of imported experts: another rank padded into the bank exactly, and ``add_expert``'s checks (every
mismatch named, nothing written on a refusal or a failed write)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from mole.base import load_base
from mole.config import BuildConfig, load_config
from mole.nn.adapters import CONFIG, WEIGHTS
from mole.nn.lineage import LINEAGE, adapter_digest
from mole.nn.model import MoLEModel
from mole.nn.spec import MoLESpec
from mole.training import gallery
from mole.training.gallery import add_expert


def peft_adapter(directory: Path, *, r: int = 4, alpha: float = 16.0, targets: tuple = ("q_proj", "v_proj"),
                 rslora: bool = False) -> Path:  # fmt: skip
    """An adapter made by peft itself on the tiny base (as a user would bring one), with random A and B."""
    base, _ = load_base("tiny", seed=0)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=rslora, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.3)
    model.save_pretrained(str(directory))
    return directory


@pytest.mark.parametrize(("r", "alpha", "rslora"), [(4, 16.0, False), (2, 3.0, True), (8, 8.0, False)])
def test_an_adapter_of_another_rank_joins_the_bank_exactly(tmp_path: Path, r: int, alpha: float, rslora: bool) -> None:
    """A bank of r = 8 at scale 16/8 computes what peft computes for an r = 4 (or rsLoRA r = 2) adapter."""
    src = peft_adapter(tmp_path / "a", r=r, alpha=alpha, rslora=rslora)
    base, tok = load_base("tiny", seed=0)
    spec = MoLESpec(base_model={"name": "tiny", "seed": 0}, expert_ids=["a", "b"], r=8, lora_alpha=16.0, top_k=1,
                    target_modules=["q_proj", "v_proj"], clusters=[0, 1])  # fmt: skip
    mole = MoLEModel(base=base, tokenizer=tok, spec=spec).eval()
    mole.load_expert(1, src)
    reference = PeftModel.from_pretrained(load_base("tiny", seed=0)[0], str(src)).eval()
    ids = torch.randint(3, 250, (2, 9))
    with torch.no_grad():
        got = mole(ids, route=torch.ones(2, dtype=torch.long)).logits
        want = reference(input_ids=ids).logits
        plain = load_base("tiny", seed=0)[0](input_ids=ids).logits
    assert not torch.allclose(want, plain, atol=1e-3), "precondition: the adapter changes the output"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for layer in mole.bank.values():  # the padded directions are exact zeros
        a, b = layer.expert(1)
        assert (a[r:] == 0).all() and (b[:, r:] == 0).all()


def test_an_adapter_above_the_banks_rank_is_refused(tmp_path: Path) -> None:
    src = peft_adapter(tmp_path / "a", r=16)
    base, tok = load_base("tiny", seed=0)
    spec = MoLESpec(base_model={"name": "tiny"}, expert_ids=["a"], r=8, lora_alpha=16.0, top_k=1,
                    target_modules=["q_proj", "v_proj"])  # fmt: skip
    with pytest.raises(ValueError, match="adapter r=16 is above the bank's r=8"):
        MoLEModel(base=base, tokenizer=tok, spec=spec).load_expert(0, src)


@pytest.fixture
def cfg(tmp_path: Path) -> BuildConfig:
    return load_config(None, preset="tiny", overrides=[f"workspace={tmp_path / 'ws'}"])


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return load_base("tiny", seed=0)[0]


def _listing(cfg: BuildConfig) -> list[str]:
    root = gallery.gallery_dir(cfg)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_add_expert_copies_the_adapter_with_its_lineage(cfg: BuildConfig, base: torch.nn.Module, tmp_path: Path):
    src = peft_adapter(tmp_path / "legal", r=4)
    res = add_expert(cfg, src, "legal", base=base)
    dest = gallery.gallery_dir(cfg) / "legal"
    assert res == {"name": "legal", "path": str(dest), "sha256": adapter_digest(src), "r": 4, "lora_alpha": 16.0,
                   "modules": 4, "rows": None}  # fmt: skip
    assert (dest / WEIGHTS).read_bytes() == (src / WEIGHTS).read_bytes()
    record = json.loads((dest / LINEAGE).read_text())
    assert record["kind"] == "gallery" and record["made_by"] == {"stage": "add-expert", "source": str(src.resolve())}
    assert record["sha256"] == adapter_digest(dest) == adapter_digest(src)
    with pytest.raises(FileExistsError, match=f"{dest}: the gallery already has an expert named 'legal'"):
        add_expert(cfg, src, "legal", base=base)
    assert _listing(cfg) == ["legal", f"legal/{CONFIG}", f"legal/{WEIGHTS}", f"legal/{LINEAGE}"]


def test_add_expert_keeps_the_rows_it_is_for_and_names_a_bad_rows_file(
    cfg: BuildConfig, base: torch.nn.Module, tmp_path: Path
) -> None:
    from mole.data.prepare import DataError

    src = peft_adapter(tmp_path / "a", r=4)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "completion": "c"}\n{"prompt": 3\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        add_expert(cfg, src, "a", rows=bad, base=base)
    assert _listing(cfg) == []  # refused before anything was written
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"prompt": f"p{i}", "completion": "c"}) + "\n" for i in (1, 2, 2)), "utf-8")
    assert add_expert(cfg, src, "a", rows=good, base=base)["rows"] == 2  # the duplicate dropped, as prepare does
    kept = [json.loads(line) for line in (gallery.gallery_dir(cfg) / "a" / gallery.ROWS).read_text().splitlines()]
    assert [r["prompt"] for r in kept] == ["p1", "p2"] and all(r["id"] for r in kept)


def _edit(src: Path, *, config: dict | None = None, tensors: dict | None = None) -> Path:
    if config:
        (src / CONFIG).write_text(json.dumps(json.loads((src / CONFIG).read_text()) | config))
    if tensors:
        save_file(load_file(str(src / WEIGHTS)) | tensors, str(src / WEIGHTS))
    return src


Q = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"config": {"base_model_name_or_path": "org/other-model"}},
         "base_model_name_or_path: 'org/other-model', but the workspace's base model is 'tiny'"),
        ({"config": {"revision": "v2"}, "revision": "v1"}, "revision: 'v2', but the base model's revision is 'v1'"),
        ({"targets": ("q_proj",)}, "target_modules: ['q_proj'], but the bank's are ['q_proj', 'v_proj']"),
        ({"tensors": {f"{Q}.lora_A.weight": torch.zeros(4, 7)}},
         "module model.layers.0.self_attn.q_proj: lora_A (4, 7), lora_B (64, 4) do not fit the base's linear"),
        ({"tensors": {f"{Q}.lora_B.weight": torch.zeros(64, 4, dtype=torch.int32)}},
         f"{Q}.lora_B.weight: dtype torch.int32; expected one of float32, float16, bfloat16"),
        ({"tensors": {"base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)}},
         "module model.layers.9.self_attn.q_proj: the base model has no such linear layer"),
    ],
)  # fmt: skip
def test_an_adapter_that_does_not_fit_is_refused_and_the_gallery_is_unchanged(
    cfg: BuildConfig, base: torch.nn.Module, tmp_path: Path, edit: dict, message: str
) -> None:
    add_expert(cfg, peft_adapter(tmp_path / "ok"), "ok", base=base)
    before = _listing(cfg)
    src = _edit(peft_adapter(tmp_path / "bad", targets=edit.get("targets", ("q_proj", "v_proj"))),
                config=edit.get("config"), tensors=edit.get("tensors"))  # fmt: skip
    if "revision" in edit:
        cfg = cfg.model_copy(update={"base_model": cfg.base_model.model_copy(update={"revision": edit["revision"]})})
    with pytest.raises(ValueError, match="cannot join the gallery") as err:
        add_expert(cfg, src, "bad", base=base)
    assert str(err.value).startswith(f"{src}: ") and message in str(err.value), str(err.value)
    assert _listing(cfg) == before


def test_bad_names_and_missing_adapters_are_named(cfg: BuildConfig, base: torch.nn.Module, tmp_path: Path) -> None:
    src = peft_adapter(tmp_path / "a")
    for name in ("../escape", "expert_01", "shared", ""):
        with pytest.raises(ValueError, match=f"--name {name!r}: expected"):
            add_expert(cfg, src, name, base=base)
    (src / WEIGHTS).rename(src / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match=f"{src}: not a peft adapter dir \\(missing {WEIGHTS}; safetensors"):
        add_expert(cfg, src, "a", base=base)
    assert _listing(cfg) == []


def test_a_write_that_fails_leaves_nothing_in_the_gallery(
    cfg: BuildConfig, base: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(directory: Path, record: dict) -> Path:
        raise OSError(28, "No space left on device", str(directory))

    monkeypatch.setattr(gallery, "write_lineage", boom)
    with pytest.raises(OSError, match="No space left"):
        add_expert(cfg, peft_adapter(tmp_path / "a"), "a", base=base)
    assert _listing(cfg) == []  # no half-written expert, no temp beside it


def test_the_add_expert_command(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mole.cli import app

    ws, good = tmp_path / "ws", peft_adapter(tmp_path / "good", r=2)
    bad = _edit(peft_adapter(tmp_path / "bad"), config={"base_model_name_or_path": "org/other-model"})
    args = ["--preset", "tiny", "--set", f"workspace={ws}"]
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n", encoding="utf-8")
    res = CliRunner().invoke(app, ["add-expert", str(good), "--name", "good", "--rows", str(rows), *args],
                             env={"COLUMNS": "200"})  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (ws / "artifacts" / "gallery" / "good" / gallery.ROWS).read_text().count("\n") == 1
    assert adapter_digest(good) in res.stdout and (ws / "artifacts" / "gallery" / "good" / LINEAGE).is_file()
    res = CliRunner().invoke(app, ["add-expert", str(bad), "-n", "bad", *args], env={"COLUMNS": "200"})
    assert res.exit_code == 1 and "base_model_name_or_path: 'org/other-model'" in " ".join(res.stderr.split())
    assert sorted(p.name for p in (ws / "artifacts" / "gallery").iterdir()) == ["good"]
