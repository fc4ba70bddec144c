"""Training runs as they are on disk: the run history and each run's checkpoints.

A run is a log folder `<log_directory>/<date>/<name>/` written by trainers/loop.py: one
`settings-<start step>.json` per session (a resumed run adds one), a loss CSV, periodic copies
in `embeddings/`, `hypernetworks/` or `checkpoints/` named `<name>-<step>.<ext>`, and previews
in `images/<name>-<step>[-i].png`. The run's newest state is its final file (embeddings/<name>.pt,
models/Lora/<name>.safetensors, ...), named in the settings. Everything here is read from disk,
so the history survives restarts; nothing imports torch (the page uses this module).

A run's status is inferred, since the loop writes no marker: *finished* when the loss log
reached the configured steps (or the end of the learning-rate schedule); *interrupted* when it
stopped earlier but its final file holds the last logged step (the loop saves on interrupt), or
a later run continued the file; *failed* when the final file lags behind the log (the run ended
without its final save) or a session logged no step at all; *running* when the page says so."""
from __future__ import annotations

import json
import os
import pickle
import re
import struct
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from core.paths import Paths
from trainers.loss_log import read_losses
from trainers.run_folder import VALIDATION_CSV

MODEL_SUFFIXES = (".pt", ".safetensors", ".bin", ".ckpt")
FINAL_KEYS = ("embedding", "hypernetwork", "output", "final")
SETTINGS = re.compile(r"^settings-(\d+)\.json$")
SKIP_FOLDERS = {"grids", "checkpoint_cards"}  # ours, under outputs/, never runs
MAX_DEPTH = 6  # outputs/<log dir, maybe nested>/<date>/<name>

FINISHED, INTERRUPTED, FAILED, RUNNING, UNKNOWN = (
    "finished", "interrupted", "failed", "running", "unknown")


def method_title(method: str) -> str:
    """The catalog's title of a run's method (a method no longer known keeps its name)."""
    from trainers import catalog
    found = catalog.find(method)
    return found.title if found is not None else method


@dataclass(frozen=True)
class Session:
    """One start of training into this folder (the first, or a resume)."""
    start_step: int
    path: Path  # its settings-<start>.json
    started: float  # the settings file's mtime: when the session began
    settings: dict


@dataclass(frozen=True)
class PreviewImage:
    step: int
    index: int
    path: Path


@dataclass
class Checkpoint:
    step: int
    path: Path
    final: bool = False  # the run's final file (embeddings/, models/...), not a periodic copy
    loss: float | None = None  # mean loss of the steps around `step`
    loss_steps: tuple[int, int] | None = None  # the steps averaged
    previews: list[Path] = field(default_factory=list)
    preview_step: int | None = None  # step of `previews` (an earlier one when none at `step`)
    size: int = 0
    modified: float = 0.0
    partners: tuple[Path, ...] = ()  # files saved with it that belong to it (APT: the '-neg')

    @property
    def key(self) -> str:
        return f"{self.step}-final" if self.final else str(self.step)

    @property
    def label(self) -> str:
        return f"step {self.step}" + (" (final)" if self.final else "")

    @property
    def caption(self) -> str:
        loss = f"loss {self.loss:.4f}" if self.loss is not None else "no loss logged"
        return f"step {self.step} · {loss}" + (" · final" if self.final else "")


@dataclass
class Run:
    id: str  # the folder relative to its scan root, e.g. "lora/2025-05-01/mylora"
    root: Path
    name: str
    method: str
    sessions: list[Session]
    losses: list[tuple[int, float, float]]  # (step, loss, learn rate)
    validation: list = field(default_factory=list)  # (step, held-out loss, nan)
    checkpoints: list[Checkpoint] = field(default_factory=list)
    previews: list[PreviewImage] = field(default_factory=list)
    final_path: Path | None = None
    final_step: int | None = None  # the step stored in final_path (whoever wrote it)
    owns_final: bool = False  # no later run wrote final_path
    target_steps: int | None = None
    started: float = 0.0
    ended: float = 0.0
    duration: float = 0.0  # seconds of training, summed over sessions
    status: str = UNKNOWN
    status_note: str = ""

    @property
    def settings(self) -> dict:
        return self.sessions[-1].settings

    @property
    def config(self) -> dict:
        return dict(self.settings.get("config") or {})

    @property
    def model(self) -> str:
        return str(self.settings.get("model") or self.config.get("model") or "")

    @property
    def model_hash(self) -> str | None:
        return self.settings.get("model_hash")

    @property
    def dataset(self) -> str:
        cfg = self.config
        return str(cfg.get("data_root") or cfg.get("train_data_dir") or cfg.get("dataset_config")
                   or "")

    @property
    def images(self) -> int | None:
        value = self.settings.get("images")
        return value if isinstance(value, int) else None

    @property
    def start_step(self) -> int:
        return self.sessions[0].start_step

    @property
    def steps(self) -> int:
        """The last step logged (the session's start when it logged none)."""
        return self.losses[-1][0] if self.losses else self.sessions[-1].start_step

    @property
    def final_loss(self) -> float | None:
        """Mean loss of the last (up to) 10 logged steps; single steps are noisy."""
        tail = [loss for _, loss, _ in self.losses[-10:]]
        return sum(tail) / len(tail) if tail else None

    @property
    def title(self) -> str:
        return f"{self.name} · {method_title(self.method)} · " \
               f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(self.started))}"

    def checkpoint(self, key: str) -> Checkpoint | None:
        return next((c for c in self.checkpoints if c.key == str(key)), None)


def run_config(run: Run) -> tuple[str, dict]:
    """(method, config dict) of the run's newest session: for "Train again with these
    settings" / "Resume" (build the method's config class with core.config.from_dict)."""
    return run.method, run.config


# ---- scanning --------------------------------------------------------------------------------
def run_folders(root: Path) -> list[Path]:
    """Folders under `root` holding a settings-<step>.json (not descending into a run)."""
    found: list[Path] = []
    if not root.is_dir():
        return found
    base_depth = len(root.parts)
    for current, folders, files in os.walk(root):
        here = Path(current)
        if any(SETTINGS.match(name) for name in files):
            found.append(here)
            folders[:] = []
            continue
        if len(here.parts) - base_depth >= MAX_DEPTH:
            folders[:] = []
            continue
        folders[:] = sorted(f for f in folders if not f.startswith(".")
                            and not (here == root and f in SKIP_FOLDERS))
    return found


def scan_runs(paths: Paths, running: Iterable[Path] = (), roots: Iterable[Path] | None = None
              ) -> list[Run]:
    """Every run under outputs/ (or `roots`), newest first. `running` are run folders the page
    knows are training now."""
    roots = [Path(r) for r in (roots if roots is not None else [paths.outputs])]
    live = {_real(Path(p)) for p in running}
    runs = []
    for root in roots:
        for folder in run_folders(root):
            run = _read_run(folder, root, paths)
            if run is not None:
                runs.append(run)
    _assign_final_files(runs)
    for run in runs:
        _finish(run, _real(run.root) in live)
    runs.sort(key=lambda r: r.sessions[-1].started, reverse=True)
    return runs


def load_run(paths: Paths, run_id: str, running: Iterable[Path] = (),
             roots: Iterable[Path] | None = None) -> Run | None:
    """The run with this id, or None. Only ids that a scan finds are accepted (an id is never
    turned into a path on its own)."""
    return next((r for r in scan_runs(paths, running, roots) if r.id == run_id), None)


def expected_run_folder(paths: Paths, cfg, started: float) -> Path | None:
    """Where trainers/loop.py puts the run folder of a job with this config that started at
    `started` (for marking the running run). None for a config it cannot tell."""
    from trainers import catalog
    method = catalog.for_config(type(cfg))
    value = getattr(cfg, method.target_field, None) if method else None
    name = value.strip() if isinstance(value, str) else ""
    log = getattr(cfg, "log_directory", None)
    if not name or not log:
        return None
    try:
        base = paths.resolve(log, "log_directory")
    except ValueError:
        return None
    return base / time.strftime("%Y-%m-%d", time.localtime(started)) / name


def _real(path: Path) -> Path:
    try:
        return path.resolve()
    except OSError:
        return path.absolute()


def _read_run(folder: Path, root: Path, paths: Paths) -> Run | None:
    sessions = []
    for entry in folder.iterdir():
        match = SETTINGS.match(entry.name)
        if not match or not entry.is_file():
            continue
        try:
            settings = json.loads(entry.read_text(encoding="utf-8"))
            started = entry.stat().st_mtime
        except (OSError, ValueError):
            continue
        if isinstance(settings, dict):
            sessions.append(Session(int(match.group(1)), entry, started, settings))
    if not sessions:
        return None
    sessions.sort(key=lambda s: (s.started, s.start_step))
    settings = sessions[-1].settings
    method = str(settings.get("method") or _guess_method(folder))
    csv_path = next((folder / n for n in csv_names() if (folder / n).is_file()), None)
    losses = read_losses(csv_path) if csv_path else []
    run = Run(id=folder.relative_to(root).as_posix(), root=folder, name=folder.name,
              method=method, sessions=sessions, losses=losses,
              validation=read_losses(folder / VALIDATION_CSV))
    run.final_path = _final_path(settings, method, folder.name, paths)
    run.target_steps = _target_steps(run)
    return run


def copy_folders() -> tuple[str, ...]:
    """The subfolders of numbered checkpoints a run folder may have, each method's."""
    from trainers import catalog
    return tuple(dict.fromkeys([m.copies_folder for m in catalog.methods()]))


def csv_names() -> tuple[str, ...]:
    """The loss logs a run folder may have, each method's (trainers/catalog.py)."""
    from trainers import catalog
    return tuple(dict.fromkeys([m.loss_csv for m in catalog.methods()]))


def _guess_method(folder: Path) -> str:
    """The method of a run folder without a settings file (A1111's own log folders): the one
    whose marks are there; else a kohya LoRA run."""
    from trainers import catalog
    marked = (m.name for m in catalog.methods() if any((folder / n).exists() for n in m.run_marks))
    return next(marked, "lora")


def _final_path(settings: dict, method: str, name: str, paths: Paths) -> Path | None:
    """The run's final file as its settings name it; for a data folder that was moved or
    copied, the file of that name in this data folder's own final folder."""
    for key in FINAL_KEYS:
        value = settings.get(key)
        if isinstance(value, str) and value.strip():
            path = Path(value)
            here = final_folder(paths, method) / path.name
            inside = _real(path) == _real(paths.data_dir) or \
                _real(paths.data_dir) in _real(path).parents
            if not inside:  # never trust a path outside the data folder from a settings file
                return here if here.is_file() else None
            return path if path.is_file() or not here.is_file() else here
    return None


def final_folder_name(method: str) -> str:
    """Where a method's finished files live, under the data folder (A1111's folders)."""
    from trainers import catalog
    found = catalog.find(method)
    return found.final_folder if found is not None else "models/Lora"


def final_folder(paths: Paths, method: str) -> Path:
    return paths.data_dir / final_folder_name(method)


# ---- the loss log ----------------------------------------------------------------------------
def loss_around(losses: list[tuple[int, float, float]], step: int, half: int
                ) -> tuple[float | None, tuple[int, int] | None]:
    """Mean loss of the logged steps within `half` steps of `step`."""
    near = [(s, loss) for s, loss, _ in losses if abs(s - step) <= half]
    if not near:
        return None, None
    return sum(loss for _, loss in near) / len(near), (near[0][0], near[-1][0])


def _target_steps(run: Run) -> int | None:
    cfg = run.config
    from trainers import catalog
    found = catalog.find(run.method)
    if found is not None and found.step_schedule:
        steps = cfg.get("steps")
        if not isinstance(steps, int):
            return None
        try:
            from trainers.schedule import parse_schedule
            return min(steps, parse_schedule(str(cfg.get("learn_rate", "")), steps).end)
        except ValueError:
            return steps
    if cfg.get("max_train_epochs"):
        return None  # known from the files' metadata (ss_max_train_steps), filled in later
    steps = cfg.get("max_train_steps")
    return steps if isinstance(steps, int) else None


# ---- files: checkpoints, previews, the final file ---------------------------------------------
def _numbered(folder: Path, name: str, suffixes: tuple[str, ...]) -> list[tuple[int, int, Path]]:
    """(step, index, path) of files `<name>-<step>[-<index>]<suffix>` in `folder`."""
    out = []
    if not folder.is_dir():
        return out
    prefix = f"{name}-"
    for entry in folder.iterdir():
        suffix = entry.suffix.lower()
        if suffix not in suffixes or not entry.name.startswith(prefix) or entry.name.startswith("."):
            continue
        tail = entry.name[len(prefix):-len(entry.suffix)]
        step, _, index = tail.partition("-")
        if step.isdigit() and (index == "" or index.isdigit()) and entry.is_file():
            out.append((int(step), int(index or 0), entry))
    return sorted(out, key=lambda item: (item[0], item[1]))


def _assign_final_files(runs: list[Run]) -> None:
    """A final file belongs to the newest run that wrote it; older runs of the same name were
    continued (or replaced) by that one."""
    newest: dict[Path, Run] = {}
    for run in runs:
        if run.final_path is None:
            continue
        key = _real(run.final_path)
        other = newest.get(key)
        if other is None or run.sessions[-1].started > other.sessions[-1].started:
            newest[key] = run
    for run in runs:
        if run.final_path is None or not run.final_path.is_file():
            continue
        run.final_step = file_step(run.final_path)
        run.owns_final = newest.get(_real(run.final_path)) is run


def _finish(run: Run, is_running: bool) -> None:
    copies = []
    for folder in copy_folders():
        copies += [(step, path) for step, _, path in _numbered(run.root / folder, run.name,
                                                              MODEL_SUFFIXES)]
    previews = [PreviewImage(step, index, path)
                for step, index, path in _numbered(run.root / "images", run.name, (".png",))]
    run.previews = previews
    checkpoints = [Checkpoint(step=step, path=path) for step, path in sorted(copies)]
    steps = {c.step for c in checkpoints}
    owns = run.owns_final
    if owns and _final_is_ours(run, is_running) and run.final_step not in steps:
        checkpoints.append(Checkpoint(step=run.final_step, path=run.final_path, final=True))
    checkpoints.sort(key=lambda c: (c.step, c.final))
    suffix = _negative_partner(run.method)
    if suffix:
        for checkpoint in checkpoints:
            checkpoint.partners = (negative_partner_file(run, checkpoint, suffix),)
    if run.target_steps is None:
        run.target_steps = _steps_from_metadata([c.path for c in checkpoints] +
                                                ([run.final_path] if owns else []))
    by_step: dict[int, list[Path]] = {}
    for preview in previews:
        by_step.setdefault(preview.step, []).append(preview.path)
    previous = run.start_step
    for checkpoint in checkpoints:
        gap = max(1, checkpoint.step - previous)
        checkpoint.loss, checkpoint.loss_steps = loss_around(
            run.losses, checkpoint.step, max(1, min(25, gap // 2)))
        if checkpoint.step in by_step:
            checkpoint.previews, checkpoint.preview_step = by_step[checkpoint.step], checkpoint.step
        else:
            earlier = [s for s in by_step if previous < s < checkpoint.step]
            if earlier:
                checkpoint.preview_step = max(earlier)
                checkpoint.previews = by_step[checkpoint.preview_step]
        try:
            stat = checkpoint.path.stat()
            checkpoint.size, checkpoint.modified = stat.st_size, stat.st_mtime
        except OSError:
            pass
        previous = checkpoint.step
    run.checkpoints = checkpoints
    _times(run, is_running)
    run.status, run.status_note = _status(run, is_running, owns)


def _negative_partner(method: str) -> str:
    from trainers import catalog
    found = catalog.find(method)
    return found.negative_partner if found is not None else ""


def negative_partner_file(run: Run, checkpoint: Checkpoint, suffix: str) -> Path:
    """The partner embedding (e.g. APT's '-neg') a run saved with this checkpoint (it may be
    gone): beside a periodic copy `<name>-<step>.pt` it is `<name><suffix>-<step>.pt`; beside
    the final file, the one the settings name (only its file name is trusted), else
    `<stem><suffix><ext>`."""
    path = checkpoint.path
    if not checkpoint.final:
        return path.with_name(f"{run.name}{suffix}-{checkpoint.step}{path.suffix}")
    named = run.settings.get("negative_embedding")
    if isinstance(named, str) and named.strip():
        candidate = path.with_name(Path(named).name)
        if candidate.is_file():
            return candidate
    return path.with_name(f"{path.stem}{suffix}{path.suffix}")


def _final_is_ours(run: Run, is_running: bool) -> bool:
    """The final file holds a state of this run: a step it reached, written after it began.
    (While it trains, the log may lag behind the file by up to 50 steps.)"""
    step = run.final_step
    if step is None or step <= run.start_step or (step > run.steps and not is_running):
        return False
    try:
        return run.final_path.stat().st_mtime >= run.sessions[-1].started - 1
    except OSError:
        return False


def _times(run: Run, is_running: bool) -> None:
    """Start, end and duration from file times: a session runs from its settings file to the
    last file written before the next session began."""
    stamps = []
    for folder in ("images",) + copy_folders():
        directory = run.root / folder
        if directory.is_dir():
            stamps += [e.stat().st_mtime for e in directory.iterdir() if e.is_file()]
    for name in csv_names():
        if (run.root / name).is_file():
            stamps.append((run.root / name).stat().st_mtime)
    starts = [s.started for s in run.sessions]
    total, end = 0.0, starts[0]
    for index, start in enumerate(starts):
        until = starts[index + 1] if index + 1 < len(starts) else float("inf")
        inside = [t for t in stamps if start <= t < until]
        last = max(inside, default=start)
        if is_running and index == len(starts) - 1:
            last = max(last, time.time())
        total += last - start
        end = max(end, last)
    run.started, run.ended, run.duration = starts[0], end, total


def _status(run: Run, is_running: bool, owns_final: bool) -> tuple[str, str]:
    last = run.sessions[-1]
    if is_running:
        return RUNNING, "training now"
    logged = any(step > last.start_step for step, _, _ in run.losses)
    target = run.target_steps
    if not logged:
        if target is not None and last.start_step >= target:
            return FAILED, (f"nothing to train: the file was already at step {last.start_step} "
                            f"of {target}")
        return FAILED, f"the session started at step {last.start_step} logged no step"
    if target is not None and run.steps >= target:
        return FINISHED, f"reached step {run.steps} of {target}"
    if run.final_step is None:
        return UNKNOWN, (f"stopped at step {run.steps} of {target or '?'}; its final file "
                         "is gone")
    if not owns_final or run.final_step > run.steps:
        return INTERRUPTED, (f"stopped at step {run.steps}; a later run continued "
                             f"{run.final_path.name} (now at step {run.final_step})")
    if run.final_step == run.steps:
        return INTERRUPTED, f"stopped and saved at step {run.steps} of {target or '?'}"
    return FAILED, (f"ended at step {run.steps} without a final save; "
                    f"{run.final_path.name} holds step {run.final_step}")


def _steps_from_metadata(files: list[Path]) -> int | None:
    for path in files:
        if path is not None and path.suffix.lower() == ".safetensors":
            value = safetensors_metadata(path).get("ss_max_train_steps")
            if value and str(value).isdigit():
                return int(value)
    return None


# ---- reading a step count without torch ---------------------------------------------------------
_step_cache: dict[Path, tuple[tuple[int, int], int | None]] = {}
_cache_lock = threading.Lock()


def file_step(path: Path) -> int | None:
    """The training step stored in an embedding, hypernetwork or LoRA file (None if unknown)."""
    try:
        stat = path.stat()
    except OSError:
        return None
    key = (stat.st_size, stat.st_mtime_ns)
    with _cache_lock:
        cached = _step_cache.get(path)
        if cached and cached[0] == key:
            return cached[1]
    if path.suffix.lower() == ".safetensors":
        meta = safetensors_metadata(path)
        value = next((meta[k] for k in ("ss_steps", "danlu.steps", "danlu.step", "step")
                      if k in meta), None)  # kohya, DreamBooth, XTI, embeddings
    else:
        value = pickled_fields(path, ("step",)).get("step")
    try:
        step = int(value) if value is not None else None
    except (TypeError, ValueError):
        step = None
    with _cache_lock:
        _step_cache[path] = (key, step)
    return step


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` of a .safetensors header (no tensor is read)."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100_000_000:
                return {}
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return dict(meta) if isinstance(meta, dict) else {}


class _Stub:
    """Stands in for every class a pickle names: nothing is imported or executed."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Stub()

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


class _Peek(pickle.Unpickler):
    def find_class(self, module, name):
        return _Stub

    def persistent_load(self, pid):
        return None


def pickled_fields(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """Plain top-level values of a torch .pt dict (legacy or zip format), read without torch
    and without running any code the pickle names."""
    def pick(obj) -> dict[str, Any]:
        if not isinstance(obj, dict):
            return {}
        return {k: obj[k] for k in keys if isinstance(obj.get(k), (int, float, str, type(None)))}
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    return {}
                with archive.open(name) as handle:
                    return pick(_Peek(handle).load())
        with open(path, "rb") as handle:
            for _ in range(3):  # magic number, protocol version, system info
                _Peek(handle).load()
            return pick(_Peek(handle).load())
    except Exception:  # a file that is not a torch pickle: the step is simply unknown
        return {}
