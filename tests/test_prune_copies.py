"""Keep-last-N pruning deletes only this run's periodic copies."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from trainers.loop import _prune


def test_prune_keeps_newest_and_leaves_other_runs_alone(tmp_path: Path):
    names = ["foo-100.safetensors", "foo-200.safetensors", "foo-300.safetensors",
             "foo-bar-50.safetensors", "foo-neg-100.safetensors", "foo-final.safetensors",
             "foo-400.pt", "foo.safetensors"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    plan = SimpleNamespace(name="foo", final_path=tmp_path / "foo.safetensors")
    _prune(tmp_path, plan, keep=2)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(set(names) - {"foo-100.safetensors"})


def test_prune_orders_by_step_number_not_text(tmp_path: Path):
    for step in (9, 10, 100):
        (tmp_path / f"run-{step}.pt").write_bytes(b"x")
    _prune(tmp_path, SimpleNamespace(name="run", final_path=tmp_path / "run.pt"), keep=1)
    assert [p.name for p in tmp_path.iterdir()] == ["run-100.pt"]
