"""One Danlu training run in its own process; prints one line `BENCH_JSON {...}`.

    python -m bench.danlu_run SPEC.json

SPEC: {"method", "kind", "model", "resolution", "data": {...layouts}, "steps", "seed",
       "workdir", "preview": bool, "cached_rerun": bool, "flop_step": int|null}

The run goes through the engine's public entry (`trainers.registry.runner(method)(cfg, ctx)`,
what both the CLI and the page call) with a context that timestamps events:
- per-step seconds from Progress events (a preview or save between steps is not counted);
- time to first step from the runner call (imports done, model not loaded: the first Train
  click in a running app) and from process spawn (`python -m trainers ...` from a shell), with
  model-load / dataset / first-step phases from the Status events;
- with `cached_rerun`, three more short runs in the same process (model already in memory:
  the next Train clicks; the median is reported);
- peak RSS (getrusage) at the last step and at exit; FLOPs of step `flop_step`; preview time.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import fields
from pathlib import Path

T_SPAWN = float(os.environ.get("DANLU_BENCH_T0", time.time()))
T_MODULE = time.time()

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import fixtures  # noqa: E402
from bench.flopcount import StepRecorder, peak_rss_mib  # noqa: E402

# The settings both sides use (the diffusers scripts get the same numbers, see baselines.py).
LEARNING_RATES = {"textual_inversion": 5e-3, "hypernetwork": 1e-5, "lora": 1e-4,
                  "lora_cached": 1e-4, "dreambooth": 5e-6, "lora_flux": 1e-4, "lora_te": 1e-4,
                  "locon": 1e-4}
# benchmark variants of an engine method: (engine method, extra config fields)
VARIANTS = {"lora_cached": ("lora", {"cache_text_encoder_outputs": True}),
            "lora_flux": ("lora", {"cache_text_encoder_outputs": True, "guidance_scale": 1.0}),
            # against sd-scripts: + text-encoder LoRA at the same rate; LoCon convolutions
            "lora_te": ("lora", {"network_train_unet_only": False}),
            "locon": ("lora", {"conv_dim": 4, "conv_alpha": 4.0})}


def engine_method(method: str) -> str:
    return VARIANTS.get(method, (method, {}))[0]
LORA_RANK = 4
PREVIEW_STEPS = 20


def available_methods() -> list[str]:
    """Methods the engine can run now (LoRA and DreamBooth land later): registered, with a
    config class and an importable module. Torch-free, so the orchestrator can ask too."""
    import importlib.util

    from trainers import catalog
    names = []
    for method in catalog.methods():
        try:
            found = importlib.util.find_spec(method.run.partition(":")[0]) is not None
        except (ImportError, ValueError):
            found = False
        if found:
            names.append(method.name)
    names += [variant for variant, (base, _) in VARIANTS.items() if base in names]
    return names


def _set(cfg, **values) -> list[str]:
    """Set the fields the config has; return the names it does not have."""
    names = {f.name for f in fields(cfg)}
    missing = []
    for name, value in values.items():
        if name in names:
            setattr(cfg, name, value)
        else:
            missing.append(name)
    return missing


def make_config(spec: dict, preview: bool):
    """The method's typed config at the benchmark's settings."""
    from trainers.registry import config_class

    variant, res, steps = spec["method"], spec["resolution"], spec["steps"]
    method = engine_method(variant)
    cfg = config_class(method)()
    data = spec["data"]
    lr = LEARNING_RATES[variant]
    if method in ("textual_inversion", "hypernetwork"):
        missing = _set(cfg, model=spec["model"], data_root=data["captioned"], batch_size=1,
                       gradient_accumulation=1, width=res, height=res, steps=steps,
                       save_every=0, preview_every=steps if preview else 0,
                       preview_steps=PREVIEW_STEPS, preview_prompt="", seed=spec["seed"],
                       learn_rate=f"{lr:g}", log_directory=f"outputs/{method}")
        if method == "textual_inversion":
            missing += _set(cfg, embedding=fixtures.EMBEDDING_NAME, template="subject.txt")
        else:
            missing += _set(cfg, hypernetwork=fixtures.HYPERNETWORK_NAME, template="hypernetwork.txt")
    else:  # kohya-style methods: LoRA, DreamBooth
        missing = _set(cfg, model=spec["model"], output_name=f"danlubench-{method}",
                       train_data_dir=data["kohya"], resolution=res, enable_bucket=False,
                       train_batch_size=1, gradient_accumulation_steps=1, max_train_steps=steps,
                       max_train_epochs=0, learning_rate=lr, optimizer_type="AdamW",
                       lr_scheduler="constant", lr_warmup_steps=0, mixed_precision="no",
                       gradient_checkpointing=False, sample_every_n_steps=0,
                       sample_every_n_epochs=0, sample_at_first=False, save_every_n_steps=0,
                       save_every_n_epochs=0, save_precision="fp32", seed=spec["seed"],
                       overwrite=True,
                       log_directory=f"outputs/{method}")
        if method == "lora":
            missing += _set(cfg, network_dim=LORA_RANK, network_alpha=float(LORA_RANK),
                            network_train_unet_only=True, conv_dim=0)
        else:
            missing += _set(cfg, train_text_encoder=False, num_class_images=0, use_ema=False,
                            instance_prompt=fixtures.INSTANCE_PROMPT, save_diffusers=False)
        missing += _set(cfg, cache_text_encoder_outputs=False)  # the engine's default
    missing += _set(cfg, **VARIANTS.get(variant, (method, {}))[1])
    cfg.validate()
    return cfg, missing


class TimingContext:
    """A job context (paths, emit, should_stop) that timestamps what the engine emits."""

    def __init__(self, paths, recorder: StepRecorder):
        self.paths = paths
        self.recorder = recorder
        self.statuses: list[tuple[float, str]] = []
        # (perf_counter, wall, process CPU seconds)
        self.first_progress: tuple[float, float, float] | None = None
        self.last_step = 0
        self.result = None
        self.losses: list[float] = []
        # (text, peak RSS so far, seconds since the context was made) per Status event
        self.rss_phases: list[tuple[str, float, float]] = []
        self.began = time.perf_counter()

    def should_stop(self) -> bool:
        return False

    def emit(self, event) -> None:
        from core import events as ev
        now = time.perf_counter()
        if isinstance(event, ev.Progress):
            if self.first_progress is None:
                self.first_progress = (now, time.time(), time.process_time())
                self.rss_phases.append(("first step done", peak_rss_mib(),
                                        round(now - self.began, 2)))
            self.last_step = event.step
            self.losses.append(event.loss)
            self.recorder.step_done(event.step)
        elif isinstance(event, ev.Status):
            self.statuses.append((now, event.text))
            self.rss_phases.append((event.text[:60], peak_rss_mib(), round(now - self.began, 2)))
        elif isinstance(event, (ev.Preview, ev.Saved)) and self.recorder.step_ends:
            self.recorder.other("preview" if isinstance(event, ev.Preview) else f"save:{event.kind}",
                                self.recorder.boundaries[-1], now)
        elif isinstance(event, (ev.Finished, ev.Failed)):
            self.result = event


def _phases(ctx: TimingContext, called: float) -> dict:
    """Seconds from the runner call to model-loading / dataset / first step."""
    marks = {"call": called}
    for at, text in ctx.statuses:
        if text.startswith("Loading model") and "model_load" not in marks:
            marks["model_load"] = at
        elif text.startswith(("Preparing dataset", "Caching latents")) and "dataset" not in marks:
            marks["dataset"] = at
    out = {}
    if "model_load" in marks and "dataset" in marks:
        out["model_load_s"] = marks["dataset"] - marks["model_load"]
    if "dataset" in marks and ctx.recorder.step_ends:
        out["dataset_and_first_step_s"] = ctx.recorder.step_ends[0][1] - marks["dataset"]
    return out


def run_once(spec: dict, folder: Path, preview: bool, flop_step):
    from core.paths import Paths
    from trainers.registry import runner

    data_dir = fixtures.fresh_data_dir(spec["kind"], folder)
    paths = Paths(data_dir).ensure()
    cfg, missing = make_config(spec, preview)
    recorder = StepRecorder(flop_step=flop_step)
    ctx = TimingContext(paths, recorder)
    called = time.perf_counter()
    called_wall = time.time()
    ctx.called_cpu = time.process_time()
    recorder.begin()
    try:
        runner(engine_method(spec["method"]))(cfg, ctx)
    finally:
        recorder.close()
    return ctx, recorder, called, called_wall, missing


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from core.malloc_tuning import prefer_huge_pages
    prefer_huge_pages()  # as the CLI and the worker do, before torch is imported
    out: dict = {"side": "danlu", "method": spec["method"], "kind": spec["kind"],
                 "steps": spec["steps"]}
    try:
        import torch  # noqa: F401  (imports are part of what a cold CLI start pays)
        import trainers.registry
        trainers.registry.runner  # noqa: B018
        from trainers import loop, models  # noqa: F401
        ready = time.time()
        out["import_s"] = ready - T_SPAWN
        if spec["method"] not in available_methods():
            out["unavailable"] = f"{spec['method']} is not in trainers/registry.py yet"
            print("BENCH_JSON " + json.dumps(out), flush=True)
            return 0
        work = Path(spec["workdir"])
        ctx, recorder, called, called_wall, missing = run_once(
            spec, work / "data", spec.get("preview", False), spec.get("flop_step", 2))
        out.update(recorder.summary())
        out["config_fields_missing"] = missing
        out["rss_exit_mib"] = peak_rss_mib()
        out["losses"] = ctx.losses
        out["rss_phases"] = ctx.rss_phases
        out["result"] = getattr(ctx.result, "message", None)
        if ctx.first_progress is not None:
            out["ttfs_call_s"] = ctx.first_progress[0] - called
            out["ttfs_spawn_s"] = ctx.first_progress[1] - T_SPAWN
        out.update(_phases(ctx, called))
        out["preview_s"] = [seconds for kind, seconds in recorder.summary()["others"]
                            if kind == "preview"]
        if spec.get("cached_rerun"):
            rerun = dict(spec, steps=3)
            cached, cpu = [], []
            for index in range(3):  # the next Train clicks (median: one click is noisy)
                ctx2, rec2, called2, _, _ = run_once(rerun, work / "data-rerun", False, None)
                if ctx2.first_progress is not None:
                    cached.append(ctx2.first_progress[0] - called2)
                    # CPU seconds of the click: what it costs without waiting for other load
                    # (all threads; with 1 thread, as in --paired, the work itself)
                    cpu.append(ctx2.first_progress[2] - ctx2.called_cpu)
            if cached:
                out["ttfs_cached_runs"] = cached
                out["ttfs_cached_s"] = sorted(cached)[len(cached) // 2]
                out["ttfs_cached_cpu_s"] = sorted(cpu)[len(cpu) // 2]
            # imports warm, model loaded from disk again: the first run minus this one is what
            # importing diffusers' pipeline machinery costs the first click
            from trainers import models as model_cache
            with model_cache._cache_lock:
                model_cache._cache.clear()
            ctx3, _, called3, _, _ = run_once(rerun, work / "data-rerun2", False, None)
            if ctx3.first_progress is not None:
                out["ttfs_warm_imports_s"] = ctx3.first_progress[0] - called3
                out.update({f"warm_{k}": v for k, v in _phases(ctx3, called3).items()})
    except Exception as error:  # report, don't hide: the orchestrator shows it in the table
        out["error"] = f"{type(error).__name__}: {getattr(error, 'user_message', None) or error}"
        out["traceback"] = traceback.format_exc()[-4000:]
    print("BENCH_JSON " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
