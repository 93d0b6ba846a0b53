"""Seeded generator of the embedded demo corpus: short prompt/completion rows over checkable skills.

Every row is ``{"prompt": str, "completion": str, "domain": skill}``. The answers are computed while the
question is built (never by evaluating text), so every completion is exactly right and exact-match
evaluation is meaningful. Uses only the standard library: no external text, no network.

Prompt convention: a prompt is one question or instruction, may span several lines, and always ends with
``ANSWER_SUFFIX`` (``"\\nAnswer:"``). A completion is the bare answer with no leading space and no
trailing newline (``"82"``, ``"5000 m"``, ``"2024-03-17"``); a consumer that trains or decodes on the pair
joins them as ``prompt + " " + completion``.

Skills (the ``domain`` label) and what their templates ask:

- ``arithmetic``: sum, difference or product of two integers, in words or symbols.
- ``unit_conversion``: metric length, mass and volume conversions with exact integer results (no time
  units: they embed close to the date skill).
- ``date_arithmetic``: dates N days/weeks after or before an ISO date, days between two dates, weekdays.
- ``string_manipulation``: reverse, uppercase, sort letters, count a letter, length, last letter.
- ``python_eval``: the value of a small Python expression (lists, builtins, ``//``, ``%``, ``**``, ``in``).
- ``json_extraction``: the value of one field of a small flat JSON object.

Templates of one skill share that skill's vocabulary so that sentence embeddings cluster by skill: with
all-MiniLM-L6-v2 and k-means, silhouette over k in 2..10 picks k = len(SKILLS) and the clusters match the
skills (ARI 1.0 at 20-200 rows per skill, seeds 0-5). Words that several skills share (time units, "add")
or a label phrase used by only some of a skill's templates split or merge clusters: re-check after edits.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
from collections.abc import Callable

logger = logging.getLogger(__name__)

ANSWER_SUFFIX = "\nAnswer:"
_MAX_ATTEMPTS_PER_ROW = 200

# ---------------------------------------------------------------------------------------------- arithmetic
# (template, kind): "verb" templates phrase the operation as an imperative ("Subtract b from a").
_ARITH_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("Arithmetic question: what is {a} {word} {b}?", "ab"),
    ("Calculate the arithmetic result of {a} {sym} {b}.", "ab"),
    ("Using integer arithmetic, compute the {noun} of {a} and {b}.", "ab"),
    ("Solve the arithmetic problem: {a} {sym} {b} = ?", "ab"),
    ("Do the arithmetic: {verb}. What number results?", "verb"),
)
_ARITH_OPS = {
    "+": {"word": "plus", "sym": "+", "noun": "sum"},
    "-": {"word": "minus", "sym": "-", "noun": "difference"},
    "*": {"word": "times", "sym": "×", "noun": "product"},
}


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    op = rng.choice(tuple(_ARITH_OPS))
    high = 99 if op == "*" else 999  # keep products about as long as sums
    a, b = rng.randint(2, high), rng.randint(2, high)
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    template, kind = rng.choice(_ARITH_TEMPLATES)
    if kind == "verb":
        verb = {"+": f"Add {a} and {b}", "-": f"Subtract {b} from {a}", "*": f"Multiply {a} by {b}"}[op]
        return template.format(verb=verb), str(value)
    return template.format(a=a, b=b, **_ARITH_OPS[op]), str(value)


# ----------------------------------------------------------------------------------------- unit conversion
# (big unit, small unit, how many small units make one big unit); a unit is (plural name, symbol).
_UNIT_PAIRS: tuple[tuple[tuple[str, str], tuple[str, str], int], ...] = (
    (("kilometers", "km"), ("meters", "m"), 1000),
    (("meters", "m"), ("centimeters", "cm"), 100),
    (("meters", "m"), ("millimeters", "mm"), 1000),
    (("centimeters", "cm"), ("millimeters", "mm"), 10),
    (("tonnes", "t"), ("kilograms", "kg"), 1000),
    (("kilograms", "kg"), ("grams", "g"), 1000),
    (("grams", "g"), ("milligrams", "mg"), 1000),
    (("liters", "L"), ("milliliters", "mL"), 1000),
    (("liters", "L"), ("centiliters", "cL"), 100),
)
_UNIT_TEMPLATES = (
    "Unit conversion: convert {v} {src_name} to {dst_name}.",
    "Metric unit conversion: how many {dst_name} are in {v} {src_name}?",
    "Convert units: express {v} {src_sym} in {dst_name}.",
    "Unit conversion: {v} {src_sym} equals how many {dst_sym}?",
    "Convert the measurement {v} {src_name} into {dst_name} (metric unit conversion).",
)


def _unit_conversion(rng: random.Random) -> tuple[str, str]:
    big, small, factor = rng.choice(_UNIT_PAIRS)
    count = rng.randint(2, 250)
    if rng.random() < 0.5:  # big -> small: multiply
        src, dst, v, value = big, small, count, count * factor
    else:  # small -> big: pick a multiple so the answer stays an integer
        src, dst, v, value = small, big, count * factor, count
    names = {"src_name": src[0], "src_sym": src[1], "dst_name": dst[0], "dst_sym": dst[1]}
    return rng.choice(_UNIT_TEMPLATES).format(v=v, **names), f"{value} {dst[1]}"


# ---------------------------------------------------------------------------------------- date arithmetic
_DATE_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("What calendar date is {n} days after {d}?", "after"),
    ("What was the calendar date {n} days before {d}?", "before"),
    ("If today's date is {d}, what will the date be in {n} days?", "after"),
    ("Which calendar date falls {w} weeks after the date {d}?", "weeks"),
    ("How many days are there between the dates {d} and {d2}?", "between"),
    ("On which day of the week does the calendar date {d} fall?", "weekday"),
)


def _random_date(rng: random.Random) -> dt.date:
    return dt.date(2000, 1, 1) + dt.timedelta(days=rng.randint(0, 365 * 30))


def _date_arithmetic(rng: random.Random) -> tuple[str, str]:
    template, kind = rng.choice(_DATE_TEMPLATES)
    d, n, w = _random_date(rng), rng.randint(2, 400), rng.randint(2, 30)
    d2 = d + dt.timedelta(days=n)
    answer = {
        "after": d2.isoformat(),
        "before": (d - dt.timedelta(days=n)).isoformat(),
        "weeks": (d + dt.timedelta(weeks=w)).isoformat(),
        "between": str(n),
        "weekday": d.strftime("%A"),
    }[kind]
    return template.format(d=d.isoformat(), d2=d2.isoformat(), n=n, w=w), answer


# ------------------------------------------------------------------------------------ string manipulation
_STRING_TEMPLATES: tuple[tuple[str, str], ...] = (
    ('Reverse the characters of the string "{s}".', "reverse"),
    ('Write the characters of the string "{s}" in reverse order.', "reverse"),
    ('Convert every character of the string "{s}" to uppercase.', "upper"),
    ('Sort the characters of the string "{s}" alphabetically.', "sort"),
    ('How many times does the character "{c}" occur in the string "{s}"?', "count"),
    ('How many characters does the string "{s}" contain?', "length"),
    ('What is the last character of the string "{s}"?', "last"),
)
# Strings draw from a small alphabet: random strings over all 26 letters scatter into unrelated word
# pieces, which spreads this skill's embeddings and made k-means split it (measured with MiniLM).
_WORD_LETTERS = "abcdefgh"
_ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def _random_word(rng: random.Random) -> str:
    """A random lowercase string of 5-8 letters (no external word list needed)."""
    return "".join(rng.choice(_WORD_LETTERS) for _ in range(rng.randint(5, 8)))


def _string_manipulation(rng: random.Random) -> tuple[str, str]:
    template, kind = rng.choice(_STRING_TEMPLATES)
    s = _random_word(rng)
    c = rng.choice(s) if rng.random() < 0.85 else rng.choice(_ALPHABET)
    answer = {
        "reverse": s[::-1],
        "upper": s.upper(),
        "sort": "".join(sorted(s)),
        "count": str(s.count(c)),
        "length": str(len(s)),
        "last": s[-1],
    }[kind]
    return template.format(s=s, c=c), answer


# ------------------------------------------------------------------------------------ python expressions
_PY_TEMPLATES = (
    "What does the Python expression `{e}` evaluate to?",
    "In Python, what is the value of the expression `{e}`?",
    "What does the Python statement `print({e})` output?",
    "Evaluate the following Python expression and give the result: `{e}`",
    "What would the Python interpreter show for the expression `{e}`?",
)


def _py_list(rng: random.Random) -> list[int]:
    return [rng.randint(0, 20) for _ in range(rng.randint(3, 6))]


def _python_expression(rng: random.Random) -> tuple[str, object]:
    """Builds a small expression and its value together, so nothing is ever evaluated from text."""
    xs, a, b, c = _py_list(rng), rng.randint(10, 99), rng.randint(2, 9), rng.randint(1, 20)
    i = rng.randrange(len(xs))
    word, exponent = _random_word(rng), rng.randint(2, 3)
    choices: list[tuple[str, object]] = [
        (f"len({xs})", len(xs)),
        (f"sum({xs})", sum(xs)),
        (f"max({xs}) - min({xs})", max(xs) - min(xs)),
        (f"sorted({xs})[{i}]", sorted(xs)[i]),
        (f"{a} // {b}", a // b),
        (f"{a} % {b}", a % b),
        (f"{b} ** {exponent}", b**exponent),
        (f"abs({c} - {a})", abs(c - a)),
        (f"{c} in {xs}", c in xs),
        (f'len("{word}")', len(word)),
        (f"{xs}[{i}] * {b}", xs[i] * b),
        (f"len({xs}[{i}:])", len(xs[i:])),
    ]
    return rng.choice(choices)


def _python_eval(rng: random.Random) -> tuple[str, str]:
    expr, value = _python_expression(rng)
    return rng.choice(_PY_TEMPLATES).format(e=expr), str(value)


# --------------------------------------------------------------------------------------- json extraction
_NAMES = ("Alice", "Bruno", "Chen", "Dara", "Elif", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Liam")
_CITIES = ("Oslo", "Lima", "Kyoto", "Cairo", "Porto", "Quito", "Seoul", "Turin", "Accra", "Perth", "Riga")
_JSON_FIELDS: dict[str, Callable[[random.Random], object]] = {
    "name": lambda r: r.choice(_NAMES),
    "city": lambda r: r.choice(_CITIES),
    "age": lambda r: r.randint(18, 90),
    "id": lambda r: r.randint(1000, 9999),
    "price": lambda r: round(r.randint(100, 99999) / 100, 2),
    "status": lambda r: r.choice(("active", "pending", "closed", "archived")),
    "color": lambda r: r.choice(("red", "green", "blue", "black", "white", "orange")),
    "active": lambda r: r.random() < 0.5,
    "count": lambda r: r.randint(0, 500),
    "code": lambda r: "".join(r.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(5)),
}
_JSON_TEMPLATES = (
    'Given the JSON object {obj}, what is the value of the "{key}" field?',
    'Extract the value of "{key}" from the following JSON: {obj}',
    'JSON input: {obj}\nWhich value does the JSON key "{key}" hold?',
    'Parse this JSON record and return its "{key}" field: {obj}',
    'From the JSON data {obj}, read the "{key}" property.',
)


def _json_extraction(rng: random.Random) -> tuple[str, str]:
    keys = rng.sample(sorted(_JSON_FIELDS), rng.randint(3, 5))
    obj = {key: _JSON_FIELDS[key](rng) for key in keys}
    key = rng.choice(keys)
    value = obj[key]
    answer = value if isinstance(value, str) else json.dumps(value)  # JSON spelling: true, 12.5
    return rng.choice(_JSON_TEMPLATES).format(obj=json.dumps(obj), key=key), answer


# ----------------------------------------------------------------------------------------------- corpus
_MAKERS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "arithmetic": _arithmetic,
    "unit_conversion": _unit_conversion,
    "date_arithmetic": _date_arithmetic,
    "string_manipulation": _string_manipulation,
    "python_eval": _python_eval,
    "json_extraction": _json_extraction,
}
SKILLS: tuple[str, ...] = tuple(_MAKERS)


def generate_demo_corpus(*, rows_per_skill: int = 200, seed: int = 0) -> list[dict[str, str]]:
    """Generates the demo prompt/completion corpus, deterministically from a seed.

    Args:
        rows_per_skill: Number of rows for each skill in ``SKILLS``; must be at least 1.
        seed: Seed of the generator. The same seed gives an identical list; another seed other rows.

    Returns:
        ``rows_per_skill * len(SKILLS)`` rows ``{"prompt", "completion", "domain"}``, shuffled, with no
        two rows sharing the same (prompt, completion) pair. Prompts end with ``ANSWER_SUFFIX``.

    Raises:
        ValueError: If ``rows_per_skill`` is smaller than 1.
        RuntimeError: If a skill cannot produce enough distinct rows (only for absurdly large requests).
    """
    if isinstance(rows_per_skill, bool) or not isinstance(rows_per_skill, int) or rows_per_skill < 1:
        raise ValueError(f"rows_per_skill must be an integer >= 1, got {rows_per_skill!r}")
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for skill, make in _MAKERS.items():
        made, attempts = 0, 0
        while made < rows_per_skill:
            attempts += 1
            if attempts > _MAX_ATTEMPTS_PER_ROW * rows_per_skill:
                raise RuntimeError(f"skill {skill!r} could not produce {rows_per_skill} distinct rows")
            question, answer = make(rng)
            pair = (question + ANSWER_SUFFIX, answer)
            if pair in seen:  # a collision: draw again rather than repeat a row
                continue
            seen.add(pair)
            rows.append({"prompt": pair[0], "completion": pair[1], "domain": skill})
            made += 1
    rng.shuffle(rows)
    logger.debug("generated %d demo rows over %d skills (seed=%d)", len(rows), len(SKILLS), seed)
    return rows
