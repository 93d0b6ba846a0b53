from __future__ import annotations

from pathlib import Path

import pytest

from mole.config import BuildConfig, ConfigError, load_config, parse_override

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_yaml_is_valid_and_matches_defaults() -> None:
    cfg = load_config(REPO / "params.yaml")
    assert cfg == BuildConfig()


def test_presets_apply_over_the_file() -> None:
    tiny = load_config(REPO / "params.yaml", preset="tiny")
    demo = load_config(REPO / "params.yaml", preset="demo")
    assert tiny.base_model.name == "tiny"
    assert tiny.data.demo_rows_per_skill < demo.data.demo_rows_per_skill
    assert demo.base_model.name == "smollm2-135m-instruct"


def test_overrides_are_parsed_as_yaml_and_applied_last() -> None:
    cfg = load_config(
        None,
        preset="tiny",
        overrides=[
            "cluster.k=3",
            "cluster.balanced=true",
            "data.max_rows=null",
            "base_model.name=./my model",
            "seed=7",
        ],
    )
    assert cfg.cluster.k == 3 and cfg.cluster.balanced is True and cfg.data.max_rows is None
    assert cfg.base_model.name == "./my model" and cfg.seed == 7


def test_unknown_key_names_dotted_path_and_known_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, overrides=["cluster.kk=3"])
    msg = str(exc.value)
    assert "cluster.kk: unknown key" in msg and "min_cluster_size" in msg
    bad = tmp_path / "params.yaml"
    bad.write_text("data:\n  sauce: x.jsonl\n")
    with pytest.raises(ConfigError, match=r"data\.sauce: unknown key.*expected one of: source"):
        load_config(bad)


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("cluster.k=0", r"cluster\.k: value 0 is invalid: .*greater than or equal to 1"),
        ("data.eval_fraction=1.5", r"data\.eval_fraction: value 1\.5 is invalid"),
        ("cluster.embedder=bert", r"cluster\.embedder: value 'bert' is invalid: .*minilm"),
        ("base_model.device=gpu", r"base_model\.device: value 'gpu' is invalid"),
        ("cluster.k_min=6", r"cluster: .*k_min \(6\) must be <= k_max \(5\)"),
        ("seed=abc", r"seed: value 'abc' is invalid"),
        ("flow.cpus_per_expert=0", r"flow\.cpus_per_expert: value 0 is invalid: .*greater than 0"),
    ],
)
def test_bad_values_name_key_value_and_expectation(override: str, pattern: str) -> None:
    overrides = [override] + (["cluster.k_max=5"] if "k_min" in override else [])
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides=overrides)


def test_bad_yaml_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_text("seed: 1\ndata:\n  source: [unclosed\n")
    with pytest.raises(ConfigError, match=r"p\.yaml:\d+: invalid YAML"):
        load_config(bad)


def test_missing_explicit_file_unknown_preset_and_bad_override() -> None:
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_config("nope.yaml")
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        load_config(None, preset="huge")
    with pytest.raises(ConfigError, match="expected KEY.SUB=VALUE"):
        parse_override("cluster.k")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(None, preset="tiny", overrides=["base_model.name.x=1"])


def test_section_hash_tracks_only_its_sections() -> None:
    a = load_config(None, preset="tiny")
    b = load_config(None, preset="tiny", overrides=["cluster.k=3"])
    assert a.section_hash("data") == b.section_hash("data")
    assert a.section_hash("cluster") != b.section_hash("cluster")
    assert a.section_hash() != b.section_hash()


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("seed: 0\nrouter:\n  top_k: 2\n  steps: 3\n  top_k: 1\n")
    with pytest.raises(ConfigError, match=r"params\.yaml:5: key 'top_k' appears twice \(first at line 3\)"):
        load_config(path)
    path.write_text("seed: 0\nseed: 1\n")
    with pytest.raises(ConfigError, match=r"params\.yaml:2: key 'seed' appears twice"):
        load_config(path)


def test_a_cross_field_error_prints_its_reason_not_the_whole_config() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, preset="tiny", overrides=["cluster.k=2", "router.top_k=3"])
    message = str(info.value)
    assert "router.top_k (3) must be <= cluster.k (2)" in message
    assert len(message) < 300 and "'base_model'" not in message
