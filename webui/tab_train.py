"""Train tab: a method picker, each method's form, Train / Interrupt / Export config, and the
live view of the running job (status, loss plot, previews)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import gradio as gr

from core.config import ConfigError, coerce, to_toml
from core.jobs import Busy, JobRunner
from core.paths import Paths
from trainers.launch import process_choices
from trainers import vram_fit
from trainers.preflight import check_before_queueing
from webui import choices as ch
from webui import live
from webui.forms import error_text, to_config
from webui.handlers import Handlers
from webui.method_forms import (MethodForm, build_section, demo_size_values, dropdown_sources,
                                fallback_choice, method_forms, size_fields, size_values)


def build(paths: Paths, runner: JobRunner) -> dict:
    forms = method_forms()
    sources = dropdown_sources(paths)
    picker = process_choices()  # None: one GPU (or none), no picker
    page = _layout(forms, sources, picker, paths, runner)
    handlers = _Handlers(paths, runner, page, sources, picker)
    _wire(page, handlers)
    return {"forms": forms, "restore": (handlers.restore_form, page.restore_outputs()),
            "fill": handlers.fill, "buttons": page.buttons,
            "dropdowns": handlers.dropdowns, "refresh_all": handlers.refresh_all}


class _Page:
    """The tab's components, set by _layout; the handlers and _wire read them."""
    forms: list[MethodForm]
    method: gr.Radio
    refresh: gr.Button
    note: gr.Markdown
    sections: list[gr.Group]  # per form
    buttons: list[FormButtons]  # per form: its own Train / Add to queue / Export / Estimate
    interrupt: gr.Button
    processes: gr.Dropdown
    message: gr.Markdown
    exported: gr.Code
    status: gr.Markdown
    plot: gr.LinePlot
    gallery: gr.Gallery
    queue_view: gr.Markdown
    queue_id: gr.Number
    up: gr.Button
    down: gr.Button
    remove: gr.Button
    seen: gr.State
    timer: gr.Timer

    def panels(self) -> list:
        """Shown together with their method."""
        return self.sections + [b.row for b in self.buttons]

    def all_inputs(self) -> list:
        return [c for form in self.forms for c in form.controls.values()]

    def restore_outputs(self) -> list:
        return [self.method] + self.panels() + self.all_inputs() + [self.message]


def _layout(forms: list[MethodForm], sources: dict, picker, paths: Paths,
            runner: JobRunner) -> _Page:
    page = _Page()
    page.forms = forms
    with gr.Tab("Train", id="train"):
        gr.Markdown("Train on a folder of images. Loss and previews appear on the right while it "
                    "runs; reloading the page re-attaches to the running job.")
        with gr.Row():
            page.method = gr.Radio([(f.title, f.key) for f in forms], value=forms[0].key,
                                   label="Method", elem_id="train-method", scale=4)
            page.refresh = gr.Button(ch.REFRESH, scale=0, min_width=90, elem_id="train-refresh")
        page.note = gr.Markdown(ch.demo_note(ch.default_model(paths)), elem_id="train-model-note")
        with gr.Row():
            with gr.Column(scale=1):
                page.sections = _form_sections(forms, sources, paths)
            with gr.Column(scale=1):
                _job_column(page, picker, runner)
        page.seen = gr.State(live.Watch())
        page.timer = gr.Timer(1.0)
    return page


def _form_sections(forms: list[MethodForm], sources: dict, paths: Paths) -> list[gr.Group]:
    sections = []
    for form in forms:
        # every form is in the page from the start ("hidden", not False): a form
        # first shown later would mount while the user types into it
        with gr.Group(visible=True if form is forms[0] else "hidden") as section:
            build_section(form, sources)
            if form.extras is not None:
                form.extras(form, paths)
        sections.append(section)
    return sections


def _job_column(page: _Page, picker, runner: JobRunner) -> None:
    """The buttons, the job's live view and the queue."""
    page.buttons = []
    with gr.Row():
        for form in page.forms:
            with gr.Row(visible=form is page.forms[0]) as row:
                buttons = FormButtons(
                    row, gr.Button("Train", variant="primary", elem_id="train-start"),
                    gr.Button("Add to queue", elem_id="train-enqueue"),
                    gr.Button("Export config", elem_id="train-export"),
                    gr.Button("Estimate memory", elem_id="train-memory"))
                if "gradient_checkpointing" in form.names:
                    buttons.vram = gr.Dropdown(
                        [*vram_fit.CHOICES, vram_fit.DETECT], value=default_vram(),
                        label="Card", elem_id="train-vram", scale=0, min_width=160,
                        info="Fit my GPU sets the memory options to the cheapest that fit")
                    buttons.fit = gr.Button("Fit my GPU", elem_id="train-fit")
                page.buttons.append(buttons)
        page.interrupt = gr.Button("Interrupt", variant="stop", elem_id="train-interrupt")
    page.processes = gr.Dropdown(
        picker[1] if picker else [1], value=1, label=picker[0] if picker else "GPUs",
        visible=picker is not None, elem_id="train-processes",
        info="More than 1 trains data-parallel in `accelerate launch` processes, one "
             "per GPU: each step trains batch size x processes images.")
    page.message = gr.Markdown(elem_id="train-message")
    page.exported = gr.Code(label="Settings as TOML (python -m trainers METHOD --config "
                            "run.toml)", language=None, visible=False, elem_id="train-toml")
    page.status = gr.Markdown(live.status_text(_snap(runner)), elem_id="train-status")
    page.plot = gr.LinePlot(None, x="step", y="loss", color="series",
                            title="Loss", height=260, elem_id="train-loss",
                            color_map={"loss": "#9ab8e6", "smoothed": "#e6550d",
                                       "validation": live.VALIDATION_COLOR})
    page.gallery = gr.Gallery(label="Previews (newest first)", columns=4, height=320,
                              elem_id="train-previews")
    with gr.Accordion("Queue", open=True):
        page.queue_view = gr.Markdown(_queue_text(runner), elem_id="train-queue")
        with gr.Row():
            page.queue_id = gr.Number(label="Job id", precision=0, elem_id="train-queue-id")
            page.up = gr.Button("Up", elem_id="train-queue-up")
            page.down = gr.Button("Down", elem_id="train-queue-down")
            page.remove = gr.Button("Remove", elem_id="train-queue-remove")


class _Handlers(Handlers):
    def __init__(self, paths: Paths, runner: JobRunner, page: _Page, sources: dict, picker):
        self.paths, self.runner, self.sources, self.picker = paths, runner, sources, picker
        self.forms = page.forms
        self.panels = page.panels()
        self.all_inputs = page.all_inputs()
        self.dropdowns = [(name, c) for form in self.forms for name, c in form.controls.items()
                          if name in sources]
        super().__init__()

    def submit(self, form: MethodForm, count, values, queue: bool):
        from trainers.memory_estimate import estimate_for
        from webui.jobs import job_parts
        try:
            cfg = to_config(form.config, form.names, values)
            check_before_queueing(cfg, self.paths)
            name, kind, fn, spec = job_parts(form.key, cfg, self.process_count(count))
            job = self.runner.submit(name, kind, fn, config=cfg, queue=queue, spec=spec)
        except (ConfigError, Busy) as error:
            return error_text(error)
        verb = "Queued" if queue else "Started"
        return f"{verb} job {job.id}: {job.name}. {estimate_for(cfg, self.paths).text()}"

    def process_count(self, value) -> int:
        allowed = self.picker[1] if self.picker else [1]
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

    def move(self, job_id, offset):
        runner = self.runner
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

    def stop(self):
        return "Interrupting: the job saves and stops after this step." if self.runner.stop() \
            else "Nothing is running."

    async def poll(self, watch: live.Watch):
        """The timer's tick: only what changed, and only the loss points this page lacks. A
        coroutine, so gradio runs it on its event loop (it takes well under a millisecond when
        nothing changed) instead of handing each of many pages' polls to a worker thread that
        fights the training thread for the GIL."""
        changed = live.refresh(self.runner, watch)
        return (changed.get("status", gr.skip()),
                changed["plot"] if "plot" in changed else gr.skip(),
                changed.get("gallery", gr.skip()),
                _queue_text(self.runner) if changed.get("queue") else gr.skip(),
                watch)

    def refresh_all(self, *current):
        return [ch.refreshed(self.sources[name](), value)
                for (name, _), value in zip(self.dropdowns, current)]

    def show(self, key):
        return [gr.update(visible=True if form.key == key else "hidden") for form in self.forms] + \
            [gr.update(visible=form.key == key) for form in self.forms]

    def fill(self, key: str | None, cfg, page_values: bool = False) -> list:
        """Updates that show method `key` with the values of `cfg` (a config or a dict), then a
        note in the message. Every dropdown of that form (of every form with `page_values`,
        which keeps the others at the values the page was built with) gets its choices read
        now; a value no longer among them is cleared and named in the note, never an error."""
        forms, sources, panels = self.forms, self.sources, self.panels
        form = next((f for f in forms if f.key == key), None)
        if form is None or cfg is None:
            if not page_values:
                return [gr.skip()] * (1 + len(panels) + len(self.all_inputs) + 1)
            form, cfg = None, {}
        value = (lambda name: cfg.get(name)) if isinstance(cfg, dict) else (lambda name: getattr(cfg, name))
        updates = ([gr.update(value=form.key)] + self.show(form.key)) if form else \
            [gr.skip()] * (1 + len(panels))
        fresh = {name: read() for name, read in sources.items()}
        cleared = []
        for other in forms:
            for name, component in other.controls.items():
                wanted = value(name) if other is form else None
                if name in sources and (other is form or page_values):
                    if wanted is None:
                        wanted = component.value
                    options = fresh[name]
                    values = [ch.value_of(option) for option in options]
                    if wanted not in values:
                        if wanted not in (None, ""):
                            cleared.append(f"{component.label}: `{wanted}` no longer exists "
                                           f"(in {other.title}), so it was cleared")
                        wanted = fallback_choice(other, name, values)
                    updates.append(gr.update(choices=options, value=wanted))
                elif other is not form or wanted is None:
                    updates.append(gr.skip())
                else:
                    updates.append(gr.update(value=", ".join(map(str, wanted))
                                             if isinstance(wanted, list) else wanted))
        note = "**Note:** " + "; ".join(cleared) + "." if cleared else gr.skip()
        return updates + [note]

    def restore_form(self):
        """A fresh page shows the settings of the running (or last) job, with every dropdown's
        choices read now (the page itself carries those read when the app started)."""
        job = self.runner.latest("train")
        cfg = getattr(job, "config", None)
        form = next((f for f in self.forms if type(cfg) is f.config), None)
        return self.fill(form.key if form else None, cfg, page_values=True)


def _wire(page: _Page, handlers: _Handlers) -> None:
    page.method.change(handlers.show, page.method, page.panels())
    page.interrupt.click(handlers.stop, None, page.message)
    page.timer.tick(handlers.poll, page.seen,
                    [page.status, page.plot, page.gallery, page.queue_view, page.seen],
                    show_progress="hidden",
                    queue=False)  # a direct HTTP call: no queue, event stream or SSE (see live.py)
    quiet = {"show_progress": "hidden"}
    for form, row in zip(handlers.forms, page.buttons):
        _wire_form(form, row, page, handlers, quiet)
        _follow_model(form, page.note)
    move, message, queue_view = handlers.move, page.message, page.queue_view
    page.up.click(lambda job_id: move(job_id, -1), page.queue_id, [message, queue_view], **quiet)
    page.down.click(lambda job_id: move(job_id, 1), page.queue_id, [message, queue_view], **quiet)
    page.remove.click(lambda job_id: move(job_id, 0), page.queue_id, [message, queue_view],
                      **quiet)
    dropdowns = [c for _, c in handlers.dropdowns]
    page.refresh.click(handlers.refresh_all, dropdowns, dropdowns)


@dataclass
class FormButtons:
    """One method's buttons: each sends only its own form's values."""
    row: gr.Row
    train: gr.Button
    enqueue: gr.Button
    export: gr.Button
    memory: gr.Button
    vram: gr.Dropdown | None = None  # "Fit my GPU", for the forms with memory options
    fit: gr.Button | None = None


def _wire_form(form: MethodForm, buttons: FormButtons, page: _Page, handlers: _Handlers,
               quiet: dict) -> None:
    inputs = list(form.controls.values())
    submit, runner, paths = handlers.submit, handlers.runner, handlers.paths
    processes, message = page.processes, page.message

    def start(count, *values):
        return submit(form, count, values, queue=False)

    def add_to_queue(count, *values):
        # the queue view is the poll's alone: an answer written here could land after the
        # poll's newer one (the job already started) and then stay, since the poll saw no change
        return submit(form, count, values, queue=True)

    def export_toml(*values):
        try:
            cfg = to_config(form.config, form.names, values)
        except ConfigError as error:
            return error_text(error), gr.update(visible=False)
        return "", gr.update(value=to_toml(cfg), visible=True)

    def estimate_memory(*values):
        from trainers.memory_estimate import estimate_for
        try:
            cfg = to_config(form.config, form.names, values)
        except ConfigError as error:
            return error_text(error)
        return estimate_for(cfg, paths).text()

    buttons.train.click(start, [processes] + inputs, message)
    buttons.enqueue.click(add_to_queue, [processes] + inputs, message, **quiet)
    buttons.export.click(export_toml, inputs, [message, page.exported])
    buttons.memory.click(estimate_memory, inputs, message)
    if buttons.fit is not None:
        def fit_my_gpu(choice, *values):
            skip = [gr.skip()] * len(inputs)
            try:
                cfg = to_config(form.config, form.names, values)
                fitted, said = vram_fit.fit(cfg, paths, vram_fit.card_for(choice))
            except (ConfigError, vram_fit.FitError) as error:
                return [*skip, error_text(error)]
            return [gr.update(value=getattr(fitted, name))
                    if getattr(fitted, name) != getattr(cfg, name) else gr.skip()
                    for name in form.names] + [said]
        buttons.fit.click(fit_my_gpu, [buttons.vram] + inputs, inputs + [message])


def default_vram() -> str:
    """The card the picker starts on: app.py's --vram (the Colab notebook's T4), else 8 GB."""
    chosen = os.environ.get("DANLU_VRAM", "")
    return chosen if chosen in (*vram_fit.CHOICES, vram_fit.DETECT) else "8 GB"


def _follow_model(form: MethodForm, note) -> None:
    """The demo note follows the form's model; choosing a demo model sets the size fields to its
    small size, and choosing a real one puts the defaults back where the demo's size still is."""
    model = form.controls.get("model")
    if model is None:  # a tool that trains nothing on a base model (Resize LoRA)
        return
    model.change(ch.demo_note, model, note)
    names = size_fields(form)
    if not names:
        return
    demo = demo_size_values(form)

    def sizes_for_model(chosen, *current):
        wanted = size_values(form, chosen)
        if wanted != demo:  # a real model: leave a size the user typed alone
            return [gr.update(value=wanted[name]) if value == demo[name] else gr.skip()
                    for name, value in zip(names, current)]
        return [gr.update(value=wanted[name]) for name in names]

    sizes = [form.controls[name] for name in names]
    model.input(sizes_for_model, [model] + sizes, sizes, show_progress="hidden")


def _queue_text(runner: JobRunner) -> str:
    waiting = runner.queued()
    if not waiting:
        return "No jobs are waiting. *Add to queue* lines up runs that start one after another."
    return "\n".join(f"{i}. job **{job.id}** — {job.name}" for i, job in enumerate(waiting, 1))


def _snap(runner: JobRunner):
    job = runner.latest("train")
    return job.snapshot() if job else None
