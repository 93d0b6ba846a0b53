"""Tests of the demo corpus generator: shape, determinism, and that every answer is right.

The answer checks are independent of the generator: they parse the question back out of the prompt text
(regexes, ``json``, ``datetime``, a small ``ast`` evaluator) and recompute the answer.
"""

from __future__ import annotations

import ast
import calendar
import collections
import datetime as dt
import json
import operator
import re
from collections.abc import Callable

import pytest

from mole.data.demo import ANSWER_SUFFIX, SKILLS, generate_demo_corpus

# --------------------------------------------------------------------------------------- answer checkers


def _question(prompt: str) -> str:
    assert prompt.endswith(ANSWER_SUFFIX), prompt
    return prompt[: -len(ANSWER_SUFFIX)]


def _check_arithmetic(prompt: str, completion: str) -> bool:
    q = _question(prompt)
    a, b = (int(x) for x in re.findall(r"\d+", q))
    if re.search(r"\bplus\b|\+|\bsum\b|\bAdd\b", q):
        expected = a + b
    elif re.search(r"\bSubtract\b", q):  # "Subtract b from a": the operands are named in reverse
        expected = b - a
    elif re.search(r"\bminus\b|\s-\s|\bdifference\b", q):
        expected = a - b
    elif re.search(r"\btimes\b|×|\bproduct\b|\bMultiply\b", q):
        expected = a * b
    else:
        raise AssertionError(f"no operation found in {prompt!r}")
    return completion == str(expected)


# Independent table: unit -> (dimension, size in the dimension's smallest unit).
_UNITS = {
    ("kilometers", "km"): ("length", 1_000_000),
    ("meters", "m"): ("length", 1000),
    ("centimeters", "cm"): ("length", 10),
    ("millimeters", "mm"): ("length", 1),
    ("tonnes", "t"): ("mass", 1_000_000_000),
    ("kilograms", "kg"): ("mass", 1_000_000),
    ("grams", "g"): ("mass", 1000),
    ("milligrams", "mg"): ("mass", 1),
    ("liters", "L"): ("volume", 1000),
    ("centiliters", "cL"): ("volume", 10),
    ("milliliters", "mL"): ("volume", 1),
}
_UNIT_BY_TOKEN = {token: names for names in _UNITS for token in names}
_UNIT_RE = "|".join(sorted(map(re.escape, _UNIT_BY_TOKEN), key=len, reverse=True))


def _check_unit_conversion(prompt: str, completion: str) -> bool:
    q = _question(prompt)
    tokens = list(re.finditer(rf"(?<![A-Za-z])({_UNIT_RE})(?![A-Za-z])", q))
    assert len(tokens) == 2, (prompt, [t.group(1) for t in tokens])
    source = re.search(rf"(\d+) ({_UNIT_RE})(?![A-Za-z])", q)
    assert source is not None, prompt
    target = next(t for t in tokens if t.start() != source.start(2))
    src, dst = _UNIT_BY_TOKEN[source.group(2)], _UNIT_BY_TOKEN[target.group(1)]
    match = re.fullmatch(r"(\d+) (\S+)", completion)
    if match is None or match.group(2) != dst[1] or _UNITS[src][0] != _UNITS[dst][0]:
        return False
    return int(source.group(1)) * _UNITS[src][1] == int(match.group(1)) * _UNITS[dst][1]


def _check_date_arithmetic(prompt: str, completion: str) -> bool:
    q = _question(prompt)
    dates = [dt.date.fromisoformat(d) for d in re.findall(r"\d{4}-\d{2}-\d{2}", q)]
    if "between" in q:
        return completion == str((dates[1] - dates[0]).days)
    if "day of the week" in q:
        return completion == calendar.day_name[calendar.weekday(dates[0].year, dates[0].month, dates[0].day)]
    count, unit = re.search(r"(?<![\d-])(\d+) (days|weeks)\b", q).groups()
    delta = dt.timedelta(days=int(count) * (7 if unit == "weeks" else 1))
    expected = dates[0] - delta if "before" in q else dates[0] + delta
    return completion == expected.isoformat()


def _check_string_manipulation(prompt: str, completion: str) -> bool:
    q = _question(prompt)
    quoted = re.findall(r'"([^"]*)"', q)
    s = quoted[-1]
    if "how many times" in q.lower():
        return completion == str(sum(1 for ch in s if ch == quoted[0]))
    checks: dict[str, Callable[[], str]] = {
        "reverse": lambda: "".join(reversed(s)),
        "uppercase": lambda: "".join(chr(ord(ch) - 32) if "a" <= ch <= "z" else ch for ch in s),
        "alphabetically": lambda: "".join(sorted(s)),
        "how many characters": lambda: str(len(s)),
        "last character": lambda: s[len(s) - 1],
    }
    for keyword, expected in checks.items():
        if keyword in q.lower():
            return completion == expected()
    raise AssertionError(f"no string operation found in {prompt!r}")


_BIN_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_FUNCS = {"len": len, "sum": sum, "max": max, "min": min, "abs": abs, "sorted": sorted}


def _safe_eval(node: ast.AST) -> object:
    """A tiny whitelist evaluator for the expressions the corpus uses (never ``eval``)."""
    if isinstance(node, ast.Expression):
        return _safe_eval(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, str)):
        return node.value
    if isinstance(node, ast.List):
        return [_safe_eval(e) for e in node.elts]
    if isinstance(node, ast.BinOp) and type(node.op) in _BIN_OPS:
        return _BIN_OPS[type(node.op)](_safe_eval(node.left), _safe_eval(node.right))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS:
        return _FUNCS[node.func.id](*[_safe_eval(a) for a in node.args])
    if isinstance(node, ast.Subscript):
        target = _safe_eval(node.value)
        if isinstance(node.slice, ast.Slice):
            return target[_safe_eval(node.slice.lower) : None]
        return target[_safe_eval(node.slice)]
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], ast.In):
        return _safe_eval(node.left) in _safe_eval(node.comparators[0])
    raise AssertionError(f"unexpected syntax: {ast.dump(node)}")


def _check_python_eval(prompt: str, completion: str) -> bool:
    expr = re.search(r"`([^`]*)`", _question(prompt)).group(1)
    printed = re.fullmatch(r"print\((.*)\)", expr)
    expr = printed.group(1) if printed else expr
    return completion == str(_safe_eval(ast.parse(expr, mode="eval")))


def _check_json_extraction(prompt: str, completion: str) -> bool:
    q = _question(prompt)
    start, end = q.index("{"), q.rindex("}") + 1
    obj = json.loads(q[start:end])
    key = re.search(r'"(\w+)"', q[:start] + q[end:]).group(1)
    value = obj[key]
    return completion == (value if isinstance(value, str) else json.dumps(value))


CHECKERS: dict[str, Callable[[str, str], bool]] = {
    "arithmetic": _check_arithmetic,
    "unit_conversion": _check_unit_conversion,
    "date_arithmetic": _check_date_arithmetic,
    "string_manipulation": _check_string_manipulation,
    "python_eval": _check_python_eval,
    "json_extraction": _check_json_extraction,
}

# ------------------------------------------------------------------------------------------------ tests


@pytest.fixture(scope="module")
def corpus() -> list[dict[str, str]]:
    return generate_demo_corpus(rows_per_skill=200, seed=0)


def test_skills_cover_the_checkable_tasks() -> None:
    assert len(SKILLS) >= 6
    assert len(set(SKILLS)) == len(SKILLS)
    assert set(SKILLS) == set(CHECKERS)


def test_same_seed_gives_identical_rows() -> None:
    assert generate_demo_corpus(rows_per_skill=40, seed=3) == generate_demo_corpus(rows_per_skill=40, seed=3)


def test_different_seeds_give_different_rows() -> None:
    a = generate_demo_corpus(rows_per_skill=40, seed=0)
    b = generate_demo_corpus(rows_per_skill=40, seed=1)
    pairs_a = {(r["prompt"], r["completion"]) for r in a}
    pairs_b = {(r["prompt"], r["completion"]) for r in b}
    assert len(pairs_a & pairs_b) < len(pairs_a) // 2


@pytest.mark.parametrize("rows_per_skill", [1, 7, 200])
def test_row_count_and_per_skill_counts(rows_per_skill: int) -> None:
    rows = generate_demo_corpus(rows_per_skill=rows_per_skill, seed=0)
    assert len(rows) == rows_per_skill * len(SKILLS)
    assert collections.Counter(r["domain"] for r in rows) == {s: rows_per_skill for s in SKILLS}


def test_rows_are_shuffled(corpus: list[dict[str, str]]) -> None:
    first = [r["domain"] for r in corpus[: 2 * len(SKILLS)]]
    assert len(set(first)) > 1


def test_no_duplicate_pairs(corpus: list[dict[str, str]]) -> None:
    pairs = [(r["prompt"], r["completion"]) for r in corpus]
    assert len(pairs) == len(set(pairs))


def test_collisions_are_redrawn_not_repeated(monkeypatch: pytest.MonkeyPatch) -> None:
    """A skill with only ten possible rows still yields ten distinct ones, and refuses an eleventh."""
    import mole.data.demo as demo

    monkeypatch.setitem(demo._MAKERS, SKILLS[0], lambda rng: (f"q{rng.randint(0, 9)}", "a"))
    rows = [r for r in generate_demo_corpus(rows_per_skill=10, seed=0) if r["domain"] == SKILLS[0]]
    assert sorted(r["prompt"] for r in rows) == sorted(f"q{i}{ANSWER_SUFFIX}" for i in range(10))
    with pytest.raises(RuntimeError, match=SKILLS[0]):
        generate_demo_corpus(rows_per_skill=11, seed=0)


def test_rows_are_well_formed(corpus: list[dict[str, str]]) -> None:
    for row in corpus:
        assert set(row) == {"prompt", "completion", "domain"}
        assert all(isinstance(v, str) for v in row.values())
        assert row["prompt"].endswith(ANSWER_SUFFIX) and len(row["prompt"]) > len(ANSWER_SUFFIX) + 10
        assert row["completion"] and row["completion"] == row["completion"].strip()
        assert len(row["completion"]) <= 20, row  # short answers: exact match is meaningful
        assert "\n" not in row["completion"]


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_bad_rows_per_skill_raises(bad: object) -> None:
    with pytest.raises(ValueError, match=rf"rows_per_skill.*{re.escape(repr(bad))}"):
        generate_demo_corpus(rows_per_skill=bad, seed=0)  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", [0, 1])
def test_every_answer_is_correct(seed: int) -> None:
    rows = generate_demo_corpus(rows_per_skill=200, seed=seed)
    wrong = [r for r in rows if not CHECKERS[r["domain"]](r["prompt"], r["completion"])]
    assert not wrong, wrong[:5]


def test_checkers_reject_wrong_answers(corpus: list[dict[str, str]]) -> None:
    """The answer checks can fail: a perturbed completion must be rejected for every skill."""
    for skill in SKILLS:
        rows = [r for r in corpus if r["domain"] == skill][:50]
        for row in rows:
            others = {r["completion"] for r in rows} - {row["completion"]}
            wrong = sorted(others)[0]
            assert not CHECKERS[skill](row["prompt"], wrong), (row, wrong)
            assert not CHECKERS[skill](row["prompt"], row["completion"] + "0"), row


def _shape(prompt: str) -> str:
    """The template behind a prompt: objects, code, quoted text, numbers and units blanked out."""
    shape = re.sub(r"\{.*\}", "{}", prompt)
    shape = re.sub(r"`[^`]*`", "``", shape)
    shape = re.sub(r'"[^"]*"', '""', shape)
    shape = re.sub(rf"(?<![A-Za-z])({_UNIT_RE})(?![A-Za-z])", "U", shape)
    shape = re.sub(r"\b(plus|minus|times|sum|difference|product|Add|Subtract|Multiply)\b", "OP", shape)
    return re.sub(r"[\d\-+×]+", "N", shape)


def test_each_skill_has_several_phrasings(corpus: list[dict[str, str]]) -> None:
    shapes: dict[str, set[str]] = collections.defaultdict(set)
    for row in corpus:
        shapes[row["domain"]].add(_shape(row["prompt"]))
    for skill in SKILLS:
        assert len(shapes[skill]) >= 4, (skill, shapes[skill])
