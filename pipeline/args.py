"""Config dataclasses filled from defaults, then a YAML file, then dot-list overrides; and dumped back.

    cfg = load_config(RunConfig, "configs/demo-clip.yaml", ["optim.lr=1e-3", "train.global_batch_size=256"])

Every component owns its config dataclass (`DataConfig` in data.py, `ModelConfig` in models.py,
`OptimConfig` in optim.py, ...), each field with a docstring under it and validation in
`__post_init__` raising ConfigError; `pipeline.config.RunConfig` composes them. This module only
knows how to fill, validate and dump dataclasses. A key that no dataclass declares is an error
naming the key, the closest valid one and the valid ones, before any work starts; a key that was
renamed names its new name.

Why our own and not OmegaConf (what lingua uses): OmegaConf's structured configs would give the
merging, but not the errors this project promises: its unknown-key error names no close match, it
has no notion of a renamed key, and a `__post_init__` check does not run on its merge (validation
would need a second pass through `OmegaConf.to_object`). Filling dataclasses from a dict is ~150
lines here and keeps one code path for YAML and the command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from pipeline.errors import ConfigError

# keys that were renamed: "section.old" -> "section.new" (refused with the new name)
RENAMED_KEYS: dict[str, str] = {"train.grad_checkpointing": "model.grad_checkpointing"}

T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unwrap_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the declared field type, or raise ConfigError naming `key`."""
    if value is None:
        return None
    tp = _unwrap_optional(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' is a section; expected a mapping, got {value!r}")
        return _build(tp, value, prefix=key + ".")
    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}") from None
        if number != int(number):
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
        return int(number)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
        return str(value)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' expects a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key '{key}' must be one of {list(choices)}, got {value!r}")
        return value
    return value


def _build(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    types_by_name = _field_types(cls)
    unknown = [k for k in values if k not in types_by_name]
    if unknown:
        key = unknown[0]
        if f"{prefix}{key}" in RENAMED_KEYS:
            raise ConfigError(f"config key '{prefix}{key}' was renamed: did you mean '{RENAMED_KEYS[prefix + key]}'?")
        close = difflib.get_close_matches(key, list(types_by_name), n=1)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
        raise ConfigError(
            f"unknown config key '{prefix}{key}'{hint}; valid keys in "
            f"'{prefix.rstrip('.') or 'top level'}': {', '.join(sorted(types_by_name))}"
        )
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _coerce(value, types_by_name[name], prefix + name)
    # nested sections not mentioned still get their defaults through default_factory
    try:
        return cls(**kwargs)
    except ConfigError as error:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {error}") from None


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["optim.lr=1e-3", "data.urls=[a,b]"]` -> nested dict; values parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. optim.lr=1e-3)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key, value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file '{path}' is not valid YAML: {error}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    return loaded


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Defaults <- YAML file <- dot-list overrides, validated; errors name the bad key."""
    values: dict[str, Any] = read_yaml(path) if path else {}
    values = _merge(values, parse_overrides(overrides or []))
    return _build(cls, values)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (what `load_config` reads back to an equal config)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
