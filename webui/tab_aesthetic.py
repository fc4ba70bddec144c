"""Aesthetic embedding tab: make one from a folder of images with a local CLIP model, and
preview a prompt with and without aesthetic-gradient steering (the cost is shown)."""
from __future__ import annotations

import gradio as gr

from core.config import ConfigError
from core.paths import Paths
from trainers.configs import AestheticEmbeddingConfig, AestheticPreviewConfig
from webui import choices as ch
from webui.forms import control, error_text, to_config

CREATE_FIELDS = ["name", "data_root", "clip_model", "batch_size", "overwrite"]
PREVIEW_FIELDS = ["model", "aesthetic_embedding", "clip_model", "prompt", "negative",
                  "aesthetic_steps", "aesthetic_lr", "aesthetic_weight", "aesthetic_slerp",
                  "aesthetic_text", "aesthetic_slerp_angle", "aesthetic_text_negative", "seed",
                  "steps", "cfg_scale", "sampler", "width", "height", "clip_skip"]


def _embeddings(paths: Paths) -> list[str]:
    from trainers.aesthetic_files import list_aesthetic_embeddings
    return list_aesthetic_embeddings(paths)


def build(paths: Paths):
    make, show = AestheticEmbeddingConfig, AestheticPreviewConfig
    with gr.Tab("Aesthetic embedding", id="aesthetic"):
        gr.Markdown("The normalized mean CLIP image embedding of a folder of images, saved in "
                    "`models/aesthetic_embeddings/` as A1111's aesthetic-gradients extension "
                    "expects. At generation time it steers a prompt: a copy of the CLIP text "
                    "encoder is tuned a few steps toward it, then mixed in by the weight "
                    "(linearly, or by slerp). An aesthetic text turns the target toward (or "
                    "away from) that text by the slerp angle first.")
        created = {n: control(make, n, elem_id=f"aesthetic-{n}") for n in CREATE_FIELDS}
        create_button = gr.Button("Create aesthetic embedding", variant="primary",
                                  elem_id="aesthetic-create")
        create_message = gr.Markdown(elem_id="aesthetic-message")
        gr.Markdown("### Preview with steering")
        with gr.Row():
            model = control(show, "model", value=ch.default_model(paths),
                            choices=ch.model_choices(paths), elem_id="aesthetic-model")
            names = _embeddings(paths)
            embedding = control(show, "aesthetic_embedding", choices=names,
                                value=names[0] if names else None, allow_custom_value=True,
                                elem_id="aesthetic-embedding")
            refresh = gr.Button(ch.REFRESH, scale=0, min_width=90, elem_id="aesthetic-refresh")
        shown = {"model": model, "aesthetic_embedding": embedding}
        for start in range(2, len(PREVIEW_FIELDS), 3):
            with gr.Row():
                for n in PREVIEW_FIELDS[start:start + 3]:
                    shown[n] = control(show, n, elem_id=f"aesthetic-preview-{n}")
        preview_button = gr.Button("Preview with steering", elem_id="aesthetic-preview")
        cost = gr.Markdown(elem_id="aesthetic-cost")
        gallery = gr.Gallery(label="Without / with steering", columns=2, height=320,
                             elem_id="aesthetic-images")

    def create(*values):
        from trainers.aesthetic import create_aesthetic_embedding
        notes: list[str] = []
        try:
            path = create_aesthetic_embedding(to_config(make, CREATE_FIELDS, values), paths,
                                              report=notes.append)
        except (ConfigError, ValueError, OSError) as error:
            return error_text(error), gr.skip()
        skipped = "".join(f"\n\n{note}" for note in notes if note.startswith("Skipped"))
        return f"Created `{path}`.{skipped}", ch.refreshed(_embeddings(paths), path.stem)

    def render(*values):
        from trainers.aesthetic import preview_from_config
        try:
            plain, steered, line = preview_from_config(to_config(show, PREVIEW_FIELDS, values), paths)
        except (ConfigError, ValueError, OSError) as error:
            return error_text(error), gr.skip()
        return line, [(str(plain), "without steering"), (str(steered), "with steering")]

    create_button.click(create, [created[n] for n in CREATE_FIELDS], [create_message, embedding])
    preview_button.click(render, [shown[n] for n in PREVIEW_FIELDS], [cost, gallery])
    refresh.click(lambda current: ch.refreshed(_embeddings(paths), current), embedding, embedding)
