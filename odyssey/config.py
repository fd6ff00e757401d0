"""Typed configs: dataclasses filled from YAML files and `--set key=value` overrides.

Every value is checked against its field's annotation before the dataclass is built, and the
dataclass's own `__post_init__` checks the rest. Either way a mistake is a `ConfigError` that names
the dotted field (`model.n_layer`) and what would be accepted, never a traceback from deep inside a run.

A nested dataclass may offer named recipes through a `from_preset(name)` classmethod; a config then
says `model: tiny` or `model: {preset: tiny, n_layer: 4}`.
"""

from __future__ import annotations

import dataclasses
import difflib
import keyword
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from odyssey.errors import ConfigError

T = TypeVar("T")


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build `cls` from a YAML file (optional) with `key=value` overrides applied on top."""
    data = read_yaml(path) if path is not None else {}
    return from_dict(cls, apply_overrides(data, overrides))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file's top-level mapping, with an error that names the file when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if loaded is not None and not isinstance(loaded, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping of fields, got {type(loaded).__name__}")
    return dict(loaded or {})


def named_file(name_or_path: str, directory: Path, kind: str) -> Path:
    """A named YAML in `directory` (`tiny-cpu` -> directory/tiny-cpu.yaml), or a path taken as it is."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        return path
    candidate = directory / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = ", ".join(sorted(p.stem for p in directory.glob("*.yaml")))
        raise ConfigError(f"no {kind} {name_or_path!r}; {kind}s: {known} (or give a YAML path)")
    return candidate


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings (values parsed as YAML) to a nested dict; returns a new dict."""
    values = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. model.n_layer=4)")
        try:
            values[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            values[key] = raw
    return set_values(data, values)


def flatten_keys(
    data: Any, is_leaf=lambda value: not isinstance(value, Mapping), prefix: str = ""
) -> dict[str, Any]:
    """A nested mapping as dotted keys to leaves: `{optim: {lr: 1}}` -> `{"optim.lr": 1}`."""
    if not isinstance(data, Mapping):
        return {}
    out = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        out.update({key: value} if is_leaf(value) else flatten_keys(value, is_leaf, key + "."))
    return out


def set_values(data: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """Set dotted keys (`optim.lr`) to values in a nested dict; returns a new dict."""
    out = _deep_copy(data)
    for key, value in values.items():
        node = out
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if isinstance(child, str):  # `model: tiny` followed by `--set model.n_layer=4`
                child = {"preset": child}
            elif not isinstance(child, Mapping):
                if child is not None:
                    raise ConfigError(f"{key}: {'.'.join(parts[: i + 1])} is not a section")
                child = {}
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return out


def from_dict(cls: type[T], data: Any, path: str = "", base: Mapping[str, Any] | None = None) -> T:
    """Build dataclass `cls` from plain data, checking every field. Fields missing from `data` come
    from `base` (a preset, or the field's default when a section is given in part), then from the
    dataclass defaults. `path` prefixes error messages."""
    if isinstance(data, str) and hasattr(cls, "from_preset"):
        data = {"preset": data}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping of fields, got {_show(data)}")
    data = dict(data)
    hints = typing.get_type_hints(cls)
    fields = {_key(f.name): f for f in dataclasses.fields(cls) if f.init}  # as YAML spells them

    base = dict(base or {})
    preset = data.pop("preset", None)
    if preset is not None:
        if not hasattr(cls, "from_preset"):
            raise ConfigError(f"{_join(path, 'preset')}: {cls.__name__} has no presets")
        try:
            base = to_dict(cls.from_preset(preset))
        except ConfigError as e:
            raise ConfigError(f"{_join(path, 'preset')}: {e}") from None

    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f"; did you mean {_join(path, close[0])!r}?" if close else ""
        if hasattr(cls, "unknown_field_hint"):  # a config that knows where such a field belongs
            hint = cls.unknown_field_hint(str(key), data[key]) or hint
        raise ConfigError(
            f"unknown field {_join(path, str(key))!r}{hint} (fields of {cls.__name__}: {', '.join(fields)})"
        )

    kwargs: dict[str, Any] = {}
    for key, f in fields.items():
        name = f.name
        if key not in data:
            if key in base:
                kwargs[name] = _coerce(base[key], hints[name], _join(path, key))
            continue
        value, tp = data[key], hints[name]
        retired = getattr(cls, "retired_values", {}).get(key, {})  # values a config no longer takes
        if isinstance(value, str) and value in retired:
            raise ConfigError(f"{_join(path, key)}: {value!r} was {retired[value]}")
        under = base.get(key, _default(f))
        if dataclasses.is_dataclass(tp) and isinstance(value, (Mapping, str)):
            # A section given in part keeps the rest of its preset or default.
            kwargs[name] = from_dict(
                tp, value, _join(path, key), to_dict(under) if dataclasses.is_dataclass(under) else under
            )
            continue
        if isinstance(under, dict) and isinstance(value, Mapping):
            value = {**under, **value}
        kwargs[name] = _coerce(value, tp, _join(path, key))
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    except TypeError as e:  # a required field without a value
        raise ConfigError(f"{path or cls.__name__}: {e}") from None


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass config as plain data (what YAML, JSON and Ray's param spaces hold): tuples become lists."""
    return dataclasses.asdict(cfg, dict_factory=lambda items: {_key(k): _plain(v) for k, v in items})


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, tuple) else value


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value) and isinstance(value, tp):
            return value
        return from_dict(tp, value, path)
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{path}: a value is required, got null")
        errors = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arm, path)
            except ConfigError as e:
                errors.append(str(e).removeprefix(f"{path}: "))
        raise ConfigError(f"{path}: {' or '.join(errors)}")
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{path}: {_show(value)} is not one of {', '.join(map(repr, args))}{hint}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {_show(value)}")
    if tp is int:
        if isinstance(value, str):
            value = _parse_number(value, int)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{path}: expected an integer, got {_show(value)}")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` as a string
            value = _parse_number(value, float)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{path}: expected a number, got {_show(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {_show(value)}")
    if origin in (list, tuple, Sequence):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(f"{path}: expected a list, got {_show(value)}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {_show(value)}")
        kt, vt = args or (Any, Any)
        return {_coerce(k, kt, path): _coerce(v, vt, f"{path}.{k}") for k, v in value.items()}
    raise ConfigError(f"{path}: unsupported field type {tp!r}")  # a bug in a config class, not in input


def _parse_number(text: str, kind: type) -> Any:
    """'3e-4' -> 0.0003, '8' -> 8; text that is no number comes back as it is (and fails the check)."""
    try:
        number = float(text)
    except ValueError:
        return text
    if kind is int:
        return int(number) if number.is_integer() else number
    return number


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def _key(field_name: str) -> str:
    """A field's name as configs spell it: a Python keyword is a field with a trailing underscore
    (`from_`), written without it (`init: {from: PATH}`)."""
    bare = field_name.removesuffix("_")
    return bare if bare != field_name and keyword.iskeyword(bare) else field_name


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"
