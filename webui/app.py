"""Assemble the page from its tabs."""
from __future__ import annotations

import gradio as gr

from core.jobs import JobRunner
from core.paths import Paths
from webui import tab_create, tab_preprocess, tab_train


def build_app(paths: Paths, runner: JobRunner) -> gr.Blocks:
    with gr.Blocks(title="Danlu") as app:
        gr.Markdown("# 丹炉 Danlu\nTrain Stable Diffusion embeddings, hypernetworks and LoRA on your own machine.")
        with gr.Tabs():
            created = tab_create.build(paths)
            trained = tab_train.build(paths, runner)
            tab_preprocess.build(paths, runner)
        dropdowns = [c for _, c in trained["dropdowns"]]
        for event in created["created"]:
            event.then(trained["refresh_all"], dropdowns, dropdowns)
        restore, outputs = trained["restore"]
        app.load(restore, None, outputs)
    return app
