"""LoRA: low-rank adapters on the U-Net (and text encoder), saved in kohya's format."""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch

from core import events as ev
from core.atomic import staged_path
from trainers import catalog, kohya_data
from trainers import kohya_training as kt
from trainers.configs import BLOCK_FIELDS, LoraConfig
from trainers.formats.lora import (LoraFormatError, LoraTrainingInfo, lora_metadata,
                                   read_lora_metadata, save_lora, update_progress)
from trainers.formats.bundled_embeddings import read_bundled
from trainers.formats.embedding import save_embedding
from trainers.formats.lora_diffusers import diffusers_folder, save_diffusers_lora
from trainers.formats.lycoris import load_adapter, lycoris_metadata, save_lycoris
from trainers.formats.key_check import saved_file_note
from trainers.formats.optim_sidecar import load_optim
from trainers.lora_network import LoraNetwork, LoraSpec, LoraStateError
from trainers.lycoris_network import LycorisNetwork, LycorisSpec
from trainers.loop import TrainingError, TrainingPlan, train
from trainers.optimizers import create_optimizer
from trainers.pivotal import PivotalTokens
from trainers.seeds import derive_seed


def run(cfg: LoraConfig, ctx) -> Path:
    model, batches = kt.prepare(cfg, ctx)
    kt.check_block_swap(cfg, model)
    name = cfg.output_name.strip()
    path = kt.output_path(ctx.paths.lora, name, ".safetensors")
    trains_te = not cfg.network_train_unet_only
    settings = dict(rank=cfg.network_dim, alpha=cfg.network_alpha, conv_rank=cfg.conv_dim,
                    conv_alpha=cfg.conv_alpha, train_unet=True, train_text_encoder=trains_te)
    if cfg.network_type == "lora":
        spec = LoraSpec(**settings, blocks=cfg.blocks(), type_ranks=cfg.type_ranks(),
                        dora=cfg.dora_wd, dora_on_output=cfg.wd_on_output)
        network_class = LoraNetwork
    else:
        spec = LycorisSpec(**settings, algo=cfg.network_type, factor=cfg.lokr_factor)
        network_class = LycorisNetwork
    with torch.random.fork_rng(devices=[]):  # the initial weights follow the seed too
        torch.manual_seed(derive_seed(cfg.seed, "lora-init"))
        network = network_class(model.unet, model.text_encoder, spec,
                              text_encoder_2=model.text_encoder_2 if trains_te else None,
                              layout=model.spec.hook("lora_layout"))
    try:
        return _train(cfg, ctx, model, batches, network, path, trains_te)
    finally:
        network.remove()  # the cached base model goes back to how it was


def _checksum(path: Path) -> str:
    """The file's own content hash pairs it with its .optim sidecar (while the two are being
    saved together, the new file's, not yet at its final name)."""
    path = staged_path(path)
    return read_lora_metadata(path).get("sshs_model_hash", "") if path.exists() else ""


def _resume(cfg: LoraConfig, network: LoraNetwork, path: Path, ctx,
            tokens: PivotalTokens | None = None) -> int:
    """Load the weights of an existing file of this name (exact fp32 ones from the sidecar
    when they match) and return its step count."""
    if cfg.overwrite or not path.exists():
        return 0
    try:
        state, metadata = load_adapter(path)
        payload, _ = load_optim(path, _checksum(path))
        exact = (payload or {}).get("danlu", {}).get("network")
        network.load_kohya_state_dict(exact if exact is not None else state)
    except (LoraStateError, LoraFormatError) as error:
        raise TrainingError(f"output_name: {path.name} exists but cannot be continued: {error}. "
                            "Tick 'Start over' to replace it, or pick another output name") from None
    _resume_tokens(tokens, path, (payload or {}).get("danlu", {}).get("pivotal"))
    return int(metadata.get("ss_steps", "0") or 0)


def _resume_tokens(tokens: PivotalTokens | None, path: Path, exact) -> None:
    """The bundled vectors of the file being continued (the sidecar's fp32 ones when it has
    them); a file and settings that disagree on pivotal tuning are refused by name."""
    bundled = read_bundled(path)
    if tokens is None:
        if bundled:
            raise TrainingError(f"pivotal_tuning: {path.name} carries the trained token "
                                f"{', '.join(map(repr, bundled))}; tick pivotal tuning with that "
                                "token to continue it, or 'Start over'")
        return
    if tokens.name not in bundled:
        held = f"holds {', '.join(map(repr, bundled))}" if bundled else "has no trained token"
        raise TrainingError(f"pivotal_token: {path.name} {held}, not {tokens.name!r}; tick "
                            "'Start over' to replace it, or pick another output name")
    tokens.load(exact if exact is not None else bundled[tokens.name], path.name)


def _train(cfg, ctx, model, batches, network: LoraNetwork, path: Path, trains_te: bool) -> Path:
    tokens = PivotalTokens.create(cfg, model)
    start = _resume(cfg, network, path, ctx, tokens)
    steps = kt.total_steps(cfg, batches)
    unet_lr = cfg.unet_lr or cfg.learning_rate
    te_lr = cfg.text_encoder_lr or cfg.learning_rate
    groups = [{"params": network.unet_parameters(), "lr": unet_lr}]
    if trains_te:
        groups.append({"params": network.text_encoder_parameters(), "lr": te_lr})
    if tokens is not None:  # the last group (PivotalTokens.rates), without weight decay
        groups.append({"params": tokens.parameters(), "lr": cfg.pivotal_lr or cfg.learning_rate,
                       "weight_decay": 0.0})
        tokens.at_step(start)
    optimizer = create_optimizer(cfg.optimizer_type, groups, cfg.learning_rate)
    offload = kt.offloader(cfg, model, trains_te)
    encoder, encode = kt.encoder_for(cfg, model, trains_te, visit=offload.visiting)
    if tokens is not None:  # the new word's vectors spliced into the captions, with grad
        encoder, encode = tokens.encoder(cfg, model, trains_te)
    started = time.time()
    per_epoch = kt.steps_per_epoch(cfg, batches)
    metadata = lora_metadata(LoraTrainingInfo(
        network_dim=cfg.network_dim, network_alpha=cfg.network_alpha, output_name=path.stem,
        steps=start, epoch=start // per_epoch, conv_dim=cfg.conv_dim,
        conv_alpha=cfg.conv_alpha if cfg.conv_dim else None,
        resolution=(cfg.resolution, cfg.resolution), learning_rate=cfg.learning_rate,
        unet_lr=unet_lr, text_encoder_lr=te_lr if trains_te else None,
        optimizer=cfg.optimizer_type, lr_scheduler=cfg.lr_scheduler,
        lr_warmup_steps=cfg.lr_warmup_steps, seed=cfg.seed,
        tag_frequency=kohya_data.tag_frequency(batches),
        dataset_dirs=kohya_data.dataset_dirs_info(batches),
        reg_dataset_dirs=kohya_data.dataset_dirs_info(batches, is_reg=True),
        training_started_at=started, num_train_images=batches.num_train_images,
        batch_size=cfg.train_batch_size, max_train_steps=steps,
        num_epochs=-(-steps // per_epoch), gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision, clip_skip=cfg.clip_skip,
        min_snr_gamma=cfg.min_snr_gamma or None, noise_offset=cfg.noise_offset or None,
        max_grad_norm=cfg.max_grad_norm or None,
        sd_model_name=Path(model.name).stem,
        sd_model_path=model.source if Path(model.source).is_file() else None,
        v_parameterization=model.prediction_type == "v_prediction", **model.spec.kohya_flags,
        title=path.stem, extra={"ss_max_token_length": cfg.max_token_length,
                                **kt.schedule_metadata(cfg)}))
    if model.spec.lora_metadata:
        for key, value in model.spec.hook("lora_metadata")(model).items():
            if value is None:
                metadata.pop(key, None)
            else:
                metadata[key] = value
    if cfg.blocks():  # kohya writes the block choice among its network args
        args = json.loads(metadata.get("ss_network_args", "{}"))
        args.update({name: getattr(cfg, name) for name in BLOCK_FIELDS
                     if name.split("_")[1] in cfg.blocks()})
        metadata["ss_network_args"] = json.dumps(args)
    if cfg.type_ranks():  # as kohya's network_args: img_attn_dim=16 (and Danlu's img_attn_alpha)
        args = json.loads(metadata.get("ss_network_args", "{}"))
        for kind, (rank, alpha) in cfg.type_ranks().items():
            args[f"{kind}_dim"] = str(rank)
            if alpha is not None:
                args[f"{kind}_alpha"] = f"{alpha:g}"
        metadata["ss_network_args"] = json.dumps(args)
    if cfg.network_type != "lora" or cfg.dora_wd:  # DoRA: LyCORIS's algo=lora, dora_wd=True
        metadata = lycoris_metadata(metadata, cfg.network_type, cfg.conv_dim, cfg.conv_alpha,
                                    cfg.lokr_factor, dora_wd=cfg.dora_wd,
                                    wd_on_output=cfg.wd_on_output)
    write = save_lora if cfg.network_type == "lora" else save_lycoris
    if tokens is not None:
        metadata.update(tokens.metadata())

    def save(target: Path, step: int) -> None:
        state = network.kohya_state_dict()
        if tokens is not None:
            state.update(tokens.bundle())
        write(target, state, update_progress(metadata, steps=step, epoch=step // per_epoch),
                  precision=cfg.save_precision)
        if cfg.save_diffusers_format and target == path:
            folder = diffusers_folder(path)
            save_diffusers_lora(folder, network.module_state_dict(), network.targets,
                                cfg.save_precision, denoiser=model.spec.denoiser)
            if tokens is not None:  # diffusers' LoRA format has no place for them
                save_embedding(folder / f"{tokens.name}.safetensors", tokens.embedding_file(step))
            ctx.emit(ev.Saved(step=step, path=str(folder), kind="diffusers folder"))

    scheduled = kt.rates(cfg, [g["lr"] for g in groups], steps)
    rates = scheduled if tokens is None else (
        lambda step: tokens.rates(scheduled(step), step))

    @contextlib.contextmanager
    def preview_strength():
        network.set_strength(cfg.preview_strength)
        try:
            yield
        finally:
            network.set_strength(1.0)

    plan = TrainingPlan(
        name=path.stem, optimizer=optimizer, rates=rates,
        encode=encode, prompt_encoder=encoder, save=save, checksum=lambda: _checksum(path),
        final_path=path, copies_folder=catalog.get("lora").copies_folder, previews=kt.previews(cfg, path.stem),
        start_step=start, unet_context=lambda: kt.memory_options(cfg, model, trains_te),
        preview_context=preview_strength, resume_optimizer=not cfg.overwrite, offload=offload,
        sidecar_extra=lambda: {"network": network.kohya_state_dict(torch.float32),
                               **({"pivotal": tokens.state()} if tokens is not None else {})},
        after_step=tokens.at_step if tokens is not None else None,
        final_note=lambda saved: saved_file_note(saved, model.spec.name))
    opts = kt.loop_options(cfg, model, batches, steps, {"method": "lora", "output": str(path)})
    return train(model, batches, plan, opts, ctx)
