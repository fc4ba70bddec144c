"""Reading a run's loss CSV incrementally: the Checkpoints tab asks again whenever a running
run's log grows, so each read parses only the lines appended since the last one.

Per file it remembers the byte offset after the last complete line, the header, the parsed rows
and the last complete line itself. A file that shrank, was replaced (another inode) or whose
remembered last line is no longer at the same place was truncated or rewritten: it is read again
from the start. A last line without its line break (still being written) is parsed for this
answer but read again next time. Torch-free (the page uses it)."""
from __future__ import annotations

import csv
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

Row = tuple[int, float, float]  # (step, loss, learn rate)


@dataclass
class _State:
    inode: int
    offset: int = 0  # bytes consumed: the header and the complete lines after it
    last_line: bytes = b""  # the complete line that ends at `offset`
    header: list[str] | None = None
    rows: list[Row] = field(default_factory=list)
    answer: tuple[tuple[int, int], list[Row]] | None = None  # ((size, mtime_ns), rows returned)


_states: dict[Path, _State] = {}
_lock = threading.Lock()


def read_losses(path: Path) -> list[Row]:
    """(step, loss, learn rate) rows. A run that was started over in the same folder restarts
    its step count; only the rows of the newest start are kept. Do not modify the list."""
    try:
        stat = os.stat(path)
    except OSError:
        return []
    key = (stat.st_size, stat.st_mtime_ns)
    with _lock:
        state = _states.get(path)
        if state is not None and state.answer is not None and state.answer[0] == key \
                and state.inode == stat.st_ino:
            return state.answer[1]
        try:
            state = _update(path, state, stat)
        except OSError:
            _states.pop(path, None)
            return []
        _states[path] = state
        return state.answer[1]


def _update(path: Path, state: _State | None, stat: os.stat_result) -> _State:
    with open(path, "rb") as handle:
        if state is None or not _same_file(handle, state, stat):
            state = _State(inode=stat.st_ino)
        handle.seek(state.offset)
        data = handle.read()
    end = data.rfind(b"\n") + 1  # complete lines end here; the rest is still being written
    complete, tail = data[:end], data[end:]
    if complete:
        lines = complete.splitlines(keepends=True)
        state.last_line = lines[-1]
        state.offset += end
        state.rows = _parse(state, lines, state.rows)
    rows = state.rows
    if tail and state.header is not None:
        rows = _parse(state, [tail], rows, whole=True)
    # keyed by what stat saw: if more was read, the next stat differs and reads on from `offset`
    state.answer = ((stat.st_size, stat.st_mtime_ns), rows)
    return state


def _same_file(handle, state: _State, stat: os.stat_result) -> bool:
    """Still the file that was read (only appended to since)?"""
    if stat.st_ino != state.inode or stat.st_size < state.offset:
        return False
    if not state.last_line:
        return state.offset == 0
    handle.seek(state.offset - len(state.last_line))
    return handle.read(len(state.last_line)) == state.last_line


def _parse(state: _State, lines: list[bytes], rows: list[Row], whole: bool = False) -> list[Row]:
    """`rows` with the rows of `lines` added (a new list when anything changes: earlier answers
    stay as they were). With `whole`, a row must have every column (a half-written line)."""
    text = [line.decode("utf-8", errors="replace") for line in lines]
    records = csv.reader(text)
    if state.header is None:
        state.header = next(records, None)
        if state.header is None:
            return rows
    columns = {name: index for index, name in enumerate(state.header)}
    if not {"step", "loss"} <= columns.keys():
        return rows
    out = rows
    for record in records:
        if whole and len(record) < len(state.header):
            continue
        try:
            step = int(record[columns["step"]])
            loss = float(record[columns["loss"]])
            rate_index = columns.get("learn_rate")
            rate = (float(record[rate_index]) if rate_index is not None
                    and rate_index < len(record) and record[rate_index] else math.nan)
        except (IndexError, ValueError):
            continue
        if out is rows:
            out = list(rows)
        if out and step <= out[-1][0]:  # started over: a new step count
            out = [row for row in out if row[0] < step]
        out.append((step, loss, rate))
    return out
