"""DreamBooth: fine-tune the whole U-Net (and optionally the text encoder), with prior
preservation, saved as one original-layout .safetensors that A1111 and ComfyUI load; for a
flow-matching family the whole transformer (text encoders frozen), saved as a transformer-only
file in the family's original layout (docs/flow-fine-tune.md)."""
from __future__ import annotations

import uuid
from pathlib import Path

import torch

from core import events as ev
from core.config import ConfigError
from trainers import catalog, distributed, kohya_data, resident
from trainers import kohya_training as kt
from trainers.class_images import ensure_class_images
from trainers.configs import DreamBoothConfig
from trainers.formats.sd_checkpoint import save_single_file
from trainers.formats.transformer_checkpoint import save_transformer_file
from trainers.fused_backward import FusedBackward
from trainers.loop import TrainingError, TrainingPlan, train
from trainers.models import give_back, load_model
from trainers.optimizers import create_optimizer
from trainers.stochastic_rounding import StochasticRounding

PRECISION = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def run(cfg: DreamBoothConfig, ctx) -> Path:
    cfg.validate()
    paths = ctx.paths
    kt.check_paths(cfg, paths)
    if cfg.class_data_dir.strip() and cfg.reg_data_dir.strip():
        raise ConfigError("class_data_dir: use either a class images folder or a "
                          "regularization folder, not both")
    path = kt.output_path(paths.stable_diffusion, cfg.output_name, ".safetensors")
    model, start, base_config = load_for_training(cfg, ctx, path)

    class_dir = None
    if cfg.class_data_dir.strip():
        class_dir = paths.resolve(cfg.class_data_dir, "class_data_dir")
        if cfg.num_class_images and distributed.is_main(ctx):  # the others wait below
            made = ensure_class_images(model, class_dir, cfg.class_prompt, cfg.num_class_images,
                                       cfg.resolution, cfg.seed, cfg.sample_sampler, ctx)
            if made:
                ctx.emit(ev.Status(f"Generated {made} class images in {class_dir}"))
    with distributed.main_first(ctx):  # class images and latent caches: the main process's
        configs = kt.global_batches(_datasets(cfg, paths, class_dir), ctx)
        ctx.emit(ev.Status("Caching latents"))
        batches = kohya_data.prepare_datasets(configs, model.vae, seed=cfg.seed,
                                              cache_to_disk=cfg.cache_latents_to_disk,
                                              prior_loss_weight=cfg.prior_loss_weight,
                                              report=lambda text: ctx.emit(ev.Status(text)),
                                              validation=kt.validation_config(cfg, paths))
    resident.page_out(model.vae)  # latents are cached: the steps never read the VAE
    return train_full_model(cfg, ctx, model, batches, path, start, base_config, "dreambooth")


# the modules whose fp32 weights a sidecar may hold: what trained (older sidecars: also the
# frozen text encoder and VAE, which are restored too)
MASTER_MODULES = ("unet", "text_encoder", "text_encoder_2", "vae")


def load_for_training(cfg, ctx, path: Path):
    """(model, start step, base config name): the base model, or the file of this name to
    continue. When its sidecar keeps the exact fp32 weights of what trained, the frozen modules
    come from the base model, as the run began with them (the file holds them rounded), and the
    trained ones from the sidecar. The weights change in place, so the model is taken out of the
    shared cache."""
    resuming = path.exists() and not cfg.overwrite
    weights = saved_master_weights(path) if resuming else None
    # an older sidecar (it holds the VAE) restores onto the file, as it was written to
    from_base = weights is not None and "vae" not in weights
    name = cfg.model if from_base or not resuming else path.name
    ctx.emit(ev.Status(f"Loading model {name}"))
    with distributed.main_first(ctx):  # the main process builds a missing model first
        model = load_model(ctx.paths, name, exclusive=True, frozen_dtype=whole_model_dtype(cfg))
    try:
        check_family(cfg, model)
    except ConfigError:
        give_back(model, set())  # unchanged: the next run reuses it
        raise
    model = kt.with_schedule(cfg, model)
    start = int(_metadata(path).get("danlu.steps", "0")) if resuming else 0
    if weights is not None:
        for module, state in weights.items():
            getattr(model, module).load_state_dict(state)
        ctx.emit(ev.Status(f"Restored the exact fp32 weights of step {start} from {path.name}.optim"))
    base_config = model.name if model.is_demo else _metadata(Path(model.source)).get("danlu.base_config")
    return model, start, base_config


def check_family(cfg, model) -> None:
    """The method trains the model's family, and the options fit it (the preflight checks the
    same before queueing, from the model's configs; this holds for the CLI and any file)."""
    from trainers.families import FamilyError
    method = catalog.for_config(type(cfg))
    try:
        catalog.require_family(method.name, model, cfg.model)
    except FamilyError as error:
        raise ConfigError(str(error)) from None
    problems = cfg.family_problems(model.spec)
    if problems:
        raise ConfigError(problems)


def whole_model_dtype(cfg) -> str:
    """full_bf16 / full_fp16 keep the whole model in half precision, so it is loaded that way
    (the GPU never holds it in fp32); otherwise fp32 (the U-Net's master weights)."""
    return "bf16" if cfg.full_bf16 else "fp16" if cfg.full_fp16 else "fp32"


def needs_master_weights(cfg) -> bool:
    """The saved file is not the training state when it is rounded (fp16/bf16) or holds the
    EMA weights; the .optim sidecar then keeps the fp32 weights to resume from."""
    return cfg.save_precision != "fp32" or getattr(cfg, "use_ema", False)


def trained_modules(cfg, model) -> tuple[str, ...]:
    """The U-Net, and the text encoders when they train."""
    encoders = ("text_encoder", "text_encoder_2") if cfg.train_text_encoder else ()
    return ("unet",) + tuple(name for name in encoders if getattr(model, name) is not None)


def master_weights(model, modules) -> dict:
    return {name: {k: v.detach().to("cpu", torch.float32).clone()
                   for k, v in getattr(model, name).state_dict().items()}
            for name in modules}


def saved_master_weights(path: Path) -> dict | None:
    """The fp32 weights kept in `<path>.optim` (when it belongs to this very file), or None."""
    from trainers.formats.optim_sidecar import load_optim
    payload, _ = load_optim(path, _metadata(path).get("danlu.save_id", ""))
    weights = (payload or {}).get("danlu", {}).get("weights")
    if not isinstance(weights, dict) or "unet" not in weights \
            or not set(weights) <= set(MASTER_MODULES):
        return None
    return weights


def _metadata(path: Path) -> dict[str, str]:
    if not path.is_file() or path.suffix.lower() != ".safetensors":
        return {}
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def _datasets(cfg: DreamBoothConfig, paths, class_dir: Path | None) -> list:
    if cfg.dataset_config.strip():
        return kt.dataset_configs(cfg, paths)
    general = kt.general_options(cfg)
    reg = class_dir or (paths.resolve(cfg.reg_data_dir, "reg_data_dir") if cfg.reg_data_dir.strip() else None)
    return [kohya_data.folder_dataset(paths.resolve(cfg.train_data_dir, "train_data_dir"), reg,
                                      train_tokens=cfg.instance_prompt or None,
                                      reg_tokens=cfg.class_prompt or None,
                                      mask_dir=kt.mask_folder(cfg, paths), **general)]


def train_full_model(cfg, ctx, model, batches, path: Path, start: int, base_config: str | None,
                     method: str) -> Path:
    """Train the U-Net (and the text encoder when asked) and save single files; DreamBooth and
    native fine-tuning share it."""
    unet, text_encoder = model.unet, model.text_encoder
    if cfg.full_bf16 or cfg.full_fp16:  # what trains, in half precision, as loaded (a
        # continued file's sidecar weights are put back in it)
        for module in [unet] + (model.text_encoders if cfg.train_text_encoder else []):
            module.to(torch.bfloat16 if cfg.full_bf16 else torch.float16)
    unet.requires_grad_(True)
    groups = [{"params": list(unet.parameters()), "lr": cfg.learning_rate}]
    if cfg.train_text_encoder:  # SDXL: both encoders, as kohya's sdxl_train
        for module in model.text_encoders:
            module.requires_grad_(True)
            module.get_input_embeddings().requires_grad_(False)  # as diffusers' script
        groups.append({"params": [p for m in model.text_encoders for p in m.parameters()
                                  if p.requires_grad],
                       "lr": cfg.text_encoder_lr or cfg.learning_rate})
    optimizer = create_optimizer(cfg.optimizer_type, groups, cfg.learning_rate)
    rounding = (StochasticRounding(optimizer, cfg.seed) if cfg.full_bf16 or cfg.full_fp16
                else None)
    fused = None
    if cfg.fused_backward_pass:
        if distributed.processes(ctx) > 1:
            raise TrainingError("fused_backward_pass: steps each weight during backward, before "
                                "the processes average their gradients; train on one process")
        fused = FusedBackward(optimizer, rounding.step_one if rounding is not None else None)
    steps = kt.total_steps(cfg, batches)
    base_rates = kt.rates(cfg, [g["lr"] for g in groups], steps)

    def rates(step: int):
        values = base_rates(step)
        if values is not None and cfg.train_text_encoder and cfg.stop_text_encoder_training \
                and step >= cfg.stop_text_encoder_training:
            values = values[:1] + [0.0]
        return values

    ema = None
    if cfg.use_ema:
        from diffusers.training_utils import EMAModel
        ema = EMAModel(unet.parameters(), decay=cfg.ema_decay)
        if start and not cfg.overwrite:
            from trainers.formats.optim_sidecar import load_optim
            payload, _ = load_optim(path, _metadata(path).get("danlu.save_id", ""))
            if payload and "ema" in payload.get("danlu", {}):
                ema.load_state_dict(payload["danlu"]["ema"])
    offload = kt.offloader(cfg, model, cfg.train_text_encoder)
    encoder, encode = kt.encoder_for(cfg, model, cfg.train_text_encoder, visit=offload.visiting)
    save_id = {"value": ""}
    # continuing from the file itself: it still comes from the model it was trained from (a
    # flow family's transformer file finds its text encoders and VAE by this name)
    base_model = _metadata(path).get("danlu.base_model", model.name) \
        if Path(model.source).resolve() == path.resolve() else model.name

    def save(target: Path, step: int) -> None:
        metadata = {"danlu.steps": str(step), "danlu.method": method,
                    "danlu.save_id": uuid.uuid4().hex, "danlu.base_model": base_model}
        if base_config:
            metadata["danlu.base_config"] = base_config
        if ema is not None:
            ema.store(unet.parameters())
            ema.copy_to(unet.parameters())
        try:
            if model.spec.checkpoint_layout:
                save_single_file(target, unet, model.vae, text_encoder,
                                 dtype=PRECISION[cfg.save_precision], metadata=metadata,
                                 family=model.spec.checkpoint_layout,
                                 text_encoder_2=model.text_encoder_2,
                                 markers=schedule_markers(model))
            else:  # a flow family: the transformer alone, in its original layout
                save_transformer_file(target, unet, model.spec.hook("transformer_file"),
                                      PRECISION[cfg.save_precision], metadata)
        finally:
            if ema is not None:
                ema.restore(unet.parameters())
        if target == path:
            save_id["value"] = metadata["danlu.save_id"]

    def checksum() -> str:
        return save_id["value"] or _metadata(path).get("danlu.save_id", "")

    plan = TrainingPlan(
        name=path.stem, optimizer=optimizer, rates=rates, encode=encode, prompt_encoder=encoder,
        save=save, checksum=checksum, final_path=path, copies_folder=catalog.get(method).copies_folder,
        previews=kt.previews(cfg, path.stem), start_step=start,
        unet_context=lambda: kt.memory_options(cfg, model, cfg.train_text_encoder),
        resume_optimizer=not cfg.overwrite, offload=offload, fused=fused,
        after_step=(lambda step: ema.step(unet.parameters())) if ema is not None else None,
        state_tensors=lambda: list(ema.shadow_params) if ema is not None else [],
        sidecar_extra=lambda: sidecar(cfg, model, ema))
    opts = kt.loop_options(cfg, model, batches, steps, {"method": method, "output": str(path)})
    try:
        result = train(model, batches, plan, opts, ctx)
    finally:
        unet.requires_grad_(False)
        for module in model.text_encoders:
            module.requires_grad_(False)
        # the next run of this model reloads only what trained (the VAE keeps its latents memo)
        give_back(model, {"unet"} | ({"text_encoder", "text_encoder_2"}
                                     if cfg.train_text_encoder else set()))
    if cfg.save_diffusers and distributed.is_main(ctx):
        _save_diffusers(model, path.with_suffix(""))
        ctx.emit(ev.Saved(step=steps, path=str(path.with_suffix("")), kind="diffusers folder"))
    return result


def sidecar(cfg, model, ema) -> dict:
    extra = {}
    if ema is not None:
        extra["ema"] = ema.state_dict()
    if needs_master_weights(cfg):
        extra["weights"] = master_weights(model, trained_modules(cfg, model))
    return extra


def _save_diffusers(model, folder: Path) -> None:
    from trainers.sampling import _pipeline, make_sampler
    sampler = model.spec.shipped_sampler
    # a flow family's pipeline takes its own flow-matching scheduler from the model's config
    scheduler = None if model.spec.prediction == "flow" else make_sampler(
        sampler, model.scheduler_config)
    pipe = _pipeline(model, model.unet, scheduler)
    if type(pipe).__name__ != model.spec.pipeline:  # a preview subclass: the family's own class
        pipe = model.spec.pipeline_class()(**pipe.components)
    pipe.save_pretrained(folder, safe_serialization=True)


def schedule_markers(model) -> list[str]:
    """The marker keys an SDXL file of this model gets (`v_pred`, `ztsnr`), so that the file
    says how it predicts where ComfyUI and Danlu look; SD 1.x / 2.x files stay as they were."""
    from trainers.models import V_PRED_KEY, ZTSNR_KEY
    if model.spec.checkpoint_layout != "sdxl":
        return []
    config = model.scheduler_config
    return ([V_PRED_KEY] if config.get("prediction_type") == "v_prediction" else []) + \
        ([ZTSNR_KEY] if config.get("rescale_betas_zero_snr") else [])
