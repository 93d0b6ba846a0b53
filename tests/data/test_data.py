from __future__ import annotations

import json
from pathlib import Path

import pytest

from mole import stages
from mole.config import load_config
from mole.data.prepare import clean_records, split_rows
from mole.data.readers import DataError, read_source

PC_ROWS = [
    {"prompt": f"Add {i} and {i + 1}.", "completion": str(2 * i + 1), "domain": "math" if i % 2 else "ops"}
    for i in range(40)
]


def _cfg(source: Path | str, *extra: str):
    return load_config(
        None, preset="tiny", overrides=[f"data.source={source}", "cluster.k=2", "cluster.min_cluster_size=4", *extra]
    )


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_every_file_format_reads_the_same_rows(tmp_path: Path, fmt: str) -> None:
    import pandas as pd

    path = tmp_path / f"d.{fmt}"
    df = pd.DataFrame(PC_ROWS)
    {
        "jsonl": lambda: _write_jsonl(path, PC_ROWS),
        "json": lambda: path.write_text(json.dumps({"data": PC_ROWS})),
        "csv": lambda: df.to_csv(path, index=False),
        "parquet": lambda: df.to_parquet(path),
    }[fmt]()
    rows, stats, mode = clean_records(read_source(str(path)))
    assert mode == "prompt_completion" and stats.kept == 40
    assert rows[3]["prompt"] == "Add 3 and 4." and rows[3]["completion"] == "7" and rows[3]["domain"] == "math"


def test_txt_directory_with_domain_subdirectories(tmp_path: Path) -> None:
    for dom in ("law", "med"):
        (tmp_path / dom).mkdir()
        for i in range(3):
            (tmp_path / dom / f"{i}.txt").write_text(f"{dom} document number {i}\n", encoding="utf-8")
    rows, stats, mode = clean_records(read_source(str(tmp_path)))
    assert mode == "text" and stats.kept == 6
    assert sorted({r["domain"] for r in rows}) == ["law", "med"]


def test_hugging_face_dataset_path_goes_through_datasets(tmp_path: Path) -> None:
    import pandas as pd

    ds_dir = tmp_path / "hfds"
    ds_dir.mkdir()
    pd.DataFrame(PC_ROWS).to_parquet(ds_dir / "train.parquet")
    rows, stats, _ = clean_records(read_source(str(ds_dir / "train.parquet")))
    from mole.data import readers

    hf_rows = list(readers._read_hf(str(ds_dir), "train"))  # a local dataset repo, loaded by `datasets`
    assert len(hf_rows) == 40 and hf_rows[0][1]["prompt"] == rows[0]["prompt"]


def test_unknown_hub_id_fails_clearly_offline() -> None:
    with pytest.raises(DataError, match=r"data.source 'nobody/no-such-dataset'.*Hugging Face dataset"):
        list(read_source("nobody/no-such-dataset"))


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": "broken"\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON"):
        list(read_source(str(path)))
    whole = tmp_path / "bad.json"
    whole.write_text('[\n {"text": "a"},\n {"text": }\n]')
    with pytest.raises(DataError, match=r"bad\.json:3: malformed JSON"):
        list(read_source(str(whole)))


def test_missing_field_names_field_and_columns(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c"}, {"prompt": "q", "domain": "x"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing field 'completion' \(columns found: prompt, domain\)"):
        clean_records(read_source(str(path)))
    path = _write_jsonl(tmp_path / "e.jsonl", [{"body": "x", "label": 1}])
    with pytest.raises(DataError, match=r"e\.jsonl:1: missing field 'text'.*columns found: body, label"):
        clean_records(read_source(str(path)))


def test_non_utf8_names_file_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin\.jsonl: not valid UTF-8 at byte offset 28 \(line 2\)"):
        list(read_source(str(path)))


def test_wrong_type_and_bad_csv_row(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}, {"text": ["a", "list"]}])
    with pytest.raises(DataError, match=r"t\.jsonl:2: field 'text' must be a string, got list"):
        clean_records(read_source(str(path)))
    csv_path = tmp_path / "c.csv"
    csv_path.write_text('text\nfine\n"two","cells"\n')
    with pytest.raises(DataError, match=r"c\.csv:3: more cells than the header"):
        list(read_source(str(csv_path)))


def test_missing_path_and_unsupported_suffix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"'./nowhere.jsonl': no such file"):
        list(read_source("./nowhere.jsonl"))
    (tmp_path / "x.xlsx").write_text("?")
    with pytest.raises(DataError, match=r"x\.xlsx: unsupported file type '\.xlsx'"):
        list(read_source(str(tmp_path / "x.xlsx")))


def test_empty_and_duplicate_rows_are_dropped_and_counted(tmp_path: Path) -> None:
    rows = [{"text": "alpha"}, {"text": "   "}, {"text": ""}, {"text": "alpha"}, {"text": None}, {"text": "beta"}]
    kept, stats, _ = clean_records(read_source(str(_write_jsonl(tmp_path / "d.jsonl", rows))))
    assert [r["text"] for r in kept] == ["alpha", "beta"]
    assert (stats.read, stats.dropped_empty, stats.dropped_missing, stats.dropped_duplicate) == (6, 2, 1, 1)
    assert stats.examples["missing"] == [f"{tmp_path / 'd.jsonl'}:5"]


def test_line_separator_characters_inside_a_jsonl_string_are_text_not_line_ends(tmp_path: Path) -> None:
    texts = ["a\u2028b", "c\u2029d", "e\u0085f", "g\x1ch", "plain"]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    records = list(read_source(str(path)))
    assert [r["text"] for _, r in records] == texts
    assert [o for o, _ in records] == [f"{path}:{i}" for i in range(1, 6)]
    path.write_text(path.read_text(encoding="utf-8") + "{bad\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl:6: malformed JSON"):
        list(read_source(str(path)))


def test_a_utf8_bom_is_not_part_of_the_first_column(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes("\ufefftext,domain\nhello,a\n".encode())
    assert [r for _, r in read_source(str(path))] == [{"text": "hello", "domain": "a"}]
    jl = tmp_path / "d.jsonl"
    jl.write_bytes("\ufeff".encode() + b'{"text": "hi"}\n')
    assert [r for _, r in read_source(str(jl))] == [{"text": "hi"}]


def test_missing_values_are_counted_and_located_not_read_as_text(tmp_path: Path) -> None:
    import pandas as pd

    pq = tmp_path / "d.parquet"
    pd.DataFrame({"prompt": ["a", None, "c"], "completion": ["x", "y", float("nan")]}).to_parquet(pq)
    kept, stats, _ = clean_records(read_source(str(pq)))
    assert [r["prompt"] for r in kept] == ["a"] and stats.dropped_missing == 2
    assert stats.examples["missing"] == [f"{pq}[row 1]", f"{pq}[row 2]"]
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("prompt,completion\na,x\nb\nc,z\n", encoding="utf-8")  # line 3 is short of a cell
    kept, stats, _ = clean_records(read_source(str(csv_path)))
    assert [r["prompt"] for r in kept] == ["a", "c"]
    assert (stats.dropped_missing, stats.examples["missing"]) == (1, [f"{csv_path}:3"])


@pytest.mark.parametrize(
    ("content", "expect"),
    [("", r"holds no rows"), ("\n  \n", r"holds no rows"),
     ('{"text": " "}\n{"text": ""}\n', r"no usable row .*2 read, 2 dropped as empty \(e\.g\. .*d\.jsonl:1"),
     ('{"text": "a"}\n{"text": "a"}\n{"text": "a"}\n', r"too few rows .*3 read, 2 dropped as duplicate")],
)  # fmt: skip
def test_sources_with_nothing_usable_name_the_file_and_the_drops(workspace: Path, content: str, expect: str) -> None:
    src = workspace / "d.jsonl"
    src.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=expect) as info:
        stages.prepare(_cfg(src))
    assert str(src) in str(info.value)


def test_split_is_seeded_stratified_and_disjoint() -> None:
    rows, _, _ = clean_records((f"r{i}", r) for i, r in enumerate(PC_ROWS))
    a_train, a_eval = split_rows(rows, eval_fraction=0.25, seed=1)
    b_train, b_eval = split_rows(rows, eval_fraction=0.25, seed=1)
    _, c_eval = split_rows(rows, eval_fraction=0.25, seed=2)
    assert [r["id"] for r in a_eval] == [r["id"] for r in b_eval]
    assert {r["id"] for r in a_eval} != {r["id"] for r in c_eval}
    assert not {r["id"] for r in a_train} & {r["id"] for r in a_eval}
    assert sorted(r["domain"] for r in a_eval) == ["math"] * 5 + ["ops"] * 5


def test_prepare_writes_outputs_and_stats(workspace: Path) -> None:
    src = _write_jsonl(workspace / "d.jsonl", PC_ROWS + [PC_ROWS[0], {"prompt": " ", "completion": "x"}])
    res = stages.prepare(_cfg(src))
    out = workspace / "data" / "prepared"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["dropped_duplicate"] == 1 and stats["dropped_empty"] == 1
    assert res["train_rows"] + res["eval_rows"] == 40
    assert len((out / "train.jsonl").read_text().splitlines()) == res["train_rows"]
    assert not list(out.parent.glob(".mole-tmp-*"))


def test_eval_source_rows_are_removed_from_train(workspace: Path) -> None:
    src = _write_jsonl(workspace / "d.jsonl", PC_ROWS)
    ev = _write_jsonl(workspace / "e.jsonl", PC_ROWS[:5])
    res = stages.prepare(_cfg(src, f"data.eval_source={ev}"))
    assert (res["train_rows"], res["eval_rows"], res["dropped_overlap_with_eval"]) == (35, 5, 5)


def test_too_few_rows_for_clusters_fails_before_training(workspace: Path) -> None:
    src = _write_jsonl(workspace / "d.jsonl", PC_ROWS[:20])
    with pytest.raises(DataError, match=r"too few rows.*cluster\.k=4 × cluster\.min_cluster_size=8 needs at least 32"):
        stages.prepare(_cfg(src, "cluster.k=4", "cluster.min_cluster_size=8"))


def test_failed_prepare_leaves_previous_outputs_intact(workspace: Path) -> None:
    stages.prepare(_cfg(_write_jsonl(workspace / "d.jsonl", PC_ROWS)))
    out = workspace / "data" / "prepared"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = workspace / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        stages.prepare(_cfg(bad))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not list(out.parent.glob(".mole-tmp-*"))


def test_the_prompt_template_is_the_ending_every_prompt_shares() -> None:
    from mole.data.prepare import prompt_suffix

    rows = [{"prompt": f"What is {i} + 1?\nAnswer:", "completion": str(i + 1)} for i in range(5)]
    rows.append({"prompt": "Spell cat.\nAnswer:", "completion": "c a t"})
    assert prompt_suffix(rows) == "\nAnswer:"
    assert prompt_suffix([{"prompt": "alpha beta"}, {"prompt": "gamma delta"}]) is None  # 'ta' is inside words
    assert prompt_suffix([{"prompt": "x Q: a"}, {"prompt": "y Q: b"}]) is None
    assert prompt_suffix([{"prompt": "one ### Response:"}, {"prompt": "two ### Response:"}]) == " ### Response:"
