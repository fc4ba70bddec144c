"""run(cfg, ctx): read every file of the source folder, write the processed images and captions.

For each source file (sorted by name; `.txt` / `.caption` captions and hidden files are not
sources), in A1111's order: split pieces (if split and oversized), a focal-point crop (if
focal_crop and the shape differs from the output's), an auto-sized crop (if multicrop), the
original (if keep_original_size); when none of these produced anything, the centre
crop-and-resize to width x height. Every output is saved as `{index:05}-{subindex}-{stem}.png` (index = position
of the file in the source listing) with `<same name>.txt` when its caption is not empty, and,
with flip, followed by its mirror image with its own caption. caption_layout orders tags and
natural captions in the .txt, or puts the natural ones in `<same name>.caption`.

Outputs are captioned a batch at a time (the largest captioner batch_size; 1 writes each file's
outputs at once); Progress counts the files whose outputs are all written. With skip_existing an
output whose .png and caption files are already in the destination is left alone (resume);
without it, an output of the same name is replaced and counted in the Summary.

The source folder is only read. Files of other types than core.images.IMAGE_EXTENSIONS and
images that cannot be read are skipped and named in the Summary."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from PIL import Image

from core import events as ev
from preprocess import transforms as tf
from preprocess.config import PreprocessConfig
from core.images import IMAGE_EXTENSIONS, ImageError, flatten, not_an_image_reason, open_image

CAPTION_EXT = ".txt"
NATURAL_EXT = ".caption"  # caption_layout "separate files": kohya's extension for captions
MAX_STEM_BYTES = 180


@dataclass
class Summary:
    source: str
    destination: str
    total: int = 0                     # files considered in the source folder
    processed: int = 0                 # of which read and processed
    written: list[str] = field(default_factory=list)   # output images (flips included)
    captions: int = 0                  # caption files written
    kept: int = 0                      # outputs already captioned, left alone (skip_existing)
    replaced: int = 0                  # outputs that replaced a file of the same name
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)
    notes: list[str] = field(default_factory=list)     # e.g. no auto-size found
    debug_images: list[str] = field(default_factory=list)
    stopped: bool = False
    seconds: float = 0.0

    def text(self) -> str:
        head = "Stopped" if self.stopped else "Done"
        lines = [f"{head}: {self.processed} of {self.total} files from {self.source} -> "
                 f"{len(self.written)} images and {self.captions} captions in {self.destination} "
                 f"({self.seconds:.1f} s)."]
        if self.kept:
            lines.append(f"Kept {self.kept} images already captioned in the destination.")
        if self.replaced:
            lines.append(f"Replaced {self.replaced} images of an earlier run in the destination.")
        if self.skipped:
            lines.append(f"Skipped {len(self.skipped)}:")
            lines += [f"  {name}: {reason}" for name, reason in self.skipped]
        lines += self.notes
        return "\n".join(lines)


class _NoContext:
    paths = None

    def emit(self, event) -> None:
        pass

    def should_stop(self) -> bool:
        return False


def list_sources(folder: Path) -> list[Path]:
    """Regular files of the folder (not recursive), by name; captions and hidden files left out."""
    files = [p for p in folder.iterdir()
             if p.is_file() and not p.name.startswith(".")
             and p.suffix.lower() not in (CAPTION_EXT, NATURAL_EXT)]
    return sorted(files, key=lambda p: (p.name.lower(), p.name))


def read_existing_caption(image_file: Path) -> str | None:
    caption = image_file.with_suffix(CAPTION_EXT)
    if not caption.is_file():
        return None
    return caption.read_text(encoding="utf-8-sig", errors="replace").strip()


def combine_caption(generated: str, existing: str | None, action: str) -> str:
    """A1111's rule: prepend/append joins with a space, copy replaces, ignore keeps generated."""
    if existing:
        if action == "prepend":
            generated = f"{existing} {generated}"
        elif action == "append":
            generated = f"{generated} {existing}"
        elif action == "copy":
            generated = existing
    return generated.strip()


def safe_stem(stem: str, limit: int = MAX_STEM_BYTES) -> str:
    data = stem.encode("utf-8")
    if len(data) <= limit:
        return stem
    return data[:limit].decode("utf-8", errors="ignore")


def variants(image: Image.Image, cfg: PreprocessConfig, face_detector=None,
             notes: list[str] | None = None, name: str = "") -> Iterator[tuple[str, Image.Image]]:
    """The output images for one source image, as (kind, image) in A1111's order; kind is
    "split", "focal", "focal-debug", "multicrop", "original" or "resize"."""
    width, height = cfg.width, cfg.height
    produced = False
    if cfg.split:
        pieces = tf.split_image(image, width, height, cfg.split_threshold, cfg.overlap_ratio)
        if pieces:
            produced = True
            for piece in pieces:
                yield "split", piece
    if cfg.focal_crop and image.width * height != image.height * width:
        result = tf.focal_crop(image, width, height, cfg.focal_face_weight,
                               cfg.focal_entropy_weight, cfg.focal_edges_weight,
                               face_detector=face_detector, debug=cfg.focal_debug)
        produced = True
        yield "focal", result.image
        if result.debug is not None:
            yield "focal-debug", result.debug
    if cfg.multicrop:
        produced = True
        cropped = tf.auto_size_crop(image, min_dim=cfg.multicrop_min_dim,
                                    max_dim=cfg.multicrop_max_dim,
                                    min_area=cfg.multicrop_min_area,
                                    max_area=cfg.multicrop_max_area,
                                    objective=cfg.multicrop_objective,
                                    threshold=cfg.multicrop_threshold)
        if cropped is not None:
            yield "multicrop", cropped
        elif notes is not None:
            notes.append(f"{name}: no auto-sized crop of {image.width}x{image.height} within the "
                         f"error threshold {cfg.multicrop_threshold}")
    if cfg.keep_original_size:
        produced = True
        yield "original", image
    if not produced:
        yield "resize", tf.resize_crop(image, width, height)


@dataclass
class _Output:
    image: Image.Image
    path: Path                 # the .png to write
    existing: str | None       # the source's caption, for the existing-caption action
    step: int


def caption_texts(parts: list[tuple[str, str]], layout: str) -> tuple[str, str | None]:
    """(<name>.txt text, <name>.caption text or None) from (captioner name, output) pairs in
    the listed order, by caption_layout."""
    from preprocess.captioners import is_tagger

    def join(items):
        return ", ".join(text for _, text in items if text)

    tags = [p for p in parts if is_tagger(p[0])]
    natural = [p for p in parts if not is_tagger(p[0])]
    if layout == "separate files":
        return join(tags), join(natural)
    if layout == "tags, caption":
        return join(tags + natural), None
    if layout == "caption, tags":
        return join(natural + tags), None
    return join(parts), None


class _Writer:
    """Saves source images' outputs: names, flips, captions (a batch at a time), events."""

    def __init__(self, cfg: PreprocessConfig, dst: Path, captioners: list, ctx, summary: Summary):
        self.cfg, self.dst, self.captioners, self.ctx = cfg, dst, captioners, ctx
        self.summary = summary
        self.names = list(cfg.captioners)[:len(captioners)]
        self.separate = cfg.caption_layout == "separate files"

    def caption_files(self, path: Path) -> list[Path]:
        """The caption files a finished output has (for skip_existing)."""
        if not self.captioners:
            return []
        if not self.separate:
            return [path.with_suffix(CAPTION_EXT)]
        from preprocess.captioners import is_tagger
        files = [path.with_suffix(NATURAL_EXT)]
        if any(is_tagger(n) for n in self.names):
            files.append(path.with_suffix(CAPTION_EXT))
        return files

    def done(self, path: Path) -> bool:
        return self.cfg.skip_existing and path.is_file() and all(
            f.is_file() for f in self.caption_files(path))

    def outputs(self, image: Image.Image, index: int, file: Path, detector) -> list[_Output]:
        """Every output of one source image (and its flip) still to write; debug images are
        written at once."""
        cfg = self.cfg
        existing = read_existing_caption(file) if cfg.existing_caption != "ignore" else None
        flipped_existing = existing
        if existing and cfg.flip_swap_left_right:
            flipped_existing = tf.swap_left_right(existing)
        stem = safe_stem(file.stem)
        subindex = 0
        out = []
        for kind, output in variants(image, cfg, detector, self.summary.notes, file.name):
            if kind == "focal-debug":
                self.save_debug(output, index, stem)
                continue
            pairs = [(output, existing)]
            if cfg.flip:
                pairs.append((tf.mirror(output), flipped_existing))
            for picture, text in pairs:
                path = self.dst / f"{index:05}-{subindex}-{stem}.png"
                subindex += 1
                if self.done(path):
                    self.summary.kept += 1
                    continue
                out.append(_Output(picture, path, text, index + 1))
        return out

    def generated(self, images: list[Image.Image]) -> list[list[tuple[str, str]]]:
        """Per image, (captioner name, output) for every captioner; captioners with
        caption_batch get the whole batch at once."""
        rgb = [flatten(i) if i.mode == "RGBA" else i.convert("RGB") for i in images]
        per_captioner = []
        for captioner in self.captioners:
            batch = getattr(captioner, "caption_batch", None)
            per_captioner.append(batch(rgb) if batch else [captioner.caption(i) for i in rgb])
        return [[(name, texts[i]) for name, texts in zip(self.names, per_captioner)]
                for i in range(len(images))]

    def write(self, outputs: list[_Output]) -> None:
        if not outputs:
            return
        if any(hasattr(c, "caption_batch") for c in self.captioners):  # a slow model: say so
            names = outputs[0].path.name + (f" .. {outputs[-1].path.name}" if len(outputs) > 1
                                            else "")
            self.ctx.emit(ev.Status(f"Captioning {len(outputs)} image(s): {names}"))
        generated = self.generated([o.image for o in outputs])
        for output, parts in zip(outputs, generated):
            main, natural = caption_texts(parts, self.cfg.caption_layout)
            caption = combine_caption(main, output.existing, self.cfg.existing_caption)
            self.save(output, caption, natural)

    def save(self, output: _Output, caption: str, natural: str | None) -> None:
        path = output.path
        if path.exists():
            self.summary.replaced += 1
        output.image.save(path, format="PNG")
        files = [(path.with_suffix(CAPTION_EXT), caption)]
        if natural is not None:
            files.append((path.with_suffix(NATURAL_EXT), natural.strip()))
        for text_file, text in files:
            if text:
                text_file.write_text(text, encoding="utf-8")
                self.summary.captions += 1
            elif text_file.exists():  # stale caption of an earlier run with the same name
                text_file.unlink()
        self.summary.written.append(str(path))
        shown = caption if natural is None else " | ".join(t for t in (caption, natural) if t)
        self.ctx.emit(ev.Preview(step=output.step, path=str(path), caption=shown))

    def save_debug(self, image: Image.Image, index: int, stem: str) -> None:
        folder = self.dst / "debug"
        folder.mkdir(exist_ok=True)
        path = folder / f"{index:05}-{stem}-focal.png"
        image.save(path, format="PNG")
        self.summary.debug_images.append(str(path))


def load_captioners(cfg: PreprocessConfig, paths, ctx) -> list:
    from preprocess import captioners
    loaded = []
    try:
        for name in cfg.captioners:
            ctx.emit(ev.Status(f"Loading {captioners.label(name)} model..."))
            captioner = captioners.create(name, cfg, paths)
            if hasattr(captioner, "should_stop"):
                captioner.should_stop = ctx.should_stop
            loaded.append(captioner)
    except BaseException:
        close_captioners(loaded)
        raise
    return loaded


def close_captioners(loaded: list) -> None:
    """Let go of the models a run loaded for itself (the VLM's); cached ones stay."""
    for captioner in loaded:
        if hasattr(captioner, "close"):
            captioner.close()


def _flush(writer: _Writer, pending: list[_Output], summary: Summary) -> bool:
    """Caption and write the pending outputs; False when a stop request ended the batch."""
    from preprocess.captioners import Stopped
    try:
        writer.write(pending)
    except Stopped:
        summary.stopped = True
        return False
    return True


def run(cfg: PreprocessConfig, ctx=None) -> Summary:
    """Preprocess cfg.source into cfg.destination; emits Status, Progress(step=files done,
    total=files), Preview per written image and Finished; stops between files when asked."""
    from preprocess.faces import make_detector

    ctx = ctx or _NoContext()
    paths = getattr(ctx, "paths", None)
    started = time.monotonic()
    src, dst = cfg.validate(paths)
    summary = Summary(source=str(src), destination=str(dst))
    detector = None
    if paths is None:  # used as a library: models are looked up in the repo's models/
        from core.paths import REPO_DIR, Paths
        model_paths = Paths(REPO_DIR)
    else:
        model_paths = paths
    if cfg.focal_crop and cfg.focal_face_weight > 0:
        detector = make_detector(cfg.face_detector, model_paths.models)
        if detector is None and cfg.face_detector == "auto":
            summary.notes.append("No face detector (opencv is not installed): the focal point "
                                 "uses entropy and edges only.")
            ctx.emit(ev.Status(summary.notes[-1]))
    captioners = load_captioners(cfg, model_paths, ctx)
    try:
        _process(cfg, ctx, src, dst, captioners, detector, summary)
    finally:
        close_captioners(captioners)
    summary.seconds = time.monotonic() - started
    ctx.emit(ev.Finished(step=summary.processed, path=str(dst), message=summary.text()))
    return summary


def _process(cfg: PreprocessConfig, ctx, src: Path, dst: Path, captioners: list, detector,
             summary: Summary) -> None:
    files = list_sources(src)
    summary.total = len(files)
    dst.mkdir(parents=True, exist_ok=True)
    writer = _Writer(cfg, dst, captioners, ctx, summary)
    batch = max([int(getattr(c, "batch_size", 1)) for c in captioners] + [1])
    pending: list[_Output] = []   # outputs waiting for a full captioning batch
    waiting = 0                   # source files whose outputs are pending
    ctx.emit(ev.Status(f"Preprocessing {len(files)} files from {src} into {dst}"))
    for index, file in enumerate(files):
        if ctx.should_stop():
            summary.stopped = True
            break
        try:
            if file.suffix.lower() not in IMAGE_EXTENSIONS:
                raise ImageError(not_an_image_reason(file))
            image = open_image(file, max_pixels=cfg.max_pixels,
                               alpha="keep" if cfg.alpha == "keep" else "flatten")
        except ImageError as error:
            summary.skipped.append((file.name, str(error)))
            ctx.emit(ev.Status(f"Skipped {file.name}: {error}"))
        else:
            pending += writer.outputs(image, index, file, detector)
            waiting += 1
        if pending and (len(pending) >= batch or index == len(files) - 1):
            if not _flush(writer, pending, summary):
                break
            pending = []
        if not pending:
            summary.processed += waiting
            waiting = 0
            ctx.emit(ev.Progress(step=index + 1, total=len(files), loss=0.0, learn_rate=0.0))
