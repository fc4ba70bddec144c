"""Build Gradio controls from a config dataclass and turn form values back into a config."""
from __future__ import annotations

import dataclasses
import typing

import gradio as gr

from core.config import ConfigError, _base_type, from_dict, help_of, label_of


def control(cls, name: str, **overrides):
    """A control for one config field, with the field's label, help and default."""
    f = {x.name: x for x in dataclasses.fields(cls)}[name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    kind, _ = _base_type(typing.get_type_hints(cls)[name])
    meta = f.metadata
    common = dict(label=label_of(cls, name), info=help_of(cls, name) or None,
                  elem_id=f"{cls.__name__}-{name}")
    default = overrides.pop("value", default)
    choices = overrides.pop("choices", meta.get("choices"))
    widget = overrides.pop("widget", None)
    common.update(overrides)
    if widget == "slider":
        return gr.Slider(minimum=meta.get("min") or 0, maximum=meta.get("max") or 1, step=0.05,
                         value=default, **common)
    if kind is bool:
        return gr.Checkbox(value=default, **common)
    if choices is not None:
        return gr.Dropdown(choices=choices, value=default, **common)
    # no minimum/maximum on Number: Gradio would reject out-of-range input with a bare "Error"
    # before our validation can name the field and the limit
    if kind is int:
        return _lenient(gr.Number(value=default, precision=0, **common))
    if kind is float:
        return _lenient(gr.Number(value=default, **common))
    return gr.Textbox(value=default, **common)


def _lenient(number: gr.Number) -> gr.Number:
    """A value gradio cannot round ('abc', inf: only an API call sends one) goes on to the
    handler, whose validation names the field, instead of failing inside gradio with a bare
    "Error"."""
    strict = number.preprocess

    def preprocess(payload):
        try:
            return strict(payload)
        except (TypeError, ValueError, OverflowError):
            return payload
    number.preprocess = preprocess
    return number


def to_config(cls, names: list[str], values) -> typing.Any:
    """Form values (in the order of `names`) -> a validated config; raises ConfigError."""
    data = {}
    for name, value in zip(names, values):
        if isinstance(value, float) and value.is_integer() and name in _int_fields(cls):
            value = int(value)
        data[name] = value
    return from_dict(cls, data).validate()


def _int_fields(cls) -> set[str]:
    hints = typing.get_type_hints(cls)
    return {n for n, t in hints.items() if _base_type(t)[0] is int}


def error_text(error: Exception) -> str:
    if isinstance(error, ConfigError):
        return "**Please fix:**\n" + "\n".join(f"- {p}" for p in error.problems)
    message = getattr(error, "user_message", None) or str(error)
    return f"**Error:** {message}"
