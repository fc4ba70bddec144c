"""What every benchmark run trains on: the models (tiny, and SD1.5-shaped with random weights,
from configs only) and a small fixed dataset of real photos, in the layouts each side reads.

Models are cached outside the repo (`bench_cache()`, default ~/.cache/danlu-bench, or
$DANLU_BENCH_CACHE) because the SD1.5-shaped one is ~4.3 GB. Building one loads torch, so the
orchestrator runs `python -m bench.fixtures model KIND` in a child and stays light itself.

Dataset layouts (the same 4 photos, pre-cropped to a square at the training size, so neither
side's resize/crop code changes any pixel):
  images/            images only: diffusers' scripts open every file in the folder
  captioned/         images + <stem>.txt, for Danlu's textual inversion and hypernetwork
  kohya/1_sks dog/   images + <stem>.txt, kohya's repeats folder, for Danlu's LoRA/DreamBooth
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket"]
INSTANCE_PROMPT = "a photo of sks dog"
PLACEHOLDER = "<danlu-bench>"  # diffusers' TI script needs a token that is not in the vocabulary
INITIALIZER = "dog"
EMBEDDING_NAME = "danlubench"
HYPERNETWORK_NAME = "danlubench-hn"


@dataclass(frozen=True)
class ModelSpec:
    kind: str        # "tiny" or "sd15"
    resolution: int  # training size in pixels
    label: str       # for the report

    @property
    def folder_name(self) -> str:
        return {"tiny": "tiny-sd1", "sd15": "sd15-shaped-random", "flux": "flux-small-random"}[self.kind]


MODELS = {"tiny": ModelSpec("tiny", 64, "tiny SD1-shaped (64 px)"),
          "sd15": ModelSpec("sd15", 256, "SD1.5-shaped, random weights (256 px)"),
          "flux": ModelSpec("flux", 256, "small Flux.1-shaped, random weights (256 px)")}
FLUX_SMALL_NOTE = ("transformer 2 double + 4 single blocks, 256 wide (4 heads of 64), guidance "
                   "embedding; T5 256 wide, 2 layers; CLIP 256 wide; Flux's 16-channel VAE shape, "
                   "scale 8: 256 tokens per 256 px image")


def bench_cache() -> Path:
    return Path(os.environ.get("DANLU_BENCH_CACHE", Path.home() / ".cache" / "danlu-bench"))


def model_dir(kind: str) -> Path:
    return bench_cache() / "models" / MODELS[kind].folder_name


# ---------------------------------------------------------------- models (run in a child)

def build_sd15_shaped(folder: Path, seed: int = 0) -> Path:
    """An SD1.5-shaped diffusers folder from trainers/model_configs/sd1 with random weights."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from trainers.tokenizer_files import write_clip_tokenizer

    folder = Path(folder)
    if (folder / "model_index.json").exists():
        return folder
    configs = ROOT / "trainers" / "model_configs" / "sd1"
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet"))
    unet.save_pretrained(staging / "unet")
    del unet
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae"))
    vae.save_pretrained(staging / "vae")
    del vae
    text_encoder = CLIPTextModel(CLIPTextConfig.from_json_file(configs / "text_encoder" / "config.json"))
    text_encoder.save_pretrained(staging / "text_encoder")
    del text_encoder
    write_clip_tokenizer(staging / "tokenizer")
    shutil.copytree(configs / "scheduler", staging / "scheduler")
    shutil.copy(configs / "model_index.json", staging / "model_index.json")
    (staging / "BENCH_MODEL.txt").write_text(
        "SD1.5-shaped pipeline with random weights for Danlu's benchmark (configs only, no "
        "download). Its images are noise.\n")
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


def build_flux_small(folder: Path, seed: int = 0) -> Path:
    """A small Flux.1-shaped diffusers folder with random weights (FLUX_SMALL_NOTE), its
    tokenizers built locally as the Flux demo's are."""
    import torch
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    from trainers import families
    from trainers.tiny_model import T5_VOCAB, _clip_config, _flux_vae, _model_index, write_tokenizers

    folder = Path(folder)
    if (folder / "model_index.json").exists():
        return folder
    family = families.get("flux1")
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    torch.manual_seed(seed)
    parts = {
        "transformer": FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64,
            num_attention_heads=4, joint_attention_dim=256, pooled_projection_dim=256,
            guidance_embeds=True, axes_dims_rope=(8, 28, 28)),
        "vae": _flux_vae(),
        "text_encoder": CLIPTextModel(_clip_config(256, "quick_gelu")),
        "text_encoder_2": T5EncoderModel(T5Config(
            vocab_size=T5_VOCAB, d_model=256, d_kv=32, d_ff=512, num_layers=2, num_heads=8,
            relative_attention_num_buckets=32, feed_forward_proj="gated-gelu",
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)),
    }
    for name, part in parts.items():
        part.save_pretrained(staging / name)
    write_tokenizers(staging, family)
    (staging / "scheduler").mkdir()
    (staging / "scheduler" / "scheduler_config.json").write_text(json.dumps(family.demo.scheduler))
    (staging / "model_index.json").write_text(json.dumps(_model_index(family), indent=1))
    (staging / "BENCH_MODEL.txt").write_text(
        f"Small Flux.1-shaped pipeline with random weights for Danlu's benchmark: {FLUX_SMALL_NOTE}.\n")
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


def build_model(kind: str) -> Path:
    folder = model_dir(kind)
    if (folder / "model_index.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    if kind == "tiny":
        from trainers.tiny_model import build_tiny_model
        return build_tiny_model(folder)
    if kind == "flux":
        return build_flux_small(folder)
    return build_sd15_shaped(folder)


# ---------------------------------------------------------------- dataset (PIL + skimage only)

def sample_photos():
    """(name, image) of scikit-image's sample photos (scikit-image is in requirements-dev.txt)."""
    from PIL import Image
    from skimage import data
    for name in PHOTOS:
        yield name, Image.fromarray(getattr(data, name)())


def make_dataset(folder: Path, resolution: int, pictures=None) -> dict[str, Path]:
    """The three layouts of the same photos at `resolution`; returns their folders.
    `pictures`: (name, PIL image) pairs to use instead of sample_photos()."""
    from PIL import Image, ImageOps

    folder = Path(folder)
    layouts = {"images": folder / "images", "captioned": folder / "captioned",
               "kohya": folder / "kohya", "kohya_subset": folder / "kohya" / "1_sks dog"}
    marker = folder / "DONE"
    if marker.exists():
        return layouts
    shutil.rmtree(folder, ignore_errors=True)
    for key in ("images", "captioned", "kohya_subset"):
        layouts[key].mkdir(parents=True)
    for index, (name, photo) in enumerate(sample_photos() if pictures is None else pictures):
        photo = ImageOps.fit(photo.convert("RGB"), (resolution, resolution), Image.LANCZOS)
        stem = f"{index:02}-{name}"
        for key in ("images", "captioned", "kohya_subset"):
            photo.save(layouts[key] / f"{stem}.png")
        (layouts["captioned"] / f"{stem}.txt").write_text(name, encoding="utf-8")
        (layouts["kohya_subset"] / f"{stem}.txt").write_text(INSTANCE_PROMPT, encoding="utf-8")
    marker.write_text("ok")
    return layouts


# ---------------------------------------------------------------- Danlu's starting files

def pristine_dir(kind: str) -> Path:
    return bench_cache() / "pristine" / MODELS[kind].folder_name


def make_pristine_files(kind: str) -> Path:
    """An embedding and a hypernetwork at step 0 for `kind`'s model (training writes into its
    file, so every run starts from a fresh copy of these)."""
    from core.paths import Paths
    from trainers.configs import CreateEmbeddingConfig, CreateHypernetworkConfig
    from trainers.embeddings import create_embedding
    from trainers.hypernetworks import create_hypernetwork

    target = pristine_dir(kind)
    if (target / "DONE").exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    paths = Paths(target).ensure()
    if kind == "flux":  # LoRA only: no embedding or hypernetwork to start from
        (target / "DONE").write_text("ok")
        return target
    model = str(build_model(kind))
    create_embedding(CreateEmbeddingConfig(name=EMBEDDING_NAME, init_text=INITIALIZER,
                                           vectors_per_token=1, model=model).validate(), paths)
    sizes = [32, 64] if kind == "tiny" else [768, 320, 640, 1280]
    create_hypernetwork(CreateHypernetworkConfig(name=HYPERNETWORK_NAME, sizes=sizes,
                                                 model="").validate(), paths)
    (target / "DONE").write_text("ok")
    return target


def fresh_data_dir(kind: str, folder: Path) -> Path:
    """A Danlu data folder holding fresh copies of the step-0 embedding and hypernetwork."""
    source = pristine_dir(kind)
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    for sub in ("embeddings", "models/hypernetworks"):
        shutil.copytree(source / sub, folder / sub, dirs_exist_ok=True)
    for sub in ("models/Stable-diffusion", "models/Lora", "models/VAE", "outputs", ".cache"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    return folder


def prepare(kind: str) -> dict:
    """Model, pristine files and dataset for `kind`; JSON-able paths."""
    model = build_model(kind)
    make_pristine_files(kind)
    layouts = make_dataset(bench_cache() / "data" / f"photos-{MODELS[kind].resolution}",
                           MODELS[kind].resolution)
    return {"kind": kind, "model": str(model), "resolution": MODELS[kind].resolution,
            "data": {key: str(value) for key, value in layouts.items()}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Build the benchmark's models and data")
    parser.add_argument("kind", choices=sorted(MODELS))
    parser.add_argument("--json-line", action="store_true",
                        help="print `BENCH_JSON {...}` (for the orchestrator)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    text = json.dumps(prepare(args.kind))
    print(("BENCH_JSON " if args.json_line else "") + text, flush=True)


if __name__ == "__main__":
    main()
