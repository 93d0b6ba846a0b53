"""Build configuration: pydantic models, one section per stage, loaded from params.yaml and presets.

Precedence, lowest first: the models' defaults < ``params.yaml`` < ``--preset NAME`` < ``--set a.b=value``.
Every error names the dotted key path, the value given and what was expected, and is raised before any work.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError, model_validator

from mole.sections import (
    BaseModelConfig,
    BuildSection,
    ClusterConfig,
    DataConfig,
    DvcConfig,
    EvaluateConfig,
    ExpertsConfig,
    FlowConfig,
    MergeConfig,
    RouterConfig,
    Section,
    TrackingConfig,
)

PRESETS: tuple[str, ...] = ("tiny", "demo")


class ConfigError(ValueError):
    """A configuration file, preset or override is invalid; the message names the key and value."""


class BuildConfig(Section):
    """The whole build: the Prefect flow's parameter and the content of params.yaml."""

    seed: int = 0
    workspace: str = "."
    base_model: BaseModelConfig = BaseModelConfig()
    data: DataConfig = DataConfig()
    cluster: ClusterConfig = ClusterConfig()
    experts: ExpertsConfig = ExpertsConfig()
    router: RouterConfig = RouterConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    merge: MergeConfig = MergeConfig()
    flow: FlowConfig = FlowConfig()
    tracking: TrackingConfig = TrackingConfig()
    dvc: DvcConfig = DvcConfig()
    build: BuildSection = BuildSection()

    @model_validator(mode="after")
    def _check_top_k(self) -> BuildConfig:
        if self.cluster.k is not None and self.router.top_k > self.cluster.k:
            raise ValueError(f"router.top_k ({self.router.top_k}) must be <= cluster.k ({self.cluster.k})")
        return self

    def path(self, relative: str) -> Path:
        """Resolve a workspace-relative path from the config."""
        return Path(self.workspace) / relative

    def section_hash(self, *names: str) -> str:
        """Stable short hash of some sections or dotted keys (all when none given), for cache keys and lineage."""
        dumped = self.model_dump(mode="json")
        picked = {n: functools.reduce(lambda node, part: node[part], n.split("."), dumped) for n in names} or dumped
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{self.name}:{line}: key {key!r} appears twice (first at line {seen[key]})")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    try:
        loader = _UniqueKeyLoader(path.read_text(encoding="utf-8"))
        loader.name = str(path)
        try:
            loaded = loader.get_single_data()
        finally:
            loader.dispose()
    except ConfigError as exc:
        raise ConfigError(f"{what} {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{what} {where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{what} {path}: expected a mapping of sections, got {type(loaded).__name__}")
    return loaded


def preset_overrides(name: str) -> dict[str, Any]:
    """The raw overrides of a named preset shipped in ``mole/presets/``."""
    if name not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    ref = resources.files("mole.presets").joinpath(f"{name}.yaml")
    with resources.as_file(ref) as path:
        return _read_yaml(path, f"preset {name!r}")


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into its key path and YAML-parsed value."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(f"--set {item!r}: expected KEY.SUB=VALUE, e.g. cluster.k=4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _apply_override(raw: dict[str, Any], keys: list[str], value: Any, item: str) -> None:
    node = raw
    for i, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {'.'.join(keys[: i + 1])} is a value, not a section")
        node = child
    node[keys[-1]] = value


def _format_errors(exc: ValidationError, raw: dict[str, Any], origin: str) -> str:
    lines = []
    for err in exc.errors():
        dotted = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            lines.append(f"{dotted}: unknown key (value {err['input']!r}); {_known_keys(err['loc'])}")
        elif not err["loc"] or isinstance(err.get("input"), dict):  # a cross-field rule: its reason, not the input
            lines.append(f"{dotted}: {err['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"{dotted}: value {err.get('input')!r} is invalid: {err['msg']}")
    return f"invalid configuration ({origin}):\n  " + "\n  ".join(lines)


def _known_keys(loc: tuple[Any, ...]) -> str:
    model: type[BaseModel] = BuildConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return "no such key"
        model = ann
    return "expected one of: " + ", ".join(model.model_fields)


def load_config(
    path: str | Path | None = "params.yaml",
    *,
    preset: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> BuildConfig:
    """Load the build configuration.

    Args:
        path: params.yaml to read; a missing default file is allowed (defaults apply), a missing explicit one is not.
        preset: name of a preset in ``mole/presets`` applied over the file.
        overrides: ``a.b=value`` strings applied last (values parsed as YAML).

    Returns:
        The validated BuildConfig.

    Raises:
        ConfigError: naming the file, dotted key, value and what was expected.
    """
    layers = _layers(path, preset, overrides)
    raw, origin = layers[-1][1], [name for name, _, _ in layers[1:]]
    try:
        return BuildConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, raw, ", ".join(origin) or "defaults")) from None


def _layers(
    path: str | Path | None, preset: str | None, overrides: list[str] | tuple[str, ...]
) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """Each source in precedence order as (name, the raw config after it, what it set), from ("default", {}, {})."""
    raw: dict[str, Any] = {}
    layers: list[tuple[str, dict[str, Any], dict[str, Any]]] = [("default", raw, {})]
    if path is not None:
        p = Path(path)
        if p.exists():
            raw = _read_yaml(p, "config")
            layers.append((str(p), raw, raw))
        elif str(path) != "params.yaml":
            raise ConfigError(f"--config: file {p} does not exist")
    if preset:
        top = preset_overrides(preset)
        raw = _deep_merge(raw, top)
        layers.append((f"preset {preset}", raw, top))
    for item in overrides:
        keys, value = parse_override(item)
        raw, top = copy.deepcopy(raw), {}
        _apply_override(raw, keys, value, item)
        _apply_override(top, keys, value, item)
        layers.append((f"--set {item}", raw, top))
    return layers


def _leaves(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict) and value:
            out |= _leaves(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_sources(
    path: str | Path | None = "params.yaml",
    *,
    preset: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> dict[str, tuple[Any, str]]:
    """Every setting of the resolved config as ``dotted.key -> (value, source)``: the source that set it last
    (``default``, the params file, ``preset NAME`` or ``--set a.b=v``), in the precedence order of ``load_config``.

    Raises:
        ConfigError: as ``load_config``.
    """
    cfg = load_config(path, preset=preset, overrides=overrides)
    out = {key: (value, "default") for key, value in _leaves(cfg.model_dump(mode="json")).items()}
    for name, _, top in _layers(path, preset, overrides)[1:]:
        for given in _leaves(top):  # a key set here, or a whole section/list given at once
            for key, (value, _) in out.items():
                if key == given or key.startswith(given + "."):
                    out[key] = (value, name)
    return out
