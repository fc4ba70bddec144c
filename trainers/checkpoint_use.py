""""Use this checkpoint": copy one of a run's checkpoints to where A1111, ComfyUI and Danlu look
for finished files (embeddings/, models/hypernetworks/, models/Lora/, models/Stable-diffusion/),
under a name the user picks.

The copy is atomic: the bytes go to a hidden temporary file beside the target, are flushed to
disk and checked, then the file appears under its name in one step. An existing file of that
name (with any model suffix, since A1111 lists them by name) is never replaced unless the
caller says so; without that, a file that appears during the copy is not replaced either."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from core.atomic import _fsync_dir, _umask
from core.config import ConfigError
from core.paths import Paths
from trainers import catalog
from trainers.configs import check_name
from trainers.runs import Checkpoint, Run, final_folder

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
    found = catalog.find(method)
    suffixes = found.suffixes if found is not None else (".safetensors",)
    return [folder / f"{name.strip()}{s}" for s in suffixes if (folder / f"{name.strip()}{s}").exists()]


def use_checkpoint(paths: Paths, run: Run, checkpoint: Checkpoint, name: str,
                   overwrite: bool = False) -> Path:
    """Copy `checkpoint` of `run` to its final folder as `<name><suffix>`; returns the new path
    (see use_checkpoint_files)."""
    return use_checkpoint_files(paths, run, checkpoint, name, overwrite)[0]


def use_checkpoint_files(paths: Paths, run: Run, checkpoint: Checkpoint, name: str,
                         overwrite: bool = False, embeddings: bool = False) -> list[Path]:
    """Copy `checkpoint` of `run` to its final folder as `<name><suffix>`; returns the new
    paths. An APT checkpoint is a pair: `<name>.pt` and `<name>-neg.pt` appear together or not at all.
    Embeddings get `name` as their stored name too (A1111 saves the file's name in it).
    With `embeddings`, a LoRA's bundled token vectors (pivotal tuning) are also written as
    `embeddings/<token>.safetensors`, listed after the LoRA (bundled_embedding_files).

    Raises ConfigError for a bad name, CheckpointExists when a name is taken and `overwrite`
    is False, FileNotFoundError when a checkpoint file is gone, RefusedCheckpoint when a file
    (or the sidecar that would go with it) does not pass the restricted loader; nothing is
    written then."""
    problems = check_name("name", name)
    method = catalog.get(run.method)
    suffix = method.negative_partner
    if not problems and suffix and name.strip().endswith(suffix):
        problems = [f"name: {method.title} checkpoints are pairs (<name> and <name>{suffix}); "
                    f"give the positive name, without '{suffix}'"]
    if problems:
        raise ConfigError(problems)
    if checkpoint not in run.checkpoints:
        raise ValueError(f"step {checkpoint.step} is not a checkpoint of run {run.id}")
    name = name.strip()
    names = [name] + [name + suffix for _ in checkpoint.partners]
    sources = [checkpoint.path, *checkpoint.partners]
    for source in sources:
        if not source.is_file():
            raise FileNotFoundError(f"{source} is gone (deleted, or pruned by 'keep last N'); "
                                    "nothing was copied")
    targets = [destination(paths, run.method, n, s.suffix) for n, s in zip(names, sources)]
    for source, target in zip(sources, targets):
        if target.resolve() == source.resolve():
            raise CheckpointExists(f"name: {target.name} is this checkpoint itself; pick "
                                   "another name")
    main = sources[0]
    sidecar = main.with_name(main.name + SIDECAR)
    copy_sidecar = checkpoint.final and sidecar.is_file()
    for source in sources + ([sidecar] if copy_sidecar else []):
        check_before_copy(source)
    bundled = bundled_embedding_files(paths, checkpoint.path, overwrite) if embeddings else {}
    taken = [p for n in names for p in existing_files(paths, run.method, n)]
    if taken and not overwrite:
        listed = ", ".join(p.name for p in taken)
        raise CheckpointExists(f"name: {listed} already exists in {targets[0].parent}; tick "
                               "'Overwrite' to replace "
                               f"{'them' if len(taken) > 1 else 'it'}, or pick another name")
    # an embedding file stores its own name, which becomes the new one
    rename = catalog.get(run.method).checkpoint_kind == "embedding"
    staged = [_stage(source, target, n if rename else None)
              for source, target, n in zip(sources, targets, names)]
    _commit(staged, targets, overwrite)
    target = targets[0]
    target_sidecar = target.with_name(target.name + SIDECAR)
    if copy_sidecar:
        copy_atomic(sidecar, target_sidecar, overwrite=True)  # so training can continue from it
    else:
        target_sidecar.unlink(missing_ok=True)  # the old file's optimizer state does not fit
    for other in taken:
        if other not in targets:  # overwrite was confirmed; two files of one name clash in A1111
            other.unlink(missing_ok=True)
            other.with_name(other.name + SIDECAR).unlink(missing_ok=True)
    for partner in targets[1:]:
        partner.with_name(partner.name + SIDECAR).unlink(missing_ok=True)
    return targets + write_embeddings(paths, bundled, checkpoint.step)


def bundled_embedding_files(paths: Paths, lora: Path, overwrite: bool) -> dict:
    """{token: vectors} bundled in a LoRA file, checked to be writable as embeddings: an
    embedding of that name already in embeddings/ (any suffix) is CheckpointExists unless
    `overwrite`; a file without any is a ValueError."""
    from trainers.embeddings import find_embedding
    from trainers.formats.bundled_embeddings import read_bundled
    bundled = read_bundled(lora)
    if not bundled:
        raise ValueError(f"{lora.name} carries no trained token (pivotal tuning); untick "
                         "'Also write its token as an embedding'")
    taken = [found.name for token in bundled if (found := find_embedding(paths, token))]
    if taken and not overwrite:
        raise CheckpointExists(f"name: the embedding {', '.join(taken)} already exists in "
                               f"{paths.embeddings}; tick 'Overwrite' to replace it, or rename "
                               "that file first")
    return bundled


def write_embeddings(paths: Paths, bundled: dict, step: int) -> list[Path]:
    """`embeddings/<token>.safetensors` per bundled token (kohya's `emb_params`, or SDXL's
    clip_l / clip_g: what diffusers' load_textual_inversion, A1111 and ComfyUI load)."""
    from trainers.embeddings import find_embedding
    from trainers.formats.embedding import EmbeddingFile, save_embedding
    written = []
    for token, vectors in bundled.items():
        target = paths.embeddings / f"{token}.safetensors"
        existing = find_embedding(paths, token)
        vectors = ({k: v.float() for k, v in vectors.items()} if isinstance(vectors, dict)
                   else vectors.float())
        save_embedding(target, EmbeddingFile(name=token, vectors=vectors, step=step))
        if existing is not None and existing != target:
            existing.unlink()  # overwrite was confirmed; two files of one name clash in A1111
        target.with_name(target.name + SIDECAR).unlink(missing_ok=True)
        written.append(target)
    return written


class RefusedCheckpoint(ValueError):
    def __init__(self, message: str):
        super().__init__(message)
        self.user_message = message


def check_before_copy(source: Path) -> None:
    """A file is copied only when it loads as Danlu would load it: a pickle through the
    restricted loader (a .pt, .ckpt or .bin that holds code would run it in A1111 or ComfyUI
    later), a .safetensors with a sound header. RefusedCheckpoint says which file and why."""
    from trainers.formats.safe_load import check_loadable
    try:
        check_loadable(source)
    except OSError:
        raise
    except ValueError as error:
        raise RefusedCheckpoint(f"{error}; nothing was copied") from None


def _stage(source: Path, target: Path, rename: str | None) -> Path:
    """A complete, flushed hidden copy of `source` beside `target` (with the embedding's stored
    name set to `rename`, where the format keeps one)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    temp = Path(temp_name)
    try:
        payload = _renamed_embedding(source, rename) if rename else None
        with os.fdopen(fd, "wb") as out:
            if payload is not None:
                out.write(payload)
            else:
                with open(source, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
                    out.flush()
                if out.tell() != source.stat().st_size:
                    raise OSError(f"copying {source.name} wrote {out.tell()} of "
                                  f"{source.stat().st_size} bytes")
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, 0o666 & ~_umask())
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp


def _renamed_embedding(source: Path, name: str) -> bytes | None:
    """The file's bytes with its stored name replaced by `name`, or None when it stores no name
    (SDXL pairs, kohya files without metadata) and a plain copy is right."""
    import io

    import torch

    from trainers.formats.embedding import TORCH_SUFFIXES
    from trainers.formats.safe_load import check_plain, safe_torch_load
    suffix = source.suffix.lower()
    if suffix in TORCH_SUFFIXES:
        data = safe_torch_load(source)
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            return None
        data = dict(data, name=name)
        check_plain(data, source.name)
        buffer = io.BytesIO()  # the legacy format, as Danlu writes .pt files (A1111 needs it)
        torch.save(data, buffer, _use_new_zipfile_serialization=False)
        return buffer.getvalue()
    if suffix == ".safetensors":
        import safetensors
        import safetensors.torch
        with safetensors.safe_open(source, framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            if "name" not in metadata:
                return None
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        return safetensors.torch.save(tensors, metadata=dict(metadata, name=name))
    return None


def _commit(staged: list[Path], targets: list[Path], overwrite: bool) -> None:
    """Give each staged file its target name: all of them or (after an error) none. Without
    `overwrite` no existing file is replaced; with it, a replaced file comes back if a later
    one fails."""
    done: list[tuple[Path, Path | None]] = []  # (target, backup of what it replaced)
    try:
        for temp, target in zip(staged, targets):
            if overwrite:
                backup = _backup(target)
                done.append((target, backup))
                os.replace(temp, target)
            else:
                _link_new(temp, target)
                done.append((target, None))
    except BaseException:
        for target, backup in reversed(done):
            with contextlib.suppress(OSError):  # undo as much as can be undone
                if backup is not None:
                    os.replace(backup, target)
                    backup.unlink(missing_ok=True)  # rename between two links of one file is a no-op
                else:
                    target.unlink(missing_ok=True)
        for temp in staged:
            temp.unlink(missing_ok=True)
        raise
    for _, backup in done:
        if backup is not None:
            backup.unlink(missing_ok=True)
    _fsync_dir(targets[0].parent)


def _backup(target: Path) -> Path | None:
    """A hidden second name for an existing `target` (it stays in place), or None."""
    if not target.exists():
        return None
    backup = target.with_name(f".{target.name}.{os.getpid()}.backup")
    backup.unlink(missing_ok=True)
    try:
        os.link(target, backup)
    except OSError:  # no hard links here
        shutil.copy2(target, backup)
    return backup


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
