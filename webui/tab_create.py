"""Create embedding tab."""
from __future__ import annotations

import gradio as gr

from core.config import ConfigError
from core.paths import Paths
from trainers.configs import CreateEmbeddingConfig
from webui import choices as ch
from webui.forms import control, error_text, to_config

FIELDS = ["name", "init_text", "vectors_per_token", "overwrite", "file_format", "model"]


def build(paths: Paths) -> dict:
    with gr.Tab("Create embedding", id="create"):
        gr.Markdown("A new textual-inversion embedding, saved in `embeddings/` in A1111's format.")
        with gr.Row():
            model = control(CreateEmbeddingConfig, "model", value=ch.default_model(paths),
                            choices=ch.model_choices(paths), scale=4)
            refresh = gr.Button(ch.REFRESH, scale=0, min_width=90, elem_id="create-refresh")
        note = gr.Markdown(ch.demo_note(ch.default_model(paths)))
        name = control(CreateEmbeddingConfig, "name")
        init_text = control(CreateEmbeddingConfig, "init_text")
        vectors = control(CreateEmbeddingConfig, "vectors_per_token")
        with gr.Row():
            file_format = control(CreateEmbeddingConfig, "file_format")
            overwrite = control(CreateEmbeddingConfig, "overwrite")
        button = gr.Button("Create embedding", variant="primary", elem_id="create-embedding")
        message = gr.Markdown(elem_id="create-message")

    def create(*values):
        from trainers.embeddings import EmbeddingExists, create_embedding
        try:
            cfg = to_config(CreateEmbeddingConfig, FIELDS, values)
            path = create_embedding(cfg, paths)
        except (ConfigError, EmbeddingExists, ValueError, OSError) as error:
            return error_text(error)
        return f"Created `{path}`."

    refresh.click(lambda current: ch.refreshed(ch.model_choices(paths), current), model, model)
    model.change(ch.demo_note, model, note)
    event = button.click(create, [name, init_text, vectors, overwrite, file_format, model], message)
    return {"model": model, "created": event}
