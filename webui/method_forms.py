"""Per-method form sections of the Train tab, built from each method's config class."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import gradio as gr

from core.paths import Paths
from trainers.captions import list_templates
from trainers.config_forms import FormLayout
from trainers.embeddings import list_embeddings
from trainers.tiny_model import DEMO_NAME, demo_size
from webui import choices as ch
from webui.forms import control


@dataclass
class MethodForm:
    key: str  # registry name, e.g. "textual_inversion"
    title: str  # radio label
    config: type
    target_field: str  # the field naming what is trained (shown in the job name)
    groups: list[tuple[str, list[str], bool]]  # (accordion title, fields, open)
    top: list[str] = field(default_factory=list)  # fields above the accordions
    overrides: dict = field(default_factory=dict)  # field -> extra control arguments
    controls: dict = field(default_factory=dict)
    hidden: list[str] = field(default_factory=list)  # fields that do not apply (kept at default)
    extras: Callable | None = None  # builds method-specific buttons under the form (form, paths)

    @property
    def names(self) -> list[str]:
        return list(self.controls)


def dropdown_sources(paths: Paths) -> dict[str, Callable[[], list[str]]]:
    """Fields whose choices come from disk, by field name."""
    from trainers.hypernetworks import list_hypernetworks
    return {
        "model": lambda: ch.model_choices(paths),
        "embedding": lambda: list_embeddings(paths),
        "hypernetwork": lambda: list_hypernetworks(paths),
        "template": lambda: list_templates(paths.templates),
        "checkpoint": lambda: ch.checkpoint_choices(paths),
        "lora": lambda: ch.lora_choices(paths),
    }


def default_layout(config: type, target_field: str) -> FormLayout:
    """The naming field and the model on top, every other field in one open section."""
    names = [f.name for f in dataclasses.fields(config)]
    top = [n for n in (target_field, "model") if n in names]
    return FormLayout([("Settings", [n for n in names if n not in top], True)], top=top)


def _tools() -> dict[str, Callable]:
    """Page tools a layout may name, each built under its form as (form, paths)."""
    from webui.fine_tune_tools import metadata_button
    return {"metadata_json": metadata_button}


def method_forms() -> list[MethodForm]:
    """One form per catalog method, in the catalog's order, titled as the catalog says and laid
    out as its config's `form` says (or `default_layout`)."""
    from trainers import catalog
    tools = _tools()
    forms = []
    for method in catalog.methods():
        layout = getattr(method.config, "form", None) or default_layout(method.config,
                                                                          method.target_field)
        unknown = [t for t in layout.tools if t not in tools]
        if unknown:
            raise ValueError(f"{method.title}: unknown form tool(s) {', '.join(unknown)}")
        built = [tools[t] for t in layout.tools]
        forms.append(MethodForm(
            method.name, method.title, method.config, method.target_field,
            [(title, list(names), is_open) for title, names, is_open in layout.groups],
            top=list(layout.top), overrides=dict(layout.overrides), hidden=list(layout.hidden),
            extras=(lambda form, paths, built=built: [tool(form, paths) for tool in built])
            if built else None))
    return forms


def fallback_choice(form: MethodForm, name: str, values: list[str]):
    """What dropdown `name` shows when it has no (valid) value: the field's default if it is a
    choice, else the first choice; nothing for the field naming what is trained."""
    default = getattr(form.config(), name)
    if default in values:
        return default
    return values[0] if values and name != form.target_field else None


# size fields -> how a demo model's size sets them (kohya's smallest bucket must fit the size)
SIZE_RULES = {"width": lambda size, default: size, "height": lambda size, default: size,
              "resolution": lambda size, default: size,
              "min_bucket_reso": lambda size, default: min(size, default)}


def size_fields(form: MethodForm) -> list[str]:
    names = {f.name for f in dataclasses.fields(form.config)}
    return [name for name in SIZE_RULES if name in names and name not in form.hidden]


def size_values(form: MethodForm, model) -> dict[str, int]:
    """The form's size fields for base model `model`: the demo size for a demo model, else the
    config's defaults."""
    size = demo_size(model) if isinstance(model, str) else None
    defaults = form.config()
    return {name: getattr(defaults, name) if size is None
            else SIZE_RULES[name](size, getattr(defaults, name)) for name in size_fields(form)}


def demo_size_values(form: MethodForm) -> dict[str, int]:
    return size_values(form, DEMO_NAME)


def build_section(form: MethodForm, sources: dict, per_row: int = 2) -> None:
    """Create the form's controls (inside the caller's layout context). With a demo model as
    the first choice, the size fields start at the demo's size."""
    has_model = "model" in sources and any(f.name == "model" for f in dataclasses.fields(form.config))
    models = [ch.value_of(option) for option in sources["model"]()] if has_model else []
    sizes = size_values(form, fallback_choice(form, "model", models) if has_model else None)

    def make(name: str):
        cls_fields = {f.name for f in dataclasses.fields(form.config)}
        assert name in cls_fields, f"{form.config.__name__} has no field {name}"
        if name in sources:
            options = sources[name]()
            values = [ch.value_of(option) for option in options]
            return control(form.config, name, choices=options,
                            value=fallback_choice(form, name, values))
        extra = dict(form.overrides.get(name, {}))
        if name in sizes:
            extra["value"] = sizes[name]
        return control(form.config, name, **extra)

    with gr.Row():
        for name in form.top:
            form.controls[name] = make(name)
    for title, names, is_open in form.groups:
        with gr.Accordion(title, open=is_open):
            for start in range(0, len(names), per_row):
                with gr.Row():
                    for name in names[start:start + per_row]:
                        form.controls[name] = make(name)
