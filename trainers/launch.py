"""Multi-process runs from the app: `accelerate launch -m trainers METHOD ...` as a subprocess
whose main process prints its events as JSON lines (torch-free: the page imports this)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

from core.atomic import atomic_write_text
from core.config import ConfigError, to_toml
from core.paths import REPO_DIR, Paths
from trainers import catalog

CPU_PROCESSES_VARIABLE = "DANLU_CPU_PROCESSES"


def cuda_device_count() -> int:
    """CUDA GPUs this process may use, without importing torch (nvidia-smi, CUDA_VISIBLE_DEVICES)."""
    if "torch" in sys.modules:
        return sys.modules["torch"].cuda.device_count()
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    count = sum(line.startswith("GPU ") for line in listed.splitlines())
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = []
        for item in visible.split(","):
            if not item.strip() or item.strip().startswith("-"):
                break  # CUDA stops at the first invalid id
            ids.append(item)
        count = min(count, len(ids))
    return count


def process_choices() -> tuple[str, list[int]] | None:
    """(label, counts) for the Train tab's process picker; None hides it. Shown with more than
    one CUDA GPU, or, for testing on a CPU, when DANLU_CPU_PROCESSES=N is set."""
    gpus = cuda_device_count()
    if gpus > 1:
        return "GPUs", list(range(1, gpus + 1))
    try:
        cpu = int(os.environ.get(CPU_PROCESSES_VARIABLE, "0"))
    except ValueError:
        cpu = 0
    if cpu > 1:
        return "Processes (CPU, for testing)", list(range(1, cpu + 1))
    return None


def check_processes(method: str, processes: int, cfg=None) -> None:
    if processes < 1:
        raise ConfigError(f"processes: must be at least 1, got {processes}")
    if processes > 1 and not catalog.get(method).parallel:
        raise ConfigError(f"processes: {method} runs in one process; choose 1")
    if processes > 1 and getattr(cfg, "varsize", False):
        raise ConfigError("processes: 'do not resize images' trains one image of its own size "
                          "per step, which cannot be split across processes; choose 1")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_command(method: str, config: Path, processes: int, paths: Paths,
                       stop_file: Path) -> list[str]:
    command = [sys.executable, "-m", "accelerate.commands.launch",
               # --multi_gpu starts the processes through torchrun; on a machine without CUDA
               # they train on the CPU over gloo (trainers/distributed.py)
               "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()),
               "-m", "trainers", method, "--config", str(config), "--data-dir", str(paths.data_dir),
               "--json-events", "--stop-file", str(stop_file)]
    return command + (["--confine-paths"] if paths.confine else [])


def distributed_job(method: str, cfg, processes: int):
    """A job function that trains `cfg` on `processes` processes and relays their progress."""
    from core.subprocess_job import relay_process
    check_processes(method, processes, cfg)

    def job(ctx) -> None:
        folder = ctx.paths.cache / "launch"
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{method}-{uuid.uuid4().hex[:12]}"
        config, stop_file = folder / f"{stem}.toml", folder / f"{stem}.stop"
        atomic_write_text(config, to_toml(cfg))
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_DIR),
                                                            os.environ.get("PYTHONPATH")])))
        try:
            relay_process(accelerate_command(method, config, processes, ctx.paths, stop_file),
                          ctx, stop_file, cwd=REPO_DIR, env=env)
        finally:
            config.unlink(missing_ok=True)
    return job
