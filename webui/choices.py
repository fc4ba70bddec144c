"""Dropdown choices read from disk (models, embeddings, templates) with refresh helpers."""
from __future__ import annotations

import gradio as gr

from core.paths import Paths
from trainers.captions import list_templates
from trainers.embeddings import list_embeddings
from trainers.models import list_models
from trainers.tiny_model import DEMO_NAME

REFRESH = "Refresh"


def model_choices(paths: Paths) -> list[str]:
    return list_models(paths)


def default_model(paths: Paths) -> str:
    return model_choices(paths)[0]


def refreshed(choices: list[str], current: str | None):
    value = current if current in choices else (choices[0] if choices else None)
    return gr.update(choices=choices, value=value)


def demo_note(model: str | None) -> str:
    if model == DEMO_NAME:
        return ("ℹ️ **tiny-demo** is Danlu's built-in demo model: random weights, built on this "
                "machine, so every tab works without a download. Its images are noise. Put a real "
                "model (a .safetensors file or a diffusers folder) in `models/Stable-diffusion` "
                "and press Refresh.")
    return ""


__all__ = ["model_choices", "default_model", "refreshed", "demo_note", "list_embeddings",
           "list_templates", "REFRESH"]
