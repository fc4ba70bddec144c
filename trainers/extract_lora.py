"""Extract a LoRA from a fine-tuned checkpoint: a truncated SVD of each targeted layer's
weight difference to the base model, written in kohya's format (SD 1.x, SD 2.x, and SDXL with
both text encoders)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from core import events as ev
from trainers.configs import ExtractLoraConfig
from trainers.formats.key_check import saved_file_note
from trainers.formats.lora import LoraTrainingInfo, lora_metadata, save_lora
from trainers.lora_network import find_targets, text_encoder_prefixes
from trainers import families
from trainers.checkpoint_weights import open_checkpoint
from trainers.families import file_family
from trainers.models import load_model, resolve_model
from trainers.resize_lora import output_target


OVERSAMPLE = 10  # extra random directions the randomized SVD keeps beyond the rank
POWER_ITERATIONS = 2
# randomized when (rank + OVERSAMPLE) * RANDOMIZED_BELOW <= the layer's smaller side and that
# side is at least RANDOMIZED_FROM (an exact SVD of a smaller layer takes milliseconds)
RANDOMIZED_BELOW, RANDOMIZED_FROM = 4, 256
SEED = 0


def low_rank(diff: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, r], down [r, in]) with up @ down the best rank-r approximation of diff: an
    exact SVD, or a randomized one (Halko et al. 2009, `torch.svd_lowrank`, seeded) when the
    rank is small against the layer, which is as good up to a small tolerance and ~20x faster
    on SD's large layers."""
    side = min(diff.shape)
    r = min(rank, side)
    if side >= RANDOMIZED_FROM and side >= (r + OVERSAMPLE) * RANDOMIZED_BELOW:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            u, s, v = torch.svd_lowrank(diff, q=r + OVERSAMPLE, niter=POWER_ITERATIONS)
        vh = v.T
    else:
        u, s, vh = torch.linalg.svd(diff, full_matrices=False)
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r]


def relative_error(diff: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    """||diff - up @ down||_F / ||diff||_F: the share of the change the LoRA leaves out."""
    return float(torch.linalg.matrix_norm(torch.addmm(diff, up, down, alpha=-1))
                 / torch.linalg.matrix_norm(diff))


def module_weights(model):
    """Weights read from a loaded model's modules (`weight(part, path, shape)`)."""
    def weight(part, path, shape):
        return getattr(model, part).get_submodule(path).weight.detach().float().cpu()
    return weight


@dataclass
class Extracted:
    state: dict[str, torch.Tensor]
    errors: dict[str, float]  # LoRA layer name -> relative Frobenius error left

    def summary(self) -> str:
        if not self.errors:
            return ""
        worst = max(self.errors, key=self.errors.get)
        mean = sum(self.errors.values()) / len(self.errors)
        return (f"relative Frobenius error left per layer: mean {mean:.4f}, worst "
                f"{self.errors[worst]:.4f} ({worst})")


def extract_state(base_unet, tuned, base_te, rank: int, conv_rank: int = 0,
                  min_change: float = 1e-8, base_te2=None, progress=None) -> Extracted:
    """Layers LoRA targets (plus ResNet/sampler layers, LoCon-style, when conv_rank > 0).
    `tuned(part, path, shape)` gives the fine-tuned weight of a module, one at a time; each
    layer's difference is made, cut and dropped before the next is read.
    With SDXL's second text encoder (`base_te2`) the encoders are named
    `lora_te1_` / `lora_te2_` and the U-Net by its original layout, as kohya names them.
    `progress(done, total)` is called after each layer."""
    state: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    prefixes = text_encoder_prefixes(base_te2)
    parts = [("unet", base_unet), ("text_encoder", base_te)]
    if base_te2 is not None:
        parts.append(("text_encoder_2", base_te2))
    targets = [(base, target) for part, base in parts
               for target in find_targets(base, part, conv=part == "unet" and conv_rank > 0,
                                          prefix=prefixes.get(part))]
    for done, (base, target) in enumerate(targets, 1):
        before = base.get_submodule(target.path).weight.detach()
        after = tuned(target.part, target.path, before.shape)
        diff = (after - before.float().cpu()).reshape(before.shape[0], -1)
        if diff.abs().max() > min_change:
            up, down = low_rank(diff, conv_rank if target.conv else rank)
            errors[target.name] = relative_error(diff, up, down)
            r = down.shape[0]
            if before.dim() == 4:  # convs keep 4-D shapes: down has the kernel, up is 1x1
                up, down = up[:, :, None, None], down.reshape(r, *before.shape[1:])
            state[f"{target.name}.lora_down.weight"] = down.contiguous()
            state[f"{target.name}.lora_up.weight"] = up.contiguous()
            state[f"{target.name}.alpha"] = torch.tensor(float(r))  # scale alpha/r = 1
        del after, diff
        if progress is not None:
            progress(done, len(targets))
    return Extracted(state, errors)


def _resolution(base) -> int:
    """kohya's modelspec resolution of the family: SDXL 1024, SD 2.x 768-v 768, else 512."""
    return base.spec.native_resolution(base.prediction_type)


def _open_tuned(paths, name: str, base):
    """The fine-tuned weights one module at a time: read from its `.safetensors` file when Danlu
    knows its layout (only the base is whole in memory), else from the model loaded whole.
    Returns (weight function, its family, a close function)."""
    kind, location = resolve_model(paths, name)
    if kind == "file" and Path(location).suffix.lower() == ".safetensors":
        family = file_family(location)
        if family != base.family:  # refused by the caller, before anything more is read
            return None, family, lambda: None
        reader = open_checkpoint(location, family, base.unet.config)
        if reader is not None:
            return reader.weight, family, reader.close
    model = load_model(paths, name, exclusive=True)
    return module_weights(model), model.family, lambda: None


def run(cfg: ExtractLoraConfig, ctx) -> Path:
    cfg.validate()
    paths = ctx.paths
    target = output_target(paths, cfg.output_name, cfg.overwrite)
    ctx.emit(ev.Status(f"Loading {cfg.model}"))
    base = load_model(paths, cfg.model)
    from trainers.catalog import require_family
    require_family("extract_lora", base, cfg.model)  # its layer names are the SD U-Nets'
    ctx.emit(ev.Status(f"Opening {cfg.checkpoint}"))
    tuned, family, close = _open_tuned(paths, cfg.checkpoint, base)
    if family != base.family:
        close()
        raise ValueError(f"checkpoint: {cfg.checkpoint} is {families.get(family).label}, but "
                         f"{cfg.model} is {base.spec.label}; extract from the model it was "
                         "trained from")
    ctx.emit(ev.Status("Computing the low-rank differences, one layer at a time"))
    started = time.monotonic()

    def progress(done, total):
        ctx.emit(ev.Progress(step=done, total=total, loss=0.0, learn_rate=0.0,
                             elapsed=time.monotonic() - started))

    try:
        extracted = extract_state(base.unet, tuned, base.text_encoder, cfg.rank, cfg.conv_rank,
                                  base_te2=base.text_encoder_2, progress=progress)
    finally:
        close()
    state = extracted.state
    if not state:
        raise ValueError(f"checkpoint: {cfg.checkpoint} has the same weights as {cfg.model}; "
                         "there is nothing to extract")
    metadata = lora_metadata(LoraTrainingInfo(
        network_dim=cfg.rank, network_alpha=float(cfg.rank), conv_dim=cfg.conv_rank,
        conv_alpha=float(cfg.conv_rank) if cfg.conv_rank else None, output_name=target.stem,
        steps=0, epoch=0, sd_model_name=Path(base.name).stem, title=target.stem,
        v_parameterization=base.prediction_type == "v_prediction", **base.spec.kohya_flags,
        resolution=_resolution(base),
        extra={"ss_training_comment": f"extracted from {cfg.checkpoint}"}))
    save_lora(target, state, metadata, precision=cfg.save_precision)
    ctx.emit(ev.Saved(step=0, path=str(target), kind="final"))
    ctx.emit(ev.Finished(step=0, path=str(target), message=f"Extracted a rank-{cfg.rank} LoRA "
                         f"with {len(state) // 3} layers to {target}; {extracted.summary()}. "
                         f"{saved_file_note(target)}"))
    return target
