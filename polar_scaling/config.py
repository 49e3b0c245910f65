"""Typed configs: nested dataclasses loaded from YAML plus ``key.sub=value`` overrides.

Precedence is defaults < YAML file < command-line overrides. Every problem is a
:class:`ConfigError` naming the source (file or ``<override>``), the dotted key and what was
expected, so a typo in a sweep file fails before any job is submitted.

Range checks live in field metadata (``ge``, ``gt``, ``le``, ``lt``, ``choices``), e.g.
``lr: float = field(default=1e-3, metadata={"gt": 0})``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range."""

    def __init__(self, source: str, key: str, message: str):
        self.source, self.key, self.message = source, key, message
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {message}")


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping with ``safe_load``; a missing file or non-mapping is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "", "file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(str(path), "", f"malformed YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), "", f"expected a mapping at top level, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=1e-3`` -> (["a", "b"], 0.001); the value is parsed as YAML (so ``[1,2]`` is a list)."""
    if "=" not in text:
        raise ConfigError("<override>", text, "expected key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError("<override>", key, "empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of ``data`` with each ``key.sub=value`` set (intermediate maps created)."""
    out = _deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {} if child is None else child
                if not isinstance(child, dict):
                    raise ConfigError("<override>", text.split("=")[0], f"{part!r} is not a section")
                node[part] = child
            node = child
        node[parts[-1]] = value
    return out


def merge(base: dict, update: dict) -> dict:
    """Deep-merge ``update`` into a copy of ``base`` (mappings merge, everything else replaces)."""
    out = _deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = _deepcopy(value)
    return out


def from_dict(cls: type[T], data: dict | None, source: str = "<config>", prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, checking keys, types and ranges recursively."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(source, prefix.rstrip("."), f"expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(source, key, f"unknown key (known: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(source, key, "required key is missing")
            continue
        value = _coerce(hints[name], data[name], source, key)
        _check_range(f.metadata, value, source, key)
        kwargs[name] = value
    try:
        obj = cls(**kwargs)
    except ConfigError as e:
        if e.source != "<config>":
            raise
        key = f"{prefix}{e.key}" if e.key else prefix.rstrip(".")
        raise ConfigError(source, key, e.message) from None
    except (TypeError, ValueError) as e:
        raise ConfigError(source, prefix.rstrip("."), str(e)) from None
    return obj


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain dict of YAML-safe values (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def default_dict(cls: type) -> dict:
    """The defaults of dataclass ``cls`` as a plain dict, without validating the whole (a
    class with a required key still has defaults for the rest)."""
    out = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            out[f.name] = to_dict(f.default)
        elif dataclasses.is_dataclass(f.default_factory):  # a section: its own defaults
            out[f.name] = default_dict(f.default_factory)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = to_dict(f.default_factory())
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = (),
                defaults: dict | None = None) -> T:
    """Defaults < ``defaults`` mapping < YAML at ``path`` < ``overrides``, validated as ``cls``."""
    data = _deepcopy(defaults or {})
    source = "<defaults>"
    if path is not None:
        data = merge(data, read_yaml(path))
        source = str(path)
    if overrides:
        data = apply_overrides(data, list(overrides))
        source = f"{source} + overrides" if path is not None else "<override>"
    return from_dict(cls, data, source)


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


def check(condition: bool, key: str, message: str) -> None:
    """For ``__post_init__`` cross-field checks; from_dict adds the source to the message."""
    if not condition:
        raise ConfigError("<config>", key, message)


# --------------------------------------------------------------------------- internals


def _deepcopy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deepcopy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deepcopy(v) for v in value]
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, source, key)
            except ConfigError as e:
                errors.append(e)
        # One candidate type (Optional[X]), or a candidate that failed on a nested key (a
        # section that was a mapping but held a bad value): its error names the real key.
        deeper = [e for e in errors if e.key != key]
        if len(errors) == 1 or deeper:
            raise (errors[0] if len(errors) == 1 else deeper[0])
        names = " or ".join(_type_name(a) for a in args)
        raise ConfigError(source, key, f"expected {names}, got {value!r}")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(source, key, f"expected one of {list(choices)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, prefix=f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(source, key, f"expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(source, key, f"expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(a, v, source, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
        item = args[0] if args else Any
        items = [_coerce(item, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(source, key, f"expected a mapping, got {value!r}")
        kt, vt = (typing.get_args(tp) or (Any, Any))
        return {k: _coerce(vt, v, source, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(source, key, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(source, key, f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)  # 1e6 in YAML is a float
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                f = math.nan
            if f.is_integer():
                return int(f)
        raise ConfigError(source, key, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(source, key, f"expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(source, key, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(source, key, f"expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(source, key, f"expected a path, got {value!r}")
    return value


def _check_range(meta: typing.Mapping, value: Any, source: str, key: str) -> None:
    if value is None or not meta:
        return
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(source, key, f"expected one of {list(meta['choices'])}, got {value!r}")
    checks = (("gt", lambda v, b: v > b, ">"), ("ge", lambda v, b: v >= b, ">="),
              ("lt", lambda v, b: v < b, "<"), ("le", lambda v, b: v <= b, "<="))
    for name, ok, sign in checks:
        if name in meta and isinstance(value, (int, float)) and not ok(value, meta[name]):
            raise ConfigError(source, key, f"expected a value {sign} {meta[name]}, got {value!r}")
