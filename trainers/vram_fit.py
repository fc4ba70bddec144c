"""'Fit my GPU' (#19 item 6): the cheapest memory options that bring a job's estimated peak
(trainers/memory_estimate.py) under a card's memory, tried in order from the one that costs the
least quality or speed, each kept only if it changes something. Torch-free: the page asks
`nvidia-smi` for the card when the user picks *detect*."""
from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import subprocess

from trainers.memory_estimate import GB, estimate_for, size_text, swappable_count

CHOICES = {"8 GB": 8, "12 GB": 12, "16 GB (Colab T4)": 16, "24 GB": 24}
DETECT = "detect"
HEADROOM = 0.9  # the CUDA context, cuDNN workspaces and fragmentation take the rest


class FitError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Card:
    name: str
    gigabytes: float
    bf16: bool  # Ampere (compute capability 8) or newer: bf16 runs natively


def card_for(choice: str) -> Card:
    """The card a picker choice means; *detect* asks nvidia-smi (FitError when there is none)."""
    if not isinstance(choice, str):
        raise FitError(f"vram: choose one of {', '.join([*CHOICES, DETECT])}")
    if choice in CHOICES:
        gigabytes = CHOICES[choice]
        # a T4 (Turing) has no native bf16; the other sizes are taken as recent cards
        return Card(choice, gigabytes, bf16="T4" not in choice)
    if choice != DETECT:
        raise FitError(f"vram: {choice!r} is not one of {', '.join([*CHOICES, DETECT])}")
    return detect()


def detect() -> Card:
    if shutil.which("nvidia-smi") is None:
        raise FitError("vram: no NVIDIA GPU found (nvidia-smi is missing); pick the card's size")
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,compute_cap",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=20, check=True).stdout.strip().splitlines()[0]
        name, megabytes, capability = (part.strip() for part in out.split(","))
        return Card(name, float(megabytes) / 1024, bf16=float(capability) >= 8.0)
    except (subprocess.SubprocessError, OSError, ValueError, IndexError) as error:
        raise FitError(f"vram: could not read the GPU from nvidia-smi ({error}); pick the "
                       "card's size") from None


def _steps(cfg, card: Card, flow: bool) -> list[tuple[dict, str]]:
    """(changes, why) in the order they are tried."""
    half = "bf16" if card.bf16 or flow else "fp16"
    steps = [({"mixed_precision": half},
              f"{half} mixed precision: half the activations"
              + (" and of the frozen weights" if hasattr(cfg, "network_dim") else ""))]
    if getattr(cfg, "pivotal_tuning", False):  # token vectors train through the text encoder
        steps.append(({"network_train_unet_only": True},
                      "U-Net only: no text-encoder LoRA (its outputs are not cached: the new "
                      "token's vectors train through it)"))
    elif hasattr(cfg, "network_train_unet_only"):
        steps.append(({"network_train_unet_only": True, "cache_text_encoder_outputs": True},
                      "U-Net only with the text encoder's outputs cached: no text-encoder "
                      "activations or LoRA"))
    if hasattr(cfg, "train_text_encoder"):
        steps.append(({"train_text_encoder": False}, "the text encoder stays frozen"))
    steps.append(({"gradient_checkpointing": True},
                  "gradient checkpointing: most activations recomputed instead of kept "
                  "(a U-Net keeps a quarter, a flow transformer a twentieth), ~20-30 % slower"))
    whole = hasattr(cfg, "fused_backward_pass") and half == "bf16"  # DreamBooth, fine-tune
    if whole and cfg.gradient_accumulation_steps == 1:
        # kohya's way to fit full fine-tuning: no gradients for the whole model at once
        steps.append(({"fused_backward_pass": True, "optimizer_type": "Adafactor",
                       "max_grad_norm": 0.0, "on_nan": "stop"},
                      "the fused backward pass with Adafactor: no whole-model gradients, "
                      "factored optimizer state (no gradient clipping)"))
    elif importlib.util.find_spec("bitsandbytes") is not None:
        steps.append(({"optimizer_type": "AdamW8bit"}, "AdamW8bit: a quarter of the optimizer "
                                                       "state (bitsandbytes)"))
    if whole:
        steps.append(({"full_bf16": True}, "full bf16: the trained weights and gradients in "
                                           "bf16, each step rounded stochastically"))
    elif hasattr(cfg, "full_fp16") and half == "fp16":  # a card without bf16 (a T4)
        steps.append(({"full_fp16": True}, "full fp16: the trained weights and gradients in "
                                           "fp16 with loss scaling, each step rounded "
                                           "stochastically"))
    if hasattr(cfg, "fp8_base"):
        steps.append(({"fp8_base": True}, "fp8 base weights: the denoiser's weights in 8 bits"))
    steps.append(({"train_batch_size": 1}, "batch size 1"))
    return steps


def fit(cfg, paths, card: Card) -> tuple[object, str]:
    """(the config with the options that fit, what was chosen and why). FitError saying what it
    would need when even every option leaves the estimate above the card."""
    from trainers import families
    family = families.guess_family(paths, getattr(cfg, "model", "")) or "sd1"
    flow = families.get(family).prediction == "flow"
    budget = card.gigabytes * GB * HEADROOM
    total = estimate_for(cfg, paths).total
    chosen = []
    for changes, why in _steps(cfg, card, flow):
        if total <= budget:
            break
        changes = {k: v for k, v in changes.items() if getattr(cfg, k) != v}
        if not changes:
            continue
        cfg = dataclasses.replace(cfg, **changes)
        total = estimate_for(cfg, paths).total
        chosen.append(why)
    if total > budget and getattr(cfg, "blocks_to_swap", None) == 0:
        cfg, total, why = _swap_blocks(cfg, paths, family, budget)
        chosen.append(why)
    if total > budget:
        scaled = "" if families.get(family).memory else (
            f" ({families.get(family).label}'s activations are scaled from SD 1.x's, not "
            "measured yet)")
        advice = "lower the resolution or the batch" + (
            "" if hasattr(cfg, "network_dim") else ", or train a LoRA")
        raise FitError(f"vram: even with {', '.join(chosen) or 'every option'}, the estimate is "
                       f"{size_text(total)}{scaled}, more than {card.name} holds; {advice}")
    kept = f"chose {'; '.join(chosen)}" if chosen else "the settings fit as they are"
    return cfg, (f"Fits {card.name}: {kept}. Estimated peak {size_text(total)} of "
                 f"{size_text(card.gigabytes * GB)}.")


def _swap_blocks(cfg, paths, family: str, budget: float) -> tuple[object, float, str]:
    """The last step, when nothing else fits (LoRA): the fewest denoiser blocks swapped in from
    CPU memory that bring the estimate under `budget`, or all but one when none does."""
    from trainers import families
    blocks = swappable_count(cfg, family)
    before = estimate_for(cfg, paths).parts["weights"]
    for count in range(1, blocks):
        swapped = dataclasses.replace(cfg, blocks_to_swap=count)
        total = estimate_for(swapped, paths).total
        if total <= budget:
            break
    saved = before - estimate_for(swapped, paths).parts["weights"]
    label = families.get(families.demo_families().get(getattr(cfg, "model", "")) or family).label
    return swapped, total, (
        f"block swap: the frozen weights of the last {count} of {label}'s {blocks} denoiser "
        f"blocks wait in CPU memory and each is copied in as it runs ({size_text(saved)} "
        "less on the card; slower steps)")
