"""Create embedding and Create hypernetwork tabs."""
from __future__ import annotations

import gradio as gr

from core.config import ConfigError
from core.paths import Paths
from trainers.configs import CreateEmbeddingConfig, CreateHypernetworkConfig
from trainers.hypernetwork_sizes import model_sizes, sizes_text
from trainers.preflight import check_before_queueing
from webui import choices as ch
from webui.forms import control, error_text, to_config

EMBEDDING_FIELDS = ["name", "init_text", "vectors_per_token", "overwrite", "file_format", "model"]
HYPERNETWORK_FIELDS = ["name", "sizes", "layer_structure", "activation_func",
                       "weight_initialization", "add_layer_norm", "use_dropout",
                       "dropout_structure", "overwrite", "model"]


def _model_row(cls, paths: Paths):
    with gr.Row():
        model = control(cls, "model", value=ch.default_model(paths),
                        choices=ch.model_choices(paths), scale=4)
        refresh = gr.Button(ch.REFRESH, scale=0, min_width=90)
    note = gr.Markdown(ch.demo_note(ch.default_model(paths)))
    refresh.click(lambda current: ch.refreshed(ch.model_choices(paths), current), model, model)
    model.change(ch.demo_note, model, note)
    return model


def build_embedding(paths: Paths):
    with gr.Tab("Create embedding", id="create"):
        gr.Markdown("A new textual-inversion embedding, saved in `embeddings/` in A1111's format.")
        model = _model_row(CreateEmbeddingConfig, paths)
        name = control(CreateEmbeddingConfig, "name")
        init_text = control(CreateEmbeddingConfig, "init_text")
        vectors = control(CreateEmbeddingConfig, "vectors_per_token")
        with gr.Row():
            file_format = control(CreateEmbeddingConfig, "file_format")
            overwrite = control(CreateEmbeddingConfig, "overwrite")
        button = gr.Button("Create embedding", variant="primary", elem_id="create-embedding")
        message = gr.Markdown(elem_id="create-message")

    def create(*values):
        from trainers.embeddings import create_embedding
        try:
            cfg = to_config(CreateEmbeddingConfig, EMBEDDING_FIELDS, values)
            check_before_queueing(cfg, paths)
            path = create_embedding(cfg, paths)
        except (ConfigError, ValueError, OSError) as error:
            return error_text(error)
        return f"Created `{path}`."

    return button.click(create, [name, init_text, vectors, overwrite, file_format, model], message)


def _sizes_for(paths: Paths, model: str | None, current: str | None = None) -> str:
    """The module sizes of the chosen model (SD1 768, 320, 640, 1280; SD2 1024, ...; SDXL 2048,
    640, 1280); what is typed stays when the model's sizes cannot be told without loading it."""
    sizes = model_sizes(paths, model if isinstance(model, str) else "")
    return sizes_text(sizes) if sizes else (current or "768, 320, 640, 1280")


def build_hypernetwork(paths: Paths):
    cls = CreateHypernetworkConfig
    with gr.Tab("Create hypernetwork", id="create-hypernetwork"):
        gr.Markdown("A new hypernetwork, saved in `models/hypernetworks/` in A1111's format. It "
                    "changes the attention layers whose width is one of its modules.")
        model = _model_row(cls, paths)
        controls = {"name": control(cls, "name"),
                    "sizes": control(cls, "sizes", value=_sizes_for(paths, ch.default_model(paths)),
                                     info="Comma-separated widths, set from the chosen model: "
                                          "768 (SD1), 1024 (SD2) or 2048 (SDXL) for "
                                          "cross-attention, 320/640/1280 for the U-Net's "
                                          "self-attention (SDXL has 640 and 1280)."),
                    "layer_structure": control(cls, "layer_structure")}
        model.change(lambda chosen, typed: _sizes_for(paths, chosen, typed),
                     [model, controls["sizes"]], controls["sizes"])
        with gr.Row():
            controls["activation_func"] = control(cls, "activation_func")
            controls["weight_initialization"] = control(cls, "weight_initialization")
        with gr.Row():
            controls["add_layer_norm"] = control(cls, "add_layer_norm")
            controls["use_dropout"] = control(cls, "use_dropout")
            controls["overwrite"] = control(cls, "overwrite")
        controls["dropout_structure"] = control(cls, "dropout_structure")
        controls["model"] = model
        button = gr.Button("Create hypernetwork", variant="primary", elem_id="create-hypernetwork-button")
        message = gr.Markdown(elem_id="create-hypernetwork-message")

    def create(*values):
        from trainers.hypernetworks import create_hypernetwork
        try:
            cfg = to_config(cls, HYPERNETWORK_FIELDS, values)
            check_before_queueing(cfg, paths)
            path = create_hypernetwork(cfg, paths)
        except (ConfigError, ValueError, OSError) as error:
            return error_text(error)
        return f"Created `{path}`."

    return button.click(create, [controls[n] for n in HYPERNETWORK_FIELDS], message)


def build(paths: Paths) -> dict:
    from webui import tab_aesthetic
    created = [build_embedding(paths), build_hypernetwork(paths)]
    tab_aesthetic.build(paths)
    return {"created": created}
