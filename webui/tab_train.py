"""Train tab: a method picker, each method's form, Train / Interrupt / Export config, and the
live view of the running job (status, loss plot, previews)."""
from __future__ import annotations

import gradio as gr

from core.config import ConfigError, coerce, to_toml
from core.jobs import Busy, JobRunner
from core.paths import Paths
from trainers.launch import process_choices
from trainers.preflight import check_before_queueing
from webui import choices as ch
from webui import live
from webui.forms import error_text, to_config
from webui.method_forms import MethodForm, build_section, dropdown_sources, method_forms


def build(paths: Paths, runner: JobRunner) -> dict:
    forms = method_forms()
    sources = dropdown_sources(paths)
    picker = process_choices()  # None: one GPU (or none), no picker
    sections = []
    with gr.Tab("Train", id="train"):
        gr.Markdown("Train on a folder of images. Loss and previews appear on the right while it "
                    "runs; reloading the page re-attaches to the running job.")
        with gr.Row():
            method = gr.Radio([(f.title, f.key) for f in forms], value=forms[0].key,
                              label="Method", elem_id="train-method", scale=4)
            refresh = gr.Button(ch.REFRESH, scale=0, min_width=90, elem_id="train-refresh")
        note = gr.Markdown(ch.demo_note(ch.default_model(paths)))
        with gr.Row():
            with gr.Column(scale=1):
                for form in forms:
                    with gr.Group(visible=form is forms[0]) as section:
                        build_section(form, sources)
                        if form.extras is not None:
                            form.extras(form, paths)
                    sections.append(section)
            with gr.Column(scale=1):
                with gr.Row():
                    train = gr.Button("Train", variant="primary", elem_id="train-start")
                    enqueue = gr.Button("Add to queue", elem_id="train-enqueue")
                    interrupt = gr.Button("Interrupt", variant="stop", elem_id="train-interrupt")
                    export = gr.Button("Export config", elem_id="train-export")
                    memory = gr.Button("Estimate memory", elem_id="train-memory")
                processes = gr.Dropdown(
                    picker[1] if picker else [1], value=1, label=picker[0] if picker else "GPUs",
                    visible=picker is not None, elem_id="train-processes",
                    info="More than 1 trains data-parallel in `accelerate launch` processes, one "
                         "per GPU: each step trains batch size x processes images.")
                message = gr.Markdown(elem_id="train-message")
                exported = gr.Code(label="Settings as TOML (python -m trainers METHOD --config "
                                   "run.toml)", language=None, visible=False, elem_id="train-toml")
                status = gr.Markdown(live.status_text(_snap(runner)), elem_id="train-status")
                plot = gr.LinePlot(None, x="step", y="loss", color="series",
                                   title="Loss", height=260, elem_id="train-loss",
                                   color_map={"loss": "#9ab8e6", "smoothed": "#e6550d"})
                gallery = gr.Gallery(label="Previews (newest first)", columns=4, height=320,
                                     elem_id="train-previews")
                with gr.Accordion("Queue", open=True):
                    queue_view = gr.Markdown(_queue_text(runner), elem_id="train-queue")
                    with gr.Row():
                        queue_id = gr.Number(label="Job id", precision=0, elem_id="train-queue-id")
                        up = gr.Button("Up", elem_id="train-queue-up")
                        down = gr.Button("Down", elem_id="train-queue-down")
                        remove = gr.Button("Remove", elem_id="train-queue-remove")
        seen = gr.State(live.Watch())
        timer = gr.Timer(1.0)

    all_inputs = [c for form in forms for c in form.controls.values()]

    def split(values) -> dict[str, list]:
        out, index = {}, 0
        for form in forms:
            out[form.key] = list(values[index:index + len(form.controls)])
            index += len(form.controls)
        return out

    def config_of(key: str, values):
        form = next((f for f in forms if f.key == key), None)
        if form is None:
            raise ConfigError(f"method: choose one of {', '.join(f.key for f in forms)}")
        return form, to_config(form.config, form.names, split(values)[key])

    def submit(key, count, values, queue: bool):
        from trainers.memory_estimate import estimate_for
        from trainers.registry import job_parts
        try:
            _, cfg = config_of(key, values)
            check_before_queueing(cfg, paths)
            name, kind, fn, spec = job_parts(key, cfg, process_count(count))
            job = runner.submit(name, kind, fn, config=cfg, queue=queue, spec=spec)
        except (ConfigError, Busy) as error:
            return error_text(error)
        verb = "Queued" if queue else "Started"
        return f"{verb} job {job.id}: {job.name}. {estimate_for(cfg, paths).text()}"

    def process_count(value) -> int:
        allowed = picker[1] if picker else [1]
        if value in (None, ""):
            return 1
        try:
            number = int(str(value).strip())
        except ValueError:
            number = None
        if number not in allowed:
            raise ConfigError(f"processes: choose one of {', '.join(map(str, allowed))}, got "
                              f"{str(value)[:40]!r}")
        return number

    def start(key, count, *values):
        return submit(key, count, values, queue=False)

    def add_to_queue(key, count, *values):
        return submit(key, count, values, queue=True), _queue_text(runner)

    def move(job_id, offset):
        if job_id is None or job_id == "":
            return "Type a job id from the queue.", _queue_text(runner)
        try:
            number = coerce("job id", job_id, int)
        except ConfigError as error:
            return error_text(error), _queue_text(runner)
        done = runner.move(number, offset) if offset else runner.stop(number)
        if not done:
            return f"Job {number} is not waiting in the queue.", _queue_text(runner)
        return "", _queue_text(runner)

    def stop():
        return "Interrupting: the job saves and stops after this step." if runner.stop() \
            else "Nothing is running."

    def export_toml(key, *values):
        try:
            _, cfg = config_of(key, values)
        except ConfigError as error:
            return error_text(error), gr.update(visible=False)
        return "", gr.update(value=to_toml(cfg), visible=True)

    def estimate_memory(key, *values):
        from trainers.memory_estimate import estimate_for
        try:
            _, cfg = config_of(key, values)
        except ConfigError as error:
            return error_text(error)
        return estimate_for(cfg, paths).text()

    async def poll(watch: live.Watch):
        """The timer's tick: only what changed, and only the loss points this page lacks. A
        coroutine, so gradio runs it on its event loop (it takes well under a millisecond when
        nothing changed) instead of handing each of many pages' polls to a worker thread that
        fights the training thread for the GIL."""
        changed = live.refresh(runner, watch)
        return (changed.get("status", gr.skip()),
                changed["plot"] if "plot" in changed else gr.skip(),
                changed.get("gallery", gr.skip()),
                _queue_text(runner) if changed.get("queue") else gr.skip(),
                watch)

    dropdowns = [(name, c) for form in forms for name, c in form.controls.items() if name in sources]

    def refresh_all(*current):
        return [ch.refreshed(sources[name](), value) for (name, _), value in zip(dropdowns, current)]

    def show(key):
        return [gr.update(visible=form.key == key) for form in forms]

    def fill(key: str | None, cfg) -> list:
        """Updates that show method `key` with the values of `cfg` (a config or a dict)."""
        form = next((f for f in forms if f.key == key), None)
        if form is None or cfg is None:
            return [gr.skip()] * (1 + len(sections) + len(all_inputs))
        value = (lambda name: cfg.get(name)) if isinstance(cfg, dict) else (lambda name: getattr(cfg, name))
        updates = [gr.update(value=form.key)] + show(form.key)
        for other in forms:
            for name in other.controls:
                wanted = value(name) if other is form else None
                updates.append(gr.skip() if other is not form or wanted is None
                               else gr.update(value=", ".join(map(str, wanted)) if isinstance(wanted, list) else wanted))
        return updates

    def restore_form():
        """A fresh page shows the settings of the running (or last) job."""
        job = runner.latest("train")
        cfg = getattr(job, "config", None)
        form = next((f for f in forms if type(cfg) is f.config), None)
        return fill(form.key if form else None, cfg)

    method.change(show, method, sections)
    train.click(start, [method, processes] + all_inputs, message)
    interrupt.click(stop, None, message)
    export.click(export_toml, [method] + all_inputs, [message, exported])
    memory.click(estimate_memory, [method] + all_inputs, message)
    timer.tick(poll, seen, [status, plot, gallery, queue_view, seen], show_progress="hidden",
               queue=False)  # a direct HTTP call: no queue, event stream or SSE (see live.py)
    quiet = {"show_progress": "hidden"}
    enqueue.click(add_to_queue, [method, processes] + all_inputs, [message, queue_view], **quiet)
    up.click(lambda job_id: move(job_id, -1), queue_id, [message, queue_view], **quiet)
    down.click(lambda job_id: move(job_id, 1), queue_id, [message, queue_view], **quiet)
    remove.click(lambda job_id: move(job_id, 0), queue_id, [message, queue_view], **quiet)
    refresh.click(refresh_all, [c for _, c in dropdowns], [c for _, c in dropdowns])
    for form in forms:
        form.controls["model"].change(ch.demo_note, form.controls["model"], note)
    return {"forms": forms, "restore": (restore_form, [method] + sections + all_inputs),
            "fill": fill,
            "dropdowns": dropdowns, "refresh_all": refresh_all}


def _queue_text(runner: JobRunner) -> str:
    waiting = runner.queued()
    if not waiting:
        return "No jobs are waiting. *Add to queue* lines up runs that start one after another."
    return "\n".join(f"{i}. job **{job.id}** — {job.name}" for i, job in enumerate(waiting, 1))


def _snap(runner: JobRunner):
    job = runner.latest("train")
    return job.snapshot() if job else None
