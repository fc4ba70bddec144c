"""The `.optim` sidecar's size per method: computed for the SD1.5-shaped model from parameter
counts, and measured on the tiny demo model by training each method for 2 steps.

    python3 -m bench.sidecar_sizes

Computed (no weights are read: the modules are built on the meta device from
trainers/model_configs/sd1): AdamW (Danlu's default) keeps two fp32 tensors per trained parameter
(8 bytes; Lion or SGD with momentum one, 4 bytes; AdamW8bit about 2); saving in fp16 (the default) adds the fp32 master weights (4 bytes per parameter) of
what trains: the U-Net (and the text encoder when it trains) for DreamBooth and fine-tuning,
the LoRA factors for LoRA (textual inversion keeps none). Before #24 the DreamBooth /
fine-tune sidecar also held the frozen VAE and text encoder in fp32. The text encoder's token
embedding is kept in the master weights when the encoder trains, but not trained (no AdamW
state), as in diffusers' script. Pickle overhead and the step counters are left out.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LORA_RANK = 8  # LoraConfig's default network_dim
MASTER = 4  # bytes per parameter: fp32 master weights
# bytes of optimizer state per trained parameter
OPTIMIZERS = {"AdamW": 8, "Lion / SGD with momentum": 4, "AdamW8bit": 2}


def sd15_counts() -> dict[str, int]:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from trainers.lora_network import find_targets
    configs = ROOT / "trainers" / "model_configs" / "sd1"
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae"))
        te = CLIPTextModel(CLIPTextConfig.from_json_file(configs / "text_encoder" / "config.json"))

    def lora(module, part):
        total = 0
        for target in find_targets(module, part, conv=False):
            shape = module.get_submodule(target.path).weight.shape
            total += LORA_RANK * (shape[0] + shape[1:].numel())
        return total

    def count(module):
        return sum(p.numel() for p in module.parameters())
    return {"unet": count(unet), "text_encoder": count(te), "vae": count(vae),
            "token_embedding": te.get_input_embeddings().weight.numel(),
            "lora_unet": lora(unet, "unet"), "lora_te": lora(te, "text_encoder"),
            "ti_vector": te.get_input_embeddings().weight.shape[1]}


def computed_rows(c: dict[str, int], state: int) -> list[tuple[str, float, float | None]]:
    """(method, bytes now, bytes before #24 or None) with `state` bytes of optimizer state per
    trained parameter."""
    unet, te, vae = c["unet"], c["text_encoder"], c["vae"]
    te_trained = te - c["token_embedding"]
    every = MASTER * (unet + te + vae)
    lora = c["lora_unet"] + c["lora_te"]
    return [
        (f"LoRA, rank {LORA_RANK}, U-Net + text encoder", (state + MASTER) * lora, None),
        ("DreamBooth / fine-tune, U-Net only", (state + MASTER) * unet, every + state * unet),
        ("DreamBooth / fine-tune, U-Net + text encoder",
         MASTER * (unet + te) + state * (unet + te_trained), every + state * (unet + te_trained)),
        ("textual inversion, 1 vector", state * c["ti_vector"], None),  # no master copy
    ]


def measured_on_demo() -> list[tuple[str, int]]:
    """Each method 2 steps on the tiny demo, fp16 saves, default optimizer: .optim sizes."""
    from core.paths import Paths
    from tests.conftest import RecordingContext, photo
    from trainers import configs
    from trainers.methods import dreambooth, fine_tune, lora, textual_inversion
    from trainers.tiny_model import build_tiny_model

    root = Path(tempfile.mkdtemp(prefix="danlu-sidecars-"))
    try:
        paths = Paths(root).ensure()
        build_tiny_model(paths.cache / "tiny-demo")
        folder = root / "images" / "1_zxq dog"
        folder.mkdir(parents=True)
        for i in range(2):
            photo(i).save(folder / f"{i}.png")
            (folder / f"{i}.txt").write_text("a photo of zxq dog")
        (root / "meta.json").write_text(
            '{"%s": {"caption": "a photo of zxq dog"}, "%s": {"caption": "a photo of zxq dog"}}'
            % tuple(str((folder / f"{i}").resolve()) for i in range(2)))
        common = dict(model="tiny-demo", resolution=64, min_bucket_reso=32, max_bucket_reso=128,
                      bucket_reso_steps=16, max_train_steps=2, sample_at_first=False, seed=3)
        runs = [
            ("LoRA, rank 8, U-Net + text encoder", lora.run, configs.LoraConfig(
                output_name="l", train_data_dir=str(root / "images"), **common)),
            ("DreamBooth, U-Net only", dreambooth.run, configs.DreamBoothConfig(
                output_name="d", train_data_dir=str(folder), **common)),
            ("DreamBooth, U-Net + text encoder", dreambooth.run, configs.DreamBoothConfig(
                output_name="dt", train_data_dir=str(folder), train_text_encoder=True, **common)),
            ("fine-tune, U-Net only", fine_tune.run, configs.FineTuneConfig(
                output_name="f", train_data_dir=str(folder), in_json=str(root / "meta.json"),
                **common)),
        ]
        out = []
        for label, run, cfg in runs:
            path = run(cfg.validate(), RecordingContext(paths))
            out.append((label, path.with_name(path.name + ".optim").stat().st_size))
        # before #24: every module's fp32 copy (SD 1.x has no second text encoder)
        current = dreambooth.trained_modules
        dreambooth.trained_modules = lambda cfg, model: ("unet", "text_encoder", "vae")
        try:
            for label, run, cfg in runs[1:3]:
                cfg = configs.DreamBoothConfig(**{**cfg.__dict__, "output_name": "old-" + cfg.output_name})
                path = run(cfg.validate(), RecordingContext(paths))
                out.append((label + ", as before #24",
                            path.with_name(path.name + ".optim").stat().st_size))
        finally:
            dreambooth.trained_modules = current
        path = textual_inversion.run(configs.TextualInversionConfig(
            embedding="zxq", create_missing=True, init_text="dog", model="tiny-demo",
            data_root=str(folder), steps=2, width=64, height=64, save_every=0, preview_every=0,
            seed=3).validate(), RecordingContext(paths))
        out.append(("textual inversion, 1 vector", path.with_name(path.name + ".optim").stat().st_size))
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:.0f} B"


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    counts = sd15_counts()
    print("SD1.5-shaped, computed from parameter counts:", counts)
    print("| method | " + " | ".join(f"{name}: now / before #24" for name in OPTIMIZERS) + " |")
    print("|---|" + "---|" * len(OPTIMIZERS))
    table = {name: computed_rows(counts, state) for name, state in OPTIMIZERS.items()}
    for i, (label, _, _) in enumerate(table["AdamW"]):
        cells = [f"{_size(rows[i][1])} / {_size(rows[i][2]) if rows[i][2] else 'same'}"
                 for rows in table.values()]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("\nTiny demo, measured (2 steps, fp16 saves, AdamW):")
    for label, size in measured_on_demo():
        print(f"| {label} | {_size(size)} |")


if __name__ == "__main__":
    main()
