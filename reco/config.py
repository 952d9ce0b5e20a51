"""Configs: dataclasses read from YAML or TOML files, with every key and type checked (the one
loader of the project: training, evaluation and the demo use it; it imports nothing from reco).

    @dataclass
    class Optim:
        lr: float = 1e-3
        betas: tuple[float, float] = (0.9, 0.999)

    @dataclass
    class Train:
        out_dir: Path
        optim: Optim = field(default_factory=Optim)
        mode: Literal["linear", "fused"] = "fused"

        def validate(self) -> None:   # optional: called after construction
            if self.optim.lr <= 0:
                raise ConfigError("optim.lr must be > 0")

    cfg = load_config("train.yaml", Train)

A misspelt key, a value of the wrong type, a NaN or an infinity, or a missing required key raises
ConfigError naming the dotted key path (`optim.lr`), so a bad config fails before any training
starts. A validate() that raises ValueError with a message starting with one of its fields
(`lr must be > 0`, as check_number writes) gets the section's path put in front
(`optim.lr must be > 0`).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import math
import numbers
import os
import re
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any, Literal, TypeVar, Union

import yaml

__all__ = ["ConfigError", "check_number", "dump_config", "from_dict", "load_config", "to_dict"]

T = TypeVar("T")

_YAML_SUFFIXES = (".yaml", ".yml")
_TOML_SUFFIXES = (".toml",)
# `X | None` annotations evaluate to types.UnionType (3.10+), `Optional[X]` to typing.Union.
_UNION_TYPES: tuple[Any, ...] = (Union,) + (
    (types.UnionType,) if hasattr(types, "UnionType") else ()
)


# ---------------------------------------------------------------------------------------------
# One range check for the numbers in config dataclasses (models, training, the demo): a NaN, an
# inf or a zero head count must fail at the config, not as a ZeroDivisionError or a run that
# trains to NaN.


def _bounds(gt: float | None, ge: float | None, lt: float | None, le: float | None) -> str:
    lo = f"> {gt:g}" if gt is not None else (f">= {ge:g}" if ge is not None else "")
    hi = f"< {lt:g}" if lt is not None else (f"<= {le:g}" if le is not None else "")
    if lo and hi:
        left = "(" if gt is not None else "["
        right = ")" if lt is not None else "]"
        return f"in {left}{lo.split()[1]}, {hi.split()[1]}{right}"
    return lo or hi


def check_number(
    name: str,
    value: Any,
    *,
    integer: bool = False,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    optional: bool = False,
) -> None:
    """Raises unless value is a finite number (an int if integer; None too if optional) within
    the bounds: TypeError for a non-number (bools are not numbers), ValueError otherwise. The
    message starts with name ("lr must be a finite number > 0, got nan"), so that a config
    loader can put the section's dotted path in front of it."""
    if optional and value is None:
        return
    kind = "an integer" if integer else "a finite number"
    want = f"{kind} {_bounds(gt, ge, lt, le)}".rstrip() + (" or None" if optional else "")
    numeric = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, numeric):
        raise TypeError(f"{name} must be {want}, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or not (
        (gt is None or value > gt)
        and (ge is None or value >= ge)
        and (lt is None or value < lt)
        and (le is None or value <= le)
    ):
        raise ValueError(f"{name} must be {want}, got {value!r}")


class ConfigError(ValueError):
    """A config file or mapping that does not fit its dataclass (the message names the key)."""


class _NotFiniteError(ConfigError):
    """A float that is NaN or infinite: the value has the right type, so a union reports it as
    is rather than as a type mismatch."""


# ---------------------------------------------------------------------------------------------
# Reading


def load_config(path: str | os.PathLike, cls: type[T]) -> T:
    """Reads a .yaml/.yml or .toml file into the dataclass `cls` (checked as by from_dict)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _YAML_SUFFIXES + _TOML_SUFFIXES:
        raise ConfigError(f"{path}: unknown config format {suffix!r} (use .yaml, .yml or .toml)")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    try:
        if suffix in _YAML_SUFFIXES:
            data = yaml.safe_load(text)
        else:
            data = _toml_module().loads(text)
    except ConfigError:
        raise
    except Exception as e:  # yaml.YAMLError / tomllib.TOMLDecodeError: report the file
        raise ConfigError(f"{path}: cannot parse: {e}") from e
    if data is None:  # an empty YAML file: all defaults
        data = {}
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def _toml_module() -> Any:
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    try:
        import tomli
    except ImportError:
        raise ConfigError(
            "reading TOML needs Python 3.11+ (tomllib) or the tomli package (pip install tomli)"
        ) from None
    return tomli


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Builds the dataclass `cls` from a (nested) mapping, checking every key and value.

    where: the dotted key path of `data` inside the whole config (for messages). Nested
    dataclasses, Optional/`X | None`, list[X], tuple[X, ...], tuple[X, Y], dict[str, X],
    Literal[...], Enum, bool/int/float/str and Path fields are converted and checked; ints are
    accepted for floats, bools are not numbers, strings are not numbers. If the dataclass has a
    `validate()` method it is called on the result and its errors propagate.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{where or '<config>'}: expected a mapping (section {cls.__name__}), "
            f"got {data!r} ({type(data).__name__})"
        )
    # get_type_hints evaluates string annotations (`from __future__ import annotations`).
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}

    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        msg = f"unknown key {_join(where, str(key))!r} in {cls.__name__}"
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        if close:
            msg += f"; did you mean {_join(where, close[0])!r}?"
        msg += f" (valid keys: {', '.join(fields) or 'none'})"
        if len(unknown) > 1:
            msg += f"; other unknown keys: {', '.join(repr(str(k)) for k in unknown[1:])}"
        raise ConfigError(msg)

    missing = [
        name
        for name, f in fields.items()
        if name not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        names = ", ".join(_join(where, m) for m in missing)
        raise ConfigError(f"missing required key(s) {names} in {cls.__name__}")

    kwargs = {
        name: _convert(data[name], hints[name], _join(where, name))
        for name in fields
        if name in data
    }
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as e:
            if not where:
                raise
            raise ConfigError(_qualify(where, str(e), fields)) from e
    return obj


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


_LEADING_NAME = re.compile(r"[A-Za-z_]\w*")


def _qualify(where: str, message: str, fields: Mapping[str, Any]) -> str:
    """A validate() message with the section's path: `lr must be ...` becomes
    `optim.lr must be ...` where the message starts with a field, else `optim: <message>`."""
    name = _LEADING_NAME.match(message)
    if name is not None and name.group() in fields:
        return _join(where, message)
    return f"{where}: {message}"


def _describe(tp: Any) -> str:
    """A short readable name for a type annotation (`list[int]`, `float | None`)."""
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return re.sub(r"\btyping\.", "", str(tp)).replace("NoneType", "None")


def _type_error(key: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"{key}: expected {_describe(tp)}, got {value!r} ({type(value).__name__})")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Checks `value` against the annotation `tp` and converts it (dicts to dataclasses, lists to
    tuples, str to Path, int to float). Raises ConfigError naming `key`."""
    if tp is Any:
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in _UNION_TYPES:
        if value is None:
            if type(None) in args:
                return None
            raise _type_error(key, tp, value)
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            option = options[0]
            try:
                return _convert(value, option, key)
            except _NotFiniteError:
                raise
            except ConfigError:
                # A scalar mismatch reports `int | None`; nested errors (a dataclass, a list
                # item) keep their own more precise message.
                if isinstance(option, type) and not (
                    dataclasses.is_dataclass(option) or issubclass(option, enum.Enum)
                ):
                    raise _type_error(key, tp, value) from None
                raise
        # Several non-None options (int | str): the first that fits wins; report the union.
        for option in options:
            try:
                return _convert(value, option, key)
            except _NotFiniteError:
                raise
            except ConfigError:
                continue
        raise _type_error(key, tp, value)
    if origin is Literal:
        # `type(...) is` so that True does not pass for Literal[1] (True == 1 in Python).
        for allowed in args:
            if value == allowed and type(value) is type(allowed):
                return allowed
        raise ConfigError(
            f"{key}: {value!r} is not one of the allowed values "
            f"({', '.join(repr(a) for a in args)})"
        )
    if origin in (list, tuple, dict) or tp in (list, tuple, dict):
        return _convert_container(value, tp, origin or tp, args, key)

    if tp is type(None):
        if value is None:
            return None
        raise _type_error(key, tp, value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(key, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(key, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # YAML .nan/.inf, TOML nan/inf: never a usable setting
                raise _NotFiniteError(f"{key} must be a finite number, got {value!r}")
            return float(value)
        raise _type_error(key, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(key, tp, value)
    if isinstance(tp, type) and issubclass(tp, PurePath):
        if isinstance(value, (str, os.PathLike)):
            return tp(value)
        raise _type_error(key, tp, value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        # Enums are written by value (what to_dict writes); the member name is accepted too.
        for member in tp:
            if value == member.value and type(value) is type(member.value):
                return member
        if isinstance(value, str) and value in tp.__members__:
            return tp[value]
        raise ConfigError(
            f"{key}: {value!r} is not one of the allowed values "
            f"({', '.join(repr(m.value) for m in tp)})"
        )
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _type_error(key, tp, value)
    raise TypeError(f"{key}: unsupported type annotation {tp!r} in a config dataclass")


def _convert_container(value: Any, tp: Any, origin: Any, args: tuple, key: str) -> Any:
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _type_error(key, tp, value)
        key_tp, value_tp = args if args else (Any, Any)
        return {
            _convert(k, key_tp, f"{key}.<key {k!r}>"): _convert(v, value_tp, _join(key, str(k)))
            for k, v in value.items()
        }
    # YAML and TOML have only lists; tuples are accepted too (from_dict on Python data).
    if not isinstance(value, (list, tuple)):
        raise _type_error(key, tp, value)
    if origin is list:
        item_tp = args[0] if args else Any
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if not args or (len(args) == 2 and args[1] is Ellipsis):  # tuple / tuple[X, ...]
        item_tp = args[0] if args else Any
        return tuple(_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if args == ((),):  # tuple[()]: the empty tuple
        args = ()
    if len(value) != len(args):
        raise ConfigError(
            f"{key}: expected {len(args)} items ({_describe(tp)}), got {len(value)}: {value!r}"
        )
    return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))


# ---------------------------------------------------------------------------------------------
# Writing


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain data: nested dicts, lists (for lists and tuples), str (for Paths),
    enum values and scalars; what from_dict reads back into an equal config."""
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        raise TypeError(f"to_dict needs a dataclass instance, got {cfg!r}")
    return _plain(cfg)


def _plain(obj: Any, drop_default_none: bool = False) -> Any:
    """obj as plain data; drop_default_none leaves out None fields whose default is None."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if drop_default_none and value is None and f.default is None:
                continue
            out[f.name] = _plain(value, drop_default_none)
        return out
    if isinstance(obj, dict):
        return {k: _plain(v, drop_default_none) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, drop_default_none) for v in obj]
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return _plain(obj.value)
    return obj


def dump_config(cfg: Any, path: str | os.PathLike) -> None:
    """Writes the config to a .yaml/.yml or .toml file (by extension), readable by load_config.

    TOML has no null: a None field that defaults to None is left out (reading the file back gives
    None again); any other None raises ConfigError.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    data = to_dict(cfg)
    if suffix in _YAML_SUFFIXES:
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    elif suffix in _TOML_SUFFIXES:
        data = _plain(cfg, drop_default_none=True)
        _check_no_none(data, "")
        text = _toml_dumps(data)
    else:
        raise ConfigError(f"{path}: unknown config format {suffix!r} (use .yaml, .yml or .toml)")
    path.write_text(text, encoding="utf-8")


def _check_no_none(obj: Any, key: str) -> None:
    if obj is None:
        raise ConfigError(f"{key}: TOML cannot hold None (and its default is not None); use YAML")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_no_none(v, _join(key, str(k)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_no_none(v, f"{key}[{i}]")


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(key: Any) -> str:
    if not isinstance(key, str):
        raise ConfigError(f"TOML keys must be strings, got {key!r}")
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key, ensure_ascii=False)


def _toml_value(value: Any) -> str:
    """An inline TOML value: scalars, arrays and (inside arrays) inline tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # shortest round-tripping form: 0.001, 1e-05, 3.0
    if isinstance(value, str):
        # A JSON string is a valid TOML basic string (same escapes, \uXXXX for control chars).
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    raise ConfigError(f"cannot write {value!r} ({type(value).__name__}) to TOML")


def _toml_dumps(data: dict[str, Any]) -> str:
    """A minimal TOML writer for nested dicts of scalars and lists: scalars of a table first, then
    its sub-tables as [a.b] sections (TOML needs that order)."""
    lines: list[str] = []

    def table(d: dict[str, Any], prefix: list[str]) -> None:
        if prefix:
            if lines:
                lines.append("")
            lines.append("[" + ".".join(_toml_key(p) for p in prefix) + "]")
        for k, v in d.items():
            if not isinstance(v, dict):
                lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v in d.items():
            if isinstance(v, dict):
                table(v, [*prefix, k])

    table(data, [])
    return "\n".join(lines) + "\n"
