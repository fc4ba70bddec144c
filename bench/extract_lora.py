"""Time and peak memory of *Extract LoRA* from an SD1.5-shaped "DreamBooth" checkpoint, on the CPU:

    python3 -m bench.extract_lora                          # Danlu as it is now
    python3 -m bench.extract_lora --sides before --before da312b5   # Danlu at an older commit
    python3 -m bench.extract_lora --sides sd-scripts       # kohya's networks/extract_lora_from_models.py

The base is the benchmark's SD1.5-shaped random model (bench.fixtures), written as an fp16
original-layout single file; the "fine-tuned" copy is that file with every U-Net and text-encoder
weight moved by 5 % of its tensor's standard deviation (seeded Gaussian noise: a full-rank
change, the worst case for a low-rank extraction). Both files are made once, in a child, under
~/.cache/danlu-bench/extract/. Each side then runs once, in its own process, at rank 32 (Danlu's
default) without convolutions, saving fp16; its wall time, CPU time (user + system) and peak RSS
come from `wait4` on that process. Results are kept in ~/.cache/danlu-bench/results-extract.json
(one entry per side, the newest run) and printed as the rows of BENCHMARKS.md's table.

*before* runs `python3 -m trainers extract_lora` from `git archive REV` of this repo (unpacked
under the cache). *sd-scripts* needs a checkout of kohya-ss/sd-scripts (never vendored):
$DANLU_SD_SCRIPTS or ~/.cache/danlu-bench/sd-scripts-v0.10.1, run by a Python that has its
imports (`--sd-scripts-python`; opencv-python-headless and einops on top of this environment's
packages were enough for v0.10.1: `python3 -m venv --system-site-packages
~/.cache/danlu-bench/sd-scripts-venv`, then its pip) and with bench/torchvision_standin.py as its
torchvision (no build exists for this torch), through bench/script_timer.py. It gets `--min_diff 1e-4` so that,
as Danlu does, it extracts the text encoder's change (its default 0.01 skips a change this small).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import fixtures  # noqa: E402
from bench.torchvision_standin import write_standin  # noqa: E402

RANK = 32
NOISE = 0.05  # the "fine-tune": each weight moves by this share of its tensor's std
BASE, TUNED = "sd15-base.safetensors", "sd15-tuned.safetensors"
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "GRADIO_ANALYTICS_ENABLED": "False"}


def work_dir() -> Path:
    return fixtures.bench_cache() / "extract"


def results_path() -> Path:
    return fixtures.bench_cache() / "results-extract.json"


def log(text: str) -> None:
    print(f"[extract {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ the two files (in a child)

def make_files(folder: Path) -> None:
    """The base as an fp16 single file, and the same with its U-Net and text encoder moved."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from trainers.formats.sd_checkpoint import save_single_file

    source = fixtures.build_model("sd15")
    models = folder / "models" / "Stable-diffusion"
    models.mkdir(parents=True, exist_ok=True)
    if (models / TUNED).exists():
        return
    unet = UNet2DConditionModel.from_pretrained(source / "unet")
    vae = AutoencoderKL.from_pretrained(source / "vae")
    text_encoder = CLIPTextModel.from_pretrained(source / "text_encoder")
    save_single_file(models / BASE, unet, vae, text_encoder, family="sd1")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in (unet, text_encoder):
            for weight in module.parameters():
                if weight.dim() > 1:
                    # from the fp16 base, so the change is all the fine-tune's
                    weight.copy_(weight.half().float())
                    weight.add_(torch.randn(weight.shape, generator=generator)
                                * (NOISE * weight.std()))
    save_single_file(models / TUNED, unet, vae, text_encoder, family="sd1")


# ------------------------------------------------------------------ one side, measured

def measure(command: list[str], cwd: Path, env: dict) -> dict:
    """Run `command` to its end; wall seconds, CPU seconds and peak RSS from wait4."""
    start = time.time()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - start
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n{output[-3000:]}")
    return {"wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024), "tail": output[-1500:]}


def danlu_command(output: str) -> list[str]:
    return [sys.executable, "-m", "trainers", "extract_lora", "--data-dir", str(work_dir()),
            "--set", f"checkpoint={TUNED}", "--set", f"model={BASE}",
            "--set", f"output_name={output}", "--set", f"rank={RANK}",
            "--set", "save_precision=fp16", "--set", "overwrite=true"]


def unpacked(rev: str) -> Path:
    """This repo at `rev`, unpacked (once) under the cache."""
    commit = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.strip()
    target = fixtures.bench_cache() / f"danlu-{commit}"
    if not (target / "trainers").exists():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", commit], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def sd_scripts_dir() -> Path:
    return Path(os.environ.get("DANLU_SD_SCRIPTS",
                               fixtures.bench_cache() / "sd-scripts-v0.10.1"))


def run_side(side: str, args) -> dict:
    env = {**os.environ, **ENV}
    models = work_dir() / "models" / "Stable-diffusion"
    if side == "danlu":
        result = measure(danlu_command("extracted-now"), ROOT, env)
        command = "python3 -m bench.extract_lora"
    elif side == "before":
        code = unpacked(args.before)
        result = measure(danlu_command("extracted-before"), code, env)
        result["code"] = code.name
        command = f"python3 -m bench.extract_lora --sides before --before {args.before}"
    else:
        scripts = sd_scripts_dir()
        if not (scripts / "networks" / "extract_lora_from_models.py").exists():
            raise SystemExit(f"no sd-scripts checkout at {scripts}; set DANLU_SD_SCRIPTS")
        standin = write_standin(fixtures.bench_cache() / "torchvision-standin")
        env.update(PYTHONPATH=str(scripts), DANLU_BENCH_STANDIN=str(standin),
                   DANLU_BENCH_OUT=str(work_dir() / "sd-scripts-timer.json"))
        out = work_dir() / "models" / "Lora" / "extracted-sd-scripts.safetensors"
        out.parent.mkdir(parents=True, exist_ok=True)
        result = measure([args.sd_scripts_python, str(ROOT / "bench" / "script_timer.py"),
                          "networks/extract_lora_from_models.py",
                          "--model_org", str(models / BASE), "--model_tuned", str(models / TUNED),
                          "--save_to", str(out), "--dim", str(RANK), "--device", "cpu",
                          "--save_precision", "fp16", "--min_diff", "1e-4"], scripts, env)
        result["code"] = scripts.name
        command = "python3 -m bench.extract_lora --sides sd-scripts"
    result.update(side=side, command=command, date=time.strftime("%Y-%m-%d"),
                  load=round(os.getloadavg()[0], 1), rank=RANK)
    return result


# ------------------------------------------------------------------ report

LABELS = {"before": "Danlu before (full `torch.linalg.svd` per layer, both models loaded)",
          "danlu": "Danlu now (randomized SVD, tuned file read one layer at a time)",
          "sd-scripts": "sd-scripts v0.10.1 `networks/extract_lora_from_models.py`"}


def rows(results: dict) -> list[str]:
    machine = f"{os.cpu_count()}-CPU"
    out = ["| extractor | wall | CPU time | peak RSS | command | date | machine |",
           "|---|---|---|---|---|---|---|"]
    for side in ("before", "sd-scripts", "danlu"):
        r = results.get(side)
        if r:
            out.append(f"| {LABELS[side]} | {r['wall_s'] / 60:.1f} min | {r['cpu_s'] / 60:.1f} min "
                       f"| {r['peak_rss_mib']:,} MiB | `{r['command']}` | {r['date']} "
                       f"| {machine}, load {r['load']} at the end |")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", default="danlu",
                        help="comma-separated: danlu, before, sd-scripts (each runs once)")
    parser.add_argument("--before", default="da312b5", help="the commit 'before' runs")
    parser.add_argument("--sd-scripts-python", default=str(
        fixtures.bench_cache() / "sd-scripts-venv" / "bin" / "python"))
    parser.add_argument("--make-files", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.make_files:
        make_files(work_dir())
        return
    if not (work_dir() / "models" / "Stable-diffusion" / TUNED).exists():
        log("making the base and fine-tuned files (once)")
        subprocess.run([sys.executable, "-m", "bench.extract_lora", "--make-files"], cwd=ROOT,
                       env={**os.environ, **ENV}, check=True)
    results = json.loads(results_path().read_text()) if results_path().exists() else {}
    for side in args.sides.split(","):
        log(f"running {side}")
        results[side] = run_side(side.strip(), args)
        log(f"{side}: {results[side]['wall_s']} s, {results[side]['peak_rss_mib']} MiB")
        results_path().write_text(json.dumps(results, indent=1))
    print(f"{platform.processor() or platform.machine()}, torch threads default")
    print("\n".join(rows(results)))


if __name__ == "__main__":
    main()
