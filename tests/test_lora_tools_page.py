"""The Checkpoints tab's LoRA tools without a browser: picked names stay bare files of
models/Lora, weights match the files, and each tool is queued with the Train tab's config."""
from __future__ import annotations

import pytest

from core.paths import Paths
from webui.lora_tools import chosen, queue_ema, queue_tool, tool_config, weighted


class Runner:
    def __init__(self):
        self.queued = []

    def submit(self, name, kind, fn, config=None, queue=False, spec=None):
        from types import SimpleNamespace
        self.queued.append((name, config, queue))
        return SimpleNamespace(id=len(self.queued))


@pytest.fixture
def paths(tmp_path):
    paths = Paths(tmp_path / "data", confine=True).ensure()
    for name in ("a.safetensors", "b.safetensors"):
        (paths.lora / name).write_bytes(b"x")
    return paths


@pytest.mark.parametrize("bad,words", [("../a.safetensors", "path characters"),
                                       ("/etc/passwd", "path characters"),
                                       ("c.safetensors", "no file 'c.safetensors'"),
                                       (None, "pick one or more")])
def test_picked_names_are_bare_files_of_models_lora(paths, bad, words):
    with pytest.raises(ValueError, match=words):
        chosen(paths, [bad] if bad else [])
    assert chosen(paths, ["a.safetensors"]) == ["a.safetensors"]


def test_weights_pair_with_the_files_and_tools_queue_the_train_tabs_configs(paths):
    assert weighted(["a.safetensors", "b.safetensors"], "") == "a.safetensors: 1, b.safetensors: 1"
    with pytest.raises(ValueError, match="weights: 1 weights for 2 files"):
        weighted(["a.safetensors", "b.safetensors"], "0.5")
    with pytest.raises(ValueError, match="Resize takes one file"):
        tool_config("resize_lora", ["a.safetensors", "b.safetensors"], "", "x", False, 4,
                    "none", 0)
    runner = Runner()
    message, job = queue_tool(paths, runner, "merge_lora", ["a.safetensors", "b.safetensors"],
                              "0.7, 0.3", "both", False, 0)
    assert job == 1 and "Queued" in message
    name, cfg, queued = runner.queued[0]
    assert queued and cfg.loras == "a.safetensors: 0.7, b.safetensors: 0.3"
    message, _ = queue_tool(paths, runner, "resize_lora", ["a.safetensors"], "", "a", False, 4,
                            "none", 0)
    assert "output_name: choose a name other than the LoRA's own" in message
    message, _ = queue_ema(paths, runner, None, "avg", False)
    assert "open a LoRA run" in message and len(runner.queued) == 1
