"""Write a file so that readers see either the old contents or the new, never half of either."""
from __future__ import annotations

import contextlib
import contextvars
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from core import crash_points

# the (temporary, final) paths written inside the current `together()` block, in order
_staged: contextvars.ContextVar[list | None] = contextvars.ContextVar("staged", default=None)


def _umask() -> int:
    # os.umask() can only be read by setting it, which races with other threads; Linux exposes
    # it read-only in /proc.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not supported everywhere (e.g. Windows); the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Call `write(temp_path)` for a temporary file beside `path`, then move it onto `path`.

    On any exception (including KeyboardInterrupt) the temporary file is removed, the previous
    file at `path` is untouched, and the exception propagates.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    temp = Path(temp_name)
    try:
        write(temp)
        # mkstemp creates the file 0600; give it the mode a normal open() would have.
        mode = (target.stat().st_mode & 0o7777) if target.exists() else (0o666 & ~_umask())
        os.chmod(temp, mode)
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        crash_points.reached("atomic-write:written")
        staged = _staged.get()
        if staged is not None:  # inside together(): moved onto `target` when the block ends
            staged.append((temp, target))
            return
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def staged_path(path: str | os.PathLike[str]) -> Path:
    """Where `path`'s newest contents are: its temporary file while a together() block has
    written it and not yet moved it, else `path` itself."""
    target = Path(path)
    for temp, final in reversed(_staged.get() or []):
        if final == target:
            return temp
    return target


@contextlib.contextmanager
def together(journal: str | os.PathLike[str]) -> Iterator[None]:
    """Every atomic_write in the block lands at its final name only when the block ends without
    an error, all of them: a failure leaves every previous file as it was.

    The moves are made durable by `journal`, a small file written once every new file is
    complete and removed after the last move; recover(journal) at the next start finishes an
    interrupted set of moves (once the first file has moved) or drops the new files (before)."""
    if _staged.get() is not None:
        raise RuntimeError("together() blocks do not nest")
    staged: list[tuple[Path, Path]] = []
    token = _staged.set(staged)
    try:
        yield
    except BaseException:
        for temp, _ in staged:
            temp.unlink(missing_ok=True)
        raise
    finally:
        _staged.reset(token)
    if staged:
        _commit(Path(journal), staged)


def _commit(journal: Path, staged: list[tuple[Path, Path]]) -> None:
    try:
        atomic_write_text(journal, json.dumps([[str(t), str(f)] for t, f in staged]))
    except BaseException:
        for temp, _ in staged:
            temp.unlink(missing_ok=True)
        raise
    _finish(journal, staged)


def _finish(journal: Path, staged: list[tuple[Path, Path]]) -> None:
    for index, (temp, final) in enumerate(staged):
        if index:
            crash_points.reached("together:between-moves")
        if temp.exists():
            os.replace(temp, final)
    for folder in {final.parent for _, final in staged}:
        _fsync_dir(folder)
    journal.unlink(missing_ok=True)
    _fsync_dir(journal.parent)


def recover(journal: str | os.PathLike[str], finals: list[Path] = ()) -> str | None:
    """Finish what an interrupted together() block left: its moves when the first had been made
    (so a reader that already read that file keeps matching), else drop its new files. Also
    removes temporary files of `finals` left by a write that never finished. Returns what was
    done, or None when there was nothing to do."""
    journal = Path(journal)
    done = None
    if journal.is_file():
        try:
            staged = [(Path(t), Path(f)) for t, f in json.loads(journal.read_text())]
        except (ValueError, TypeError, OSError):
            staged = []
        if staged and not staged[0][0].exists():
            _finish(journal, staged)
            done = f"finished an interrupted save ({', '.join(f.name for _, f in staged)})"
        else:
            for temp, _ in staged:
                temp.unlink(missing_ok=True)
            journal.unlink(missing_ok=True)
            done = "dropped the files of a save that was interrupted before it completed"
    for final in [journal, *finals]:
        final = Path(final)
        if not final.parent.is_dir():
            continue
        for leftover in final.parent.iterdir():
            if leftover.name.startswith(f".{final.name}.") and leftover.name.endswith(".tmp"):
                leftover.unlink(missing_ok=True)
                done = done or "removed the temporary files of an interrupted save"
    return done


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    atomic_write(path, lambda temp: temp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    atomic_write(path, lambda temp: temp.write_text(text, encoding=encoding))
