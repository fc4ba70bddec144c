""""Use this checkpoint": copy one of a run's checkpoints to where A1111, ComfyUI and Danlu look
for finished files (embeddings/, models/hypernetworks/, models/Lora/, models/Stable-diffusion/),
under a name the user picks.

The copy is atomic: the bytes go to a hidden temporary file beside the target, are flushed to
disk and checked, then the file appears under its name in one step. An existing file of that
name (with any model suffix, since A1111 lists them by name) is never replaced unless the
caller says so; without that, a file that appears during the copy is not replaced either."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from core.atomic import _fsync_dir, _umask
from core.config import ConfigError
from core.paths import Paths
from trainers.configs import check_name
from trainers.runs import Checkpoint, Run, final_folder

SAME_NAME_SUFFIXES = {
    "textual_inversion": (".pt", ".safetensors", ".bin"),
    "apt": (".pt", ".safetensors", ".bin"),
    "xti": (".safetensors", ".pt"),
    "hypernetwork": (".pt",),
    "lora": (".safetensors", ".pt", ".ckpt"),
    "dreambooth": (".safetensors", ".ckpt"),
    "fine_tune": (".safetensors", ".ckpt"),
}
SIDECAR = ".optim"


class CheckpointExists(FileExistsError):
    def __init__(self, message: str):
        super().__init__(message)
        self.user_message = message


def destination(paths: Paths, method: str, name: str, suffix: str) -> Path:
    return final_folder(paths, method) / f"{name.strip()}{suffix}"


def existing_files(paths: Paths, method: str, name: str) -> list[Path]:
    """Files already using `name` in the method's folder (any of its suffixes)."""
    folder = final_folder(paths, method)
    suffixes = SAME_NAME_SUFFIXES.get(method, (".safetensors",))
    return [folder / f"{name.strip()}{s}" for s in suffixes if (folder / f"{name.strip()}{s}").exists()]


def use_checkpoint(paths: Paths, run: Run, checkpoint: Checkpoint, name: str,
                   overwrite: bool = False) -> Path:
    """Copy `checkpoint` of `run` to its final folder as `<name><suffix>`; returns the new path.

    Raises ConfigError for a bad name, CheckpointExists when the name is taken and `overwrite`
    is False, FileNotFoundError when the checkpoint file is gone."""
    problems = check_name("name", name)
    if problems:
        raise ConfigError(problems)
    if checkpoint not in run.checkpoints:
        raise ValueError(f"step {checkpoint.step} is not a checkpoint of run {run.id}")
    source = checkpoint.path
    if not source.is_file():
        raise FileNotFoundError(f"{source} is gone (deleted, or pruned by 'keep last N')")
    target = destination(paths, run.method, name, source.suffix)
    if target.resolve() == source.resolve():
        raise CheckpointExists(f"name: {target.name} is this checkpoint itself; pick another name")
    taken = existing_files(paths, run.method, name)
    if taken and not overwrite:
        listed = ", ".join(p.name for p in taken)
        raise CheckpointExists(f"name: {listed} already exists in {target.parent}; tick "
                               "'Overwrite' to replace it, or pick another name")
    copy_atomic(source, target, overwrite=overwrite)
    sidecar = source.with_name(source.name + SIDECAR)
    target_sidecar = target.with_name(target.name + SIDECAR)
    if checkpoint.final and sidecar.is_file():
        copy_atomic(sidecar, target_sidecar, overwrite=True)  # so training can continue from it
    else:
        target_sidecar.unlink(missing_ok=True)  # the old file's optimizer state does not fit
    for other in taken:
        if other != target:  # overwrite was confirmed; two files of one name clash in A1111
            other.unlink(missing_ok=True)
            other.with_name(other.name + SIDECAR).unlink(missing_ok=True)
    return target


def copy_atomic(source: Path, target: Path, overwrite: bool = False) -> None:
    """Copy `source` to `target` so that `target` is either absent/unchanged or complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        if temp.stat().st_size != source.stat().st_size:
            raise OSError(f"copying {source.name} wrote {temp.stat().st_size} of "
                          f"{source.stat().st_size} bytes")
        os.chmod(temp, 0o666 & ~_umask())
        if overwrite:
            os.replace(temp, target)
        else:
            _link_new(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def _link_new(temp: Path, target: Path) -> None:
    """Give `temp` the name `target` only if no file has that name (atomically where the file
    system has hard links), then drop the temporary name."""
    try:
        os.link(temp, target)
    except FileExistsError:
        raise CheckpointExists(f"name: {target.name} appeared in {target.parent} during the "
                               "copy; nothing was replaced") from None
    except OSError:  # no hard links here (some network or FAT file systems)
        if target.exists():
            raise CheckpointExists(f"name: {target.name} already exists in {target.parent}") \
                from None
        os.replace(temp, target)
        return
    temp.unlink()
