"""Typed job configs: dataclass <-> TOML, `--set key=value` overrides, field validation.

A config field carries its label, help text and limits in its metadata (see `option`), so the
page, the CLI and the TOML file all read them from one place."""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """Bad config values; the message names every field that is wrong."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))

    @property
    def user_message(self) -> str:
        return "Invalid settings: " + "; ".join(self.problems)


def accept(cfg, problems: list[str]):
    """Return cfg if there are no problems, else raise them all at once."""
    if problems:
        raise ConfigError(problems)
    return cfg


# Numbers without a declared `max` still get one: a typo like 1e30 is refused by name instead of
# overflowing a seed, a tensor size or a file name later.
INT_CEILING = 2**32 - 1
FLOAT_CEILING = 1e9
# What a `path` field is relative to (`Paths` attribute); a shared app confines all of them.
PATH_BASES = {"data": "data_dir", "model": "stable_diffusion", "models": "models",
              "aesthetic": "aesthetic_embeddings", "lora": "lora"}


def option(default: Any, help: str, label: str | None = None, choices: list | None = None,
           min: float | None = None, max: float | None = None, multiple_of: int | None = None,
           path: str | None = None):
    """A config field with its label, help and limits. `path` marks a field that names a file
    or folder: "data" (relative to the data folder), "model" (a base-model name or path),
    "models" (a name or path under models/) or "aesthetic" (a name under
    models/aesthetic_embeddings, or a path)."""
    assert path in (None, *PATH_BASES), path
    meta = {"help": help, "label": label, "choices": choices, "min": min, "max": max,
            "multiple_of": multiple_of, "path": path}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def label_of(cls, name: str) -> str:
    meta = fields_of(cls)[name].metadata
    return meta.get("label") or name.replace("_", " ").capitalize()


def help_of(cls, name: str) -> str:
    return fields_of(cls)[name].metadata.get("help", "")


def fields_of(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(tp):
    """int | None -> (int, True); list[str] -> (list, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def coerce(name: str, value: Any, tp) -> Any:
    """Convert a value from a form or TOML to the field's type or raise ConfigError."""
    base, optional = _base_type(tp)
    if value is None or (optional and value == ""):
        if optional:
            return None
        raise ConfigError(f"{name}: a value is required")
    origin = typing.get_origin(base) or base
    try:
        if origin is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if origin is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            return int(str(value).strip())
        if origin is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(str(value).strip()) if not isinstance(value, (int, float)) else float(value)
            if not math.isfinite(number):
                raise ValueError
            return number
        if origin is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if origin is list:
            item = (typing.get_args(base) or (str,))[0]
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return [coerce(name, v, item) for v in value]
    except ConfigError:
        raise
    except (ValueError, TypeError, OverflowError):
        kind = getattr(origin, "__name__", str(origin))
        raise ConfigError(f"{name}: expected {kind}, got {value!r}") from None
    raise TypeError(f"unsupported config field type {tp!r}")


def check_limits(cfg) -> list[str]:
    """Problems with values outside the limits declared in the fields' metadata (numbers
    without a declared max are held to INT_CEILING / FLOAT_CEILING; list items too)."""
    problems = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        meta = f.metadata
        if value is None:
            continue
        if meta.get("choices") is not None and not isinstance(value, list) and \
                value not in meta["choices"]:
            problems.append(f"{f.name}: {value!r} is not one of {', '.join(map(str, meta['choices']))}")
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, (int, float)) and not isinstance(item, bool):
                problems += _number_problems(f.name, item, meta)
    return problems


def _number_problems(name: str, value, meta) -> list[str]:
    ceiling = meta.get("max")
    if ceiling is None:
        ceiling = FLOAT_CEILING if isinstance(value, float) else INT_CEILING
    floor = meta.get("min")
    if floor is None:
        floor = -ceiling
    if value < floor:
        return [f"{name}: must be at least {floor}, got {value}"]
    if value > ceiling:
        return [f"{name}: must be at most {ceiling}, got {value}"]
    if meta.get("multiple_of") and value % meta["multiple_of"]:
        return [f"{name}: must be a multiple of {meta['multiple_of']}, got {value}"]
    return []


def path_problems(cfg, paths) -> list[str]:
    """Problems with the fields marked `path=...`: empty ones are skipped; the rest must be
    allowed by `paths.resolve` (no NUL; when the app is shared, inside the data folder)."""
    problems = []
    for f in dataclasses.fields(cfg):
        kind, value = f.metadata.get("path"), getattr(cfg, f.name)
        if not kind or not isinstance(value, str) or not value.strip():
            continue
        # a model name is looked up under its folder, then as a path from the data folder
        tries = [value] if kind == "data" else [value, getattr(paths, PATH_BASES[kind]) / value.strip()]
        try:
            for typed in tries:
                paths.resolve(typed, f.name)
        except ValueError as error:
            problems.append(str(error))
    return problems


def from_dict(cls, data: dict[str, Any], strict: bool = True):
    """Build a config from a dict (TOML or form values); unknown keys are an error."""
    hints = _hints(cls)
    known = fields_of(cls)
    problems, values = [], {}
    for key, value in data.items():
        if key not in known:
            if strict:
                problems.append(f"{key}: unknown setting for {cls.__name__}")
            continue
        try:
            values[key] = coerce(key, value, hints[key])
        except ConfigError as error:
            problems.extend(error.problems)
    if problems:
        raise ConfigError(problems)
    return cls(**values)


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def load_toml(cls, path: str | Path | None, overrides: list[str] = ()):
    data: dict[str, Any] = {}
    if path:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config: {path} does not exist") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"config: {path} is not valid TOML ({error})") from None
    for text in overrides:
        key, value = parse_override(text)
        data[key] = value
    return from_dict(cls, data)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)


def to_toml(cfg, commented: bool = True) -> str:
    lines = []
    if commented:
        lines.append(f"# {type(cfg).__name__} for Danlu. Every key is optional; missing keys "
                     "take the default shown.")
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if commented and f.metadata.get("help"):
            lines.append("")
            for part in f.metadata["help"].splitlines():
                lines.append(f"# {part}")
            if f.metadata.get("choices"):
                lines.append("# one of: " + ", ".join(map(str, f.metadata["choices"])))
        if value is None:
            lines.append(f"# {f.name} =")
        else:
            lines.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
