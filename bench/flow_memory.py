"""What a LoRA step of each flow-matching family (and SDXL) costs at its published width,
measured on the CPU without the full model (#20 item 6): the family's demo folder with its
transformer replaced by the published shape cut to one block of each kind, then to two of one
kind, each run through `--memory-report`'s one measured step (trainers/memory_report.py) at
256 px with the text encoder's outputs cached. The differences give each kind of block's
activations; the published block counts sum them to the real depth. SDXL's U-Net runs whole at
its published shape. The trained parameters per rank are counted exactly on the published
shape built on the meta device.

    python3 -m bench.flow_memory [--families flux1,zimage] [--json out.json]
    python3 -m bench.flow_memory --table

prints, per family, the `Memory` record its module registers and the one-block figures; with
--table, the estimate those records give for settings other trainers document.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

RANK = 16


def lora_parameters_per_rank(family: str) -> float:
    """Trained LoRA parameters per unit of rank on the published shape: every target Linear of
    the family's layout adds (in + out) per rank (q / k / v train as their own Linears)."""
    from trainers import families
    from trainers.published_shapes import shape
    from torch import nn
    denoiser = shape(family).build("meta")
    layout = families.get(family).hook("lora_layout")
    modules = [denoiser.get_submodule(t.path) for t in layout.denoiser_targets(denoiser, conv=False)]
    return float(sum(m.in_features + m.out_features if isinstance(m, nn.Linear)
                     else m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels
                     for m in modules))


def _write_model(demo: Path, target: Path, published, blocks: dict) -> None:
    """The demo folder with the published transformer cut to `blocks`, taking the demo text
    encoder's (narrow) outputs: the text-side input widths are the only change in shape."""
    import torch
    folder = "transformer" if (demo / "transformer").is_dir() else "unet"
    shutil.copytree(demo, target, ignore=shutil.ignore_patterns(folder))
    torch.manual_seed(0)
    demo_config = json.loads((demo / folder / "config.json").read_text())
    widths = {name: demo_config[name] for name in (published.context,) + published.extra_widths}
    if "addition_time_embed_dim" in published.config:  # SDXL: 6 size ids + the pooled text
        pooled = widths["projection_class_embeddings_input_dim"] \
            - 6 * demo_config["addition_time_embed_dim"]
        widths["projection_class_embeddings_input_dim"] = \
            6 * published.config["addition_time_embed_dim"] + pooled
    denoiser = published.with_changes(**blocks, **widths).build("cpu")
    denoiser.save_pretrained(target / folder, safe_serialization=True)
    del denoiser


def _config(model: str, images: Path, **changes):
    from trainers.configs import LoraConfig
    base = dict(model=model, output_name="memory", train_data_dir=str(images), resolution=256,
                min_bucket_reso=256, max_bucket_reso=256, bucket_reso_steps=64,
                network_dim=RANK, network_alpha=RANK, max_train_steps=1, save_every_n_epochs=0,
                sample_at_first=False, seed=0, network_train_unet_only=True,
                cache_text_encoder_outputs=True, train_batch_size=1)
    base.update(changes)
    return LoraConfig(**base).validate()


def _one_square_image(folder: Path) -> Path:
    from PIL import Image
    import numpy as np
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "one.png")
    (folder / "one.txt").write_text("a photo of a cat")
    return folder


def activations(paths, demo: Path, images: Path, published, blocks: dict) -> tuple[int, int]:
    """The activations of one measured LoRA step on the demo folder with `published` cut to
    `blocks`: plain, and with gradient checkpointing."""
    from trainers.memory_report import measure
    name = "flow-memory-" + "-".join(f"{v}" for v in blocks.values())
    target = paths.stable_diffusion / name
    shutil.rmtree(target, ignore_errors=True)
    _write_model(demo, target, published, blocks)
    try:
        return tuple(measure("lora", _config(name, images, gradient_checkpointing=checkpointing),
                             paths)["measured"]["activations"] for checkpointing in (False, True))
    finally:
        shutil.rmtree(target)


def measure_family(family: str, root: Path, published=None, report=print) -> dict:
    """Activations (fp32 bytes, one 256 px image) with one block of each kind ("base"), each
    kind's extra block ("per_block"), and the sum to the published depth ("activations_256");
    the same with gradient checkpointing under "checkpointed", whose total adds one block's
    plain activations: what its recomputation holds during the backward pass. `published`: a
    PublishedShape to measure instead of the family's own."""
    from core.paths import Paths
    from trainers.published_shapes import shape
    from trainers.tiny_model import build_tiny_model
    paths = Paths(root / "data", confine=False).ensure()
    demo = build_tiny_model(root / "demo", family=family)
    images = _one_square_image(root / "images")
    published = published or shape(family)
    kinds, counts = published.blocks, published.block_counts()
    layouts = [("base", {kind: 1 for kind in kinds})] + [
        (kind, {other: 2 if other == kind else 1 for other in kinds}) for kind in kinds]
    found = {False: {}, True: {}}
    for label, blocks in layouts:
        found[False][label], found[True][label] = activations(paths, demo, images, published,
                                                              blocks)
        report(f"{family} {label} {blocks}: activations {found[False][label] / 2 ** 20:.1f} MiB, "
               f"with checkpointing {found[True][label] / 2 ** 20:.1f} MiB")

    def summed(values: dict) -> dict:
        per_block = {kind: values[kind] - values["base"] for kind in kinds}
        # the first block of a kind may keep less (what comes before its first trained layer
        # needs no gradient), so the depth adds the second block's cost to the one-block run
        total = values["base"] + sum(per_block[kind] * (counts[kind] - 1) for kind in kinds)
        return {"base": values["base"], "per_block": per_block, "activations_256": total}
    plain, checkpointed = summed(found[False]), summed(found[True])
    checkpointed["held"] = checkpointed["activations_256"]
    # a transformer's one recomputed block; a U-Net, measured whole, reports what it holds
    checkpointed["activations_256"] += max(plain["per_block"].values(), default=0)
    return {**plain, "checkpointed": checkpointed}


# (family, settings over the common ones, what another trainer documents for the same)
DOCUMENTED = [
    ("flux1", dict(train_batch_size=2), "kohya sd-scripts (flux_train_network.md, fp8_base): "
     "24 GB, batch 2"),
    ("flux1", dict(blocks_to_swap=16), "kohya: 12 GB with blocks_to_swap 16 and AdamW8bit"),
    ("flux1", dict(blocks_to_swap=22), "kohya: 10 GB with blocks_to_swap 22"),
    ("flux1", dict(blocks_to_swap=28), "kohya: 8 GB with blocks_to_swap 28"),
    ("chroma", dict(blocks_to_swap=16), "kohya (Chroma shares Flux.1's settings): 12 GB"),
    ("flux2_klein", dict(), "the issue: 8 GB for Klein 9B with fp8 and offloading "
     "(musubi-tuner / OneTrainer); this is Klein 4B"),
    ("zimage", dict(), "the issue: 8 GB with fp8 and offloading (musubi-tuner / OneTrainer)"),
    ("qwen_image", dict(blocks_to_swap=30), "not documented at hand"),
]
COMMON = dict(resolution=1024, network_dim=16, network_alpha=16, mixed_precision="bf16",
              fp8_base=True, gradient_checkpointing=True, optimizer_type="AdamW8bit",
              network_train_unet_only=True, cache_text_encoder_outputs=True)


def table() -> str:
    """The estimate, with the measured Memory records, for settings other trainers document."""
    from trainers.configs import LoraConfig
    from trainers.memory_estimate import BETWEEN_STEPS, estimate
    rows = ["| family (published model) | settings over: LoRA r16, 1024 px, bf16, fp8 base, "
            "gradient checkpointing, AdamW8bit, text outputs cached, batch 1 | Danlu's estimate | "
            "weights on the device during the steps / activations / text encoders and VAE "
            "coming back between steps | documented elsewhere |", "|---|---|---|---|---|"]
    gb = 1024 ** 3
    for family, changes, documented in DOCUMENTED:
        cfg = LoraConfig(model="x", output_name="x", train_data_dir="x", **{**COMMON, **changes})
        parts = estimate(cfg, family).parts
        settings = ", ".join(f"{k} {v}" for k, v in changes.items()) or "—"
        rows.append(f"| {family} ({shape_name(family)}) | {settings} | "
                    f"**{sum(parts.values()) / gb:.1f} GB** | {parts['weights'] / gb:.1f} / "
                    f"{parts['activations'] / gb:.1f} / {parts.get(BETWEEN_STEPS, 0) / gb:.1f} GB "
                    f"| {documented} |")
    return "\n".join(rows)


def shape_name(family: str) -> str:
    from trainers.published_shapes import shape
    return shape(family).model


def main(argv=None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from trainers import families
    from trainers.published_shapes import SHAPES
    parser = argparse.ArgumentParser(prog="python3 -m bench.flow_memory", description=__doc__)
    parser.add_argument("--families", default=",".join(SHAPES))
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--table", action="store_true",
                        help="only print the estimates for settings other trainers document")
    args = parser.parse_args(argv)
    if args.table:
        print(table())
        return
    results = {}
    for family in args.families.split(","):
        with tempfile.TemporaryDirectory(prefix="danlu-flow-memory-") as folder:
            found = measure_family(family, Path(folder))
        found["lora_per_rank"] = lora_parameters_per_rank(family)
        results[family] = found
        sd1 = families.get("sd1").memory  # Flux.1's text-encoder LoRA is on CLIP-L, as SD 1.x's
        text_rank, text_part = (sd1.lora_per_rank[1], sd1.activations_256[1]) \
            if family == "flux1" else (0, 0)
        print(f"{family}: memory=Memory(lora_per_rank=({found['lora_per_rank']:.4g}, "
              f"{text_rank:.4g}), activations_256=({found['activations_256']:.4g}, "
              f"{text_part:.4g}), checkpointed_256={found['checkpointed']['activations_256']:.4g})",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
