"""atomic_write: readers see the old file or the new one, never a partial write."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.atomic import atomic_write, atomic_write_bytes, atomic_write_text


def test_writes_new_file_and_creates_parent_dirs(tmp_path):
    target = tmp_path / "a" / "b" / "file.bin"
    atomic_write_bytes(target, b"\x00\x01payload")
    assert target.read_bytes() == b"\x00\x01payload"
    assert os.listdir(target.parent) == ["file.bin"]


def test_replaces_existing_file_and_keeps_its_mode(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("old")
    os.chmod(target, 0o640)
    atomic_write_text(target, "new ✓")
    assert target.read_text(encoding="utf-8") == "new ✓"
    assert target.stat().st_mode & 0o777 == 0o640


def test_new_file_gets_normal_permissions_not_private_temp_ones(tmp_path):
    target = tmp_path / "fresh.txt"
    atomic_write_text(target, "x")
    old_umask = os.umask(0o022)
    os.umask(old_umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~old_umask


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_writer_failing_midway_leaves_old_file_and_no_temp(tmp_path, error):
    target = tmp_path / "model.pt"
    original = os.urandom(4096)
    target.write_bytes(original)
    seen: list[Path] = []

    def half_write(temp: Path) -> None:
        seen.append(temp)
        assert temp.parent == target.parent and temp != target
        temp.write_bytes(b"partial" * 100)
        raise error

    with pytest.raises(type(error)):
        atomic_write(target, half_write)
    assert target.read_bytes() == original
    assert os.listdir(tmp_path) == ["model.pt"]
    assert seen and not seen[0].exists()


def test_failure_with_no_previous_file_leaves_nothing(tmp_path):
    target = tmp_path / "out" / "new.png"

    def fail(temp: Path) -> None:
        temp.write_bytes(b"junk")
        raise ValueError("encoder failed")

    with pytest.raises(ValueError, match="encoder failed"):
        atomic_write(target, fail)
    assert not target.exists()
    assert os.listdir(target.parent) == []
