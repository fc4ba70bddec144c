"""Hypernetworks: train small MLPs that transform the attention context (A1111's semantics);
the base model stays frozen."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from core.atomic import staged_path
from trainers import catalog
from trainers import template_training as tt
from trainers.configs import HypernetworkTrainingConfig
from trainers.formats.hypernetwork import file_shorthash, load_hypernetwork, save_hypernetwork
from trainers.hypernetwork_attention import applied, attention_widths
from trainers.hypernetworks import find_hypernetwork
from trainers.loop import TrainingError, TrainingPlan, train
from trainers.conditioning import prompt_encoder
from trainers.sampling import render


def run(cfg: HypernetworkTrainingConfig, ctx) -> Path:
    model, dataset, template_lines = tt.prepare(cfg, ctx)
    name = cfg.hypernetwork.strip()
    path = find_hypernetwork(ctx.paths, name)
    net = load_hypernetwork(path)
    widths = set(attention_widths(model.unet))
    if not widths & set(net.layers):
        raise TrainingError(f"hypernetwork: {path.name} has modules for widths "
                            f"{sorted(net.layers)}, but {cfg.model}'s attention widths are "
                            f"{sorted(widths)}; it would change nothing")
    net.to(model.unet.device)
    net.train()
    parameters = net.parameters()
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=0.0)  # A1111: torch's default weight decay
    encoder = prompt_encoder(model, max_tokens=cfg.max_token_length)
    start = int(net.step or 0)

    def save(target: Path, step: int) -> None:
        net.step = step
        net.spec.sd_checkpoint = model.short_hash
        net.spec.sd_checkpoint_name = Path(model.name).stem
        save_hypernetwork(target, net)

    plan = TrainingPlan(
        name=name, optimizer=optimizer, rates=tt.rates(cfg),
        encode=lambda texts: encoder.encode(texts), prompt_encoder=encoder, save=save,
        checksum=lambda: file_shorthash(staged_path(path)),  # A1111 pairs .optim by file hash
        final_path=path,
        copies_folder=catalog.get("hypernetwork").copies_folder, previews=tt.previews(cfg, name), start_step=start,
        unet_context=lambda: applied(model.unet, net, 1.0),
        preview_context=lambda: _evaluating(net, cfg.preview_strength))
    opts = tt.loop_options(cfg, model, catalog.get("hypernetwork").loss_csv,
                           {"method": "hypernetwork", "hypernetwork": str(path),
                            "images": len(dataset.examples)})
    return train(model, tt.TemplateBatches(dataset, template_lines, name, cfg), plan, opts, ctx)


@contextlib.contextmanager
def _evaluating(net, strength: float):
    """Previews run the hypernetwork in eval mode (no dropout), where its strength applies."""
    net.eval()
    net.set_strength(strength)
    try:
        yield
    finally:
        net.train()


def render_with(model, net, strength: float, settings):
    """One image with a hypernetwork applied at `strength` (checkpoint gallery, tests)."""
    encoder = prompt_encoder(model)
    net.eval()
    with applied(model.unet, net, strength):
        return render(model, encoder, settings)
