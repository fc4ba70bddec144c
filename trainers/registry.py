"""Method name -> (config class, run function), imported lazily so the page stays torch-free."""
from __future__ import annotations

import importlib

from trainers.configs import METHOD_CONFIGS

RUNNERS = {"textual_inversion": "trainers.methods.textual_inversion",
           "apt": "trainers.methods.apt",
           "xti": "trainers.methods.xti",
           "hypernetwork": "trainers.methods.hypernetwork",
           "lora": "trainers.methods.lora",
           "dreambooth": "trainers.methods.dreambooth",
           "fine_tune": "trainers.methods.fine_tune",
           "extract_lora": "trainers.extract_lora"}


def config_class(method: str):
    if method not in METHOD_CONFIGS:
        raise KeyError(f"unknown method {method!r}; known: {', '.join(METHOD_CONFIGS)}")
    return METHOD_CONFIGS[method]


def runner(method: str):
    config_class(method)
    return importlib.import_module(RUNNERS[method]).run


TITLES = {"textual_inversion": "textual inversion", "apt": "apt", "xti": "xti", "hypernetwork": "hypernetwork",
          "lora": "lora", "dreambooth": "dreambooth", "fine_tune": "fine-tune", "extract_lora": "extract lora"}
TARGETS = {"textual_inversion": "embedding", "apt": "embedding", "hypernetwork": "hypernetwork"}


def job_parts(method: str, cfg, processes: int = 1) -> tuple[str, str, object, dict]:
    """(name, kind, fn, spec) for queueing a job; the spec rebuilds it after a restart. A
    training job's fn is a ProcessTask, which the app's JobRunner runs in its training worker
    process. With several processes the job runs `accelerate launch` and relays its events
    (trainers/launch.py)."""
    from dataclasses import asdict
    if method == "preprocess":
        from preprocess.pipeline import run as preprocess
        name = f"preprocess: {cfg.source} -> {cfg.destination}"
        return name, "preprocess", (lambda ctx: preprocess(cfg, ctx)), \
            {"method": method, "name": name, "config": asdict(cfg)}
    target = getattr(cfg, TARGETS.get(method, "output_name"), "")
    spec = {"method": method, "name": f"{TITLES[method]}: {target}", "config": asdict(cfg)}
    if processes > 1:
        from trainers.launch import distributed_job
        fn = distributed_job(method, cfg, processes)
        spec.update(processes=processes, name=f"{spec['name']} ({processes} processes)")
        return spec["name"], "train", fn, spec
    from core.worker_process import ProcessTask
    runner(method)  # an unknown method fails here, not in the worker
    return spec["name"], "train", ProcessTask("trainers.registry:run_config",
                                              (method, spec["config"])), spec


def run_config(ctx, method: str, config: dict):
    """A training job's work, in the app's training worker process (or on its thread): the
    method's run() with the config rebuilt from its plain form."""
    from core.config import from_dict
    return runner(method)(from_dict(config_class(method), config).validate(), ctx)


def rebuild(spec: dict):
    """The inverse of job_parts: (name, kind, fn, config) from a stored spec."""
    from core.config import from_dict
    if spec["method"] == "preprocess":
        from preprocess.config import PreprocessConfig
        cfg = from_dict(PreprocessConfig, spec["config"])
    else:
        cfg = from_dict(config_class(spec["method"]), spec["config"]).validate()
    name, kind, fn, _ = job_parts(spec["method"], cfg, int(spec.get("processes", 1)))
    return name, kind, fn, cfg
