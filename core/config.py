"""Config is data: frozen dataclasses, built from presets, files and `key=value` overrides.

    cfg = build_config(TeacherRunConfig, preset=PRESETS["digits"], file="my.toml",
                       overrides=["train.steps=500", "model.width=64"])

Precedence: dataclass defaults < preset < config file (JSON or TOML) < overrides.
Unknown keys and unparsable values raise an NFMError that lists the valid keys. Fields annotated
``Literal["a", "b"]`` are choices: a value outside them is refused here, where the config is loaded
(and by `check_choices` for configs built in Python), naming the key and the valid values.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

from nfm.core.errors import NFMError

T = TypeVar("T")


class ShapedByData:
    """For model configs whose in_channels / img_size (0) and num_classes (-1) are taken from the data."""

    def resolved(self, channels: int, img_size: int, num_classes: int):
        """Fill the data-dependent fields (0 / -1) from the data set."""
        return dataclasses.replace(
            self,
            in_channels=self.in_channels or channels,
            img_size=self.img_size or img_size,
            num_classes=num_classes if self.num_classes < 0 else self.num_classes,
        )


def added(default: Any) -> Any:
    """A field added after configs were first written and hashed: `skip_bad: bool = added(False)`. At its
    default it is left out of `to_dict`, so run-directory hashes and the config.json of runs written before
    it existed stay as they were (a run resumes across the upgrade)."""
    return dataclasses.field(default=default, metadata={"added": True})


def to_dict(cfg: Any) -> dict[str, Any]:
    """A nested plain dict (JSON-serialisable) of a dataclass config; `added` fields only when not at their
    default."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.metadata.get("added") and value == f.default:
            continue
        out[f.name] = to_dict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
    return out


def config_hash(obj: Any) -> str:
    """Ten hex digits of a config (a dataclass or a plain dict): the name of what it trains (RUN/teacher-HASH,
    RUN/students/KIND-HASH), so a rerun of the same settings finds it."""
    d = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _keys(cls: type, prefix: str = "") -> list[str]:
    out = []
    for name, tp in _field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            out += _keys(tp, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric field, attached with Annotated: `steps: Annotated[int, Range(min=1)] = 2000`.
    Values must be finite; min / max are inclusive, gt / lt exclusive."""

    min: float | None = None
    max: float | None = None
    gt: float | None = None
    lt: float | None = None

    def describe(self) -> str:
        parts = [f">= {self.min}" if self.min is not None else "", f"> {self.gt}" if self.gt is not None else ""]
        parts += [f"<= {self.max}" if self.max is not None else "", f"< {self.lt}" if self.lt is not None else ""]
        return " and ".join(p for p in parts if p) or "finite"

    def check(self, value: Any, key: str) -> None:
        ok = isinstance(value, (int, float)) and math.isfinite(value)
        ok = ok and (self.min is None or value >= self.min) and (self.max is None or value <= self.max)
        ok = ok and (self.gt is None or value > self.gt) and (self.lt is None or value < self.lt)
        if not ok:
            raise NFMError(f"config key {key!r} must be {self.describe()}, got {value!r}")


AtLeast1 = Annotated[int, Range(min=1)]  # counts: steps, batch sizes, views
NonNegative = Annotated[int, Range(min=0)]  # cadences where 0 means off, optional counts
Positive = Annotated[float, Range(gt=0)]  # learning rates, scales
Scale = Annotated[float, Range(min=0)]  # noise scales where 0 means none
Fraction = Annotated[float, Range(min=0, lt=1)]  # probabilities, decays, betas


def _field_ranges(cls: type) -> dict[str, Range]:
    hints = typing.get_type_hints(cls, include_extras=True)
    out = {}
    for f in dataclasses.fields(cls):
        for meta in getattr(hints[f.name], "__metadata__", ()):
            if isinstance(meta, Range):
                out[f.name] = meta
    return out


def choices(tp: Any) -> tuple[Any, ...]:
    """The values of a ``Literal[...]`` annotation (``()`` for any other type)."""
    return typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else ()


def one_of(value: Any, tp: Any, what: str) -> Any:
    """`value` if it is one of the Literal type `tp`'s choices; else the error naming them (for function
    arguments; config fields are checked when the config is loaded)."""
    if value not in choices(tp):
        raise NFMError(f"unknown {what} {value!r}; choose one of {', '.join(map(str, choices(tp)))}")
    return value


def _check_choice(value: Any, tp: Any, key: str) -> Any:
    valid = choices(tp)
    if value not in valid:
        raise NFMError(f"config key {key!r}: {value!r} is not one of {', '.join(map(str, valid))}")
    return value


def check_choices(cfg: Any, prefix: str = "") -> Any:
    """Refuse a (nested) dataclass config whose Literal fields (or tuples of them) hold a value outside
    their choices, or whose Range-annotated numbers are out of bounds."""
    for name, bounds in _field_ranges(type(cfg)).items():
        bounds.check(getattr(cfg, name), prefix + name)
    for name, tp in _field_types(type(cfg)).items():
        value = getattr(cfg, name)
        if dataclasses.is_dataclass(tp):
            check_choices(value, f"{prefix}{name}.")
        elif choices(tp):
            _check_choice(value, tp, prefix + name)
        elif typing.get_origin(tp) in (tuple, list) and choices((typing.get_args(tp) or (Any,))[0]):
            for v in value:
                _check_choice(v, typing.get_args(tp)[0], prefix + name)
    return cfg


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a value (possibly a string from the command line) to the annotated type."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        if isinstance(value, bool) and str(value).lower() in typing.get_args(tp):  # JSON/TOML true -> "true"
            value = str(value).lower()
        return _check_choice(str(value) if isinstance(value, str) else value, tp, key)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        seq = [a for a in args if typing.get_origin(a) in (tuple, list)]
        if seq and (isinstance(value, (list, tuple)) or (isinstance(value, str) and "," in value)):
            return _coerce(value, seq[0], key)  # e.g. int | tuple[int, ...]: "8,2,2" or [8, 2, 2]
        return _coerce(value, args[0], key)
    if origin in (tuple, list):
        (elem, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [
                v
                for v in value.replace("(", "").replace(")", "").replace("[", "").replace("]", "").split(",")
                if v.strip()
            ]
        return origin(_coerce(v, elem, key) for v in value)
    try:
        if tp is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError) as e:
        raise NFMError(f"config key {key!r}: cannot read {value!r} as {tp.__name__}") from e
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build a (nested) dataclass from a dict, rejecting unknown keys."""
    types_ = _field_types(cls)
    unknown = [k for k in data if k not in types_]
    if unknown:
        valid = ", ".join(_keys(cls, prefix))
        raise NFMError(f"unknown config key {prefix + unknown[0]!r}; valid keys: {valid}")
    kwargs = {}
    for name, value in data.items():
        tp = types_[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise NFMError(f"config key {prefix + name!r} is a section; set its fields as {prefix + name}.FIELD")
            kwargs[name] = from_dict(tp, value, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    ranges = _field_ranges(cls)
    for name, value in kwargs.items():
        if name in ranges:
            ranges[name].check(value, prefix + name)
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """["train.steps=10", "model.width=64"] -> {"train": {"steps": "10"}, "model": {"width": "64"}}."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise NFMError(f"override {item!r} is not of the form key=value (e.g. train.steps=1000)")
        key, value = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise NFMError(f"override {item!r} conflicts with an earlier override of {p!r}")
        node[parts[-1]] = value.strip()
    return out


def load_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise NFMError(f"config file not found: {path}")
    try:
        if path.suffix == ".toml":
            return tomllib.loads(path.read_text())
        return json.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise NFMError(f"config file {path} does not parse ({e}); use JSON (.json) or TOML (.toml)") from e


def build_config(
    cls: type[T],
    preset: dict[str, Any] | None = None,
    file: str | Path | None = None,
    overrides: list[str] | None = None,
) -> T:
    data: dict[str, Any] = {}
    if preset:
        data = _merge(data, preset)
    if file:
        data = _merge(data, load_file(file))
    if overrides:
        data = _merge(data, parse_overrides(overrides))
    return from_dict(cls, data)


def with_overrides(cfg: T, overrides: list[str], prefix: str = "") -> T:
    """A copy of a config with `key=value` overrides applied (checked as build_config checks them)."""
    return from_dict(type(cfg), _merge(to_dict(cfg), parse_overrides(overrides)), prefix)


def diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Keys whose values differ between two nested dicts: [(key, a_value, b_value)]."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append((prefix + k, va, vb))
    return out


def format_table(cfg: Any, title: str = "config") -> str:
    """The resolved config as an aligned two-column table."""
    rows: list[tuple[str, str]] = []

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                rows.append((prefix + k, repr(v) if isinstance(v, str) else str(v)))

    walk(dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg, "")
    width = max(len(k) for k, _ in rows) if rows else 0
    line = "-" * (width + 2 + max((len(v) for _, v in rows), default=0))
    body = "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
    return f"{title}\n{line}\n{body}\n{line}"
