"""The memory of one training step, measured on the real modules (#19): the job's settings run
for one optimizer step in a scratch data folder (the user's models are read, nothing of theirs
is written), and the step is watched through torch's global optimizer hooks and saved-tensor
hooks:

- weights: every parameter and buffer of the model's components, by dtype, as the run stored
  them (frozen in bf16 / fp16 / fp8 where the settings say so);
- trainable parameters and their gradients, when the optimizer steps;
- optimizer state, after its first step;
- activations: the tensors autograd keeps for the backward pass of that step (each storage
  once; weights it keeps are counted with the weights), which is what grows with resolution
  and batch; on CUDA also torch's allocator peak;
- with block swap, the denoiser's bytes that stay on the device, those parked in CPU memory and
  those in flight; the measured weights are what the device holds.

Reported next to `memory_estimate.estimate` for the same settings."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from pathlib import Path

import torch

KOHYA_METHODS = ("lora", "dreambooth", "fine_tune")


class StepMemory:
    """Watches the first optimizer step taken while it is active."""

    def __init__(self):
        self.trainable = 0
        self.gradients = 0
        self.optimizer_state = 0
        self.activations = 0
        self.cuda_peak: int | None = None
        self.done = False
        self._seen: set[int] = set()

    def _pack(self, tensor: torch.Tensor):
        if not self.done and not isinstance(tensor, torch.nn.Parameter):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in self._seen:
                self._seen.add(storage.data_ptr())
                self.activations += storage.nbytes()
        return tensor

    def _before_step(self, optimizer, args, kwargs) -> None:
        if self.done:
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.trainable = sum(p.numel() for p in params)
        self.gradients = sum(p.grad.numel() * p.grad.element_size() for p in params
                             if p.grad is not None)

    def _after_step(self, optimizer, args, kwargs) -> None:
        if self.done:
            return
        self.optimizer_state = sum(_state_bytes(state) for state in optimizer.state.values())
        if torch.cuda.is_available():
            self.cuda_peak = int(torch.cuda.max_memory_allocated())
        self.done = True

    @contextlib.contextmanager
    def watching(self):
        from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                           register_optimizer_step_pre_hook)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        handles = [register_optimizer_step_pre_hook(self._before_step),
                   register_optimizer_step_post_hook(self._after_step)]
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
                yield self
        finally:
            for handle in handles:
                handle.remove()


def _state_bytes(state) -> int:
    if torch.is_tensor(state):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_state_bytes(v) for v in state)
    return 0


def weight_bytes(model) -> dict[str, dict[str, int]]:
    """component -> dtype -> bytes of its parameters and buffers."""
    found: dict[str, dict[str, int]] = {}
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        module = getattr(model, name, None)
        if module is None:
            continue
        component = model.spec.denoiser if name == "unet" else name
        parts = found.setdefault(component, {})
        for tensor in list(module.parameters()) + list(module.buffers()):
            dtype = str(tensor.dtype).replace("torch.", "")
            parts[dtype] = parts.get(dtype, 0) + tensor.numel() * tensor.element_size()
    return found


def swapped_bytes(denoiser, count: int) -> dict | None:
    """With `count` blocks swapped (trainers/block_swap.py): the denoiser's bytes that stay on
    the device, those parked in CPU memory, and those in flight at the peak — the largest
    swapped block, plus the largest other one on CUDA, where the next block is copied ahead.
    On the CPU the device and the CPU are the same memory: this is what a GPU would hold."""
    if not count:
        return None
    from trainers.block_swap import check_count
    blocks = check_count(count, denoiser)
    sizes = sorted((_module_bytes(block) for block in blocks[len(blocks) - count:]),
                   reverse=True)
    in_flight = sum(sizes[:2 if torch.cuda.is_available() else 1])
    total = _module_bytes(denoiser)
    return {"blocks": count, "of": len(blocks), "denoiser": total, "parked": sum(sizes),
            "in_flight": in_flight, "resident": total - sum(sizes) + in_flight}


def _module_bytes(module) -> int:
    return sum(t.numel() * t.element_size()
               for t in list(module.parameters()) + list(module.buffers()))


def _sandbox(paths, root: Path):
    """A data folder that reads the user's base models and model cache and writes nowhere
    else."""
    from core.paths import Paths
    sandbox = Paths(root, confine=False).ensure()
    for source, target in ((paths.stable_diffusion, sandbox.stable_diffusion),
                           (paths.cache, sandbox.cache)):
        if target.exists() and not any(target.iterdir()):
            target.rmdir()
        if not target.exists():
            os.symlink(source, target, target_is_directory=True)
    return sandbox


def _one_step(cfg, paths):
    """The config for one measured step: same model, data, precision, batch, resolution and
    memory options; no previews, saves, class-image generation or resume."""
    def where(field):
        value = getattr(cfg, field, "")
        return str(paths.resolve(value, field)) if str(value).strip() else value
    changes = dict(output_name="memory-report", max_train_steps=1, max_train_epochs=0,
                   gradient_accumulation_steps=1, sample_every_n_steps=0,
                   sample_every_n_epochs=0, sample_at_first=False, save_every_n_steps=0,
                   save_every_n_epochs=0, overwrite=True, log_directory="logs",
                   cache_latents_to_disk=False)
    for field in ("train_data_dir", "reg_data_dir", "dataset_config", "in_json"):
        if hasattr(cfg, field):
            changes[field] = where(field)
    if hasattr(cfg, "class_data_dir"):
        changes.update(class_data_dir="", num_class_images=0)
    return dataclasses.replace(cfg, **{k: v for k, v in changes.items() if hasattr(cfg, k)})


class _QuietContext:
    def __init__(self, paths):
        self.paths = paths
        self.parallel = None

    def emit(self, event) -> None:
        pass

    def should_stop(self) -> bool:
        return False


def measure(method: str, cfg, paths) -> dict:
    """Run one step of `method` with `cfg` and report its memory (bytes) beside the estimate."""
    from trainers import catalog
    from trainers.memory_estimate import BETWEEN_STEPS, estimate_for, off_device_components
    from trainers.models import load_model
    from trainers.registry import runner
    if method not in KOHYA_METHODS:
        raise ValueError(f"memory report: measured for {', '.join(KOHYA_METHODS)}; "
                         f"{method} is not one of them")
    catalog.get(method)  # an unknown method is named by the catalog
    probe = StepMemory()
    with tempfile.TemporaryDirectory(prefix="danlu-memory-") as folder:
        sandbox = _sandbox(paths, Path(folder) / "data")
        step_cfg = _one_step(cfg, paths)
        with probe.watching():
            runner(method)(step_cfg, _QuietContext(sandbox))
        if method == "lora":
            frozen = cfg.frozen_dtype()
        else:  # as the run loaded it: full_bf16 / full_fp16 hold the whole model in half
            from trainers.methods.dreambooth import whole_model_dtype
            frozen = whole_model_dtype(cfg)
        model = load_model(sandbox, cfg.model, frozen_dtype=frozen)
        weights = weight_bytes(model)
        swap = swapped_bytes(model.unet, getattr(cfg, "blocks_to_swap", 0))
    estimated = estimate_for(cfg, paths).parts
    resident = sum(sum(parts.values()) for parts in weights.values())
    if swap:  # what the device holds: the blocks not swapped and those in flight
        resident -= swap["parked"] - swap["in_flight"]
    # the parked text encoders / VAE (trainers/offload.py; on a CPU nothing moves, the report
    # says what a GPU would hold) come back between steps, when no activations are held
    parked = sum(sum(weights.get(name, {}).values()) for name in off_device_components(cfg))
    measured = {"weights": resident - parked,
                "gradients": probe.gradients, "optimizer": probe.optimizer_state,
                "activations": probe.activations}
    if parked:
        measured[BETWEEN_STEPS] = max(0, parked - probe.gradients - probe.activations)
    return {"method": method, "model": cfg.model,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "weights": weights, "block_swap": swap, "trainable_parameters": probe.trainable,
            "measured": {**measured, "total": sum(measured.values())},
            "cuda_peak": probe.cuda_peak,
            "estimate": {**{k: int(v) for k, v in estimated.items()},
                         "total": int(sum(estimated.values()))}}
