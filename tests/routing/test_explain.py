"""The routing audit (mole explain): the routers' own weights for every token of prompt and completion, cluster
routing, and its views (terminal, HTML, PNG) and command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mole import audit
from mole.cli import app
from mole.nn.model import MoLEModel
from mole.routing.explain import explain

PROMPT = "Reverse the word: drawer"


@pytest.fixture
def model(tiny_mole_dir: Path) -> MoLEModel:
    return MoLEModel.from_pretrained(tiny_mole_dir)


def _recorded(model: MoLEModel, run) -> list[list[torch.Tensor]]:  # noqa: ANN001 - a callable running the model
    """Per block, the weights its router returned in each call while ``run()`` ran (hooks on the routers)."""
    calls: list[list[torch.Tensor]] = [[] for _ in model.routers]
    hooks = [r.register_forward_hook(lambda m, a, o, b=b: calls[b].append(o.weights[0].clone()))
             for b, r in enumerate(model.routers)]  # fmt: skip
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return calls


def test_explain_reports_the_routers_own_weights_for_prompt_and_completion(model: MoLEModel) -> None:
    (exp,) = explain(model, [PROMPT], max_new_tokens=8)
    # The prompt as predict sends it: templated, and its tokens exactly the tokenizer's.
    ids = model.tokenizer(PROMPT + "\nAnswer:", return_tensors="pt")["input_ids"]
    assert exp.prompt == PROMPT + "\nAnswer:" and exp.token_ids[: exp.n_prompt] == ids[0].tolist()
    assert exp.completion == model.generate_text([PROMPT], max_new_tokens=8)[0]
    assert exp.n_prompt < len(exp.tokens) <= exp.n_prompt + 8  # completion tokens are included
    assert exp.tokens[0] == "<s>" and "".join(exp.tokens[1 : exp.n_prompt]) == exp.prompt

    # The prompt's tokens: what the routers return in a plain forward of the prompt alone.
    with torch.no_grad():
        plain = _recorded(model, lambda: model(ids))
    want = torch.stack([c[0] for c in plain]).numpy()  # (L, T_prompt, E)
    np.testing.assert_allclose(exp.per_block[:, : exp.n_prompt], want, atol=1e-6)
    # Every token, the completion's too: what the routers returned while the completion was decoded (one call for
    # the prompt, then one per new token; the last token is never read, so it has no decoding-time routing).
    gen = _recorded(model, lambda: model.generate_text([PROMPT], max_new_tokens=8))
    decoded = torch.stack([torch.cat(c) for c in gen]).numpy()  # (L, T - 1, E)
    assert decoded.shape[1] == len(exp.tokens) - 1
    np.testing.assert_allclose(exp.per_block[:, :-1], decoded, atol=1e-5)

    # Top-2 of 3 experts: tokens do take different experts, weights sum to 1 per token and block.
    assert ((exp.per_block > 0).sum(-1) == 2).all()
    np.testing.assert_allclose(exp.weights.sum(-1), 1.0, atol=1e-6)
    assert len({r[0][0] for r in exp.ranked(1)}) > 1
    np.testing.assert_allclose(exp.weights, exp.per_block.mean(0))
    assert exp.ranked(2)[3] == sorted(exp.ranked(2)[3], key=lambda x: -x[1])
    d = exp.to_dict(per_block=True)
    assert d["experts"] == ["add", "reverse", "units"] and np.asarray(d["per_block"]).shape == exp.per_block.shape
    assert d["weights"] == exp.weights.tolist()  # full precision in JSON


def test_raw_reads_the_prompt_as_given(model: MoLEModel) -> None:
    (exp,) = explain(model, [PROMPT], max_new_tokens=3, raw=True)
    assert exp.prompt == PROMPT and exp.completion == model.generate_text([PROMPT], max_new_tokens=3, raw=True)[0]


def test_cluster_routing_gives_each_token_one_expert_with_weight_1(model: MoLEModel) -> None:
    model.spec.routing = "cluster"
    prompts = ["Reverse the word: cat", "Add 2 and 3."]
    exps = explain(model, prompts, max_new_tokens=4)
    want = model.route_by_cluster([p + "\nAnswer:" for p in prompts]).tolist()
    assert want == [1, 0]
    for exp, expert in zip(exps, want, strict=True):
        assert exp.routing == "cluster" and len(exp.tokens) > exp.n_prompt
        assert (exp.per_block[..., expert] == 1.0).all() and exp.per_block.sum() == exp.per_block[..., expert].sum()
        assert exp.ranked(3) == [[(expert, 1.0)]] * len(exp.tokens)
    assert [e.completion for e in exps] == model.generate_text(prompts, max_new_tokens=4)


def test_views_name_the_experts_and_round_the_weights(model: MoLEModel, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    exps = explain(model, [PROMPT, "Add <2> & 3"], max_new_tokens=4)
    page = audit.write(exps, tmp_path / "routing.html", per_block=True).read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>") and page.count("<section>") == 2
    assert all(f">{e}</span>" in page for e in ("add", "reverse", "units"))  # the legend
    assert "Top expert per block" in page and "&lt;2&gt; &amp; 3" in page and "<2>" not in page
    w = exps[0].ranked(1)[1][0][1]
    assert f"{w:.3f}" in page and repr(w) not in page  # people read 3 decimals
    png = audit.write(exps, tmp_path / "routing.png", per_block=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="routing.pdf"):
        audit.write(exps, tmp_path / "routing.pdf")
    audit.show(exps[0], per_block=True)
    text = capsys.readouterr().out
    assert "top expert" in text and "block 1" in text and "reverse" in text and f"{w:.3f}" in text


def test_the_command_audits_a_model_dir(tiny_mole_dir: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the defaults
    html, png = tmp_path / "out" / "r.html", tmp_path / "r.png"
    args = ["explain", "-m", str(tiny_mole_dir), "--prompt", PROMPT, "--max-new-tokens", "5"]
    res = CliRunner().invoke(app, [*args, "--json", "--out", str(html), "--out", str(png)])
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.stdout)
    (exp,) = explain(MoLEModel.from_pretrained(tiny_mole_dir), [PROMPT], max_new_tokens=5)
    assert row == exp.to_dict() and row["prompt"] == PROMPT + "\nAnswer:"
    assert html.is_file() and "reverse" in html.read_text(encoding="utf-8") and png.stat().st_size > 0
    res = CliRunner().invoke(app, [*args, "--per-block", "--raw"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "top expert" in res.stdout and "block 0" in res.stdout and "Answer" not in res.stdout.split("top expert")[0]
    res = CliRunner().invoke(app, [*args, "--out", "r.svg"])
    assert res.exit_code == 2 and "r.svg" in res.output
