"""Extended textual inversion (XTI, "P+"): train one set of embedding vectors per U-Net
cross-attention layer (16 for SD1), like textual inversion otherwise; previews apply them per
layer. Saved in kohya's XTI layout (trainers/formats/xti.py) in models/xti/."""
from __future__ import annotations

from pathlib import Path

import torch

from core import events as ev
from trainers import catalog
from trainers import template_training as tt
from trainers.catalog import require_family
from trainers.configs import XtiConfig
from trainers.embeddings import initial_vectors
from trainers.formats.embedding import embedding_checksum
from trainers.formats.xti import XtiFile, XtiFormatError, load_xti, save_xti
from trainers.loop import TrainingError, TrainingPlan, train
from trainers.prompts import PromptEncoder
from trainers.xti_layers import XtiEncoder, layer_names, per_layer


def xti_folder(paths) -> Path:
    return paths.models / "xti"


def run(cfg: XtiConfig, ctx) -> Path:
    model, dataset, template_lines = tt.prepare(cfg, ctx)
    require_family("xti", model, cfg.model)
    name = cfg.output_name.strip()
    path = xti_folder(ctx.paths) / f"{name}.{cfg.file_format}"
    layers = layer_names(model.unet)
    start, vectors = _start(cfg, ctx, model, path, layers)
    device = model.unet.device
    params = {layer: torch.nn.Parameter(vectors[layer].clone().to(device)) for layer in layers}
    encoder = XtiEncoder(PromptEncoder(model.tokenizer, model.text_encoder,
                                       max_tokens=cfg.max_token_length), name, params)
    optimizer = torch.optim.AdamW(list(params.values()), lr=0.0, weight_decay=0.0)

    def as_file(step: int) -> XtiFile:
        return XtiFile(name=name, step=step,
                       layers={k: v.detach().cpu().clone() for k, v in params.items()})

    def checksum() -> str:
        return embedding_checksum(torch.cat([v.detach().cpu() for v in params.values()]))

    path.parent.mkdir(parents=True, exist_ok=True)
    plan = TrainingPlan(
        name=name, optimizer=optimizer, rates=tt.rates(cfg), encode=encoder.encode,
        prompt_encoder=encoder, save=lambda target, step: save_xti(target, as_file(step)),
        checksum=checksum, final_path=path, copies_folder=catalog.get("xti").copies_folder, previews=tt.previews(cfg, name),
        start_step=start, unet_context=lambda: per_layer(model.unet),
        resume_optimizer=not cfg.overwrite)
    opts = tt.loop_options(cfg, model, catalog.get("xti").loss_csv,
                           {"method": "xti", "output": str(path), "layers": layers,
                            "vectors": cfg.num_vectors_per_token,
                            "images": len(dataset.examples)})
    return train(model, tt.TemplateBatches(dataset, template_lines, name, cfg), plan, opts, ctx)


def _start(cfg: XtiConfig, ctx, model, path: Path, layers: list[str]):
    """(step, layer -> vectors): the existing file's, or the init text's in every layer."""
    width = model.text_encoder.get_input_embeddings().weight.shape[1]
    if path.exists() and not cfg.overwrite:
        try:
            stored = load_xti(path)
        except XtiFormatError as error:
            raise TrainingError(f"output_name: {error}. Tick 'Start over' to replace it") from None
        shape = next(iter(stored.layers.values())).shape
        if list(stored.layers) != layers or shape[1] != width:
            raise TrainingError(
                f"output_name: {path.name} has layers {', '.join(stored.layers)} of width "
                f"{shape[1]}, but {cfg.model} has {', '.join(layers)} of width {width}; tick "
                "'Start over' to replace it, or pick another name")
        ctx.emit(ev.Status(f"Continuing {path.name} from step {stored.step}"))
        return stored.step, stored.layers
    init = initial_vectors(model.tokenizer, model.text_encoder, cfg.init_text,
                           cfg.num_vectors_per_token)
    ctx.emit(ev.Status(f"Starting {'over with ' if path.exists() else 'the new '}{path.name} from "
                       f"{cfg.init_text!r} ({cfg.num_vectors_per_token} vectors per token in "
                       f"each of {len(layers)} layers)"))
    return 0, {layer: init.clone() for layer in layers}
