"""The fine-tune form's 'Make metadata JSON' button: merge the image folder's caption and tag
files into the metadata JSON the form names (kohya's merge and clean steps)."""
from __future__ import annotations

import gradio as gr

from core.config import ConfigError, from_dict
from webui.forms import error_text


def metadata_button(form, paths) -> None:
    with gr.Row():
        button = gr.Button("Make metadata JSON", elem_id="finetune-make-json", scale=0,
                           min_width=200)
        result = gr.Markdown(elem_id="finetune-json-result")
    names = ["train_data_dir", "in_json", "caption_extension", "tag_extension", "clean_captions",
             "anime_caption_rules"]

    def make(*values):
        from trainers.finetune_metadata import make_for_config
        try:
            cfg = from_dict(form.config, dict(zip(names, values)))
            return make_for_config(cfg, paths)
        except (ConfigError, ValueError, OSError) as error:
            return error_text(error)

    button.click(make, [form.controls[n] for n in names], result)
