"""Config dataclasses filled from defaults, then a YAML file, then dot-list overrides; and dumped back.

    cfg = load_config(RunConfig, "configs/demo-clip.yaml", ["optim.lr=1e-3", "train.global_batch_size=256"])

Every component owns its config dataclass (`DataConfig` in data/config.py, `ModelConfig` in model/config.py,
`OptimConfig` in optim.py, ...), each field with a docstring under it and validation in
`__post_init__` raising ConfigError; `pipeline.train.config.RunConfig` composes them. This module only
knows how to fill, validate and dump dataclasses. Keys that no dataclass declares are one error,
before any work starts, listing all of them at once: each with where it was written (`file:line`
of the YAML file, or the command line) and the valid key it most likely meant; a key that was
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

from pipeline.core.errors import ConfigError

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


def _suggest(key: str, valid: list[str]) -> str | None:
    """The valid key a typo most likely meant: the closest by spelling, else one that the key starts with
    or that starts with the key ('evaluation' -> 'eval')."""
    close = difflib.get_close_matches(key, valid, n=1)
    if close:
        return close[0]
    related = [name for name in valid if min(len(name), len(key)) >= 3 and (key.startswith(name) or name.startswith(key))]
    return max(related, key=len) if related else None


def _unknown_key_message(cls: type, dotted: str) -> str:
    """'unknown config key 'a.b' (did you mean 'a.c'?)', or the new name of a renamed key. `cls` is the
    section the last part of `dotted` was looked up in."""
    if dotted in RENAMED_KEYS:
        return f"config key '{dotted}' was renamed: did you mean '{RENAMED_KEYS[dotted]}'?"
    prefix, _, key = dotted.rpartition(".")
    valid = sorted(_field_types(cls))
    close = _suggest(key, valid)
    if close:
        return f"unknown config key '{dotted}' (did you mean '{prefix + '.' if prefix else ''}{close}'?)"
    return f"unknown config key '{dotted}'; valid keys in '{prefix or 'top level'}': {', '.join(valid)}"


def _unknown_keys(cls: type, values: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Every key of `values` (and of its sections, at any depth) that `cls` does not declare, as
    (dotted key, message), in the order they appear."""
    types_by_name = _field_types(cls)
    found = []
    for key, value in values.items():
        dotted = prefix + str(key)
        if key not in types_by_name:
            found.append((dotted, _unknown_key_message(cls, dotted)))
            continue
        section = _unwrap_optional(types_by_name[key])
        if dataclasses.is_dataclass(section) and isinstance(value, dict):
            found.extend(_unknown_keys(section, value, dotted + "."))
    return found


def _key_lines(text: str) -> dict[str, int]:
    """Dotted key -> the 1-based line it is written on, for every key of a YAML mapping (at any depth)."""
    lines: dict[str, int] = {}

    def walk(node, prefix: str) -> None:
        if not isinstance(node, yaml.MappingNode):
            return
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                dotted = prefix + str(key_node.value)
                lines.setdefault(dotted, key_node.start_mark.line + 1)
                walk(value_node, dotted + ".")

    try:
        walk(yaml.compose(text, Loader=yaml.SafeLoader), "")
    except yaml.YAMLError:  # read_yaml has parsed it already; lines are only a help
        pass
    return lines


def check_keys(cls: type, file_values: dict[str, Any], override_values: dict[str, Any],
               path: str | Path | None = None) -> None:
    """ConfigError listing every unknown key at once: each of the file's with `file:line`, each of the
    command line's as such, each with its did-you-mean."""
    lines = _key_lines(Path(path).read_text()) if path and file_values else {}
    problems = [f"{path}:{lines[key]}: {message}" if key in lines else f"{path}: {message}"
                for key, message in _unknown_keys(cls, file_values)]
    problems += [f"command line: {message}" for _, message in _unknown_keys(cls, override_values)]
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} unknown config keys: " + "; ".join(problems))


def _build(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    types_by_name = _field_types(cls)
    unknown = [k for k in values if k not in types_by_name]
    if unknown:  # load_config reports them all first (check_keys); this guards direct callers
        raise ConfigError(_unknown_key_message(cls, prefix + unknown[0]))
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
    file_values: dict[str, Any] = read_yaml(path) if path else {}
    override_values = parse_overrides(overrides or [])
    check_keys(cls, file_values, override_values, path)
    return _build(cls, _merge(file_values, override_values))


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (what `load_config` reads back to an equal config)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
