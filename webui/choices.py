"""Dropdown choices read from disk (models, embeddings, templates) with refresh helpers."""
from __future__ import annotations

import gradio as gr

from core.paths import Paths
from trainers.captions import list_templates
from trainers.embeddings import list_embeddings
from trainers import families
from trainers.models import list_models
from trainers.tiny_model import demo_size

REFRESH = "Refresh"


def labelled(name: str) -> tuple[str, str]:
    """(shown label, value) of a model name: the demo models say what they are."""
    demo = families.demo_of(name)
    if demo is not None:
        return f"{name} ({demo.label})", name
    return name, name


def model_choices(paths: Paths) -> list[tuple[str, str]]:
    """What is in models/Stable-diffusion, then the built-in SD1, SD2 and SDXL demo models."""
    return [labelled(name) for name in list_models(paths)]


def checkpoint_choices(paths: Paths) -> list[tuple[str, str]]:
    """Models that can be fine-tuned results (the demo models cannot)."""
    return [labelled(name) for name in list_models(paths) if families.demo_of(name) is None]


def lora_choices(paths: Paths) -> list[str]:
    """The LoRA files in models/Lora (kohya's .safetensors)."""
    folder = paths.lora
    return sorted(p.name for p in folder.glob("*.safetensors") if p.is_file()) \
        if folder.is_dir() else []


def value_of(choice) -> str:
    return choice[1] if isinstance(choice, (tuple, list)) else choice


def default_model(paths: Paths) -> str:
    return value_of(model_choices(paths)[0])


def refreshed(choices: list, current: str | None):
    values = [value_of(c) for c in choices]
    value = current if current in values else (values[0] if values else None)
    return gr.update(choices=choices, value=value)


def demo_note(model: str | None) -> str:
    if isinstance(model, str) and families.demo_of(model) is not None:
        family = families.get(families.demo_families()[model]).label
        return (f"ℹ️ **{model}** is Danlu's built-in {family}-shaped demo model: random weights, "
                "built on this machine, so every tab works without a download. Its images are "
                "noise. Put a real model (a .safetensors file or a diffusers folder) in "
                "`models/Stable-diffusion` and press Refresh.\n\n"
                f"Choosing it sets the training size to **{demo_size(model)} px**: its images "
                "are noise at any size, and on a CPU a step at 512 px takes seconds instead of "
                "a fraction of one. Choosing a real model puts 512 px back (a size you typed stays).")
    return ""


__all__ = ["model_choices", "checkpoint_choices", "default_model", "refreshed", "demo_note",
           "labelled", "value_of", "list_embeddings", "list_templates", "REFRESH"]
