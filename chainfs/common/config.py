"""Typed TOML configuration.

Each service declares its settings as a (nested) dataclass in its own package,
with the default written once, on the field, and documented with a comment.
:func:`load` reads a TOML file into that dataclass and rejects unknown or
ill-typed fields with a message naming the field and the file.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from chainfs.common.errors import ChainfsError, Code

T = TypeVar("T")


class ConfigError(ChainfsError):
    def __init__(self, message: str) -> None:
        super().__init__(Code.CONFIG_ERROR, message)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as e:
                errors.append(e.message)
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return _build(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        vt = args[1] if len(args) == 2 else Any
        return {k: _convert(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected int, got bool")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__}")
    return value


def _build(cls: type[T], data: dict[str, Any], where: str) -> T:
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown field {unknown[0]!r} (known: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(value, hints[name], f"{where}.{name}" if where else name)
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if callable(check):
        try:
            check()
        except ValueError as e:
            raise ConfigError(f"{where or 'config'}: {e}") from None
    return obj


def from_dict(cls: type[T], data: dict[str, Any], source: str = "<dict>") -> T:
    """Build ``cls`` from a parsed mapping; errors name ``source`` and the field."""
    try:
        return _build(cls, data, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e.message.lstrip(': ')}") from None


def load(cls: type[T], path: str | Path | None, overrides: dict[str, Any] | None = None) -> T:
    """Read ``path`` (TOML) into ``cls``; ``None`` gives the defaults."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{source}: config file not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{source}: not valid TOML: {e}") from None
    if overrides:
        data = _merge(data, overrides)
    return from_dict(cls, data, source)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def to_toml(obj: Any) -> str:
    """Render a config dataclass as TOML (for `chainfs up` and example configs)."""
    top: list[str] = []
    tables: list[str] = []

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list | tuple):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        raise TypeError(f"cannot render {v!r}")

    def walk(o: Any, prefix: str, out: list[str]) -> None:
        sub: list[tuple[str, Any]] = []
        for f in dataclasses.fields(o):
            v = getattr(o, f.name)
            if v is None:
                continue
            if dataclasses.is_dataclass(v):
                sub.append((f.name, v))
            else:
                out.append(f"{f.name} = {fmt(v)}")
        for name, v in sub:
            full = f"{prefix}.{name}" if prefix else name
            tables.append("")
            tables.append(f"[{full}]")
            walk(v, full, tables)

    walk(obj, "", top)
    return "\n".join(top + tables) + "\n"


def require_positive(obj: Any, *names: str) -> None:
    """Raise ValueError naming the first field of ``obj`` in ``names`` that is not > 0."""
    for name in names:
        if getattr(obj, name) <= 0:
            raise ValueError(f"{name} must be > 0")


def require_non_negative(obj: Any, *names: str) -> None:
    """Raise ValueError naming the first field of ``obj`` in ``names`` that is < 0."""
    for name in names:
        if getattr(obj, name) < 0:
            raise ValueError(f"{name} must be >= 0")
