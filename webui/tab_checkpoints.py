"""Checkpoints tab: the run history (read from the log folders, so it survives restarts), one
run's loss curve with its checkpoints marked, checkpoint cards, "Use this checkpoint", and a
Compare grid rendered as a queued job. A running run updates while it trains."""
from __future__ import annotations

import bisect
import hashlib
import json
import shutil
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from core import events as ev
from core.config import ConfigError
from core.jobs import JobRunner
from core.paths import Paths
from trainers import runs as rn
from webui import choices as ch
from webui import live
from webui import lora_tools
from webui.forms import error_text
from webui.handlers import Handlers

CARDS = "checkpoint_cards"  # outputs/<this>/: thumbnails of files that live elsewhere
MARK_COLOR = "#2ca02c"
HISTORY_COLUMNS = ["Started", "Run", "Method", "Base model", "Dataset", "Steps", "Final loss",
                   "Duration", "Status"]


def build(paths: Paths, runner: JobRunner) -> dict:
    page = _layout(_scan(paths, runner))
    with page.tab:
        lora_tools.build(paths, runner, page.shown, lambda run_id: _load(paths, runner, run_id))
    handlers = _Handlers(paths, runner, page)
    _wire(page, handlers)
    return {"run": page.run_choice, "train_again": page.train_again,
            "config_of": config_of(paths, runner),
            "restore": (handlers.restore,
                        [page.run_choice, page.history, page.table_ids, page.compare_job])}


class _Page:
    """The tab's components, set by _layout; the handlers and _wire read them."""
    tab: gr.Tab
    run_choice: gr.Dropdown
    refresh: gr.Button
    history: gr.Dataframe
    summary: gr.Markdown
    resume: gr.Button
    resume_message: gr.Markdown
    plot: gr.LinePlot
    gallery: gr.Gallery
    details: gr.Markdown
    detail_previews: gr.Gallery
    use_name: gr.Textbox
    use_overwrite: gr.Checkbox
    use_embedding: gr.Checkbox
    use: gr.Button
    use_message: gr.Markdown
    pick: gr.CheckboxGroup
    strengths: gr.Textbox
    seeds: gr.Textbox
    steps: gr.Number
    prompts: gr.Textbox
    compare: gr.Button
    stop: gr.Button
    compare_status: gr.Markdown
    grid: gr.Image
    settings_toml: gr.Code
    train_again: gr.Button
    shown: gr.State  # run id on screen
    table_ids: gr.State  # run ids in the history's row order
    cards: gr.State  # checkpoint keys in gallery order
    selected: gr.State  # checkpoint key
    compare_job: gr.State  # job id
    seen: gr.State  # what the page shows, so the timer sends only changes
    timer: gr.Timer

    def view_outputs(self) -> list:
        """What shows one run."""
        return [self.summary, self.plot, self.gallery, self.cards, self.pick, self.settings_toml]

    def tick_outputs(self) -> list:
        return [self.compare_status, self.grid, self.run_choice, self.history, self.table_ids,
                self.seen] + self.view_outputs()


def _layout(runs: list[rn.Run]) -> _Page:
    page = _Page()
    with gr.Tab("Checkpoints", id="checkpoints") as page.tab:
        gr.Markdown("Past and running training runs, read from their log folders. Open a run "
                    "to see its loss curve and checkpoints; click a checkpoint card to copy it "
                    "to its final folder, or compare checkpoints in a grid.")
        _run_view(page, runs)
        with gr.Group():
            _checkpoint_card(page)
        with gr.Accordion("Compare checkpoints", open=True):
            _compare_form(page)
        with gr.Accordion("Settings", open=False):
            page.settings_toml = gr.Code(label="Settings as TOML (python -m trainers METHOD "
                                         "--config run.toml trains again with them)",
                                         language=None, elem_id="ckpt-settings")
            page.train_again = gr.Button("Train again with these settings (opens the Train "
                                         "tab)", elem_id="ckpt-train-again")
        page.shown = gr.State(None)
        page.table_ids = gr.State([r.id for r in runs])
        page.cards = gr.State([])
        page.selected = gr.State(None)
        page.compare_job = gr.State(None)
        page.seen = gr.State({})
        page.timer = gr.Timer(2.0)
    return page


def _run_view(page: _Page, runs: list[rn.Run]) -> None:
    """The run picker, the history, and the open run's summary, loss curve and checkpoints."""
    with gr.Row():
        page.run_choice = gr.Dropdown(_run_choices(runs), value=None, label="Run", scale=4,
                                      elem_id="ckpt-run")
        page.refresh = gr.Button(ch.REFRESH, scale=0, min_width=90, elem_id="ckpt-refresh")
    page.history = gr.Dataframe(_history_frame(runs), interactive=False, wrap=True,
                                max_height=280, elem_id="ckpt-history",
                                label="Run history (newest first; click a row to open it)")
    page.summary = gr.Markdown(elem_id="ckpt-summary")
    with gr.Row():
        page.resume = gr.Button("Resume", scale=0, min_width=120, elem_id="ckpt-resume")
        page.resume_message = gr.Markdown(elem_id="ckpt-resume-message")
    with gr.Row():
        page.plot = gr.LinePlot(_plot_frame(None), x="step", y="loss", color="series",
                                title="Loss (green lines: saved checkpoints)", height=280,
                                color_map=_color_map(None), colors_in_legend=["loss", "smoothed", "validation"],
                                elem_id="ckpt-loss", scale=1)
        page.gallery = gr.Gallery(label="Checkpoints (click one)", columns=3, height=300,
                                  allow_preview=False, elem_id="ckpt-gallery", scale=1)


def _checkpoint_card(page: _Page) -> None:
    """The clicked checkpoint: its details, previews and "Use this checkpoint"."""
    page.details = gr.Markdown("Click a checkpoint card to see it here.",
                               elem_id="ckpt-details")
    page.detail_previews = gr.Gallery(label="Previews at this step", columns=6, height=160,
                                      allow_preview=False, preview=False, visible=False,
                                      elem_id="ckpt-detail-previews")
    with gr.Row():
        page.use_name = gr.Textbox(label="Name", scale=3, elem_id="ckpt-use-name",
                                   info="File name in its final folder (for an embedding, "
                                        "also the word you type in prompts).")
        page.use_overwrite = gr.Checkbox(label="Overwrite a file of this name", scale=2,
                                         elem_id="ckpt-use-overwrite")
        page.use_embedding = gr.Checkbox(
            label="Also write its token as an embedding", scale=2, elem_id="ckpt-use-embedding",
            info="A LoRA trained with pivotal tuning: its token's vectors as "
                 "embeddings/<token>.safetensors (for ComfyUI and diffusers).")
        page.use = gr.Button("Use this checkpoint", variant="primary", scale=1,
                             elem_id="ckpt-use")
    page.use_message = gr.Markdown(elem_id="ckpt-use-message")


def _compare_form(page: _Page) -> None:
    page.pick = gr.CheckboxGroup([], label="Checkpoints (rows)", elem_id="ckpt-compare-pick")
    with gr.Row():
        page.strengths = gr.Textbox("1.0", label="Strengths (rows; LoRA and hypernetwork)",
                                    elem_id="ckpt-compare-strengths", info="e.g. 0.5, 1.0")
        page.seeds = gr.Textbox("42", label="Seeds (one fixed seed per column)",
                                elem_id="ckpt-compare-seeds", info="e.g. 1, 2, 3")
        page.steps = gr.Number(20, precision=0, label="Sampling steps",
                               elem_id="ckpt-compare-steps")
    page.prompts = gr.Textbox(label="Prompts (columns; one per line, `--n` adds a negative "
                              "prompt)", lines=2, elem_id="ckpt-compare-prompts")
    with gr.Row():
        page.compare = gr.Button("Render grid", variant="primary", elem_id="ckpt-compare-start")
        page.stop = gr.Button("Stop", variant="stop", elem_id="ckpt-compare-stop")
    page.compare_status = gr.Markdown(elem_id="ckpt-compare-status")
    page.grid = gr.Image(label="Grid (saved under outputs/grids/)", type="filepath",
                         interactive=False, format="png", elem_id="ckpt-grid")


class _Handlers(Handlers):
    def __init__(self, paths: Paths, runner: JobRunner, page: _Page):
        self.paths, self.runner, self.page = paths, runner, page
        super().__init__()

    # ---- history ------------------------------------------------------------------------------
    def refresh_history(self, current):
        runs = _scan(self.paths, self.runner)
        ids = [r.id for r in runs]
        return (gr.update(choices=_run_choices(runs), value=current if current in ids else None),
                _history_frame(runs), ids)

    @staticmethod
    def select_row(ids, event: gr.SelectData):
        row = event.index[0] if isinstance(event.index, (list, tuple)) else event.index
        return ids[row] if isinstance(row, int) and 0 <= row < len(ids) else gr.skip()

    # ---- one run ------------------------------------------------------------------------------
    def view(self, run: rn.Run | None, keep_pick=None) -> tuple[list, list]:
        """Values for the page's view_outputs, and a fingerprint of each so the timer sends only
        what changed (a gallery sent again loses its selection)."""
        if run is None:
            values = ["Choose a run.", _plot(None), [], [], gr.update(choices=[], value=[]), ""]
            return values, ["", None, (), (), (), ""]
        losses = _live_losses(self.runner, run)
        items = [(_servable(self.paths, c.previews[0] if c.previews else None), c.caption)
                 for c in run.checkpoints]
        keys = [c.key for c in run.checkpoints]
        choices = [(c.label, c.key) for c in run.checkpoints]
        chosen = [k for k in (keep_pick or []) if k in keys]
        values = [_summary(run), _plot(run, losses), items, keys,
                  gr.update(choices=choices, value=chosen), _settings_toml(run)]
        prints = [values[0], (len(losses), losses[-1][0] if losses else None, tuple(keys)),
                  tuple(items), tuple(keys), tuple(choices), values[5]]
        return values, prints

    def open_run(self, run_id, state):
        run = _load(self.paths, self.runner, run_id)
        values, prints = self.view(run)
        if run is None:
            form = [gr.skip()] * 5
        else:
            from trainers import catalog
            from trainers.compare import default_prompt, preview_defaults
            method = catalog.find(run.method)
            form = [gr.update(interactive=method is not None and method.strength),
                    default_prompt(run), preview_defaults(run)["steps"],
                    "Click a checkpoint card to see it here.", gr.update(value=[], visible=False)]
        state = {**(state or {}), "run": _signature(self.paths, self.runner, run), "view": prints}
        return values + form + [run_id, None, state]

    def select_card(self, run_id, keys, event: gr.SelectData):
        run = _load(self.paths, self.runner, run_id)
        index = event.index if isinstance(event.index, int) else None
        key = keys[index] if run is not None and index is not None and index < len(keys) else None
        checkpoint = run.checkpoint(key) if key else None
        if checkpoint is None:
            return "That checkpoint is gone; refresh the run.", gr.update(visible=False), \
                gr.skip(), None, ""
        previews = [(_servable(self.paths, p), p.name) for p in checkpoint.previews]
        return (_details(run, checkpoint), gr.update(value=previews, visible=bool(previews)),
                f"{run.name}-{checkpoint.step}", key, "")

    def use_checkpoint(self, run_id, key, name, overwrite, embedding=False):
        from trainers.checkpoint_use import use_checkpoint_files as copy
        run = _load(self.paths, self.runner, run_id)
        checkpoint = run.checkpoint(key) if run is not None and key else None
        if checkpoint is None:
            return "**Error:** click a checkpoint card first.", gr.skip()
        try:
            targets = copy(self.paths, run, checkpoint, name or "", overwrite=bool(overwrite),
                           embeddings=bool(embedding))
        except (ConfigError, OSError, ValueError) as error:
            return error_text(error), gr.skip()
        target = targets[0]
        if embedding:  # the LoRA, then one embedding per token it carries
            words = ", ".join(f"**{t.stem}**" for t in targets[1:])
            return (f"Copied {checkpoint.label} to `{target}` and wrote its token as "
                    f"{', '.join(f'`{t}`' for t in targets[1:])}: type {words} in prompts.",
                    False)
        if len(targets) > 1:  # APT: the prompt's embedding and the negative prompt's
            return (f"Copied {checkpoint.label} to `{target}` and `{targets[1]}`. Use "
                    f"**{target.stem}** in the prompt and **{targets[1].stem}** in the "
                    "negative prompt.", False)
        return (f"Copied {checkpoint.label} to `{target}`. It is listed under "
                f"`{target.parent.name}/` as **{target.stem}**.", False)

    # ---- compare --------------------------------------------------------------------------------
    def start_compare(self, run_id, keys, strengths_text, prompts_text, seeds_text, steps_value):
        from trainers.compare import compare_job as job_fn
        from trainers.compare import spec_for_run
        run = _load(self.paths, self.runner, run_id)
        if run is None:
            return "**Error:** choose a run first.", gr.skip()
        try:
            spec = spec_for_run(run, list(keys or []), strengths_text, prompts_text, seeds_text,
                                steps=int(steps_value) if steps_value else None)
            job = _submit(self.runner, f"compare: {run.name}", job_fn(spec, self.paths), spec)
        except (ConfigError, ValueError, RuntimeError) as error:
            return error_text(error), gr.skip()
        cells = len(spec.rows()) * len(spec.columns())
        return f"Queued job {job.id}: {cells} images.", job.id

    def resume_run(self, run_id):
        run = _load(self.paths, self.runner, run_id)
        if run is None:
            return "**Error:** choose a run first."
        try:
            job = queue_resume(self.paths, self.runner, run)
        except (ConfigError, KeyError, ValueError, RuntimeError) as error:
            return error_text(error)
        return (f"Queued job {job.id}: {job.name}, continuing from step {run.final_step} "
                "(watch it in the Train tab).")

    def stop_compare(self, job_id):
        return "Stopping the comparison." if job_id and self.runner.stop(job_id) else \
            "No comparison is running."

    # ---- the timer: compare progress, the running run, the history ------------------------------
    def tick(self, run_id, job_id, keep_pick, state):
        paths, runner, page = self.paths, self.runner, self.page
        tick_outputs = page.tick_outputs()
        state = dict(state or {})
        out = {component: gr.skip() for component in tick_outputs}
        snap = _compare_snapshot(runner, job_id)
        if snap is not None:
            text = _compare_text(snap)
            if text != state.get("compare"):
                out[page.compare_status] = state["compare"] = text
            result = snap["result"]
            path = getattr(result, "path", "") if isinstance(result, ev.Finished) else ""
            if path and path != state.get("grid") and Path(path).is_file():
                out[page.grid] = state["grid"] = _servable(paths, Path(path))
        train = runner.latest("train")
        folders = _running(paths, runner)
        # the history again when a train job starts, writes its folder, ends, or every 10 s
        train_key = (train.id, train.state, any(f.is_dir() for f in folders),
                     int(time.time() // 10) if folders else 0) if train is not None else None
        if train_key != state.get("train"):
            state["train"] = train_key
            runs = _scan(paths, runner)
            out[page.run_choice] = gr.update(choices=_run_choices(runs))
            out[page.history] = _history_frame(runs)
            out[page.table_ids] = [r.id for r in runs]
        if run_id:
            run_signature = _signature(paths, runner, run_id)
            if run_signature != state.get("run"):
                state["run"] = run_signature
                values, prints = self.view(_load(paths, runner, run_id), keep_pick)
                old = state.get("view") or [None] * len(prints)
                for component, value, now, before in zip(page.view_outputs(), values, prints, old):
                    if now != before:
                        out[component] = value
                state["view"] = prints
        out[page.seen] = state
        return [out[component] for component in tick_outputs]

    def restore(self):
        """A fresh page: the history as it is now, and the last comparison's job."""
        job = self.runner.latest("compare")
        return [*self.refresh_history(None), job.id if job is not None else None]


def _wire(page: _Page, handlers: _Handlers) -> None:
    history_outputs = [page.run_choice, page.history, page.table_ids]
    page.refresh.click(handlers.refresh_history, page.run_choice, history_outputs)
    page.tab.select(handlers.refresh_history, page.run_choice, history_outputs)
    page.history.select(handlers.select_row, page.table_ids, page.run_choice)
    page.run_choice.change(handlers.open_run, [page.run_choice, page.seen], page.view_outputs() + [
        page.strengths, page.prompts, page.steps, page.details, page.detail_previews, page.shown,
        page.selected, page.seen])
    page.gallery.select(handlers.select_card, [page.shown, page.cards],
                        [page.details, page.detail_previews, page.use_name, page.selected,
                         page.use_message])
    page.use.click(handlers.use_checkpoint,
                   [page.shown, page.selected, page.use_name, page.use_overwrite,
                    page.use_embedding], [page.use_message, page.use_overwrite])
    page.compare.click(handlers.start_compare,
                       [page.shown, page.pick, page.strengths, page.prompts, page.seeds,
                        page.steps], [page.compare_status, page.compare_job])
    page.stop.click(handlers.stop_compare, page.compare_job, page.compare_status)
    page.resume.click(handlers.resume_run, page.shown, page.resume_message)
    page.timer.tick(handlers.tick, [page.shown, page.compare_job, page.pick, page.seen],
                    page.tick_outputs(), show_progress="hidden",
                    queue=False)  # a direct HTTP call: no queue, event stream or SSE (see live.py)


def config_of(paths: Paths, runner: JobRunner):
    """run id -> (method, config dict) of its newest session, or None: for "Train again with
    these settings" and "Resume" in the Train tab (same settings continue from the final file;
    LoRA's `overwrite=True` starts over)."""
    def get(run_id: str):
        run = _load(paths, runner, run_id)
        return rn.run_config(run) if run is not None else None
    return get


def queue_resume(paths: Paths, runner: JobRunner, run: rn.Run):
    """Queue the run's newest settings again as a training job: it continues from the run's
    final file (with its optimizer state). Raises ValueError/ConfigError saying why not."""
    from core.config import from_dict
    from trainers.preflight import check_before_queueing
    from trainers.registry import config_class
    from webui.jobs import job_parts
    if run.status in (rn.RUNNING, rn.FINISHED):
        raise ValueError(f"this run is {run.status}; there is nothing to resume")
    if run.final_path is None or not run.final_path.is_file():
        raise ValueError(f"its file {run.final_path} is gone; there is nothing to resume from")
    if not run.owns_final:
        raise ValueError(f"a later run already continued {run.final_path.name}; resume that one")
    method, data = rn.run_config(run)
    if "overwrite" in data:
        data["overwrite"] = False  # "start over" would throw the saved state away
    cfg = from_dict(config_class(method), data, strict=False).validate()
    check_before_queueing(cfg, paths)
    name, kind, fn, spec = job_parts(method, cfg)
    return runner.submit(name, kind, fn, config=cfg, queue=True, spec=spec)


# ---- reading runs, with what the runner knows ---------------------------------------------------
def _job_folder(paths: Paths, job) -> Path | None:
    """The run folder a train job writes to: from its events, else from its config."""
    snap = job.snapshot()
    for event in list(snap["saved"]) + list(snap["previews"]):
        path = Path(event.path)
        if path.parent.name in rn.copy_folders() + ("images",) and \
                any(path.parent.parent.glob("settings-*.json")):
            return path.parent.parent
    if job.config is None or job.started is None:
        return None
    return rn.expected_run_folder(paths, job.config, job.started)


def _running(paths: Paths, runner: JobRunner) -> list[Path]:
    job = runner.current()
    if job is None or job.kind != "train":
        return []
    folder = _job_folder(paths, job)
    return [folder] if folder is not None else []


def _overlay_failure(paths: Paths, runner: JobRunner, runs: list[rn.Run]) -> None:
    """The last train job failed in this process: say so, with its message."""
    job = runner.latest("train")
    if job is None or job.state != "failed":
        return
    folder = _job_folder(paths, job)
    for run in runs:
        if folder is not None and rn._real(run.root) == rn._real(folder) and \
                run.sessions[-1].started >= (job.started or 0) - 1:
            run.status = rn.FAILED
            run.status_note = getattr(job.result, "message", "") or run.status_note


def _scan(paths: Paths, runner: JobRunner) -> list[rn.Run]:
    runs = rn.scan_runs(paths, _running(paths, runner))
    _overlay_failure(paths, runner, runs)
    return runs


def _load(paths: Paths, runner: JobRunner, run_id) -> rn.Run | None:
    if not run_id:
        return None
    return next((r for r in _scan(paths, runner) if r.id == run_id), None)


def _signature(paths: Paths, runner: JobRunner, run) -> tuple | None:
    """Cheap stats that change when the run's files or live losses change."""
    run_id = run.id if isinstance(run, rn.Run) else run
    if not run_id:
        return None
    root = paths.outputs / run_id
    stamps = []
    for name in ("",) + rn.copy_folders() + ("images",):
        try:
            stat = (root / name).stat()
            stamps.append((name, stat.st_mtime_ns))
        except OSError:
            pass
    for name in rn.csv_names():
        try:
            stat = (root / name).stat()
            stamps.append((name, stat.st_mtime_ns, stat.st_size))
        except OSError:
            pass
    job = runner.current()
    live_steps = None
    if job is not None and job.kind == "train" and any(
            rn._real(f) == rn._real(root) for f in _running(paths, runner)):
        progress = job.last_progress  # not a snapshot: that would copy the whole loss list
        live_steps = progress.step if progress is not None else 0
    return tuple(stamps) + (live_steps,)


def _live_losses(runner: JobRunner, run: rn.Run) -> list[tuple[int, float, float]]:
    """The loss log, plus the steps a running job has not flushed to its CSV yet."""
    losses = list(run.losses)
    job = runner.current()
    if run.status == rn.RUNNING and job is not None and job.kind == "train":
        last = losses[-1][0] if losses else -1
        first_new = bisect.bisect_right(job.losses, last, key=lambda row: row[0])
        losses += [row for row in job.snapshot(losses_from=first_new)["losses"] if row[0] > last]
    return losses


# ---- what the page shows --------------------------------------------------------------------------
def _run_choices(runs: list[rn.Run]) -> list[tuple[str, str]]:
    return [(f"{run.title} — {run.status}", run.id) for run in runs]


def _history_frame(runs: list[rn.Run]) -> pd.DataFrame:
    rows = []
    for run in runs:
        dataset = Path(run.dataset).name if run.dataset else ""
        if run.images is not None:
            dataset = f"{dataset} ({run.images} images)"
        steps = f"{run.steps}/{run.target_steps}" if run.target_steps else str(run.steps)
        loss = f"{run.final_loss:.4f}" if run.final_loss is not None else ""
        rows.append([time.strftime("%Y-%m-%d %H:%M", time.localtime(run.started)), run.name,
                     rn.method_title(run.method), run.model, dataset, steps,
                     loss, live._duration(run.duration), run.status])
    return pd.DataFrame(rows, columns=HISTORY_COLUMNS)


def _plot_frame(run: rn.Run | None, losses=None) -> pd.DataFrame | None:
    """Loss, smoothed loss and a vertical line per checkpoint; None when nothing was logged
    (an empty frame sent to a LinePlot leaves it blank for every later update)."""
    losses = list(losses if losses is not None else (run.losses if run else []))
    if not losses:
        return None
    frame = live.with_validation(live.loss_frame(losses), run.validation if run else [])
    if run is None or not run.checkpoints:
        return frame
    low, high = float(frame["loss"].min()), float(frame["loss"].max())
    marks = []
    for checkpoint in run.checkpoints:
        series = f"checkpoint {checkpoint.step}"
        marks += [(checkpoint.step, low, series), (checkpoint.step, high, series)]
    extra = pd.DataFrame(marks, columns=["step", "loss", "series"])
    return pd.concat([frame, extra], ignore_index=True)


def _color_map(run: rn.Run | None) -> dict[str, str]:
    colors = {"loss": "#9ab8e6", "smoothed": "#e6550d", "validation": live.VALIDATION_COLOR}
    for checkpoint in run.checkpoints if run else []:
        colors[f"checkpoint {checkpoint.step}"] = MARK_COLOR
    return colors


def _plot(run: rn.Run | None, losses=None):
    return gr.update(value=_plot_frame(run, losses), color_map=_color_map(run))


def _when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp))


def _summary(run: rn.Run) -> str:
    lines = [f"### {run.name} — {rn.method_title(run.method)}",
             f"**Status:** {run.status} ({run.status_note})"]
    model = run.model + (f" [{run.model_hash}]" if run.model_hash else "")
    dataset = run.dataset + (f" ({run.images} images)" if run.images is not None else "")
    steps = f"{run.steps}" + (f" of {run.target_steps}" if run.target_steps else "")
    loss = f"{run.final_loss:.4f}" if run.final_loss is not None else "—"
    lines.append(f"Base model: `{model}` · dataset: `{dataset}` · steps: {steps} · final loss "
                 f"(mean of the last 10 steps): {loss} · trained for "
                 f"{live._duration(run.duration)} ({_when(run.started)} – {_when(run.ended)})")
    if len(run.sessions) > 1:
        lines.append("Sessions: " + ", ".join(f"from step {s.start_step} at {_when(s.started)}"
                                              for s in run.sessions))
    if run.final_path is not None:
        at = f" (now at step {run.final_step})" if run.final_step is not None else " (missing)"
        lines.append(f"Final file: `{run.final_path}`{at}. **Resume:** train again with these "
                     "settings and it continues from that file's step.")
    lines.append(f"Folder: `{run.root}` · {len(run.checkpoints)} checkpoints, "
                 f"{len(run.previews)} previews")
    return "\n\n".join(lines)


def _details(run: rn.Run, checkpoint: rn.Checkpoint) -> str:
    loss = "no loss logged near this step"
    if checkpoint.loss is not None and checkpoint.loss_steps:
        a, b = checkpoint.loss_steps
        loss = f"loss {checkpoint.loss:.4f} (mean of steps {a}–{b})"
    preview = ""
    if checkpoint.preview_step is not None and checkpoint.preview_step != checkpoint.step:
        preview = f" · preview from step {checkpoint.preview_step}"
    elif not checkpoint.previews:
        preview = " · no preview at this step"
    size = f"{checkpoint.size / 1e6:.2f} MB" if checkpoint.size >= 1e5 else \
        f"{checkpoint.size / 1e3:.1f} kB"
    return (f"**{checkpoint.label}** of {run.name} · {loss}{preview}\n\n"
            f"`{checkpoint.path}` · {size} · saved {_when(checkpoint.modified)}\n\n"
            f"*Use this checkpoint* copies it to `{rn.final_folder_name(run.method)}/` "
            "under the name below" + (" (with its `-neg` partner as `<name>-neg`)."
                                      if checkpoint.partners else "."))


def _settings_toml(run: rn.Run) -> str:
    from core.config import from_dict, to_toml
    from trainers.registry import config_class
    try:
        return to_toml(from_dict(config_class(run.method), run.config, strict=False))
    except (KeyError, ConfigError, TypeError, ValueError):
        return json.dumps(run.settings, indent=2, default=str)


def _compare_snapshot(runner: JobRunner, job_id):
    if job_id is None:
        return None
    job = runner.get(job_id)
    return job.snapshot() if job is not None else None


def _compare_text(snap: dict) -> str:
    progress = snap["progress"]
    lines = [f"**{snap['name']}** — {snap['state']}"]
    if progress is not None and snap["state"] == "running":
        lines.append(f"image {progress.step} of {progress.total}")
    result = snap["result"]
    if isinstance(result, ev.Failed):
        lines.append(f"**Failed:** {result.message}")
    elif isinstance(result, ev.Finished):
        lines.append(result.message)
    elif snap["state"] == "queued":
        lines.append("waits for the running job to finish")
    elif snap["log"]:
        lines.append(snap["log"][-1])
    return "\n\n".join(lines)


def _submit(runner: JobRunner, name: str, fn, config):
    """Queue behind a running job (rendering shares the model a training run is changing)."""
    import inspect
    if "queue" in inspect.signature(runner.submit).parameters:
        return runner.submit(name, "compare", fn, config=config, queue=True)
    return runner.submit(name, "compare", fn, config=config)


def _servable(paths: Paths, path: Path | None) -> str:
    """A path the page may show: files under outputs/ as they are; anything else is copied to
    outputs/checkpoint_cards/ first; None becomes a "no preview" card."""
    outputs = paths.outputs.resolve()
    folder = paths.outputs / CARDS
    if path is None:
        card = folder / "no-preview.png"
        if not card.exists():
            folder.mkdir(parents=True, exist_ok=True)
            from PIL import Image, ImageDraw, ImageFont
            image = Image.new("RGB", (256, 256), "#eeeeee")
            draw = ImageDraw.Draw(image)
            draw.text((128, 128), "no preview", fill="#666666", anchor="mm",
                      font=ImageFont.load_default(size=24))
            image.save(card)
        return str(card)
    real = path.resolve()
    if real == outputs or outputs in real.parents:
        return str(path)
    stat = real.stat()
    digest = hashlib.sha1(f"{real}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    copy = folder / f"{digest}{real.suffix.lower()}"
    if not copy.exists():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(real, copy)
    return str(copy)
