"""Assemble the page from its tabs."""
from __future__ import annotations

import gradio as gr

from core.jobs import JobRunner
from core.paths import Paths
from webui import tab_checkpoints, tab_create, tab_preprocess, tab_train
from webui.blocks import Blocks


def build_app(paths: Paths, runner: JobRunner) -> gr.Blocks:
    with Blocks(title="Danlu") as app:
        gr.Markdown("# 丹炉 Danlu\nTrain Stable Diffusion embeddings, hypernetworks, LoRA and DreamBooth on your own machine.")
        with gr.Tabs() as tabs:
            created = tab_create.build(paths)
            trained = tab_train.build(paths, runner)
            checkpoints = tab_checkpoints.build(paths, runner)
            tab_preprocess.build(paths, runner)
        dropdowns = [c for _, c in trained["dropdowns"]]
        for event in created["created"]:
            event.then(trained["refresh_all"], dropdowns, dropdowns)
        restore, outputs = trained["restore"]
        app.load(restore, None, outputs)
        restore_checkpoints, checkpoint_outputs = checkpoints["restore"]
        app.load(restore_checkpoints, None, checkpoint_outputs)
        config_of = checkpoints["config_of"]

        def train_again(run_id):
            found = config_of(run_id) if run_id else None
            return trained["fill"](*(found or (None, None))) + [gr.Tabs(selected="train")]
        checkpoints["train_again"].click(train_again, checkpoints["run"], outputs + [tabs])
    return app
