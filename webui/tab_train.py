"""Train tab: the form, Train / Interrupt / Export config, and the live view of the job."""
from __future__ import annotations

import gradio as gr

from core.config import ConfigError, to_toml
from core.jobs import Busy, JobRunner
from core.paths import Paths
from trainers.configs import TextualInversionConfig
from trainers.preflight import check_template_training
from webui import choices as ch
from webui import live
from webui.forms import control, error_text, to_config

TI = TextualInversionConfig
DATA = ["data_root", "template", "width", "height", "varsize", "filename_word_regex",
        "filename_join_string", "shuffle_tags", "tag_drop_out", "latent_sampling", "use_weight"]
OPTIM = ["learn_rate", "batch_size", "gradient_accumulation", "steps", "clip_grad_mode",
         "clip_grad_value", "seed"]
OUTPUT = ["log_directory", "save_every", "preview_every", "save_image_with_embedded",
          "preview_prompt", "preview_negative", "preview_seed", "preview_steps", "preview_cfg",
          "preview_sampler"]


def build(paths: Paths, runner: JobRunner) -> dict:
    controls: dict[str, gr.components.Component] = {}
    with gr.Tab("Train", id="train"):
        gr.Markdown("Train an embedding on a folder of images. Loss and previews appear below "
                    "while it runs; reloading the page re-attaches to the running job.")
        with gr.Row():
            controls["embedding"] = control(TI, "embedding", value=None, scale=4,
                                            choices=ch.list_embeddings(paths))
            controls["model"] = control(TI, "model", choices=ch.model_choices(paths),
                                        value=ch.default_model(paths), scale=4)
            refresh = gr.Button(ch.REFRESH, scale=0, min_width=90, elem_id="train-refresh")
        note = gr.Markdown(ch.demo_note(ch.default_model(paths)))
        with gr.Row():
            with gr.Column(scale=1):
                with gr.Accordion("Dataset and prompts", open=True):
                    _rows(controls, paths, DATA)
                with gr.Accordion("Optimization", open=True):
                    _rows(controls, paths, OPTIM)
                with gr.Accordion("Saving and previews", open=False):
                    _rows(controls, paths, OUTPUT)
            with gr.Column(scale=1):
                with gr.Row():
                    train = gr.Button("Train embedding", variant="primary", elem_id="train-start")
                    interrupt = gr.Button("Interrupt", variant="stop", elem_id="train-interrupt")
                    export = gr.Button("Export config", elem_id="train-export")
                message = gr.Markdown(elem_id="train-message")
                exported = gr.Code(label="Settings as TOML (for python -m trainers textual_inversion "
                                   "--config run.toml)", language=None, visible=False,
                                   elem_id="train-toml")
                status = gr.Markdown(live.status_text(_snap(runner)), elem_id="train-status")
                plot = gr.LinePlot(live.loss_frame([]), x="step", y="loss", color="series",
                                   title="Loss", height=260, elem_id="train-loss",
                                   color_map={"loss": "#9ab8e6", "smoothed": "#e6550d"})
                gallery = gr.Gallery(label="Previews (newest first)", columns=4, height=320,
                                     elem_id="train-previews")
        seen = gr.State((None, -1, -1, None))
        timer = gr.Timer(1.0)

    names = list(controls)
    inputs = [controls[n] for n in names]

    def start(*values):
        from trainers.registry import runner as method_runner
        try:
            cfg = to_config(TI, names, values)
            check_template_training(cfg, paths)
            run = method_runner("textual_inversion")
            job = runner.submit(f"textual inversion: {cfg.embedding}", "train",
                                lambda ctx: run(cfg, ctx), config=cfg)
        except (ConfigError, Busy) as error:
            return error_text(error)
        return f"Started job {job.id}: training `{cfg.embedding}`."

    def stop():
        return "Interrupting: the job saves and stops after this step." if runner.stop() \
            else "Nothing is running."

    def export_toml(*values):
        try:
            cfg = to_config(TI, names, values)
        except ConfigError as error:
            return error_text(error), gr.update(visible=False)
        return "", gr.update(value=to_toml(cfg), visible=True)

    def poll(state):
        job = runner.latest("train")
        if job is None:
            return gr.skip(), gr.skip(), gr.skip(), state
        snap = job.snapshot()
        key = (job.id, len(snap["losses"]), len(snap["previews"]), snap["state"])
        if key == tuple(state):
            return gr.skip(), gr.skip(), gr.skip(), state
        changed_plot = key[:2] != tuple(state)[:2]
        changed_gallery = (key[0], key[2]) != (state[0], state[2])
        return (live.status_text(snap),
                live.loss_frame(snap["losses"]) if changed_plot else gr.skip(),
                live.gallery_items(snap["previews"]) if changed_gallery else gr.skip(),
                key)

    def refresh_all(embedding, model, template):
        return (ch.refreshed(ch.list_embeddings(paths), embedding),
                ch.refreshed(ch.model_choices(paths), model),
                ch.refreshed(ch.list_templates(paths.templates), template))

    train.click(start, inputs, message)
    interrupt.click(stop, None, message)
    export.click(export_toml, inputs, [message, exported])
    timer.tick(poll, seen, [status, plot, gallery, seen], show_progress="hidden")
    refresh.click(refresh_all, [controls["embedding"], controls["model"], controls["template"]],
                  [controls["embedding"], controls["model"], controls["template"]])
    controls["model"].change(ch.demo_note, controls["model"], note)
    return {"embedding": controls["embedding"], "refresh_embeddings":
            lambda current: ch.refreshed(ch.list_embeddings(paths), current)}


def _rows(controls: dict, paths: Paths, names: list[str], per_row: int = 2) -> None:
    for start in range(0, len(names), per_row):
        with gr.Row():
            for name in names[start:start + per_row]:
                if name == "template":
                    controls[name] = control(TI, name, choices=ch.list_templates(paths.templates))
                else:
                    controls[name] = control(TI, name)


def _snap(runner: JobRunner):
    job = runner.latest("train")
    return job.snapshot() if job else None
