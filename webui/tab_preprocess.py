"""Preprocess images tab: the PreprocessConfig form, Preprocess / Interrupt, the live view of the
job (progress, ETA, a gallery of written images, the summary), and a dataset editor for the
captions of a folder (per-image edit, batch tag operations, a tag-frequency table, the dataset
check of preprocess/dataset_check.py).

Safe paths: typed folders are resolved with `paths.resolve` (confined to the data folder when
the app is shared). The gallery never shows a user's file directly: every image shown is a
JPEG thumbnail written by this module into `outputs/preprocess/thumbnails/<folder hash>/`,
inside the app's only allowed path. Caption edits use the image paths kept in server-side
gr.State, never a path sent back by the browser."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from core import events as ev
from core.config import ConfigError, from_dict, help_of, label_of
from core.jobs import Busy, JobRunner
from core.paths import PathError, Paths
from preprocess import captions_edit as ce
from preprocess.config import PIL_MAX_PIXELS, PreprocessConfig
from webui.forms import control, error_text
from webui.handlers import Handlers

KIND = "preprocess"
CFG = PreprocessConfig
THUMB_SIZE = 384
GALLERY_LIMIT = 24          # newest results shown while a job runs
EDITOR_LIMIT = 2000         # images shown in the dataset editor (batch edits cover all)
CAPTIONER_LABELS = {"blip": "BLIP (caption)", "deepbooru": "DeepDanbooru (tags)",
                    "wd14": "WD tagger v2 / v3 (tags)",
                    "vlm": "VLM: Florence-2, Qwen-VL, JoyCaption (caption)"}
EDIT_ACTIONS = [("Add tags (at the end)", "add"), ("Add tags at the front", "add_front"),
                ("Remove tags", "remove"), ("Replace tags", "replace"),
                ("Move tags to the front", "move_front"), ("Remove duplicate tags", "dedupe")]

TOP = ["source", "destination"]
GROUPS: list[tuple[str, list[str], bool]] = [
    ("Size & captions", ["width", "height", "existing_caption", "keep_original_size", "alpha",
                         "max_pixels"], True),
    ("Flip / split", ["flip", "flip_swap_left_right", "split", "split_threshold",
                      "overlap_ratio"], True),
    ("Focal point crop", ["focal_crop", "face_detector", "focal_face_weight",
                          "focal_entropy_weight", "focal_edges_weight", "focal_debug"], False),
    ("Auto-sized crop", ["multicrop", "multicrop_objective", "multicrop_min_dim",
                         "multicrop_max_dim", "multicrop_min_area", "multicrop_max_area",
                         "multicrop_threshold"], False),
]
CAPTIONER_FIELDS = {
    "blip": ["blip_model", "blip_num_beams", "blip_min_length", "blip_max_length"],
    "deepbooru": ["deepbooru_model", "deepbooru_threshold", "deepbooru_filter_tags",
                  "deepbooru_sort_alpha", "deepbooru_use_spaces", "deepbooru_escape"],
    "wd14": ["wd14_model", "wd14_undesired_tags", "wd14_general_threshold", "wd14_general_mcut",
             "wd14_character_threshold", "wd14_character_mcut", "wd14_character_first",
             "wd14_rating", "wd14_sort_alpha", "wd14_use_spaces", "wd14_escape"],
    "vlm": ["vlm_model", "vlm_prompt", "vlm_max_new_tokens", "vlm_batch_size", "vlm_num_beams"],
}
CAPTION_RUN = ["device", "caption_layout", "skip_existing"]  # beside the captioner choice


# --- thumbnails: the only image files the page ever shows ---------------------------------------

def thumbnail_root(paths: Paths) -> Path:
    return paths.outputs / "preprocess" / "thumbnails"


def _thumb_folder(root: Path, folder: Path) -> Path:
    return root / hashlib.sha1(str(folder.resolve()).encode("utf-8")).hexdigest()[:16]


def _thumb_name(image: Path) -> str:
    name = f"{image.name}.jpg"
    if len(name.encode("utf-8")) > 200 or name.startswith("."):
        name = hashlib.sha1(image.name.encode("utf-8")).hexdigest()[:20] + ".jpg"
    return name


def _placeholder(root: Path) -> Path:
    path = root / "unreadable.png"
    if not path.exists():
        from PIL import Image, ImageDraw
        root.mkdir(parents=True, exist_ok=True)
        image = Image.new("RGB", (96, 96), (200, 200, 200))
        ImageDraw.Draw(image).text((44, 40), "?", fill=(90, 90, 90))
        _save_atomic(image, path, "PNG")
    return path


def _save_atomic(image, path: Path, fmt: str, mtime_ns: int | None = None) -> None:
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix="tmp-", suffix=path.suffix)
    os.close(handle)
    try:
        image.save(temp, format=fmt, quality=88)
        if mtime_ns is not None:
            os.utime(temp, ns=(mtime_ns, mtime_ns))
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


def thumbnail(image: str | Path, root: Path) -> Path:
    """A JPEG copy (at most THUMB_SIZE px) of `image` under `root`, remade when the image's
    modification time changes; a placeholder for files that cannot be read."""
    from core.images import open_image
    image = Path(image)
    try:
        stat = image.stat()
    except OSError:
        return _placeholder(root)
    thumb = _thumb_folder(root, image.parent) / _thumb_name(image)
    try:
        if thumb.stat().st_mtime_ns == stat.st_mtime_ns:
            return thumb
    except OSError:
        pass
    try:
        picture = open_image(image, max_pixels=PIL_MAX_PIXELS, draft=(THUMB_SIZE, THUMB_SIZE))
        picture.thumbnail((THUMB_SIZE, THUMB_SIZE))
    except Exception:  # any unreadable or odd file: show a placeholder, never fail the page
        return _placeholder(root)
    thumb.parent.mkdir(parents=True, exist_ok=True)
    _save_atomic(picture, thumb, "JPEG", stat.st_mtime_ns)
    return thumb


def prune_thumbnails(root: Path, folder: Path, images: list[Path]) -> None:
    """Remove thumbnails of images no longer in the folder."""
    thumbs = _thumb_folder(root, folder)
    if not thumbs.is_dir():
        return
    keep = {_thumb_name(p) for p in images}
    for old in thumbs.iterdir():
        if old.is_file() and old.name not in keep and not old.name.startswith("tmp-"):
            old.unlink(missing_ok=True)


# --- the live view of a preprocess job ----------------------------------------------------------

def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02}:{seconds:02}" if hours else f"{minutes}:{seconds:02}"


def status_text(snap: dict | None, now: float | None = None) -> str:
    if snap is None:
        return "No preprocess job has run yet."
    lines = [f"**{snap['name']}** — {snap['state']}"]
    progress: ev.Progress | None = snap["progress"]
    written = len(snap["previews"])
    if progress is not None and progress.total:
        end = snap["ended"] or now or time.time()
        elapsed = end - snap["started"] if snap["started"] else 0.0
        rate = progress.step / elapsed if elapsed > 0 else 0.0
        left = (progress.total - progress.step) / rate if rate > 0 else 0.0
        eta = _duration(left) if snap["state"] == "running" and rate > 0 else "—"
        lines.append(f"images {progress.step}/{progress.total} "
                     f"({100 * progress.step // progress.total}%) · {written} files written · "
                     f"{rate:.2f} images/s · elapsed {_duration(elapsed)} · ETA {eta}")
    result = snap["result"]
    if isinstance(result, ev.Failed):
        lines.append(f"**Failed:** {result.message}")
    elif isinstance(result, ev.Finished):
        lines.append(result.message.splitlines()[0] if result.message else "finished")
    elif snap["log"]:
        lines.append(snap["log"][-1])
    return "\n\n".join(lines)


def result_items(previews: list[ev.Preview], root: Path,
                 limit: int = GALLERY_LIMIT) -> list[tuple[str, str]]:
    """The newest written images, newest first, as thumbnails with their captions."""
    return [(str(thumbnail(p.path, root)), p.caption) for p in previews[-limit:]][::-1]


# --- dataset editor -----------------------------------------------------------------------------

def frequency_frame(folder: Path | None) -> pd.DataFrame:
    rows = ce.tag_frequency(folder) if folder is not None else []
    return pd.DataFrame(rows, columns=["tag", "images"]).astype({"tag": "object",
                                                                 "images": "int64"})


def editor_view(folder: Path, root: Path) -> tuple[list[tuple[str, str]], list[str], str]:
    captions = ce.read_captions(folder)
    images = list(captions)
    prune_thumbnails(root, folder, images)
    shown = images[:EDITOR_LIMIT]
    items = [(str(thumbnail(p, root)), captions[p] or f"(no caption) {p.name}") for p in shown]
    with_caption = sum(1 for text in captions.values() if text)
    note = f"{len(images)} images, {with_caption} with a caption, in `{folder}`."
    if len(images) > len(shown):
        note += f" Showing the first {len(shown)}; batch edits apply to all."
    return items, [str(p) for p in shown], note


def _check_tags(action: str, tags: str) -> str | None:
    if action != "dedupe" and not ce.split_tags(tags or ""):
        return "tags: give at least one tag (comma-separated)"
    return None


# --- the tab ------------------------------------------------------------------------------------

def _field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(CFG)]


def form_layout() -> list[str]:
    """Every PreprocessConfig field in the order the form shows them."""
    names = TOP + [n for _, group, _ in GROUPS for n in group]
    names += ["captioners"] + CAPTION_RUN + [n for group in CAPTIONER_FIELDS.values()
                                             for n in group]
    return names


def build(paths: Paths, runner: JobRunner) -> dict:
    missing = set(_field_names()) - set(form_layout())
    assert not missing, f"PreprocessConfig fields without a control: {sorted(missing)}"
    page = _layout(runner)
    handlers = _Handlers(paths, runner, page)
    _wire(page, handlers)
    return {"controls": page.controls, "restore": (handlers.restore_form, page.restore_outputs()),
            "gallery": page.gallery, "editor": page.browser}


class _Page:
    """The tab's components, set by _layout; the handlers and _wire read them."""
    controls: dict[str, gr.components.Component]  # by PreprocessConfig field
    captioner_groups: dict[str, gr.Group]  # each captioner's options, by captioner
    inner: gr.Tabs
    start_button: gr.Button
    enqueue: gr.Button
    interrupt: gr.Button
    to_editor: gr.Button
    message: gr.Markdown
    status: gr.Markdown
    gallery: gr.Gallery
    summary: gr.Textbox
    folder: gr.Textbox
    load: gr.Button
    check_resolution: gr.Number
    check_tokens: gr.Dropdown
    check: gr.Button
    check_report: gr.Textbox
    edit_message: gr.Markdown
    browser: gr.Gallery
    selected_name: gr.Markdown
    caption: gr.Textbox
    save: gr.Button
    action: gr.Dropdown
    tags: gr.Textbox
    replacement: gr.Textbox
    apply: gr.Button
    table: gr.Dataframe
    seen: gr.State
    loaded: gr.State
    images: gr.State
    chosen: gr.State
    timer: gr.Timer

    def inputs(self) -> list:
        return list(self.controls.values())

    def restore_outputs(self) -> list:
        return self.inputs() + list(self.captioner_groups.values())

    def editor_outputs(self) -> list:
        """What opening a folder in the dataset editor updates."""
        return [self.edit_message, self.browser, self.loaded, self.images, self.chosen,
                self.selected_name, self.caption, self.table]


def _layout(runner: JobRunner) -> _Page:
    page = _Page()
    with gr.Tab("Preprocess images", id="preprocess"):
        gr.Markdown("Resize, crop, flip and caption a folder of images into a training dataset, "
                    "then fix its captions in the dataset editor. The source folder is only "
                    "read. Relative paths are inside the data folder.")
        with gr.Tabs() as page.inner:
            with gr.Tab("Process a folder", id="preprocess-run"):
                with gr.Row():
                    with gr.Column(scale=1):
                        page.controls, page.captioner_groups = _config_form()
                    with gr.Column(scale=1):
                        _job_view(page, runner)
            with gr.Tab("Dataset editor", id="preprocess-editor"):
                _dataset_editor(page)
        page.seen = gr.State((None, -1, -1, None, False))
        page.loaded = gr.State(None)       # the resolved folder being edited (str)
        page.images = gr.State([])         # its image paths, in gallery order
        page.chosen = gr.State(None)       # index of the selected image
        page.timer = gr.Timer(1.0)
    return page


def _config_form() -> tuple[dict[str, gr.components.Component], dict[str, gr.Group]]:
    """The PreprocessConfig controls by field, and each captioner's group of options."""
    controls: dict[str, gr.components.Component] = {}
    captioner_groups = {}
    with gr.Row():
        for name in TOP:
            controls[name] = control(CFG, name)
    for title, names, is_open in GROUPS:
        with gr.Accordion(title, open=is_open):
            _two_per_row(names, controls)
    with gr.Accordion("Captioners", open=False):
        controls["captioners"] = gr.CheckboxGroup(
            [(CAPTIONER_LABELS.get(n, n), n) for n in CAPTIONER_FIELDS],
            value=[], label=label_of(CFG, "captioners"),
            info=help_of(CFG, "captioners"), elem_id=f"{CFG.__name__}-captioners")
        with gr.Row():
            for name in CAPTION_RUN:
                controls[name] = control(CFG, name)
        for key, names in CAPTIONER_FIELDS.items():
            with gr.Group(visible=False) as group:
                gr.Markdown(f"**{CAPTIONER_LABELS[key]}**")
                _two_per_row(names, controls)
            captioner_groups[key] = group
    return controls, captioner_groups


def _two_per_row(names: list[str], controls: dict) -> None:
    for start in range(0, len(names), 2):
        with gr.Row():
            for name in names[start:start + 2]:
                controls[name] = control(CFG, name)


def _job_view(page: _Page, runner: JobRunner) -> None:
    """The buttons and the live view of the job."""
    with gr.Row():
        page.start_button = gr.Button("Preprocess", variant="primary",
                                      elem_id="preprocess-start")
        page.enqueue = gr.Button("Add to queue", elem_id="preprocess-enqueue")
        page.interrupt = gr.Button("Interrupt", variant="stop",
                                   elem_id="preprocess-interrupt")
        page.to_editor = gr.Button("Edit captions of the destination",
                                   elem_id="preprocess-edit-destination")
    page.message = gr.Markdown(elem_id="preprocess-message")
    page.status = gr.Markdown(status_text(_snap(runner)), elem_id="preprocess-status")
    page.gallery = gr.Gallery(label="Written images (newest first)", columns=4,
                              height=360, elem_id="preprocess-gallery")
    page.summary = gr.Textbox(label="Summary", lines=6, max_lines=30,
                              interactive=False, visible=False,
                              elem_id="preprocess-summary")


def _dataset_editor(page: _Page) -> None:
    with gr.Row():
        page.folder = gr.Textbox(label="Dataset folder", scale=4,
                                 info="Images with <name>.txt captions beside them.",
                                 elem_id="preprocess-edit-folder")
        page.load = gr.Button("Load", scale=0, min_width=90, elem_id="preprocess-edit-load")
    with gr.Row():
        page.check_resolution = gr.Number(512, label="Training resolution", precision=0,
                                          minimum=64, maximum=4096,
                                          elem_id="preprocess-check-resolution")
        page.check_tokens = gr.Dropdown([75, 150, 225], value=75, label="Max token length",
                                        elem_id="preprocess-check-tokens")
        page.check = gr.Button("Check dataset", elem_id="preprocess-check")
    page.check_report = gr.Textbox(label="Dataset check (small images, duplicates, captions, "
                                   "tags)", lines=4, max_lines=30, interactive=False,
                                   elem_id="preprocess-check-report")
    page.edit_message = gr.Markdown(elem_id="preprocess-edit-message")
    with gr.Row():
        with gr.Column(scale=3):
            page.browser = gr.Gallery(label="Images (select one to edit its caption)",
                                      columns=5, height=480, allow_preview=False,
                                      elem_id="preprocess-edit-gallery")
            with gr.Row():
                page.selected_name = gr.Markdown("No image selected.",
                                                 elem_id="preprocess-edit-selected")
            page.caption = gr.Textbox(label="Caption", lines=3, interactive=True,
                                      elem_id="preprocess-edit-caption")
            page.save = gr.Button("Save caption", elem_id="preprocess-edit-save")
        with gr.Column(scale=2):
            gr.Markdown("**Batch edit every caption of the folder** (tags are "
                        "comma-separated; case and `_`/space do not matter).")
            page.action = gr.Dropdown(EDIT_ACTIONS, value="remove", label="Operation",
                                      elem_id="preprocess-edit-action")
            page.tags = gr.Textbox(label="Tags", placeholder="e.g. red hair, 1girl",
                                   elem_id="preprocess-edit-tags")
            page.replacement = gr.Textbox(label="Replace with (empty removes)",
                                          visible=False,
                                          elem_id="preprocess-edit-replacement")
            page.apply = gr.Button("Apply to all captions", variant="primary",
                                   elem_id="preprocess-edit-apply")
            page.table = gr.Dataframe(frequency_frame(None), headers=["tag", "images"],
                                      label="Tag frequency (click a tag to add it to "
                                      "Tags)", interactive=False, max_height=420,
                                      elem_id="preprocess-edit-tag-table")


class _Handlers(Handlers):
    def __init__(self, paths: Paths, runner: JobRunner, page: _Page):
        self.paths, self.runner = paths, runner
        self.root = thumbnail_root(paths)
        self.names = list(page.controls)
        self.captioner_groups = page.captioner_groups
        super().__init__()

    # -- preprocess --
    def config_of(self, values) -> PreprocessConfig:
        cfg = from_dict(CFG, dict(zip(self.names, values)))
        cfg.validate(self.paths)
        return cfg

    def submit(self, values, queue: bool):
        from webui.jobs import job_parts
        try:
            cfg = self.config_of(values)
            name, kind, fn, spec = job_parts("preprocess", cfg)
            job = self.runner.submit(name, kind, fn, config=cfg, queue=queue, spec=spec)
        except (ConfigError, Busy) as error:
            return error_text(error)
        return f"{'Queued' if queue else 'Started'} job {job.id}: {job.name}."

    def start(self, *values):
        return self.submit(values, queue=False)

    def add_to_queue(self, *values):
        return self.submit(values, queue=True)

    def stop(self):
        job = self.runner.current()
        if job is not None and job.kind == KIND and self.runner.stop(job.id):
            return "Interrupting: the job stops after the current image."
        return "No preprocess job is running."

    def poll(self, state):
        job = self.runner.latest(KIND)
        if job is None:
            return gr.skip(), gr.skip(), gr.skip(), state
        snap = job.snapshot()
        step = snap["progress"].step if snap["progress"] else -1
        key = (job.id, step, len(snap["previews"]), snap["state"], snap["result"] is not None)
        state = tuple(state)
        if key == state and snap["state"] != "running":
            return gr.skip(), gr.skip(), gr.skip(), state
        status_update = status_text(snap)  # running: refresh elapsed time and ETA
        if key == state:
            return status_update, gr.skip(), gr.skip(), state
        new_gallery = (key[0], key[2]) != (state[0], state[2])
        result = snap["result"]
        if result is None:
            summary_update = gr.update(value="", visible=False)
        else:
            summary_update = gr.update(value=result.message, visible=True)
        if key[0] == state[0] and key[4] == state[4]:
            summary_update = gr.skip()
        return (status_update,
                result_items(snap["previews"], self.root) if new_gallery else gr.skip(),
                summary_update, key)

    def restore_form(self):
        """A fresh page shows the settings of the running (or last) preprocess job."""
        cfg = getattr(self.runner.latest(KIND), "config", None)
        if not isinstance(cfg, CFG):
            return [gr.skip()] * (len(self.names) + len(self.captioner_groups))
        return ([gr.update(value=getattr(cfg, n)) for n in self.names]
                + self.show_captioner_options(cfg.captioners))

    def show_captioner_options(self, chosen_names):
        return [gr.update(visible=key in (chosen_names or [])) for key in self.captioner_groups]

    # -- dataset editor --
    def resolve_folder(self, typed: str) -> Path:
        typed = typed if isinstance(typed, str) else ""  # only an API call sends anything else
        path = self.paths.resolve(typed, "folder")
        if not path.is_dir():
            raise PathError(f"folder: {typed.strip()!r} "
                            f"{'is not a folder' if path.exists() else 'does not exist'}")
        return path

    def refreshed(self, folder_path: Path, index):
        items, listed, note = editor_view(folder_path, self.root)
        text = ""
        if index is not None and 0 <= index < len(listed):
            text = ce.read_caption(Path(listed[index]))
        else:
            index = None
        return items, listed, note, frequency_frame(folder_path), index, text

    def open_folder(self, typed):
        try:
            folder_path = self.resolve_folder(typed or "")
        except PathError as error:
            return (f"**Error:** {error}", gr.skip(), None, [], None, "No image selected.", "",
                    gr.skip())
        items, listed, note, frame, _, _ = self.refreshed(folder_path, None)
        return note, items, str(folder_path), listed, None, "No image selected.", "", frame

    def open_destination(self, typed):
        typed = typed if isinstance(typed, str) else ""
        return (gr.update(value=typed), gr.Tabs(selected="preprocess-editor"),
                *self.open_folder(typed))

    def check_dataset(self, typed, resolution, tokens):
        from preprocess.dataset_check import check_dataset
        try:
            folder_path = self.resolve_folder(typed or "")
            size = int(resolution or 0)
            return check_dataset(folder_path, size, int(tokens or 75)).text()
        except (PathError, ValueError, OSError) as error:
            return f"Error: {error}"

    @staticmethod
    def select(listed, evt: gr.SelectData):
        index = evt.index if isinstance(evt.index, int) else None
        if index is None or not 0 <= index < len(listed):
            return None, "No image selected.", ""
        image = Path(listed[index])
        return index, f"**{image.name}** — `{ce.caption_path(image).name}`", ce.read_caption(image)

    def save_caption(self, folder_text, listed, index, text):
        if folder_text is None or index is None or not 0 <= index < len(listed):
            return "**Error:** select an image first.", gr.skip(), gr.skip(), gr.skip(), gr.skip()
        image = Path(listed[index])
        try:
            ce.write_caption(image, (text or "").strip())
            items, listed, note, frame, index, text = self.refreshed(Path(folder_text), index)
        except OSError as error:
            return f"**Error:** {error}", gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return f"Saved the caption of {image.name}.", items, listed, frame, text

    def batch(self, folder_text, listed, index, action_name, tag_text, new_text):
        if folder_text is None:
            return ("**Error:** load a dataset folder first.", gr.skip(), gr.skip(), gr.skip(),
                    gr.skip())
        problem = _check_tags(action_name, tag_text)
        if problem:
            return f"**Please fix:**\n- {problem}", gr.skip(), gr.skip(), gr.skip(), gr.skip()
        try:
            report = ce.apply_edit(folder_text, action_name, tag_text or "", new_text or "")
            items, listed, note, frame, index, text = self.refreshed(Path(folder_text), index)
        except (OSError, ValueError) as error:
            return f"**Error:** {error}", gr.skip(), gr.skip(), gr.skip(), gr.skip()
        label = dict((v, k) for k, v in EDIT_ACTIONS)[action_name]
        total = len(report.changed) + report.unchanged
        return (f"{label}: changed {len(report.changed)} of {total} captions. {note}",
                items, listed, frame, text)

    @staticmethod
    def pick_tag(current, evt: gr.SelectData):
        row = evt.row_value if isinstance(evt.row_value, (list, tuple)) and evt.row_value else None
        tag = str(row[0]) if row else str(evt.value)
        present = ce.split_tags(current if isinstance(current, str) else "")
        if ce.tag_key(tag) in {ce.tag_key(t) for t in present}:
            return gr.skip()
        return ce.join_tags(present + [tag])


def _wire(page: _Page, handlers: _Handlers) -> None:
    inputs = page.inputs()
    page.start_button.click(handlers.start, inputs, page.message)
    page.enqueue.click(handlers.add_to_queue, inputs, page.message)
    page.interrupt.click(handlers.stop, None, page.message)
    page.timer.tick(handlers.poll, page.seen, [page.status, page.gallery, page.summary, page.seen],
                    show_progress="hidden",
                    queue=False)  # a direct HTTP call: no queue, event stream or SSE (see live.py)
    captioners = page.controls["captioners"]
    captioners.change(handlers.show_captioner_options, captioners,
                      list(page.captioner_groups.values()))
    gr.on(None, handlers.restore_form, None, page.restore_outputs())

    editor_outputs = page.editor_outputs()
    page.load.click(handlers.open_folder, page.folder, editor_outputs)
    page.folder.submit(handlers.open_folder, page.folder, editor_outputs)
    page.check.click(handlers.check_dataset, [page.folder, page.check_resolution,
                                              page.check_tokens], page.check_report)
    page.to_editor.click(handlers.open_destination, page.controls["destination"],
                         [page.folder, page.inner] + editor_outputs)
    page.browser.select(handlers.select, page.images, [page.chosen, page.selected_name,
                                                       page.caption])
    edit_outputs = [page.edit_message, page.browser, page.images, page.table, page.caption]
    page.save.click(handlers.save_caption, [page.loaded, page.images, page.chosen, page.caption],
                    edit_outputs)
    page.apply.click(handlers.batch, [page.loaded, page.images, page.chosen, page.action,
                                      page.tags, page.replacement], edit_outputs)
    page.action.change(lambda a: gr.update(visible=a == "replace"), page.action, page.replacement)
    page.table.select(handlers.pick_tag, page.tags, page.tags)


def _snap(runner: JobRunner):
    job = runner.latest(KIND)
    return job.snapshot() if job else None
