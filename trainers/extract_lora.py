"""Extract a LoRA from a fine-tuned checkpoint: a truncated SVD of each targeted layer's
weight difference to the base model, written in kohya's format (SD 1.x, SD 2.x, and SDXL with
both text encoders)."""
from __future__ import annotations

from pathlib import Path

import torch

from core import events as ev
from trainers.configs import ExtractLoraConfig
from trainers.formats.lora import LoraTrainingInfo, lora_metadata, save_lora
from trainers.lora_network import find_targets, text_encoder_prefixes
from trainers.models import load_model
from trainers.resize_lora import output_target


def low_rank(diff: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, r], down [r, in]) with up @ down the best rank-r approximation of diff."""
    u, s, vh = torch.linalg.svd(diff, full_matrices=False)
    r = min(rank, s.shape[0])
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r]


def extract_state(base_unet, tuned_unet, base_te, tuned_te, rank: int, conv_rank: int = 0,
                  min_change: float = 1e-8, base_te2=None, tuned_te2=None) -> dict[str, torch.Tensor]:
    """Layers LoRA targets (plus ResNet/sampler layers, LoCon-style, when conv_rank > 0).
    With SDXL's second text encoders (`base_te2`, `tuned_te2`) the encoders are named
    `lora_te1_` / `lora_te2_` and the U-Net by its original layout, as kohya names them."""
    state: dict[str, torch.Tensor] = {}
    prefixes = text_encoder_prefixes(base_te2)
    parts = [("unet", base_unet, tuned_unet), ("text_encoder", base_te, tuned_te)]
    if base_te2 is not None:
        parts.append(("text_encoder_2", base_te2, tuned_te2))
    for part, base, tuned in parts:
        for target in find_targets(base, part, conv=part == "unet" and conv_rank > 0,
                                   prefix=prefixes.get(part)):
            before = base.get_submodule(target.path).weight.detach().float().cpu()
            after = tuned.get_submodule(target.path).weight.detach().float().cpu()
            diff = (after - before).reshape(before.shape[0], -1)
            if diff.abs().max() <= min_change:
                continue
            up, down = low_rank(diff, conv_rank if target.conv else rank)
            r = down.shape[0]
            if before.dim() == 4:  # convs keep 4-D shapes: down has the kernel, up is 1x1
                up, down = up[:, :, None, None], down.reshape(r, *before.shape[1:])
            state[f"{target.name}.lora_down.weight"] = down.contiguous()
            state[f"{target.name}.lora_up.weight"] = up.contiguous()
            state[f"{target.name}.alpha"] = torch.tensor(float(r))  # scale alpha/r = 1
    return state


def _resolution(base) -> int:
    """kohya's modelspec resolution of the family: SDXL 1024, SD 2.x 768-v 768, else 512."""
    return base.spec.native_resolution(base.prediction_type)


def run(cfg: ExtractLoraConfig, ctx) -> Path:
    cfg.validate()
    paths = ctx.paths
    target = output_target(paths, cfg.output_name, cfg.overwrite)
    ctx.emit(ev.Status(f"Loading {cfg.checkpoint}"))
    tuned = load_model(paths, cfg.checkpoint, exclusive=True)
    ctx.emit(ev.Status(f"Loading {cfg.model}"))
    base = load_model(paths, cfg.model)
    if tuned.family != base.family:
        raise ValueError(f"checkpoint: {cfg.checkpoint} is {tuned.spec.label}, but {cfg.model} "
                         f"is {base.spec.label}; extract from the model it was trained from")
    ctx.emit(ev.Status("Computing the low-rank differences"))
    state = extract_state(base.unet, tuned.unet, base.text_encoder, tuned.text_encoder, cfg.rank,
                          cfg.conv_rank, base_te2=base.text_encoder_2,
                          tuned_te2=tuned.text_encoder_2)
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
                         f"with {len(state) // 3} layers to {target}"))
    return target
