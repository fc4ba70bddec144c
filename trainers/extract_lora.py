"""Extract a LoRA from a fine-tuned checkpoint: a truncated SVD of each targeted layer's
weight difference to the base model, written in kohya's format."""
from __future__ import annotations

from pathlib import Path

import torch

from core import events as ev
from trainers.configs import ExtractLoraConfig
from trainers.formats.lora import lora_metadata, save_lora
from trainers.lora_network import find_targets
from trainers.models import load_model


def low_rank(diff: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, r], down [r, in]) with up @ down the best rank-r approximation of diff."""
    u, s, vh = torch.linalg.svd(diff, full_matrices=False)
    r = min(rank, s.shape[0])
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r]


def extract_state(base_unet, tuned_unet, base_te, tuned_te, rank: int, conv_rank: int = 0,
                  min_change: float = 1e-8) -> dict[str, torch.Tensor]:
    """Layers LoRA targets (plus ResNet/sampler layers, LoCon-style, when conv_rank > 0)."""
    state: dict[str, torch.Tensor] = {}
    for part, base, tuned in (("unet", base_unet, tuned_unet), ("text_encoder", base_te, tuned_te)):
        for target in find_targets(base, part, conv=part == "unet" and conv_rank > 0):
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


def run(cfg: ExtractLoraConfig, ctx) -> Path:
    cfg.validate()
    paths = ctx.paths
    target = paths.lora / f"{cfg.output_name.strip()}.safetensors"
    if target.exists() and not cfg.overwrite:
        raise FileExistsError(f"output_name: {target.name} exists in {paths.lora}; tick "
                              "'Overwrite' to replace it")
    ctx.emit(ev.Status(f"Loading {cfg.checkpoint}"))
    tuned = load_model(paths, cfg.checkpoint, exclusive=True)
    ctx.emit(ev.Status(f"Loading {cfg.model}"))
    base = load_model(paths, cfg.model)
    if tuned.family != base.family:
        raise ValueError(f"checkpoint: {cfg.checkpoint} is {tuned.family.upper()}, but {cfg.model} "
                         f"is {base.family.upper()}; extract from the model it was trained from")
    if base.is_sdxl:
        raise ValueError("model: extracting a LoRA from an SDXL checkpoint is not supported yet "
                         "(its second text encoder would be left out)")
    ctx.emit(ev.Status("Computing the low-rank differences"))
    state = extract_state(base.unet, tuned.unet, base.text_encoder, tuned.text_encoder, cfg.rank,
                          cfg.conv_rank)
    if not state:
        raise ValueError(f"checkpoint: {cfg.checkpoint} has the same weights as {cfg.model}; "
                         "there is nothing to extract")
    metadata = lora_metadata(network_dim=cfg.rank, network_alpha=float(cfg.rank),
                             conv_dim=cfg.conv_rank, conv_alpha=float(cfg.conv_rank) if cfg.conv_rank else None,
                             output_name=target.stem, steps=0, epoch=0,
                             sd_model_name=Path(base.name).stem, title=target.stem,
                             v2=base.family == "sd2",
                             v_parameterization=base.prediction_type == "v_prediction",
                             extra={"ss_training_comment": f"extracted from {cfg.checkpoint}"})
    save_lora(target, state, metadata, precision=cfg.save_precision)
    ctx.emit(ev.Saved(step=0, path=str(target), kind="final"))
    ctx.emit(ev.Finished(step=0, path=str(target), message=f"Extracted a rank-{cfg.rank} LoRA "
                         f"with {len(state) // 3} layers to {target}"))
    return target
