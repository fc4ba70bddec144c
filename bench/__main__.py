"""python -m bench: Danlu's training methods against diffusers' example scripts, on the CPU.

    python3 -m bench                 # quick (~10 min): tiny model, 64 px, every method, UI overhead
    python3 -m bench --full          # SD1.5-shaped random model, 256 px: TI and LoRA (~30-40 min)
    python3 -m bench --full --methods dreambooth      # + full fine-tune (~15 GB RAM per process)
    python3 -m bench --flux          # Flux.1 LoRA vs train_dreambooth_lora_flux.py (small Flux, 256 px)
    python3 -m bench --against kohya # vs kohya's sd-scripts (SD1.5-shaped, 256 px; bench/kohya.py)
    python3 -m bench --methods lora,ui --rounds 2 --no-write
    python3 -m bench --report-only   # re-render BENCHMARKS.md from the last saved measurements

Every measurement runs in its own process (bench.danlu_run, bench/script_timer.py,
bench.ui_overhead, bench.matmul_peak, bench.preprocess_throughput); this process stays
torch-free and only schedules them, alternating Danlu and the baseline, and writes the
section of BENCHMARKS.md for its mode (other sections are kept). Raw measurements are saved
in ~/.cache/danlu-bench/results-<mode>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import baselines, fixtures, kohya, report  # noqa: E402
from bench.torchvision_standin import write_standin  # noqa: E402

TRAINING = ["textual_inversion", "hypernetwork", "lora", "lora_cached", "lora_te", "locon",
            "dreambooth", "lora_flux"]
EXTRAS = ["ui", "preprocess"]
MODES = {
    "quick": {"kind": "tiny", "steps": 30, "rounds": 3, "timeout": 900,
              "methods": TRAINING + ["ui"], "ui_steps": 200, "ui_rounds": 4,
              "heading": "## Training: Danlu vs diffusers' scripts — quick (tiny model, 64 px)"},
    "full": {"kind": "sd15", "steps": 10, "rounds": 2, "timeout": 7200,
             "methods": ["textual_inversion", "lora", "lora_cached", "preprocess"], "ui_steps": 60, "ui_rounds": 3,
             "heading": "## Training: Danlu vs diffusers' scripts — full (SD1.5-shaped, 256 px)"},
    "flux": {"kind": "flux", "steps": 10, "rounds": 2, "timeout": 3600, "methods": ["lora_flux"],
             "ui_steps": 0, "ui_rounds": 0,
             "heading": "## Flux.1 LoRA: Danlu vs diffusers' train_dreambooth_lora_flux.py "
                        "(small Flux-shaped, 256 px)"},
    "kohya": {"kind": "sd15", "steps": 10, "rounds": 2, "timeout": 7200,
              "methods": ["lora", "lora_te", "locon", "textual_inversion", "dreambooth"],
              "ui_steps": 0, "ui_rounds": 0,
              "heading": "## Training: Danlu vs kohya's sd-scripts (SD1.5-shaped, 256 px)"},
}
# issue #24's targets against sd-scripts: seconds per step, Danlu / sd-scripts
KOHYA_TARGETS = {"lora": 0.8, "lora_te": 0.8, "locon": 0.8, "dreambooth": 0.8,
                 "textual_inversion": 0.8}
SEED = 0
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
             "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled",
             "GRADIO_ANALYTICS_ENABLED": "False", "DIFFUSERS_VERBOSITY": "error"}
STANDIN_NOTE = (
    "torchvision: none exists for this CPU torch, so the scripts get a small stand-in "
    "(`bench/torchvision_standin.py`: Compose, Resize, CenterCrop, RandomCrop, "
    "RandomHorizontalFlip, ToTensor, Normalize, InterpolationMode, `transforms.functional`), "
    "written to a temp folder at run time and put on the scripts' `sys.path` by "
    "`bench/script_timer.py` only after transformers has cached that torchvision is not "
    "installed, so library code takes its usual no-torchvision paths. The training images are "
    "already square at the training size, so its Resize/Crop change no pixel.")


def log(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _pinned(pin: int | None) -> tuple[list[str], dict]:
    """taskset prefix and single-thread env for a paired run on CPU `pin`."""
    if pin is None:
        return [], {}
    return (["taskset", "-c", str(pin)],
            {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})


def child_json(cmd: list[str], timeout: float, cwd: Path, env: dict | None = None) -> dict:
    """Run a child that prints `BENCH_JSON {...}` last; its output is kept for failures."""
    env = dict(os.environ, **CHILD_ENV, **(env or {}), DANLU_BENCH_T0=repr(time.time()))
    try:
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s: {' '.join(cmd[:4])}"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON "):])
    tail = (done.stderr or done.stdout)[-1500:]
    return {"error": f"exit {done.returncode}: {tail.strip().splitlines()[-1] if tail.strip() else ''}",
            "stderr_tail": tail, "returncode": done.returncode}


def run_danlu(method: str, setup: dict, steps: int, round_, work: Path, timeout: float,
              preview: bool, cached_rerun: bool, pin: int | None = None) -> dict:
    folder = work / f"danlu-{method}-{round_}"
    folder.mkdir(parents=True, exist_ok=True)
    spec = dict(method=method, kind=setup["kind"], model=setup["model"],
                resolution=setup["resolution"], data=setup["data"], steps=steps, seed=SEED,
                workdir=str(folder), preview=preview, cached_rerun=cached_rerun,
                flop_step=2 if pin is None else None)
    spec_file = folder / "spec.json"
    spec_file.write_text(json.dumps(spec))
    prefix, env = _pinned(pin)
    result = child_json(prefix + [sys.executable, "-m", "bench.danlu_run", str(spec_file)],
                        timeout, ROOT, env)
    shutil.rmtree(folder / "data", ignore_errors=True)
    shutil.rmtree(folder / "data-rerun", ignore_errors=True)
    shutil.rmtree(folder / "data-rerun2", ignore_errors=True)
    return result


def run_baseline(method: str, setup: dict, steps: int, round_, work: Path, timeout: float,
                 standin: Path, pin: int | None = None, provider=baselines) -> dict:
    folder = work / f"script-{method}-{round_}"
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "timing.json"
    cmd = provider.command(method, setup, steps, SEED, folder / "output")
    prefix, env = _pinned(pin)
    if provider is kohya:
        env["DANLU_BENCH_BAR"] = kohya.BAR
    env.update({"DANLU_BENCH_STANDIN": str(standin), "DANLU_BENCH_OUT": str(out),
                "DANLU_BENCH_FLOP_STEP": "2" if pin is None else ""})
    result = child_json(prefix + cmd, timeout, folder, env)
    if out.exists():  # the wrapper writes its measurements to a file, not to stdout
        data = json.loads(out.read_text())
        if result.get("returncode") not in (None, 0) and not data.get("error"):
            data["error"] = result["error"]
        result = data
    shutil.rmtree(folder / "output", ignore_errors=True)
    return result


def _brief(result: dict) -> str:
    if result.get("unavailable"):
        return "not available"
    if result.get("error"):
        return "FAILED " + str(result["error"]).splitlines()[0][:200]
    median = report.run_median(result)
    rss = result.get("rss_at_last_step_mib")
    return (f"{median:.3f} s/step, first step after {result.get('ttfs_spawn_s', 0):.1f} s, "
            f"RSS {rss:.0f} MiB" if median is not None and rss else "no steps")


def machine_info() -> dict:
    from bench.preprocess_throughput import machine
    info = machine()
    try:
        kib = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal")))
        info["memory"] = f"{kib / 1024 ** 2:.0f} GB"
    except (OSError, StopIteration, ValueError):
        pass
    return info


def versions() -> dict:
    from importlib import metadata
    out = {"Python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "accelerate", "peft", "gradio"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def notes(kind: str, methods: list[str]) -> list[str]:
    res = fixtures.MODELS[kind].resolution
    if kind == "flux":
        return [
            f"Same on both sides: the small Flux.1-shaped folder ({fixtures.FLUX_SMALL_NOTE}), the 4 "
            f"photos square at {res} px with the one caption 'a photo of sks dog', batch 1, fp32, "
            "AdamW at a constant 1e-4, seed 0, LoRA rank 4 with alpha = rank, guidance 1, T5 "
            "padded to 512 tokens, latents encoded once (the script's --cache_latents) and the "
            "prompt encoded once (the script does so by itself for one instance prompt; Danlu's "
            "cache_text_encoder_outputs), no validation, no intermediate checkpoints, torch's "
            "default threads.",
            "Adapters: the script's default targets are the double blocks' attention and "
            "feed-forward linears; Danlu trains kohya's Flux set (those, the double blocks' "
            "modulation linears and every single block's linear1 / linear2 / modulation), so it "
            "trains more LoRA parameters per step.",
            "Timesteps: the script draws them uniformly (weighting scheme none), Danlu by kohya's "
            "shift 3.1582 default; a step's cost does not depend on its timestep.",
        ]
    out = [
        f"Same on both sides: model folder, the 4 photos (scikit-image samples, square at {res} px), "
        f"resolution {res}, batch 1, fp32 (no mixed precision), constant learning rate without "
        "warm-up (TI 5e-3, LoRA 1e-4, DreamBooth 5e-6), AdamW, seed 0, LoRA rank 4 with alpha = "
        "rank, torch's default 2 threads (1 in paired runs), no validation, no intermediate "
        "checkpoints.",
        "Latents: Danlu encodes every image once before the first step (A1111's 'once' for TI and "
        "hypernetworks, kohya's cache_latents for LoRA/DreamBooth); the scripts run the VAE "
        "encoder on every step and have no option to cache. This is most of their extra FLOPs.",
        "Textual inversion: the script makes the whole token-embedding matrix (49,408 rows) "
        "trainable, runs AdamW over all of it and copies the original rows back after every step; "
        "Danlu trains only the new vectors, spliced into the prompt. Prompts: the script's "
        "ImageNet templates ('a photo of a {}'), Danlu's `subject.txt` (the same kind); the script "
        "also flips images at random (free).",
        "LoRA: the script adapts the attention projections only (to_q, to_k, to_v, to_out.0); Danlu "
        "uses kohya's module set (also the feed-forward layers and proj_in/proj_out), which is what "
        "A1111/ComfyUI files contain, so it trains ~2× the adapter parameters (still <1% of the "
        "U-Net's FLOPs). Both clip the gradients' norm at 1.0 every step (Danlu's max_grad_norm "
        "default, since session 3). U-Net only on both sides.",
        "Caching (issue 5's rows): Danlu always encodes latents once (kohya's cache_latents; it "
        "has no switch to encode every step, so there is no 'latents not cached' Danlu row); "
        "diffusers' train_dreambooth_lora.py has no latent cache and runs the VAE encoder every "
        "step. 'LoRA (rank 4)': both run the frozen text encoder every step (Danlu's default "
        "cache_text_encoder_outputs = false). 'text-encoder outputs cached': Danlu with "
        "cache_text_encoder_outputs = true (each caption encoded once) against the script with "
        "--pre_compute_text_embeddings (its one instance prompt encoded once, the text encoder "
        "then freed).",
        "The scripts load images through a DataLoader every step; Danlu keeps them in memory. "
        "Danlu writes a loss CSV line and emits a Progress event per step; the scripts update tqdm.",
        "Different random streams: both seed 0, but the sequence of timesteps and noise differs; a "
        "step's cost does not depend on its timestep.",
        "Time to first step counts Python imports: 'first Train click in a running app' is timed "
        "from the call of the method's `run(cfg, ctx)` in a process where `trainers` is imported "
        "(as the app's training worker has it) but no model is loaded yet, so it includes diffusers' "
        "pipeline import in `load_model`, the model load and encoding the dataset; 'model already "
        "loaded' is "
        "a second run in the same process (Danlu keeps one model cached); 'CLI' and 'script' are "
        "from process spawn.",
    ]
    if "dreambooth" in methods and kind == "sd15":
        out.append("DreamBooth on the SD1.5-shaped model trains all 860M U-Net weights with AdamW in "
                   "fp32: ~15 GB per process; the two sides run one after the other, never at once.")
    return out


def kohya_notes() -> list[str]:
    return [
        "Same on both sides: the SD1.5-shaped folder, the 4 photos square at 256 px in kohya's "
        "`1_sks dog` folder with the caption 'a photo of sks dog', batch 1, fp32, AdamW at a "
        "constant rate (LoRA / LoCon 1e-4, DreamBooth 5e-6, TI 5e-3), seed 0, rank 4 with alpha = "
        "rank (LoCon: conv rank 4, alpha 4), latents cached once (--cache_latents), SDPA "
        "attention, gradient-norm clipping at 1.0 (both sides' default), no sampling, no "
        "intermediate saves, torch's default threads.",
        "Both sides train kohya's module set (Danlu writes kohya's LoRA format), so the adapters "
        "are the same; DreamBooth trains the U-Net only (sd-scripts' --stop_text_encoder_training "
        "-1); textual inversion: sd-scripts' object templates against Danlu's subject.txt.",
        "sd-scripts runs unchanged in its own environment with its release's pinned libraries "
        "(accelerate 1.6, transformers 4.54, diffusers 0.32) over the same torch; its CLIP "
        "tokenizer is given as --tokenizer_cache_dir (it would download it) and torchvision is "
        "the stand-in below. It builds SD1.5's U-Net from its own fixed config, so the tiny model "
        "cannot be compared; SDXL-shaped runs are not made (sd-scripts' SDXL scripts with their "
        "fp32 weights and optimizer state need more than this machine's 24 GB next to Danlu's).",
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="tiny model, 64 px (default)")
    mode.add_argument("--full", action="store_true", help="SD1.5-shaped random model, 256 px")
    mode.add_argument("--flux", action="store_true",
                      help="Flux.1 LoRA on a small Flux-shaped random model, 256 px")
    parser.add_argument("--methods", help="comma list of " + ", ".join(TRAINING + EXTRAS)
                        + " (default: quick = all training methods + ui; full = "
                          "textual_inversion, lora, lora_cached, preprocess)")
    parser.add_argument("--rounds", type=int, help="A/B rounds (default quick 3, full 2)")
    parser.add_argument("--steps", type=int, help="steps per run (default quick 30, full 10)")
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    parser.add_argument("--report-only", action="store_true",
                        help="re-render from the saved measurements of this mode")
    parser.add_argument("--keep-work", action="store_true", help="keep the temp folder")
    parser.add_argument("--append", action="store_true",
                        help="add these rounds to the saved measurements of this mode (same "
                             "steps) instead of starting over; the report covers all of them")
    parser.add_argument("--paired", action="store_true",
                        help="instead of A/B in turn, run Danlu and the script at the same time, "
                             "each pinned to its own CPU with 1 thread (swapping CPUs every "
                             "round), so bursts of other load hit both alike")
    parser.add_argument("--against", choices=["diffusers", "kohya"], default="diffusers",
                        help="the baseline: diffusers' example scripts (default) or kohya's "
                             "sd-scripts (SD1.5-shaped model; `python -m bench.kohya setup` first)")
    parser.add_argument("--threads", type=int,
                        help="OMP/MKL threads for every child (default: torch's default)")
    args = parser.parse_args(argv)

    name = ("kohya" if args.against == "kohya" else "full" if args.full else "flux" if args.flux
            else "quick")
    provider = kohya if name == "kohya" else baselines
    settings = MODES[name]
    results_file = fixtures.bench_cache() / f"results-{name}.json"
    if args.report_only:
        source = results_file if results_file.exists() else results_file.with_suffix(".partial.json")
        results = json.loads(source.read_text())
        return _finish(results, args, results_file, save=False)

    kind = settings["kind"]
    methods = [m.strip() for m in (args.methods.split(",") if args.methods else settings["methods"])
               if m.strip()]
    unknown = [m for m in methods if m not in TRAINING + EXTRAS]
    if unknown:
        parser.error(f"unknown methods: {', '.join(unknown)}")
    training = [m for m in TRAINING if m in methods]
    rounds = args.rounds or settings["rounds"]
    steps = args.steps or settings["steps"]
    if steps < 5:
        parser.error("--steps must be at least 5 (2 warm-up steps, then timed ones)")
    command = ("python3 -m bench" + (" --full" if args.full else "") + (" --flux" if args.flux else "")
               + (" --against kohya" if name == "kohya" else "") + (" --paired" if args.paired else ""))
    for flag, value in (("--methods", args.methods), ("--rounds", args.rounds),
                        ("--steps", args.steps)):
        if value:
            command += f" {flag} {value}"

    if args.threads:
        CHILD_ENV.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        command += f" --threads {args.threads}"
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="danlu-bench-"))
    standin = write_standin(work / "standin")
    results: dict = {
        "mode": name, "heading": settings["heading"], "command": command,
        "started": time.strftime("%Y-%m-%d %H:%M"), "rounds": 0 if args.paired else rounds, "warmup": report.WARMUP,
        "steps": {kind: steps}, "models": {kind: {"label": fixtures.MODELS[kind].label,
                                                   "resolution": fixtures.MODELS[kind].resolution}},
        "machine": machine_info(), "versions": versions(), "runs": [], "matmul": [],
        "unavailable": {}, "standin": STANDIN_NOTE, "notes": notes(kind, training),
        "examples_dir": str(baselines.examples_dir()), "threads": args.threads or os.cpu_count(),
    }
    if name == "kohya":
        results.update(baseline_label="kohya's sd-scripts", baseline_name="sd-scripts",
                       script_names=kohya.LABELS, targets=KOHYA_TARGETS,
                       examples_dir=str(kohya.checkout_dir()), notes=kohya_notes())
    results["machine"]["load_start"] = results["machine"].get("load")
    first_round = 0
    if args.append and results_file.exists():
        previous = json.loads(results_file.read_text())
        if previous.get("steps") != results["steps"]:
            parser.error(f"--append: the saved {name} measurements used {previous.get('steps')} "
                         f"steps, not {results['steps']}")
        first_round = previous.get("rounds", 0)
        previous["rounds"] = first_round + (0 if args.paired else rounds)
        previous["command"] = f"{previous.get('command')}, then {command} --append"
        previous["machine"]["load_start"] = (f"{previous['machine'].get('load_start')}; "
                                             f"{results['machine']['load_start']}")
        measured = ({run["method"] for run in previous.get("runs", [])}
                    | {pair["method"] for pair in previous.get("paired", [])} | set(training))
        previous["versions"] = results["versions"]
        previous["notes"] = kohya_notes() if name == "kohya" else notes(kind, sorted(measured))
        started -= previous.get("seconds", 0)
        results = previous
    try:
        log(f"{name}: {kind} model, {steps} steps, {rounds} rounds, methods {', '.join(methods)}")
        log("matmul peak")
        results["matmul"].append(child_json([sys.executable, "-m", "bench.matmul_peak"], 300, ROOT))
        if training or "ui" in methods:
            log(f"building/locating the {kind} model and data (first time: minutes for sd15)")
            setup = child_json([sys.executable, "-m", "bench.fixtures", kind, "--json-line"],
                               3600, ROOT)
            if setup.get("error"):
                raise RuntimeError(f"setup failed: {setup['error']}\n{setup.get('stderr_tail', '')}")
        from bench.danlu_run import available_methods
        available = available_methods()
        try:
            results["baseline_source"] = provider.source_info()
        except Exception:  # noqa: BLE001 - the report says what is missing
            results["baseline_source"] = {}
        for method in training:
            if method not in available:
                results["unavailable"][method] = "not available in Danlu yet (not in trainers/registry.py)"
        if args.paired:
            _paired(results, training, available, setup, steps, rounds, work, settings,
                    standin, results_file, provider)
        for round_ in range(first_round, first_round + (0 if args.paired else rounds)):
            for method in training:
                order = ["danlu", "baseline"] if round_ % 2 == 0 else ["baseline", "danlu"]
                for side in order:
                    if side == "danlu":
                        if method not in available:
                            if round_ == 0:
                                results["runs"].append({"side": "danlu", "method": method,
                                                        "kind": kind, "round": round_,
                                                        "unavailable": "not available yet"})
                            continue
                        previews = method in ("textual_inversion", "hypernetwork") and (
                            round_ == 0 or kind == "tiny")
                        result = run_danlu(method, setup, steps, round_, work, settings["timeout"],
                                           preview=previews,
                                           cached_rerun=round_ == 0 and kind == "tiny")
                    else:
                        try:
                            provider.script_path(method)
                        except provider.BaselineMissing as error:
                            if round_ == 0 and method in provider.SCRIPTS:
                                results["runs"].append({"side": "baseline", "method": method,
                                                        "kind": kind, "round": round_,
                                                        "error": str(error)})
                            continue
                        result = run_baseline(method, setup, steps, round_, work,
                                              settings["timeout"], standin, provider=provider)
                    result.update(side=side, method=method, kind=kind, round=round_)
                    results["runs"].append(result)
                    log(f"round {round_ + 1}/{first_round + rounds} {method} {side}: {_brief(result)}")
                    _save_partial(results, results_file)
        if "ui" in methods and "textual_inversion" in available:
            log("UI overhead (page path vs CLI path)")
            ui_dir = work / "ui"
            ui_dir.mkdir()
            spec = dict(method="textual_inversion", kind=kind, model=setup["model"],
                        resolution=setup["resolution"], data=setup["data"],
                        steps=settings["ui_steps"] if kind == "tiny" else max(steps, 8),
                        seed=SEED, workdir=str(ui_dir), rounds=settings["ui_rounds"])
            (ui_dir / "spec.json").write_text(json.dumps(spec))
            if args.paired:
                _ui_paired(results, ui_dir / "spec.json", rounds, settings["timeout"])
            else:
                results["ui"] = child_json([sys.executable, "-m", "bench.ui_overhead",
                                            str(ui_dir / "spec.json")], settings["timeout"], ROOT)
                summary = report.ui_summary(results["ui"])
                log(f"UI overhead: {100 * summary['overhead']:+.1f}%" if summary
                    else f"UI overhead failed: {results['ui'].get('error')}")
        if "preprocess" in methods:
            log("preprocess throughput (bench.preprocess_throughput)")
            cmd = [sys.executable, "-m", "bench.preprocess_throughput", "--output", args.out]
            if args.no_write:
                cmd.append("--no-write")
            done = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, **CHILD_ENV),
                                  capture_output=True, text=True)
            results["preprocess"] = {"returncode": done.returncode,
                                     "output": done.stdout[-3000:]}
            results["commands"] = {"preprocess": "python3 -m bench.preprocess_throughput"}
        log("matmul peak again")
        results["matmul"].append(child_json([sys.executable, "-m", "bench.matmul_peak"], 300, ROOT))
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"work folder kept: {work}")
    results["machine"]["load"] = machine_info().get("load")
    results["seconds"] = time.time() - started
    results["commands"] = {  # saved entries first: this run's command replaces the saved one
        **results.get("commands", {}),
        "this benchmark": results["command"],
        "one Danlu run": "python3 -m bench.danlu_run SPEC.json  (SPEC written by the runner)",
        "one script run": "DANLU_BENCH_STANDIN=<folder> python3 bench/script_timer.py "
                          "<examples>/train_dreambooth_lora.py --pretrained_model_name_or_path "
                          "<model> --instance_data_dir <images> --instance_prompt 'a photo of sks "
                          "dog' --resolution R --train_batch_size 1 --max_train_steps N "
                          "--learning_rate 1e-4 --lr_scheduler constant --lr_warmup_steps 0 "
                          "--rank 4 --seed 0 --mixed_precision no --checkpointing_steps 1000000 "
                          "(see `bench/baselines.py::script_args` for all three)",
        "baseline scripts": "python3 -m bench.baselines extract --git-dir <diffusers clone>/.git",
    }
    if name == "kohya":
        results["commands"].update({
            "one script run": "DANLU_BENCH_BAR=steps DANLU_BENCH_STANDIN=<folder> <venv>/bin/python "
                              "bench/script_timer.py <sd-scripts>/train_network.py ... (see "
                              "`bench/kohya.py::script_args`)",
            "baseline scripts": "python3 -m bench.kohya setup --git-dir <sd-scripts clone>/.git"})
    return _finish(results, args, results_file, save=True)


def _paired(results, training, available, setup, steps, rounds, work, settings, standin,
            results_file, provider=baselines) -> None:
    """Danlu and the script at the same time on CPUs 0 and 1 (then 1 and 0), 1 thread each."""
    from concurrent.futures import ThreadPoolExecutor

    pairs = results.setdefault("paired", [])
    first = max((p["round"] for p in pairs), default=-1) + 1
    for round_ in range(first, first + rounds):
        for method in training:
            if method not in available:
                continue
            if method not in provider.SCRIPTS:  # no script to pair with (hypernetworks)
                if round_ == first:
                    result = run_danlu(method, setup, steps, f"p{round_}", work,
                                       settings["timeout"], False, setup["kind"] == "tiny", 0)
                    result.update(side="danlu", method=method, kind=setup["kind"], round=round_,
                                  alone=True)
                    results["runs"].append(result)
                    log(f"paired round {round_ + 1} {method} (alone, no script): {_brief(result)}")
                continue
            if method == "dreambooth" and setup["kind"] == "sd15":
                log("paired: skipping DreamBooth on sd15 (two full fine-tunes do not fit in RAM)")
                continue
            cpu = round_ % 2
            with ThreadPoolExecutor(2) as pool:
                # time to first step with the model loaded: measured on the tiny model once
                danlu = pool.submit(run_danlu, method, setup, steps, f"p{round_}", work,
                                    settings["timeout"], False,
                                    setup["kind"] == "tiny" and round_ == first, cpu)
                script = pool.submit(run_baseline, method, setup, steps, f"p{round_}", work,
                                     settings["timeout"], standin, 1 - cpu, provider)
                pair = {"method": method, "kind": setup["kind"], "round": round_,
                        "cpus": [cpu, 1 - cpu], "danlu": danlu.result(), "baseline": script.result()}
            pairs.append(pair)
            ratio = report.paired_ratio(pair)
            log(f"paired round {round_ + 1} {method}: Danlu {_brief(pair['danlu'])}; script "
                f"{_brief(pair['baseline'])}; overlap ratio "
                + (f"{ratio['ratio']:.2f}" if ratio else "—"))
            _save_partial(results, results_file)


def _ui_paired(results: dict, spec_file: Path, rounds: int, timeout: float) -> None:
    """The CLI path and the page path at the same time, each in its own process pinned to its
    own CPU with 1 thread; the CPUs swap every pair (2 pairs; each child makes the spec's
    `rounds` runs)."""
    from concurrent.futures import ThreadPoolExecutor

    pairs = results.setdefault("ui_paired", [])
    first = len(pairs)
    for index in range(first, first + 2):
        cpu = index % 2

        def side(name: str, pin: int) -> dict:
            prefix, env = _pinned(pin)
            return child_json(prefix + [sys.executable, "-m", "bench.ui_overhead", str(spec_file),
                                        "--side", name], timeout, ROOT, env)
        with ThreadPoolExecutor(2) as pool:
            cli = pool.submit(side, "cli", cpu)
            page = pool.submit(side, "page", 1 - cpu)
            pair = {"round": index, "cpus": [cpu, 1 - cpu], "cli": cli.result(),
                    "page": page.result()}
        pairs.append(pair)
        overhead = report.ui_pair_overhead(pair)
        log(f"UI overhead pair {index + 1}: "
            + (f"{100 * overhead:+.1f}%" if overhead is not None else
               f"failed: {pair['cli'].get('error') or pair['page'].get('error')}"))


def _save_partial(results: dict, results_file: Path) -> None:
    """Keep what is measured so far (`--report-only` can render it if the run dies)."""
    results_file.parent.mkdir(parents=True, exist_ok=True)
    results_file.with_suffix(".partial.json").write_text(json.dumps(results))


def _finish(results: dict, args, results_file: Path, save: bool) -> int:
    if save:
        results_file.parent.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(results))
        results_file.with_suffix(".partial.json").unlink(missing_ok=True)
    section = report.render(results)
    print(section)
    if not args.no_write:
        report.write_section(Path(args.out), results["heading"], section)
        log(f"written to {args.out}; measurements in {results_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
