"""The loss CSV read incrementally: appended lines only are parsed; truncation, replacement,
rewrites, half-written lines and restarted step counts give what a full read gives."""
from __future__ import annotations

import math
import os

import pytest

from trainers import loss_log
from trainers.loss_log import read_losses

HEADER = "step,epoch,epoch_step,loss,learn_rate\r\n"


def line(step, loss=None, rate="0.001"):
    return f"{step},0,{step},{loss if loss is not None else step / 100:.7f},{rate}\r\n"


@pytest.fixture
def parsed(monkeypatch):
    """How many lines each parse call was given."""
    calls = []
    real = loss_log._parse

    def counting(state, lines, rows, whole=False):
        calls.append(len(lines))
        return real(state, lines, rows, whole)
    monkeypatch.setattr(loss_log, "_parse", counting)
    return calls


def append(path, text):
    with open(path, "a", encoding="utf-8", newline="") as handle:
        handle.write(text)
    stamp = os.stat(path).st_mtime_ns + 1_000_000  # a new mtime even on coarse clocks
    os.utime(path, ns=(stamp, stamp))


def steps(rows):
    return [row[0] for row in rows]


def test_only_appended_lines_are_parsed(tmp_path, parsed):
    path = tmp_path / "loss.csv"
    path.write_text(HEADER + "".join(line(s) for s in range(1, 51)), newline="")
    first = read_losses(path)
    assert steps(first) == list(range(1, 51)) and parsed == [51]  # header + 50
    assert read_losses(path) is first and parsed == [51]  # unchanged: nothing read
    append(path, "".join(line(s) for s in range(51, 54)))
    second = read_losses(path)
    assert steps(second) == list(range(1, 54)) and parsed == [51, 3]
    assert second[-1] == (53, 0.53, 0.001)
    assert steps(first) == list(range(1, 51))  # an earlier answer is left as it was


def test_a_half_written_last_line_is_read_again_when_complete(tmp_path):
    path = tmp_path / "loss.csv"
    path.write_text(HEADER + line(1) + "2,0,2,0.5", newline="")  # no rate yet
    assert steps(read_losses(path)) == [1]
    append(path, "5,0.0")  # "2,0,2,0.55,0.0" has every column, but is not finished
    assert read_losses(path)[-1] == (2, 0.55, 0.0)
    append(path, "01\r\n" + line(3))
    assert read_losses(path)[1:] == [(2, 0.55, 0.001), (3, 0.03, 0.001)]


def test_a_header_still_being_written_is_not_taken_for_the_header(tmp_path):
    path = tmp_path / "loss.csv"
    path.write_text("step,epoch,epo", newline="")
    assert read_losses(path) == []
    append(path, "ch_step,loss,learn_rate\r\n" + line(1))
    assert steps(read_losses(path)) == [1]


def test_truncation_replacement_and_rewrite_read_from_the_start(tmp_path, parsed):
    path = tmp_path / "loss.csv"
    path.write_text(HEADER + "".join(line(s) for s in range(1, 11)), newline="")
    assert steps(read_losses(path)) == list(range(1, 11))
    path.write_text(HEADER + line(1, 0.9), newline="")  # truncated (same inode, smaller)
    assert read_losses(path) == [(1, 0.9, 0.001)]
    # rewritten in place to a longer file: the remembered last line is gone from its place
    path.write_text(HEADER + "".join(line(s, 0.7) for s in range(1, 4)), newline="")
    append(path, "")
    assert read_losses(path) == [(s, 0.7, 0.001) for s in range(1, 4)]
    other = tmp_path / "rotated.csv"  # replaced by another file (a new inode)
    other.write_text(HEADER + "".join(line(s, 0.3) for s in range(1, 5)), newline="")
    os.replace(other, path)
    assert read_losses(path) == [(s, 0.3, 0.001) for s in range(1, 5)]
    path.unlink()
    assert read_losses(path) == []


def test_a_restarted_step_count_keeps_the_newest_start_across_reads(tmp_path):
    path = tmp_path / "loss.csv"
    path.write_text(HEADER + "".join(line(s) for s in range(1, 7)), newline="")
    assert steps(read_losses(path)) == list(range(1, 7))
    append(path, line(4, 0.4) + line(5, 0.5))  # resumed from step 3
    assert steps(read_losses(path)) == [1, 2, 3, 4, 5]
    assert read_losses(path)[3:] == [(4, 0.4, 0.001), (5, 0.5, 0.001)]
    append(path, line(1, 0.1))  # started over
    assert read_losses(path) == [(1, 0.1, 0.001)]


def test_bad_lines_and_missing_columns(tmp_path):
    path = tmp_path / "loss.csv"
    path.write_text(HEADER + line(1) + "x,0,0,nope,1\r\n" + "2,0,2,0.2,\r\n", newline="")
    rows = read_losses(path)
    assert rows[0] == (1, 0.01, 0.001) and rows[1][:2] == (2, 0.2) and math.isnan(rows[1][2])
    bare = tmp_path / "no_loss.csv"
    bare.write_text("step,epoch\r\n1,0\r\n", newline="")
    assert read_losses(bare) == []
