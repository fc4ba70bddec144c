"""Smoke tests of the benchmark's plumbing (bench/); the benchmark itself is never run here."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(side, method, round_, seconds, rss, flops=None, **extra):
    steps = [[1, 9.0], [2, 2.0]] + [[i, seconds * (1 + 0.01 * i)] for i in range(3, 9)]
    return {"side": side, "method": method, "kind": "sd15", "round": round_, "step_times": steps,
            "step_cpu_times": steps, "flop_step": 2, "rss_at_last_step_mib": rss,
            "rss_exit_mib": rss + 10, "ttfs_spawn_s": 20.0, "flops": flops, **extra}


def fake_results() -> dict:
    runs = []
    for round_ in range(2):
        runs += [_run("danlu", "lora", round_, 5.0, 4000, 362e9, ttfs_call_s=8.0),
                 _run("baseline", "lora", round_, 8.0, 5000, 640e9,
                      flops_by_module={"Encoder": 270e9}),
                 _run("danlu", "textual_inversion", round_, 6.0, 4100, 380e9,
                      preview_s=[60.0] if round_ == 0 else [])]
    runs.append({"side": "danlu", "method": "dreambooth", "kind": "sd15", "round": 0,
                 "unavailable": "not available yet"})

    def walls(start, seconds):
        return {"step_walls": [[i, start + i * seconds] for i in range(1, 11)]}
    paired = [{"method": "lora", "kind": "sd15", "round": 0, "cpus": [0, 1],
               "danlu": walls(30.0, 6.0), "baseline": walls(0.0, 10.0)}]
    return {"heading": "## Training: fake", "command": "python3 -m bench --full", "rounds": 2,
            "steps": {"sd15": 8}, "models": {"sd15": {"label": "SD1.5-shaped", "resolution": 256}},
            "matmul": [{"best_gflops": 190.0, "median_gflops": 170.0}], "runs": runs,
            "paired": paired,
            "ui": {"kind": "sd15", "steps": 8, "rounds": 2, "cli_s_per_step": [5.0, 5.1],
                   "page_s_per_step": [5.05, 5.1], "poll_s": [0.004, 0.005],
                   "long_history_poll_s": 0.09},
            "unavailable": {"dreambooth": "not in trainers/registry.py yet"},
            "notes": ["a note"], "machine": {"nproc": "2", "cpu": "x", "load": "1, 1, 1"},
            "versions": {"torch": "2.13.0"}}


def test_report_writer_makes_a_table_and_keeps_other_sections(tmp_path):
    from bench import report

    text = report.render(fake_results())
    assert text.startswith("## Training: fake")
    row = report.summarize(fake_results())[("sd15", "lora")]
    assert math.isclose(row["ratio"], 5.275 / 8.44, rel_tol=1e-6)  # medians of steps 3..8
    rows = [line for line in text.splitlines() if line.startswith("| SD1.5-shaped | LoRA")]
    assert rows and f"**{row['ratio']:.2f}×**" in rows[0] and "≤ 0.8× met" in rows[0]
    assert "0.80×" in rows[0]  # RSS ratio 4000 / 5000
    ti = next(line for line in text.splitlines() if line.startswith("| SD1.5-shaped | Textual"))
    assert "not run" in ti  # no baseline run for TI in the fake data
    assert "not available yet" in text and "### UI overhead" in text
    assert "**+0.5%**" in text  # 5.075 / 5.05
    assert "VAE encode 270.0 GFLOP" in text and "### Preview cost" in text
    pair = next(line for line in text.splitlines() if line.startswith("| SD1.5-shaped | LoRA")
                and "| 1 |" in line)
    assert "**0.60×**" in pair  # only the steps that overlapped count: 6 s vs 10 s

    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## Preprocess throughput\n\nkept line\n", encoding="utf-8")
    report.write_section(path, "## Training: fake", text)
    report.write_section(path, "## Training: fake", text)  # replacing, not appending
    written = path.read_text(encoding="utf-8")
    assert written.count("## Training: fake") == 1
    assert written.index("## Training: fake") < written.index("## Preprocess throughput")
    assert written.rstrip().endswith("kept line")


def test_torchvision_standin_semantics():
    import torch
    from PIL import Image

    from bench import torchvision_standin as T

    image = Image.new("RGB", (150, 100), (255, 0, 0))
    pipeline = T.Compose([T.Resize(64, interpolation=T.InterpolationMode.BILINEAR),
                          T.RandomCrop(64), T.RandomHorizontalFlip(), T.ToTensor(),
                          T.Normalize([0.5], [0.5])])
    out = pipeline(image)
    assert out.shape == (3, 64, 64)
    assert torch.allclose(out[0], torch.ones(64, 64)) and torch.allclose(out[1], -torch.ones(64, 64))
    assert T.Resize(50)(image).size == (75, 50)  # the shorter side becomes 50
    assert T.CenterCrop(40)(image).size == (40, 40)
    assert T.functional.crop(image, 10, 20, 30, 40).size == (40, 30)


def test_danlu_runner_child_returns_sane_json(tmp_path):
    env = dict(os.environ, DANLU_BENCH_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    setup = subprocess.run([sys.executable, "-m", "bench.fixtures", "tiny", "--json-line"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    line = next(l for l in setup.stdout.splitlines() if l.startswith("BENCH_JSON "))
    info = json.loads(line[len("BENCH_JSON "):])
    spec = dict(method="textual_inversion", kind="tiny", model=info["model"],
                resolution=info["resolution"], data=info["data"], steps=3, seed=0,
                workdir=str(tmp_path / "work"), preview=False, cached_rerun=False, flop_step=2)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    done = subprocess.run([sys.executable, "-m", "bench.danlu_run", str(spec_file)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    line = next(l for l in done.stdout.splitlines() if l.startswith("BENCH_JSON "))
    result = json.loads(line[len("BENCH_JSON "):])
    assert "error" not in result, result.get("traceback")
    assert [step for step, _ in result["step_times"]] == [1, 2, 3]
    assert all(seconds > 0 for _, seconds in result["step_times"])
    assert 0 < result["ttfs_call_s"] <= result["ttfs_spawn_s"]
    assert result["rss_at_last_step_mib"] > 50
    assert result["flops"] > 1e6  # the tiny U-Net's forward + backward, counted on step 2
    assert len(result["losses"]) == 3 and all(math.isfinite(loss) for loss in result["losses"])
    assert result["config_fields_missing"] == []
