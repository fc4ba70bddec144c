"""How `python -m trainers` ends: every failure with one `error:` line on stderr (no traceback
unless asked for), a Failed event with --json-events and a non-zero exit; a stop by SIGINT /
SIGTERM with 130 / 143 after saving, a stop by --stop-file with 0."""
from __future__ import annotations

import errno
import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, cli_embedding_run


@pytest.fixture
def ti_setup(tmp_path, tiny_model_dir, photo_dataset):
    """A data folder with tiny-demo and the embedding 'clitok', and a run.toml training it."""
    return cli_embedding_run(tmp_path, tiny_model_dir, photo_dataset, steps=2)


def cli(ti_setup, *extra):
    data, config, _ = ti_setup
    return ["textual_inversion", "--config", str(config), "--data-dir", str(data), *extra]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def failed_events(out: str) -> list[dict]:
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return [event for event in events if event["event"] == "Failed"]


def disk_full_save(monkeypatch):
    """Saving the embedding fills the disk halfway through writing its temporary file."""
    import trainers.methods.textual_inversion as ti
    from core.atomic import atomic_write

    def save_embedding(target, emb):
        def write(temp):
            temp.write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(temp))
        atomic_write(target, write)
    monkeypatch.setattr(ti, "save_embedding", save_embedding)


@pytest.mark.parametrize("json_events", [False, True])
def test_a_full_disk_during_the_save_ends_with_one_line_and_a_failed_event(
        ti_setup, monkeypatch, capsys, json_events):
    from trainers.__main__ import main
    from trainers.formats.embedding import load_embedding
    disk_full_save(monkeypatch)
    code = main(cli(ti_setup, *(["--json-events"] if json_events else [])))
    out, err = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    assert "textual_inversion failed: the disk is full while writing" in lines[0]
    if json_events:
        assert [event["message"] for event in failed_events(out)] == [lines[0]]
    else:
        assert out == ""
    _, _, path = ti_setup
    assert load_embedding(path).step == 0  # the file saved before is whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["clitok.pt"]  # no temporary left


@pytest.mark.parametrize("error", [KeyError("vectors"), TypeError("'NoneType' is not callable"),
                                   MemoryError()])
def test_an_unexpected_exception_ends_with_one_line_naming_it(ti_setup, monkeypatch, capsys, error):
    import trainers.methods.textual_inversion as ti
    from trainers.__main__ import main

    def broken(path):
        raise error
    monkeypatch.setattr(ti, "load_embedding", broken)
    code = main(cli(ti_setup, "--json-events"))
    out, err = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    assert lines[0].startswith("error: textual_inversion failed: ")
    assert type(error).__name__ in lines[0]
    if isinstance(error, MemoryError):
        assert "out of memory" in lines[0]
    else:
        assert str(error) in lines[0]
    assert [event["message"] for event in failed_events(out)] == [lines[0]]


def test_debug_prints_the_traceback_before_the_line(ti_setup, monkeypatch, capsys):
    import trainers.methods.textual_inversion as ti
    from trainers.__main__ import main
    monkeypatch.setattr(ti, "load_embedding", lambda path: {}["vectors"])
    monkeypatch.setenv("DANLU_DEBUG", "1")
    assert main(cli(ti_setup)) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError" in err
    assert err.rstrip().splitlines()[-1] == "error: textual_inversion failed: KeyError: 'vectors'"
    monkeypatch.delenv("DANLU_DEBUG")
    assert main(cli(ti_setup, "--debug")) == 1
    assert "Traceback" in capsys.readouterr().err


def test_bad_settings_give_a_failed_event_too(tmp_path, capsys):
    from trainers.__main__ import main
    code = main(["textual_inversion", "--set", "width=100", "--data-dir", str(tmp_path),
                 "--json-events"])
    out, err = capsys.readouterr()
    assert code == 2
    assert error_lines(err) == [failed_events(out)[0]["message"]]
    assert "width: must be a multiple of 8, got 100" in err


def test_a_usage_error_gives_a_failed_event_too(capsys):
    from trainers.__main__ import main
    with pytest.raises(SystemExit) as exit:
        main(["textual_inversoin", "--json-events"])
    out, err = capsys.readouterr()
    assert exit.value.code == 2
    assert "invalid choice: 'textual_inversoin'" in failed_events(out)[0]["message"]
    assert "invalid choice: 'textual_inversoin'" in err


def test_a_missing_file_named_in_the_settings_exits_2_naming_the_field(ti_setup, capsys):
    from trainers.__main__ import main
    assert main(cli(ti_setup, "--set", 'embedding="nothere"')) == 2
    assert "embedding: no embedding named 'nothere'" in error_lines(capsys.readouterr().err)[0]


def start_long_run(ti_setup, *extra):
    data, config, _ = ti_setup
    config.write_text(config.read_text().replace("steps = 2", "steps = 100000"))
    return subprocess.Popen([sys.executable, "-m", "trainers", *cli(ti_setup, *extra)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))


def stop_after_first_step(proc, stop) -> str:
    seen, rest = b"", b""
    deadline = time.time() + 120
    try:
        while b"loss=" not in seen:  # tqdm's first progress line
            assert time.time() < deadline and proc.poll() is None, seen.decode(errors="replace")
            if select.select([proc.stderr], [], [], 0.5)[0]:
                seen += os.read(proc.stderr.fileno(), 65536)
        stop()
        _, rest = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    return (seen + rest).decode(errors="replace")


@pytest.mark.parametrize("how, expected", [("SIGINT", 130), ("SIGTERM", 143), ("stop-file", 0)])
def test_a_stopped_run_saves_then_exits_with_what_stopped_it(ti_setup, tmp_path, how, expected):
    from trainers.formats.embedding import load_embedding
    stop_file = tmp_path / "stop-now"
    proc = start_long_run(ti_setup, "--stop-file", str(stop_file))
    if how == "stop-file":
        output = stop_after_first_step(proc, stop_file.touch)
    else:
        output = stop_after_first_step(proc, lambda: proc.send_signal(getattr(signal, how)))
    assert proc.returncode == expected, output
    assert "Traceback" not in output and "error:" not in output
    _, _, path = ti_setup
    saved = load_embedding(path)
    assert saved.step > 0
    assert f"Training interrupted at step {saved.step}; saved {path}" in output
