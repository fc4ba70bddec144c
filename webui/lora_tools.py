"""The Checkpoints tab's "LoRA tools": pick LoRA files from models/Lora and Check them against
the key maps of A1111, ComfyUI and diffusers, Merge them (weighted), Resize one, Merge them
into a checkpoint, or average the open run's copies (post-hoc EMA). The tools are the Train
tab's methods (trainers/merge_lora.py, ...): their configs are validated and checked, then
queued as the Train tab queues them. The Check runs the CLI's `check_lora` in its own process,
so the page stays torch-free and a training job does not hold it up."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gradio as gr

from core import events as ev
from core.config import ConfigError, from_dict
from core.jobs import JobRunner
from core.paths import REPO_DIR, Paths
from trainers import runs as rn
from trainers.configs import check_name
from webui import choices as ch
from webui.forms import error_text

CHECK_TIMEOUT = 300  # seconds; the first check in a fresh process imports diffusers
DYNAMIC = ["none", "sv_ratio", "sv_fro", "sv_cumulative"]


class _Tools:
    files: gr.Dropdown
    refresh: gr.Button
    weights: gr.Textbox
    output_name: gr.Textbox
    overwrite: gr.Checkbox
    rank: gr.Number
    dynamic_method: gr.Dropdown
    dynamic_param: gr.Number
    model: gr.Dropdown
    check: gr.Button
    merge: gr.Button
    resize: gr.Button
    into: gr.Button
    ema: gr.Button
    result: gr.Markdown
    job: gr.State
    seen: gr.State
    timer: gr.Timer


def build(paths: Paths, runner: JobRunner, shown: gr.State, load_run) -> _Tools:
    """The area's controls (inside the Checkpoints tab); `shown` is the open run's id and
    `load_run(run_id)` the Run it names (or None)."""
    tools = _Tools()
    with gr.Accordion("LoRA tools", open=False, elem_id="lora-tools"):
        gr.Markdown("Check, merge, resize or bake LoRA files from `models/Lora`; the tools run "
                    "as queued jobs and write new files (the chosen ones are kept). Post-hoc "
                    "EMA averages the open run's saved copies.")
        with gr.Row():
            tools.files = gr.Dropdown(ch.lora_choices(paths), value=[], multiselect=True,
                                      label="LoRA files (models/Lora)", scale=4,
                                      elem_id="lora-tools-files")
            tools.refresh = gr.Button(ch.REFRESH, scale=0, min_width=90,
                                      elem_id="lora-tools-refresh")
        with gr.Row():
            tools.weights = gr.Textbox("", label="Weights (one per file, in order; empty: 1)",
                                       elem_id="lora-tools-weights")
            tools.output_name = gr.Textbox("", label="Output name", elem_id="lora-tools-output")
            tools.overwrite = gr.Checkbox(False, label="Overwrite", elem_id="lora-tools-overwrite")
        with gr.Row():
            tools.rank = gr.Number(0, precision=0, minimum=0, maximum=1024,
                                   label="Rank (Resize: the new rank; Merge: 0 keeps every rank)",
                                   elem_id="lora-tools-rank")
            tools.dynamic_method = gr.Dropdown(DYNAMIC, value="none",
                                               label="Dynamic method (Resize)",
                                               elem_id="lora-tools-dynamic")
            tools.dynamic_param = gr.Number(0, label="Dynamic param (Resize)",
                                            elem_id="lora-tools-dynamic-param")
            tools.model = gr.Dropdown(ch.checkpoint_choices(paths) + _demos(paths), value=None,
                                      label="Base model (Merge into checkpoint)",
                                      elem_id="lora-tools-model")
        with gr.Row():
            tools.check = gr.Button("Check", variant="primary", elem_id="lora-tools-check")
            tools.merge = gr.Button("Merge", elem_id="lora-tools-merge")
            tools.resize = gr.Button("Resize", elem_id="lora-tools-resize")
            tools.into = gr.Button("Merge into checkpoint", elem_id="lora-tools-into")
            tools.ema = gr.Button("Post-hoc EMA of the open run", elem_id="lora-tools-ema")
        tools.result = gr.Markdown(elem_id="lora-tools-result")
        tools.job = gr.State(None)
        tools.seen = gr.State("")  # the job text on the page, so the timer sends only changes
        tools.timer = gr.Timer(2.0)
    _wire(tools, paths, runner, shown, load_run)
    return tools


def _demos(paths: Paths) -> list:
    return [c for c in ch.model_choices(paths) if c not in ch.checkpoint_choices(paths)]


def _wire(tools: _Tools, paths: Paths, runner: JobRunner, shown: gr.State, load_run) -> None:
    tools.refresh.click(lambda current: refreshed(paths, current), tools.files, tools.files)
    tools.check.click(lambda files: check_files(paths, files), tools.files, tools.result)
    common = [tools.files, tools.weights, tools.output_name, tools.overwrite]
    queued = [tools.result, tools.job]
    tools.merge.click(lambda *v: queue_tool(paths, runner, "merge_lora", *v),
                      common + [tools.rank], queued)
    tools.resize.click(lambda *v: queue_tool(paths, runner, "resize_lora", *v),
                       common + [tools.rank, tools.dynamic_method, tools.dynamic_param], queued)
    tools.into.click(lambda *v: queue_tool(paths, runner, "merge_into_checkpoint", *v),
                     common + [tools.model], queued)
    tools.ema.click(lambda run_id, name, overwrite: queue_ema(paths, runner, load_run(run_id),
                                                              name, overwrite),
                    [shown, tools.output_name, tools.overwrite], queued)
    tools.timer.tick(lambda job_id, seen: job_text(runner, job_id, seen), [tools.job, tools.seen],
                     [tools.result, tools.seen], show_progress="hidden", queue=False)


def refreshed(paths: Paths, current):
    """models/Lora's files again, keeping the picked ones that are still there."""
    names = ch.lora_choices(paths)
    kept = [n for n in current if n in names] if isinstance(current, (list, tuple)) else []
    return gr.update(choices=names, value=kept)


# ---- the Check ----------------------------------------------------------------------------
def chosen(paths: Paths, files) -> list[str]:
    """The picked names, each a bare name of a file in models/Lora (ValueError naming it)."""
    if files is not None and not isinstance(files, (str, list, tuple)):
        raise ValueError("LoRA files: pick files from the list")
    names = [files] if isinstance(files, str) else list(files or [])
    if not names:
        raise ValueError("LoRA files: pick one or more files from models/Lora")
    for name in names:
        problems = check_name("LoRA files", str(name))
        if problems:
            raise ValueError(problems[0])
        if not (paths.lora / name).is_file():
            raise ValueError(f"LoRA files: no file {name!r} in models/Lora")
    return [str(n) for n in names]


def check_files(paths: Paths, files) -> str:
    """Each picked file's Check report, from `python -m trainers check_lora`."""
    try:
        names = chosen(paths, files)
    except ValueError as error:
        return error_text(error)
    return "\n\n".join(_check_one(paths, name) for name in names)


def _check_one(paths: Paths, name: str) -> str:
    command = [sys.executable, "-m", "trainers", "check_lora", "--json-events",
               "--data-dir", str(paths.data_dir), "--set", f"lora={name}"]
    if paths.confine:
        command.append("--confine-paths")
    try:
        done = subprocess.run(command, cwd=REPO_DIR, capture_output=True, text=True,
                              timeout=CHECK_TIMEOUT)
    except subprocess.TimeoutExpired:
        return f"**{name}**: the check took longer than {CHECK_TIMEOUT} s and was stopped"
    lines, summary = [], ""
    for line in done.stdout.splitlines():
        try:
            event = ev.from_json(line)
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(event, ev.Status):
            lines.append(event.text)
        elif isinstance(event, ev.Finished):
            summary = event.message
        elif isinstance(event, ev.Failed):
            summary = f"❌ {event.message}"
    if not summary:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        summary = f"❌ the check failed: {tail}"
    shown = lines[:60] + ([f"... and {len(lines) - 60} more lines"] if len(lines) > 60 else [])
    body = "\n".join(shown)
    return f"**{name}** — {summary}" + (f"\n\n```\n{body}\n```" if body else "")


# ---- the tools ----------------------------------------------------------------------------
def weighted(names: list[str], weights: str) -> str:
    """'a.safetensors: 0.5, b.safetensors: 1' from the picked names and the weights typed."""
    typed = [w.strip() for w in str(weights or "").replace(";", ",").split(",") if w.strip()]
    if typed and len(typed) != len(names):
        raise ValueError(f"weights: {len(typed)} weights for {len(names)} files; give one per "
                         "file, in order, or none")
    for text in typed:
        try:
            float(text)
        except ValueError:
            raise ValueError(f"weights: {text!r} is not a number") from None
    return ", ".join(f"{name}: {typed[i] if typed else 1}" for i, name in enumerate(names))


def tool_config(method: str, names: list[str], weights, output_name, overwrite, *extra) -> dict:
    data = {"output_name": str(output_name or "").strip(), "overwrite": bool(overwrite)}
    if method == "resize_lora":
        if len(names) != 1:
            raise ValueError("LoRA files: Resize takes one file")
        rank, method_name, param = extra
        data.update(lora=names[0], rank=rank if rank else 8, dynamic_method=method_name or "none",
                    dynamic_param=param or 0)
    elif method == "merge_lora":
        data.update(loras=weighted(names, weights), rank=extra[0] or 0)
    else:  # merge_into_checkpoint
        data.update(loras=weighted(names, weights), model=ch.value_of(extra[0] or ""))
    return data


def queue_tool(paths: Paths, runner: JobRunner, method: str, files, weights, output_name,
               overwrite, *extra):
    """Validate, check and queue one tool as the Train tab queues it: (message, job id)."""
    try:
        names = chosen(paths, files)
        data = tool_config(method, names, weights, output_name, overwrite, *extra)
        return _queue(paths, runner, method, data)
    except (ConfigError, ValueError, TypeError) as error:
        return error_text(error), gr.update()


def queue_ema(paths: Paths, runner: JobRunner, run: rn.Run | None, output_name, overwrite):
    """Queue the post-hoc EMA of the open run's LoRA copies: (message, job id)."""
    try:
        if run is None:
            raise ValueError("run: open a LoRA run above first (its copies are averaged)")
        if run.method != "lora":
            raise ValueError(f"run: {run.name} is a {run.method} run; post-hoc EMA averages "
                             "a LoRA run's copies")
        folder = (run.root / run.id).resolve()
        try:
            folder = folder.relative_to(paths.data_dir.resolve())
        except ValueError:
            pass
        data = {"run_folder": str(folder), "output_name": str(output_name or "").strip(),
                "overwrite": bool(overwrite)}
        return _queue(paths, runner, "lora_ema", data)
    except (ConfigError, ValueError, TypeError, OSError) as error:
        return error_text(error), gr.update()


def _queue(paths: Paths, runner: JobRunner, method: str, data: dict):
    from trainers.preflight import check_before_queueing
    from trainers.registry import config_class
    from webui.jobs import job_parts
    cfg = from_dict(config_class(method), data).validate()
    check_before_queueing(cfg, paths)
    name, kind, fn, spec = job_parts(method, cfg)
    job = runner.submit(name, kind, fn, config=cfg, queue=True, spec=spec)
    return f"Queued **{name}** (job {job.id}); its result shows here.", job.id


def job_text(runner: JobRunner, job_id, seen=""):
    """(the queued tool's state and final message, what the page shows), or skips."""
    job = runner.get(job_id) if isinstance(job_id, int) else None
    if job is None:
        return gr.skip(), seen
    snap = job.snapshot()
    text = f"**{snap['name']}** — {snap['state']}"
    result = snap["result"]
    if isinstance(result, ev.Failed):
        text += f"\n\n❌ {result.message}"
    elif isinstance(result, ev.Finished):
        text += f"\n\n{result.message}"
    elif snap["log"]:
        text += f"\n\n{snap['log'][-1]}"
    return (gr.skip(), seen) if text == seen else (text, text)
