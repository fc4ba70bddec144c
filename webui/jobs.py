"""Jobs as the app queues them: (name, kind, work, spec) from a method's config, and back from a
stored spec after a restart. It sits above the engine and preprocessing, so neither imports the
other; the engine and preprocess modules are imported only when a job is made."""
from __future__ import annotations


def job_parts(method: str, cfg, processes: int = 1) -> tuple[str, str, object, dict]:
    """(name, kind, fn, spec) for queueing a job; the spec rebuilds it after a restart. A
    training job's fn is a ProcessTask, which the app's JobRunner runs in its training worker
    process. With several processes the job runs `accelerate launch` and relays its events
    (trainers/launch.py)."""
    from dataclasses import asdict

    from trainers import catalog
    if method == "preprocess":
        from preprocess.pipeline import run as preprocess
        name = f"preprocess: {cfg.source} -> {cfg.destination}"
        return name, "preprocess", (lambda ctx: preprocess(cfg, ctx)), \
            {"method": method, "name": name, "config": asdict(cfg)}
    entry = catalog.get(method)
    target = getattr(cfg, entry.target_field, "")
    spec = {"method": method, "name": f"{entry.title}: {target}", "config": asdict(cfg)}
    if processes > 1:
        from trainers.launch import distributed_job
        fn = distributed_job(method, cfg, processes)
        spec.update(processes=processes, name=f"{spec['name']} ({processes} processes)")
        return spec["name"], "train", fn, spec
    from core.worker_process import ProcessTask
    entry.runner()  # an unknown or broken method fails here, not in the worker
    return spec["name"], "train", ProcessTask("trainers.registry:run_config",
                                              (method, spec["config"])), spec


def rebuild(spec: dict):
    """The inverse of job_parts: (name, kind, fn, config) from a stored spec."""
    from core.config import from_dict
    from trainers import registry
    if spec["method"] == "preprocess":
        from preprocess.config import PreprocessConfig
        cfg = from_dict(PreprocessConfig, spec["config"])
    else:
        cfg = from_dict(registry.config_class(spec["method"]), spec["config"]).validate()
    name, kind, fn, _ = job_parts(spec["method"], cfg, int(spec.get("processes", 1)))
    return name, kind, fn, cfg
