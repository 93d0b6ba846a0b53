"""mole.routing.warm_start.warm_start_gates with ``auto``: which rule it keeps, and that the model carries it."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from mole.data.tokenize import eval_batches
from mole.nn.model import MoLEModel
from mole.routing import extend, warm_start
from mole.routing.diagnostics import routing_agreement, row_routing
from mole.routing.warm_start import eval_loss, warm_start_gates

ROWS = [{"prompt": f"Add {a} and {b}.\nAnswer:", "completion": str(a + b)} for a in range(4) for b in range(3)]
EXPERTS = [i % 3 for i in range(len(ROWS))]


# AUTO_MARGIN is the relative gain the logistic fit needs over the nearest-mean rule. A margin of 0.99 asks for a
# held-out loss under 1 % of the other's, which no fit reaches; one of -100 lets a loss 101 times higher win.
@pytest.mark.parametrize(("margin", "kept", "detail"), [(0.99, "means", "temperatures"),
                                                        (-100.0, "logistic", "token_accuracy")])  # fmt: skip
def test_auto_keeps_a_rule_by_its_held_out_loss_and_the_model_carries_it(
    make_mole: Callable[[], MoLEModel], monkeypatch: pytest.MonkeyPatch, margin: float, kept: str, detail: str
) -> None:
    monkeypatch.setattr(warm_start, "AUTO_MARGIN", margin)
    model = make_mole()
    calls: list[tuple] = []
    out = warm_start_gates(model, ROWS, EXPERTS, method="auto", c=0.01, batch_size=4, max_length=32, max_tokens=4096,
                           progress=lambda *a: calls.append(a))  # fmt: skip
    assert [c[:3] for c in calls] == [("warm-start", i, 4) for i in range(5)]  # a step per fit and per scoring
    assert [c[3] for c in calls[2::2]] == [out["heldout_loss"]["means"], out["heldout_loss"]["logistic"]]
    assert out["method"] == kept and set(out["heldout_loss"]) == {"means", "logistic"}
    assert len(out[detail]) == model.base.config.num_hidden_layers  # the kept rule's per-block fit details
    held_out = eval_loss(model, ROWS[: len(ROWS) // 4], batch_size=4, max_length=32)
    assert held_out == pytest.approx(out["heldout_loss"][kept], abs=1e-5)  # recorded rounded to 5 decimals
    n_val = len(ROWS) // 4  # the agreement from the same pass: the kept rule's, on the held-out rows
    logits = row_routing(model, ROWS[:n_val], batch_size=4, max_length=32)[1]
    assert out["heldout_agreement"] == routing_agreement(logits, EXPERTS[:n_val])
    other = "logistic" if kept == "means" else "means"
    assert abs(out["heldout_loss"][other] - out["heldout_loss"][kept]) > 1e-4  # so the check above tells them apart


def test_prefix_pooled_states_are_running_means_of_the_token_states(make_mole: Callable[[], MoLEModel]) -> None:
    model = make_mole()
    kw = {"batch_size": 4, "max_length": 32, "max_tokens": 10**6, "seed": 0}  # every token kept, in order
    tokens, labels = warm_start.block_inputs(model, ROWS[:4], EXPERTS[:4], **kw)
    pooled, labels_p = warm_start.block_inputs(model, ROWS[:4], EXPERTS[:4], pool="prefix", **kw)
    assert (labels == labels_p).all()
    batches = eval_batches(ROWS[:4], model.tokenizer, batch_size=4, max_length=32)
    lengths = [int(m.sum()) for _, b in batches for m in b["attention_mask"]]
    start = 0
    for n in lengths:  # each row's tokens are consecutive: its running means are cumulative means of its states
        for b in (0, len(tokens) - 1):
            want = torch.from_numpy(tokens[b][start : start + n]).double().cumsum(0) / torch.arange(1, n + 1)[:, None]
            got = torch.from_numpy(pooled[b][start : start + n]).double()
            assert torch.allclose(got, want, atol=1e-5 * float(want.abs().max()))
        start += n
    assert start == len(labels)


def test_prefix_pooled_logistic_gate_routes_by_the_fit_on_running_means(make_mole: Callable[[], MoLEModel]) -> None:
    model = make_mole()
    for router in model.routers:
        router.pool = "prefix"
    model.spec.pool = "prefix"
    acc = warm_start.fit_logistic_gates(model, ROWS, EXPERTS, c=1.0, batch_size=4, max_length=32, max_tokens=10**6)
    pooled, labels = warm_start.block_inputs(model, ROWS, EXPERTS, batch_size=4, max_length=32, max_tokens=10**6,
                                             pool="prefix")  # fmt: skip
    for router, x, a in zip(model.routers, pooled, acc, strict=True):
        with torch.no_grad():
            logits = router.gate(torch.from_numpy(x))  # the pooled logits are the gate of the pooled state
        assert round(float((logits.argmax(-1).numpy() == labels).mean()), 4) == a


def test_one_forced_pass_gives_the_block_inputs_of_each_row_under_its_own_expert(
    make_mole: Callable[[], MoLEModel],
) -> None:
    """The shared pass: per-expert means and sampled states are the block inputs the base reports (hidden_states)
    with each row forced to its expert, whatever gates the model holds."""
    model = make_mole()
    kw = {"batch_size": 4, "max_length": 32, "max_tokens": 10**6, "seed": 0}  # every token kept, in order
    data = warm_start.collect_block_inputs(model, ROWS, EXPERTS, **kw)
    with torch.no_grad():
        for router in model.routers:  # other gates: a forced pass does not read them
            router.gate.weight.normal_()
    again = warm_start.collect_block_inputs(model, ROWS, EXPERTS, **kw)
    sums = [torch.zeros(3, model.base.config.hidden_size, dtype=torch.float64) for _ in model.routers]
    counts, states = torch.zeros(3, dtype=torch.float64), [[] for _ in model.routers]
    batches = list(eval_batches(ROWS, model.tokenizer, batch_size=4, max_length=32))
    for idx, batch in batches:
        route, mask = torch.tensor([EXPERTS[i] for i in idx]), batch["attention_mask"].bool()
        with torch.no_grad(), model.forced_route(route):
            hidden = model.base(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
        counts.index_add_(0, route, mask.sum(1).double())
        for b in range(len(sums)):  # hidden_states[b] is block b's input
            sums[b].index_add_(0, route, (hidden.hidden_states[b].double() * mask[..., None]).sum(1))
            states[b].append(hidden.hidden_states[b][mask])
    for b in range(len(sums)):
        torch.testing.assert_close(data.means[b], (sums[b] / counts[:, None]).float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.from_numpy(data.states[b]), torch.cat(states[b]), atol=1e-5, rtol=1e-5)
        assert torch.equal(data.means[b], again.means[b]) and (data.states[b] == again.states[b]).all()
    masks = [(i, int(m.sum())) for idx, b in batches for i, m in zip(idx, b["attention_mask"], strict=True)]
    assert data.labels.tolist() == [EXPERTS[i] for i, n in masks for _ in range(n)]  # each row's tokens, in order


def test_auto_from_one_pass_scores_each_rule_as_fitting_it_alone_does(make_mole: Callable[[], MoLEModel]) -> None:
    """``auto`` fits both rules from one shared pass; each rule's held-out loss and fit details are those of fitting
    that rule alone on the same rows (its own pass), so the rule kept is the same."""
    kw = {"c": 0.01, "batch_size": 4, "max_length": 32, "max_tokens": 4096}
    out = warm_start_gates(make_mole(), ROWS, EXPERTS, method="auto", **kw)
    n_val = len(ROWS) // 4
    for rule, detail in (("means", "temperatures"), ("logistic", "token_accuracy")):
        model = make_mole()
        alone = warm_start_gates(model, ROWS[n_val:], EXPERTS[n_val:], method=rule, **kw)
        loss = eval_loss(model, ROWS[:n_val], batch_size=4, max_length=32)
        assert round(loss, 5) == pytest.approx(out["heldout_loss"][rule], abs=1e-5)
        if out["method"] == rule:
            assert alone[detail] == out[detail]


def test_extend_gates_keeps_the_previous_rows_exactly_and_fits_a_row_that_wins_the_new_experts_tokens(
    make_mole: Callable[[], MoLEModel],
) -> None:
    """An incremental build's router: the previous build's gate rows (two experts) stay bit for bit; the row of the
    expert added since is fitted against them, so more tokens go to their own expert than with a blank row."""
    model = make_mole()
    warm_start.fit_logistic_gates(model, ROWS, EXPERTS, c=1.0, batch_size=4, max_length=32, max_tokens=10**6)
    previous = {k: v[:2].clone() for k, v in model.routers.state_dict().items()}  # a router of experts 0 and 1
    kw = {"batch_size": 4, "max_length": 32, "max_tokens": 10**6}
    x, labels = warm_start.block_inputs(model, ROWS, EXPERTS, **kw)

    def accuracy() -> float:  # of the new expert's tokens, the fraction its row wins, averaged over blocks
        new = labels == 2
        with torch.no_grad():
            gates = zip(model.routers, x, strict=True)
            hits = [(r.gate(torch.from_numpy(s[new])).argmax(-1).numpy() == 2).mean() for r, s in gates]
        return float(sum(hits) / len(hits))

    for router in model.routers:  # a blank row for the new expert (where the fit starts): what it must beat
        with torch.no_grad():
            router.gate.weight[2:].zero_()
            router.gate.bias[2:].zero_()
    blank = accuracy()
    # The new expert's rows come last and max_rows is small: rows are taken in turn from each expert's.
    order = sorted(range(len(ROWS)), key=lambda i: EXPERTS[i] == 2)
    out = extend.extend_gates(model, previous, [ROWS[i] for i in order], [EXPERTS[i] for i in order], c=1.0,
                                  max_rows=9, **kw)  # fmt: skip
    assert out["kept_rows"] == 2 and out["added_rows"] == [2]
    state = model.routers.state_dict()
    for key, old in previous.items():
        assert torch.equal(state[key][:2], old), key
    assert accuracy() > blank + 0.1, (accuracy(), blank)


def test_logistic_gates_fitted_side_by_side_equal_the_fits_one_by_one(make_mole: Callable[[], MoLEModel]) -> None:
    model = make_mole()
    data = warm_start.collect_block_inputs(model, ROWS, EXPERTS, batch_size=4, max_length=32, max_tokens=4096)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # one worker: the blocks one after the other
        one = warm_start.logistic_gates(model, data, c=0.01)
        gates = [r.gate.weight.detach().clone() for r in model.routers]
        torch.set_num_threads(2)  # two workers, one BLAS thread each
        two = warm_start.logistic_gates(model, data, c=0.01)
    finally:
        torch.set_num_threads(threads)
    assert one == two
    for router, want in zip(model.routers, gates, strict=True):
        torch.testing.assert_close(router.gate.weight, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
