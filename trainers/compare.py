"""Compare checkpoints: a labelled grid of checkpoints x strengths (rows) by prompts x seeds
(columns). Every column has one fixed seed, so the images down a column differ only by the
checkpoint and strength.

Each cell is cached on disk under a key of (base model, checkpoint file hash, strength, prompt,
negative, seed, steps, CFG, size, sampler), so changing one axis renders only the new cells.
Cells are stored as PNG (lossless): a grid built from the cache is identical to a fresh one.

torch is imported only inside the rendering functions (the page imports this module)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from core import events as ev
from core.atomic import atomic_write
from core.config import ConfigError
from core.paths import Paths
from trainers import catalog
from trainers.apt_prompts import pair_negative
from trainers.configs import SAMPLERS

CACHE_VERSION = 1
MAX_CELLS = 400
FLAG = re.compile(r"\s--([a-z]+)\s+")


@dataclass
class CompareSpec:
    method: str  # a catalog method whose checkpoints can be applied (Method.apply)
    model: str  # the base model, as the run named it (DreamBooth checkpoints are models)
    token: str  # the word an embedding stands for in prompts (the run's name)
    checkpoints: list[tuple[str, str]]  # (row label, file)
    prompts: list[str]
    seeds: list[int]
    strengths: list[float] = field(default_factory=lambda: [1.0])
    negative: str = ""
    steps: int = 20
    cfg: float = 7.0
    sampler: str = "Euler a"
    width: int = 512
    height: int = 512
    clip_skip: int = 1
    title: str = ""
    partners: list[list[str]] = field(default_factory=list)  # per checkpoint (APT: its '-neg')

    @property
    def uses_strength(self) -> bool:
        return _strength(self.method)

    def _negative_partner(self) -> str:
        """The suffix of the embedding each checkpoint pairs with in the negative prompt."""
        method = catalog.find(self.method)
        return method.negative_partner if method is not None else ""

    def rows(self) -> list[tuple[int, float | None]]:
        strengths = self.strengths if self.uses_strength else [None]
        return [(index, strength) for index in range(len(self.checkpoints))
                for strength in strengths]

    def columns(self) -> list[tuple[str, str, int]]:
        """(prompt, negative, seed) per column; a prompt line may carry `--n negative`. APT:
        the '-neg' embedding joins the negative prompt, as in its training previews."""
        out = []
        for line in self.prompts:
            prompt, negative = split_prompt(line, self.negative)
            if self._negative_partner():
                negative = pair_negative(prompt, self.token, negative)
            out += [(prompt, negative, seed) for seed in self.seeds]
        return out

    def partner_files(self, index: int) -> list[str]:
        return list(self.partners[index]) if index < len(self.partners) else []

    def row_labels(self) -> list[str]:
        labels = []
        for index, strength in self.rows():
            label = self.checkpoints[index][0]
            labels.append(label if strength is None else f"{label} · strength {strength:g}")
        return labels

    def column_labels(self) -> list[str]:
        return [f"{prompt} · seed {seed}" for prompt, _, seed in self.columns()]

    def validate(self) -> "CompareSpec":
        problems = []
        method = catalog.find(self.method)
        if method is None or not method.comparable:
            problems.append(f"method: comparing {self.method} checkpoints is not supported yet")
        if not self.checkpoints:
            problems.append("checkpoints: choose at least one checkpoint")
        suffix = self._negative_partner()
        if suffix and (len(self.partners) != len(self.checkpoints)
                       or any(len(p) != 1 for p in self.partners)):
            problems.append(f"checkpoints: each {method.title} checkpoint needs its "
                            f"'{suffix}' embedding")
        if not self.prompts:
            problems.append("prompts: give at least one prompt")
        if not self.seeds:
            problems.append("seeds: give at least one seed")
        if self.uses_strength and not self.strengths:
            problems.append("strengths: give at least one strength, e.g. 1.0")
        if any(not 0 <= s < 2**63 for s in self.seeds):
            problems.append("seeds: a seed is a whole number from 0 up (no -1: a grid needs "
                            "fixed seeds)")
        if any(not math.isfinite(s) or abs(s) > 4 for s in self.strengths):
            problems.append("strengths: each strength must be between -4 and 4")
        if not 1 <= self.steps <= 150:
            problems.append("steps: sampling steps must be between 1 and 150")
        if self.width % 8 or self.height % 8 or not (8 <= self.width <= 2048
                                                      and 8 <= self.height <= 2048):
            problems.append("size: width and height must be multiples of 8 from 8 to 2048")
        if self.sampler not in SAMPLERS:
            problems.append(f"sampler: unknown sampler {self.sampler!r}")
        try:
            self.columns()
        except ValueError as error:
            problems.append(str(error))
        cells = len(self.checkpoints) * max(1, len(self.strengths) if self.uses_strength else 1) \
            * len(self.prompts) * len(self.seeds)
        if cells > MAX_CELLS:
            problems.append(f"checkpoints: {cells} images is more than {MAX_CELLS}; choose fewer "
                            "checkpoints, strengths, prompts or seeds")
        if problems:
            raise ConfigError(problems)
        return self


@dataclass
class GridResult:
    path: Path
    row_labels: list[str]
    column_labels: list[str]
    rendered: int  # cells rendered now
    cached: int  # cells taken from the cache
    cell_size: tuple[int, int]


# ---- parsing what the user typed ----------------------------------------------------------------
def split_prompt(line: str, negative: str = "") -> tuple[str, str]:
    """`prompt --n negative` -> (prompt, negative). Other kohya flags set the whole grid's
    size, steps and seed, so they are refused here."""
    parts = FLAG.split(" " + line.strip() + " ")
    prompt = parts[0].strip()
    flags = dict(zip(parts[1::2], (p.strip() for p in parts[2::2])))
    for flag in flags:
        if flag != "n":
            raise ValueError(f"prompts: --{flag} in {line.strip()!r}: size, steps and seeds "
                             "are set for the whole grid; only --n (negative prompt) may follow "
                             "a prompt")
    if not prompt:
        raise ValueError(f"prompts: no prompt before the flags in {line.strip()!r}")
    return prompt, flags.get("n", negative)


def parse_numbers(text: str, field_name: str, kind=float) -> list:
    """"0.5, 1.0" or "1 2 3" -> numbers; raises ConfigError naming the field."""
    values = []
    for item in re.split(r"[,\s]+", str(text).strip()):
        if not item:
            continue
        try:
            values.append(kind(item))
        except ValueError:
            raise ConfigError(f"{field_name}: {item!r} is not "
                              f"{'a whole number' if kind is int else 'a number'}") from None
    return list(dict.fromkeys(values))


def parse_prompts(text: str) -> list[str]:
    return [line.strip() for line in str(text).splitlines()
            if line.strip() and not line.strip().startswith("#")]


def default_prompt(run) -> str:
    """The prompt the run previewed with (kohya flags except --n removed), else its name."""
    cfg = run.config
    if cfg.get("preview_prompt"):
        return str(cfg["preview_prompt"])
    if cfg.get("instance_prompt"):
        return str(cfg["instance_prompt"])
    for line in parse_prompts(str(cfg.get("sample_prompts") or "")):
        parts = FLAG.split(" " + line + " ")
        negative = dict(zip(parts[1::2], (p.strip() for p in parts[2::2]))).get("n")
        return parts[0].strip() + (f" --n {negative}" if negative else "")
    return run.name if _names_it(run.method) else f"a photo of {run.name}"


def _names_it(method: str) -> bool:
    found = catalog.find(method)
    return found is not None and found.prompt_names_it


def _strength(method: str) -> bool:
    found = catalog.find(method)
    return found is not None and found.strength


def preview_defaults(run) -> dict:
    """Steps, size, sampler and CFG the run's previews used."""
    cfg = run.config
    size = cfg.get("resolution") or cfg.get("width") or 512
    return {"steps": int(cfg.get("preview_steps") or 20),
            "width": int(cfg.get("width") or size), "height": int(cfg.get("height") or size),
            "sampler": str(cfg.get("preview_sampler") or cfg.get("sample_sampler") or "Euler a"),
            "cfg": float(cfg.get("preview_cfg") or 7.0),
            "negative": str(cfg.get("preview_negative") or ""),
            "clip_skip": int(cfg.get("clip_skip") or 1)}


def spec_for_run(run, keys: list[str], strengths: str, prompts: str, seeds: str,
                 steps: int | None = None, width: int | None = None, height: int | None = None,
                 sampler: str | None = None) -> CompareSpec:
    """A validated CompareSpec from the Compare form of a run (raises ConfigError)."""
    chosen = [run.checkpoint(key) for key in keys]
    missing = [key for key, c in zip(keys, chosen) if c is None]
    if missing:
        raise ConfigError(f"checkpoints: {', '.join(missing)} no longer exist; refresh the run")
    defaults = preview_defaults(run)
    chosen.sort(key=lambda c: (c.step, c.final))
    spec = CompareSpec(
        method=run.method, model=run.model, token=run.name,
        checkpoints=[(c.label, str(c.path)) for c in chosen],
        partners=[[str(p) for p in c.partners] for c in chosen],
        prompts=parse_prompts(prompts), seeds=parse_numbers(seeds, "seeds", int),
        strengths=parse_numbers(strengths, "strengths") if _strength(run.method)
        else [1.0],
        negative=defaults["negative"], steps=int(steps or defaults["steps"]),
        cfg=defaults["cfg"], sampler=sampler or defaults["sampler"],
        width=int(width or defaults["width"]), height=int(height or defaults["height"]),
        clip_skip=defaults["clip_skip"], title=f"{run.name} · {run.model}")
    return spec.validate()


# ---- the cache ---------------------------------------------------------------------------------
_hash_lock = threading.Lock()
_hashes: dict[tuple[str, int, int], str] = {}


def file_hash(path: str | Path) -> str:
    """sha256 of a file, remembered by path, size and mtime."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _hash_lock:
        if key in _hashes:
            return _hashes[key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    with _hash_lock:
        _hashes[key] = digest.hexdigest()
    return _hashes[key]


def model_identity(paths: Paths, name: str) -> str:
    """The base model's name and, for files and folders, when it last changed."""
    from trainers.models import resolve_model
    try:
        kind, location = resolve_model(paths, name)
    except ValueError:  # ModelError, PathError: loading will say what is wrong
        return name
    if kind in ("file", "folder"):
        return f"{name}|{Path(location).stat().st_size}|{Path(location).stat().st_mtime_ns}"
    return f"{name}|{kind}"


def cell_key(spec: CompareSpec, model_id: str, checkpoint_hash: str, strength: float | None,
             prompt: str, negative: str, seed: int) -> str:
    parts = [CACHE_VERSION, model_id, spec.method, checkpoint_hash,
             None if strength is None else float(strength), prompt, negative, int(seed),
             spec.steps, float(spec.cfg), spec.width, spec.height, spec.sampler, spec.clip_skip,
             spec.token if _names_it(spec.method) else ""]
    return hashlib.sha256(json.dumps(parts).encode("utf-8")).hexdigest()


def cache_folder(paths: Paths) -> Path:
    return paths.cache / "compare"


def grids_folder(paths: Paths) -> Path:
    return paths.outputs / "grids"


# ---- rendering -----------------------------------------------------------------------------------
def render_grid(spec: CompareSpec, paths: Paths, ctx=None, cache_dir: Path | None = None,
                out_dir: Path | None = None) -> GridResult | None:
    """Render (or take from the cache) every cell, draw the labelled grid and save it as a PNG
    under outputs/grids/. Returns None when `ctx` asked to stop."""
    spec.validate()
    cache = Path(cache_dir or cache_folder(paths))
    cache.mkdir(parents=True, exist_ok=True)
    emit = ctx.emit if ctx is not None else (lambda event: None)
    emit(ev.Status("Hashing checkpoints"))
    hashes = ["+".join(file_hash(p) for p in [path, *spec.partner_files(index)])
              for index, (_, path) in enumerate(spec.checkpoints)]
    model_id = model_identity(paths, spec.model)
    rows, columns = spec.rows(), spec.columns()
    keys = {(r, c): cell_key(spec, model_id, hashes[rows[r][0]], rows[r][1], *columns[c])
            for r in range(len(rows)) for c in range(len(columns))}
    missing = [cell for cell, key in keys.items() if not (cache / f"{key}.png").is_file()]
    total = len(keys)
    cached = total - len(missing)
    emit(ev.Status(f"{total} images: {cached} from the cache, {len(missing)} to render"))
    began = time.perf_counter()
    if missing and not _render_missing(spec, paths, rows, columns, missing, keys, cache, ctx):
        return None
    emit(ev.Progress(step=total, total=total, loss=0.0, learn_rate=0.0,
                     elapsed=time.perf_counter() - began))
    from PIL import Image
    grid_cells = [[Image.open(cache / f"{keys[(r, c)]}.png").convert("RGB")
                   for c in range(len(columns))] for r in range(len(rows))]
    image = draw_grid(grid_cells, spec.row_labels(), spec.column_labels(), spec.title)
    folder = Path(out_dir or grids_folder(paths))
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", spec.token or "grid")[:60]
    digest = hashlib.sha256("|".join(keys[k] for k in sorted(keys)).encode()).hexdigest()[:10]
    path = folder / f"{name}-{digest}.png"
    _save_png(image, path, {"rows": spec.row_labels(), "columns": spec.column_labels(),
                            "spec": asdict(spec)})
    return GridResult(path=path, row_labels=spec.row_labels(),
                      column_labels=spec.column_labels(), rendered=len(missing), cached=cached,
                      cell_size=(spec.width, spec.height))


def _render_missing(spec, paths, rows, columns, missing, keys, cache, ctx) -> bool:
    """Render the missing cells, one checkpoint at a time; False if asked to stop."""
    from trainers.models import load_model
    from trainers.sampling import PreviewSettings, render

    emit = ctx.emit if ctx is not None else (lambda event: None)
    base = None
    if catalog.get(spec.method).checkpoint_kind != "model":  # a whole model loads per checkpoint
        emit(ev.Status(f"Loading model {spec.model}"))
        base = load_model(paths, spec.model)
    total, done, began = len(keys), len(keys) - len(missing), time.perf_counter()
    by_checkpoint: dict[int, list[tuple[int, int]]] = {}
    for r, c in missing:
        by_checkpoint.setdefault(rows[r][0], []).append((r, c))
    for index, cells in sorted(by_checkpoint.items()):
        label, path = spec.checkpoints[index]
        emit(ev.Status(f"Rendering {label}"))
        partners = [Path(p) for p in spec.partner_files(index)]
        with _applied(spec, paths, base, Path(path), partners) as (model, set_strength, encoder):
            for r, c in sorted(cells):
                if ctx is not None and ctx.should_stop():
                    emit(ev.Status(f"Stopped after {done} of {total} images"))
                    return False
                strength = rows[r][1]
                if strength is not None:
                    set_strength(strength)
                prompt, negative, seed = columns[c]
                image, _ = render(model, encoder, PreviewSettings(
                    prompt=prompt, negative=negative, seed=seed, steps=spec.steps, cfg=spec.cfg,
                    sampler=spec.sampler, width=spec.width, height=spec.height))
                target = cache / f"{keys[(r, c)]}.png"
                atomic_write(target, lambda temp: image.save(temp, format="PNG"))
                done += 1
                emit(ev.Progress(step=done, total=total, loss=0.0, learn_rate=0.0,
                                 elapsed=time.perf_counter() - began))
    return True


@contextlib.contextmanager
def _applied(spec: CompareSpec, paths: Paths, model, path: Path, partners: list[Path] = ()):
    """Yield (model, set_strength, prompt encoder) with the checkpoint applied to the cached
    base model (which is as before afterwards), or a whole-model checkpoint loaded as a model,
    as the method's catalog entry says (trainers/checkpoint_apply.py)."""
    with catalog.get(spec.method).applier()(spec, paths, model, path, list(partners)) as applied:
        yield applied


def compare_job(spec: CompareSpec, paths: Paths):
    """The function a JobRunner runs: render, then report the grid as the job's result."""
    def run(ctx):
        result = render_grid(spec, paths, ctx)
        if result is None:
            ctx.emit(ev.Finished(step=0, message="Comparison stopped; no grid was saved"))
            return None
        ctx.emit(ev.Preview(step=0, path=str(result.path), caption=spec.title))
        ctx.emit(ev.Finished(step=len(result.row_labels) * len(result.column_labels),
                             path=str(result.path),
                             message=f"Grid saved: {result.path} ({result.rendered} rendered, "
                                     f"{result.cached} from the cache)"))
        return result
    return run


# ---- drawing -----------------------------------------------------------------------------------
def _font(size: int):
    from PIL import ImageFont
    return ImageFont.load_default(size=size)


def _wrap(draw, text: str, font, width: int, max_lines: int = 4) -> list[str]:
    """Greedy word wrap to `width` pixels; long words are broken; at most `max_lines`."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if draw.textlength(candidate, font=font) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        while draw.textlength(word, font=font) > width and len(word) > 1:
            cut = len(word)
            while cut > 1 and draw.textlength(word[:cut], font=font) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and draw.textlength(last + "…", font=font) > width:
            last = last[:-1]
        lines[-1] = last + "…"
    return lines or [""]


def _label_lines(draw, label: str, font, width: int, max_lines: int) -> list[str]:
    """Each " · "-separated part of a label on its own line(s)."""
    lines: list[str] = []
    for part in label.split(" · "):
        lines += _wrap(draw, part, font, width, max_lines)
    return lines


def draw_grid(cells, row_labels: list[str], column_labels: list[str], title: str = ""):
    """Cells (rows of PIL images of one size) with row labels on the left, column labels on
    top and a title line, on white."""
    from PIL import Image, ImageDraw

    cell_w, cell_h = cells[0][0].size
    size = max(12, min(28, cell_w // 14))
    font = _font(size)
    line_h, pad = size + 4, max(4, size // 2)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    col_w = max(cell_w, 8 * size)
    widest = max(probe.textlength(part, font=font) for label in row_labels
                 for part in label.split(" · "))
    label_w = int(min(max(cell_w, 16 * size), widest + 2 * pad))
    column_lines = [_label_lines(probe, label, font, col_w - pad, 3) for label in column_labels]
    row_lines = [_label_lines(probe, label, font, label_w - 2 * pad, 3) for label in row_labels]
    title_h = line_h + pad if title else 0
    header_h = max(len(lines) for lines in column_lines) * line_h + pad
    row_h = max(cell_h, max(len(lines) for lines in row_lines) * line_h)
    width = label_w + len(column_labels) * (col_w + pad) + pad
    height = title_h + header_h + len(row_labels) * (row_h + pad) + pad
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((pad, pad // 2), title, fill="black", font=font)
    for c, lines in enumerate(column_lines):
        x = label_w + c * (col_w + pad)
        for i, line in enumerate(lines):
            draw.text((x + (col_w - probe.textlength(line, font=font)) // 2,
                       title_h + i * line_h), line, fill="black", font=font)
    for r, lines in enumerate(row_lines):
        y = title_h + header_h + r * (row_h + pad)
        top = y + (row_h - len(lines) * line_h) // 2
        for i, line in enumerate(lines):
            draw.text((pad, top + i * line_h), line, fill="black", font=font)
        for c in range(len(column_labels)):
            x = label_w + c * (col_w + pad) + (col_w - cell_w) // 2
            grid.paste(cells[r][c], (x, y + (row_h - cell_h) // 2))
    return grid


def _save_png(image, path: Path, info: dict) -> None:
    from PIL import PngImagePlugin
    meta = PngImagePlugin.PngInfo()
    meta.add_text("danlu-grid", json.dumps(info, default=str))
    atomic_write(path, lambda temp: image.save(temp, format="PNG", pnginfo=meta))


def read_grid_labels(path: str | Path) -> dict:
    """The rows and columns a saved grid PNG was drawn with."""
    from PIL import Image
    with Image.open(path) as image:
        return json.loads(image.text.get("danlu-grid", "{}"))
