"""A peak-memory estimate for a job's settings, shown before a run starts so users on 8–12 GB
cards can choose options. Torch-free. Weights, gradients and optimizer state follow from the
parameter counts; a LoRA's trained parameters and the activations kept for backward come from
the family's `Memory`, measured with `--memory-report` (trainers/memory_report.py) — for SD 1.x
and its demo; other families scale SD 1.x's by their denoiser's size until measured."""
from __future__ import annotations

from dataclasses import dataclass

from trainers.configs import SD1_UNET_PARAMETERS

GB = 1024 ** 3
MB = 1024 ** 2
# bytes of optimizer state per trained parameter (paged state counts where it is at its peak)
OPTIMIZER_BYTES = {"AdamW": 8, "AdamW8bit": 2, "PagedAdamW8bit": 2, "PagedAdamW": 8,
                   "PagedAdamW32bit": 8, "Lion": 4, "Lion8bit": 1, "PagedLion8bit": 1,
                   "Prodigy": 16, "Adafactor": 1, "SGDNesterov": 4, "SGDNesterov8bit": 1}
# what mixed precision and gradient checkpointing leave of the fp32 activations (measured on the
# SD1.5-shaped model and the demo: 0.52-0.57 and 0.22-0.27)
HALF_ACTIVATIONS = 0.54
CHECKPOINTED_ACTIVATIONS = 0.25
# blocks a block swap takes from (trainers/block_swap.py), per family; an even share of the
# denoiser's weights is counted per block (a demo is counted as its family)
SWAPPABLE_BLOCKS = {"sd1": 8, "sd2": 8, "sdxl": 6, "flux1": 57, "chroma": 57, "flux2_klein": 25,
                    "zimage": 30, "qwen_image": 60}
# swapped blocks on the device at once during a step: the running one and the one prefetched
IN_FLIGHT = 2
# latent tokens of a 256 px image in a flow transformer (8x VAE, 2x2 patches); for a U-Net only
# the ratio matters, which is the pixels'
IMAGE_TOKENS_256 = 256
# the part of the peak the parked text encoders / VAE add when they come back between steps
BETWEEN_STEPS = "text encoders / VAE between steps"
# a fused backward pass keeps only the gradients of the layers being finished: the largest
# tensors of SD 1.x's U-Net are about 2 % of it
FUSED_GRADIENTS = 0.02


@dataclass
class Estimate:
    parts: dict[str, float]  # bytes

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def text(self) -> str:
        listed = ", ".join(f"{name} {size_text(value)}" for name, value in self.parts.items()
                           if value >= 0.01 * self.total and value > 0)
        return (f"Estimated peak memory: about {size_text(self.total)}"
                f"{f' ({listed})' if listed else ''}. {advice(self.total)}")


def size_text(size: float) -> str:
    """'2.3 GB' from 1 GB up, else '420 MB' / '3.5 MB' / '0.2 MB' (the demo models are MBs)."""
    if size >= GB:
        return f"{size / GB:.1f} GB"
    megabytes = size / MB
    return f"{megabytes:.0f} MB" if megabytes >= 10 else f"{megabytes:.1f} MB"


def advice(total: float) -> str:
    if total <= 7.5 * GB:
        return "Should fit an 8 GB card."
    if total <= 11.5 * GB:
        return "Needs a 12 GB card; for 8 GB try gradient checkpointing, bf16 or an 8-bit optimizer."
    if total <= 23 * GB:
        return "Needs a 24 GB card; gradient checkpointing, bf16 and an 8-bit optimizer lower it."
    return "Larger than most cards: lower the batch or resolution, or use LoRA instead."


def estimate(cfg, family: str | None = None) -> Estimate:
    """`family` (a trainers.families name, see guess_family) gives the model's size; a demo
    model is known by name; unknown means SD1."""
    from trainers import families
    demo = families.demo_of(getattr(cfg, "model", ""))
    record = demo or families.get(family or "sd1")
    unet, text, vae = record.params
    memory = record.memory or _scaled(unet)
    frozen = cfg.frozen_dtype()
    half = 2 if frozen in ("bf16", "fp16", "fp8") else 4
    # fp8: the denoiser's Linear / conv weights (nearly all of it) in 1 byte, the rest in bf16
    vae_bytes = vae * (2 if frozen in ("bf16", "fp8") else 4)
    weights = unet * (1 if frozen == "fp8" else half) + text * half + vae_bytes
    # what the steps never read waits off the device (trainers/offload.py) and comes back for
    # caching, a caption not seen yet and previews, while no activations are held
    away = {"vae": vae_bytes, "text_encoder": text * half}
    off_device = sum(away[name] for name in set(off_device_components(cfg)) & set(away))
    trainable = cfg.trainable_parameters(unet, text, memory.lora_per_rank)
    optimizer = OPTIMIZER_BYTES.get(getattr(cfg, "optimizer_type", "AdamW"), 8)
    resolution = getattr(cfg, "resolution", None) or max(getattr(cfg, "width", 512), getattr(cfg, "height", 512))
    batch = getattr(cfg, "train_batch_size", None) or getattr(cfg, "batch_size", 1)
    denoiser, text_part = memory.activations_256
    text_part = text_part if _text_in_backward(cfg) else 0
    if getattr(cfg, "gradient_checkpointing", False):
        if memory.checkpointed_256 is not None:
            denoiser = memory.checkpointed_256
        else:
            denoiser *= CHECKPOINTED_ACTIVATIONS
        text_part *= CHECKPOINTED_ACTIVATIONS
    tokens = IMAGE_TOKENS_256 * (resolution / 256) ** 2  # what the denoiser's cost follows
    grows = (tokens + memory.context_tokens) / (IMAGE_TOKENS_256 + memory.context_tokens)
    activations = batch * (denoiser * grows + text_part)
    if getattr(cfg, "mixed_precision", "no") in ("fp16", "bf16"):
        activations *= HALF_ACTIVATIONS
    gradients = trainable * 4
    if getattr(cfg, "full_bf16", False) or getattr(cfg, "full_fp16", False):
        # what trains is stored in bf16 / fp16, its gradients too
        weights -= (unet + (text if cfg.train_text_encoder else 0)) * 2
        gradients /= 2
    if getattr(cfg, "fused_backward_pass", False):
        gradients *= FUSED_GRADIENTS
    swapped = getattr(cfg, "blocks_to_swap", 0)
    if swapped:  # the swapped blocks' frozen weights wait in CPU memory, but those in flight
        blocks = swappable_count(cfg, family)
        weights -= unet * (1 if frozen == "fp8" else half) * parked_share(swapped, blocks)
    parts = {"weights": weights - off_device, "gradients": gradients,
             "optimizer": trainable * optimizer, "activations": activations}
    if off_device:
        parts[BETWEEN_STEPS] = max(0.0, off_device - gradients - activations)
    if getattr(cfg, "use_ema", False):
        parts["EMA"] = unet * 4
    return Estimate(parts)


def swappable_count(cfg, family: str | None) -> int:
    """How many blocks a block swap takes from (a demo model counts as its family)."""
    from trainers import families
    return SWAPPABLE_BLOCKS.get(families.demo_families().get(getattr(cfg, "model", ""))
                                or family or "sd1", 8)


def parked_share(swapped: int, blocks: int) -> float:
    """The share of the denoiser's weights off the device with `swapped` of `blocks` swapped:
    an even share per block, less the blocks in flight (the one running and, on CUDA, the next
    one copied ahead; trainers/block_swap.py)."""
    swapped = min(swapped, blocks - 1)
    return (swapped - min(swapped, IN_FLIGHT)) / blocks


def _scaled(unet: float):
    """SD 1.x's measured costs scaled to a denoiser of `unet` parameters."""
    from trainers import families
    sd1 = families.get("sd1").memory
    scale = unet / SD1_UNET_PARAMETERS
    return families.Memory(lora_per_rank=(sd1.lora_per_rank[0] * scale, sd1.lora_per_rank[1]),
                           activations_256=(sd1.activations_256[0] * scale,
                                            sd1.activations_256[1]))


def off_device_components(cfg) -> list[str]:
    """The components a job's steps never read (trainers/offload.py parks them): for LoRA,
    DreamBooth and fine-tuning the VAE (latents are cached) and the text encoders when their
    outputs are cached; the embedding methods keep everything."""
    if not hasattr(cfg, "text_outputs_cached"):
        return []
    trains = not cfg.network_train_unet_only if hasattr(cfg, "network_train_unet_only") \
        else bool(getattr(cfg, "train_text_encoder", False))
    return ["vae"] + (["text_encoder", "text_encoder_2"] if cfg.text_outputs_cached(trains)
                      else [])


def _text_in_backward(cfg) -> bool:
    """Whether the text encoder's activations are kept for backward (it trains, or an
    embedding trains through it)."""
    if hasattr(cfg, "network_train_unet_only"):  # pivotal tuning trains through it too
        return not cfg.network_train_unet_only or cfg.pivotal_tuning
    if hasattr(cfg, "train_text_encoder"):
        return bool(cfg.train_text_encoder)
    return hasattr(cfg, "embedding")


def estimate_for(cfg, paths) -> Estimate:
    """estimate() with the family of the model the config names, told without loading it."""
    from trainers.families import guess_family
    return estimate(cfg, guess_family(paths, getattr(cfg, "model", "")))
