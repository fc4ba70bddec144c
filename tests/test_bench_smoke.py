"""Smoke tests of the benchmark's plumbing (bench/); the benchmark itself is never run here."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_report_renders_paired_ui_overhead_cached_lora_rows_and_loaded_ttfs():
    from bench import report

    results = fake_results()
    del results["ui"]
    results["ui_paired"] = [
        {"round": i, "cpus": [i % 2, 1 - i % 2],
         "cli": {"side": "cli", "s_per_step": [0.100, 0.102], "cpu_per_step": [0.1, 0.1]},
         "page": {"side": "page", "s_per_step": [0.101, 0.103 + 0.002 * i],
                  "cpu_per_step": [0.1, 0.101], "poll_s": [0.002, 0.003], "kind": "tiny",
                  "steps": 200, "gradio_postprocess": True, "long_history_poll_s": 0.0025,
                  "reload_poll_s": 0.4}} for i in range(2)]
    results["ui_paired"].append({"round": 2, "cli": {"error": "boom"}, "page": {}})
    summary = report.ui_paired_summary(results)
    assert summary["pairs"] == 2 and summary["failed"] == 1
    # mean page s/step over mean CLI s/step of each pair, then the median over pairs
    assert math.isclose(summary["overhead"], (0.102 / 0.101 + 0.103 / 0.101) / 2 - 1,
                        rel_tol=1e-9)
    results["runs"] += [
        _run("danlu", "lora_cached", 0, 4.0, 3900, 300e9),
        _run("baseline", "lora_cached", 0, 8.0, 4800, 600e9),
        dict(_run("danlu", "hypernetwork", 0, 1.0, 500), kind="tiny", ttfs_cached_s=0.6,
             ttfs_cached_cpu_s=0.5),
        dict(_run("danlu", "textual_inversion", 0, 1.0, 500), kind="tiny", ttfs_cached_s=2.5,
             ttfs_call_s=9.0)]
    results["models"]["tiny"] = {"label": "tiny", "resolution": 64}
    text = report.render(results)
    assert "### UI overhead" in text and "each pinned to its own CPU" in text
    ui_row = next(line for line in text.splitlines() if line.startswith("| 0.101 |"))
    assert f"**{100 * summary['overhead']:+.1f}%**" in ui_row and "< 3% met" in ui_row
    assert "400 ms" in ui_row  # the first poll of a reloaded page
    cached = next(line for line in text.splitlines()
                  if line.startswith("| SD1.5-shaped | LoRA (rank 4), text-encoder outputs cached"))
    assert "**0.50×**" in cached and "≤ 0.8× met" in cached
    loaded = next(line for line in text.splitlines() if line.startswith("Model already loaded"))
    assert "Hypernetwork 0.6 s (0.5 CPU-s) (met)" in loaded
    assert "Textual inversion 2.50 s (**not met**)" in loaded


def test_cached_lora_variant_settings_on_both_sides(tmp_path):
    from bench import baselines, danlu_run

    setup = {"model": str(tmp_path / "m"), "resolution": 64,
             "data": {"images": "i", "captioned": "c", "kohya": str(tmp_path / "k")}}
    plain = baselines.script_args("lora", setup, 5, 0, tmp_path / "o")
    cached = baselines.script_args("lora_cached", setup, 5, 0, tmp_path / "o")
    assert "--pre_compute_text_embeddings" in cached and "--pre_compute_text_embeddings" not in plain
    assert cached[:len(plain)] == plain
    spec = dict(method="lora_cached", kind="tiny", model=setup["model"], resolution=64,
                data=setup["data"], steps=5, seed=0)
    cfg, missing = danlu_run.make_config(spec, preview=False)
    assert missing == [] and cfg.cache_text_encoder_outputs is True
    cfg, _ = danlu_run.make_config(dict(spec, method="lora"), preview=False)
    assert cfg.cache_text_encoder_outputs is False
    assert danlu_run.engine_method("lora_cached") == "lora"


def test_paired_only_results_render_pairs_and_the_paired_sides_time_to_first_step():
    from bench import report

    results = fake_results()
    results["runs"] = [dict(_run("danlu", "hypernetwork", 0, 1.0, 500), alone=True)]
    results["paired"][0]["danlu"].update(ttfs_call_s=7.0, ttfs_spawn_s=9.0, ttfs_cached_s=0.4,
                                         rss_at_last_step_mib=4000)
    results["paired"][0]["baseline"].update(ttfs_spawn_s=12.0, rss_at_last_step_mib=5000)
    text = report.render(results)
    assert "paired mode only" in text and "alternating (A B" not in text
    assert "| SD1.5-shaped | Hypernetwork | 1.06 (1.06–1.06) | 500 |" in text
    pair = next(line for line in text.splitlines() if line.startswith("| SD1.5-shaped | LoRA"))
    assert "**0.60×**" in pair and "4,000 / 5,000" in pair and "0.80×" in pair
    ttfs = next(line for line in text.splitlines()
                if line.startswith("| SD1.5-shaped | LoRA") and "9.00 s" in line)
    assert "7.00 s" in ttfs and "12.0 s" in ttfs and "| 0.4 s |" in ttfs
    assert not any(line.startswith("| SD1.5-shaped | LoRA") and line.endswith("| — | — |  |")
                   for line in text.splitlines())  # no FLOP row without counted FLOPs


def test_flux_lora_settings_match_on_both_sides(tmp_path):
    """The Flux comparison: the script caches latents and pads T5 to Danlu's 512 tokens, Danlu
    caches text outputs, both at guidance 1 and rank 4; the report holds it to issue #20's
    targets."""
    from bench import baselines, danlu_run, report
    setup = {"model": str(tmp_path / "m"), "resolution": 256,
             "data": {"images": "i", "captioned": "c", "kohya": str(tmp_path / "k")}}
    args = baselines.script_args("lora_flux", setup, 5, 0, tmp_path / "o")
    assert baselines.SCRIPTS["lora_flux"].endswith("train_dreambooth_lora_flux.py")
    pairs = dict(zip(args, args[1:]))
    assert "--cache_latents" in args and pairs["--rank"] == "4" and pairs["--guidance_scale"] == "1"
    assert pairs["--max_sequence_length"] == "512" and pairs["--resolution"] == "256"
    spec = dict(method="lora_flux", kind="flux", model=setup["model"], resolution=256,
                data=setup["data"], steps=5, seed=0)
    cfg, missing = danlu_run.make_config(spec, preview=False)
    assert missing == [] and cfg.cache_text_encoder_outputs is True and cfg.guidance_scale == 1.0
    assert (cfg.network_dim, cfg.network_alpha, cfg.learning_rate) == (4, 4.0, 1e-4)
    assert report.SPEED_TARGETS["lora_flux"] == 0.8 and "flux" in report.TARGET_KINDS


def test_kohya_baseline_runs_sd_scripts_at_danlus_settings(tmp_path):
    """sd-scripts gets the same model, kohya folder, size, rank, rate, seed and cached latents
    as Danlu; its tokenizer comes from the model folder under the hub id it would download;
    a missing checkout is reported by name, and the pins skip torch and GPU extras."""
    from bench import danlu_run, kohya
    model = tmp_path / "model"
    (model / "tokenizer").mkdir(parents=True)
    (model / "tokenizer" / "vocab.json").write_text("{}")
    setup = {"model": str(model), "resolution": 256,
             "data": {"images": "i", "captioned": "c", "kohya": str(tmp_path / "k")}}
    tokenizers = kohya.tokenizer_cache(setup, tmp_path)
    assert (tokenizers / "openai_clip-vit-large-patch14" / "vocab.json").is_file()
    args = {m: kohya.script_args(m, setup, 7, 0, tmp_path / "o", tokenizers) for m in kohya.SCRIPTS}
    pairs = dict(zip(args["lora"], args["lora"][1:]))
    assert pairs["--network_dim"] == pairs["--network_alpha"] == "4" and pairs["--max_train_steps"] == "7"
    assert "--network_train_unet_only" in args["lora"] and "--network_train_unet_only" not in args["lora_te"]
    assert "conv_dim=4" in args["locon"] and "--cache_latents" in args["dreambooth"]
    assert dict(zip(args["dreambooth"], args["dreambooth"][1:]))["--stop_text_encoder_training"] == "-1"
    assert dict(zip(args["textual_inversion"], args["textual_inversion"][1:]))["--learning_rate"] == "0.005"
    for method in ("lora_te", "locon"):  # Danlu's side of the same comparison
        spec = dict(method=method, kind="sd15", model=str(model), resolution=256,
                    data=setup["data"], steps=5, seed=0)
        cfg, missing = danlu_run.make_config(spec, preview=False)
        assert missing == []
        assert (cfg.network_train_unet_only, cfg.conv_dim) == ((False, 0) if method == "lora_te" else (True, 4))
    with pytest.raises(kohya.BaselineMissing, match="train_network.py not found"):
        kohya.script_path("lora", tmp_path / "nowhere")
    (tmp_path / "req").mkdir()
    (tmp_path / "req" / "requirements.txt").write_text(
        "accelerate==1.6.0\ntorch==2.0\nopencv-python==4.10.0.84\ndiffusers[torch]==0.32.1\n"
        "bitsandbytes\n# comment\n-e .\n")
    assert kohya.pinned_requirements(tmp_path / "req") == [
        "accelerate==1.6.0", "opencv-python-headless==4.10.0.84", "diffusers==0.32.1"]
