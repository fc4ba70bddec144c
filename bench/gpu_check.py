"""The prepared GPU check: one short command for a session that is lent a GPU machine.

    python3 -m bench.gpu_check [--steps 20] [--sd15] [--json PATH]

It trains the built-in demo models on whatever device the engine picks (the first CUDA GPU when
there is one) — LoRA in fp32 / fp16 / bf16 mixed precision, fp8 base weights, block swap and
offloaded text encoders, the flow families' demos, textual inversion (also on fp8 base weights),
and DreamBooth (also with full_bf16 and the fused backward pass, with full_fp16 on CUDA, and of
Chroma's whole transformer) —
and prints, per case, the device, seconds per step after the first, the peak GPU memory, the
last loss and whether the saved file loads. `--sd15` adds a LoRA on a random SD1.5-shaped model
at 512 px (the real model's sizes, ~4 GB of weights built from configs), whose peak memory is
the figure the low-VRAM work moves. Every case runs on its own: one that fails prints why and
the rest go on. On a machine without CUDA it runs the same cases on the CPU (slowly at 512 px),
which is how the tests check the script itself. Record what it prints in BENCHMARKS.md with the
card's name."""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class CheckContext:
    """The engine's context: keeps losses and step times, never stops."""

    def __init__(self, paths):
        self.paths = paths
        self.losses: list[float] = []
        self.step_times: list[float] = []
        self.saved: list[str] = []

    def emit(self, event) -> None:
        from core import events as ev
        if isinstance(event, ev.Progress):
            self.step_times.append(time.perf_counter())
            if event.loss is not None:
                self.losses.append(float(event.loss))
        elif isinstance(event, ev.Saved):
            self.saved.append(event.path)

    def should_stop(self) -> bool:
        return False


def environment() -> dict:
    import torch
    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if info["cuda"]:
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1),
                    bf16=torch.cuda.is_bf16_supported(), cuda_version=torch.version.cuda)
    else:
        info["device"] = "cpu"
    return info


def make_images(folder: Path, size: int, count: int = 4, kohya: bool = False) -> Path:
    """Captioned pictures drawn with PIL (no downloads, no scikit-image)."""
    from PIL import Image, ImageDraw
    target = folder / "1_zxq dog" if kohya else folder
    target.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.new("RGB", (size, size), (40 * i, 120, 200 - 30 * i))
        draw = ImageDraw.Draw(image)
        draw.ellipse((size // 8 * (i + 1) // 2, size // 6, size * 3 // 4, size * 5 // 6),
                     fill=(250 - 40 * i, 60 + 30 * i, 90))
        image.save(target / f"img{i}.png")
        (target / f"img{i}.txt").write_text(f"zxq dog, shape {i}")
    return folder


def cases(steps: int, work: Path, sd15: bool) -> list[tuple[str, callable]]:
    from trainers.configs import DreamBoothConfig, LoraConfig, TextualInversionConfig
    kohya = make_images(work / "kohya", 64, kohya=True)
    plain = make_images(work / "plain", 64)
    lora = dict(model="tiny-demo", train_data_dir=str(kohya), resolution=64, min_bucket_reso=32,
                max_bucket_reso=128, bucket_reso_steps=16, network_dim=4, network_alpha=2.0,
                max_train_steps=steps, save_every_n_epochs=0, sample_at_first=False,
                learning_rate=1e-3, seed=7, save_precision="fp16")
    import torch
    precisions = ("no", "fp16", "bf16") if torch.cuda.is_available() else ("no", "bf16")  # fp16: CUDA only
    found = [(f"lora tiny {mp}", "lora", LoraConfig(output_name=f"check-{mp}", mixed_precision=mp,
                                                     **lora))
             for mp in precisions]
    found.append(("lora tiny flux bf16", "lora", LoraConfig(
        **{**lora, "model": "tiny-demo-flux", "network_train_unet_only": True,
           "mixed_precision": "bf16"}, output_name="check-flux")))
    found.append(("lora tiny zimage bf16", "lora", LoraConfig(
        **{**lora, "model": "tiny-demo-zimage", "network_train_unet_only": True,
           "mixed_precision": "bf16"}, output_name="check-zimage")))
    found.append(("lora tiny fp8 base", "lora", LoraConfig(
        **{**lora, "mixed_precision": "bf16", "fp8_base": True}, output_name="check-fp8")))
    found.append(("lora tiny bf16 block swap 2, TE cached (offloaded)", "lora", LoraConfig(
        **{**lora, "mixed_precision": "bf16", "blocks_to_swap": 2,
           "cache_text_encoder_outputs": True, "network_train_unet_only": True},
        output_name="check-swap")))
    found.append(("lora tiny flux bf16 block swap 1", "lora", LoraConfig(
        **{**lora, "model": "tiny-demo-flux", "network_train_unet_only": True,
           "mixed_precision": "bf16", "blocks_to_swap": 1}, output_name="check-flux-swap")))
    found.append(("lora tiny qwenimage bf16", "lora", LoraConfig(
        **{**lora, "model": "tiny-demo-qwenimage", "network_train_unet_only": True,
           "mixed_precision": "bf16"}, output_name="check-qwen")))
    found.append(("textual inversion tiny", "textual_inversion", TextualInversionConfig(
        model="tiny-demo", embedding="gpucheck", create_missing=True, init_text="dog",
        data_root=str(plain), width=64, height=64, steps=steps, save_every=0, preview_every=0,
        template="subject_filewords.txt", learn_rate="0.005", seed=3)))
    found.append(("textual inversion tiny fp8 base", "textual_inversion", TextualInversionConfig(
        model="tiny-demo", embedding="gpucheck-fp8", create_missing=True, init_text="dog",
        data_root=str(plain), width=64, height=64, steps=steps, save_every=0, preview_every=0,
        template="subject_filewords.txt", learn_rate="0.005", seed=3, mixed_precision="bf16",
        fp8_base=True)))
    if torch.cuda.is_available():  # fp16 compute: CUDA only
        found.append(("dreambooth tiny full_fp16 (loss scaling)", "dreambooth", DreamBoothConfig(
            model="tiny-demo", output_name="check-db-fp16", train_data_dir=str(kohya),
            resolution=64, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16,
            instance_prompt="a photo of zxq dog", max_train_steps=steps, learning_rate=1e-5,
            sample_at_first=False, save_precision="fp16", mixed_precision="fp16", seed=3,
            full_fp16=True)))
    found.append(("dreambooth tiny bf16", "dreambooth", DreamBoothConfig(
        model="tiny-demo", output_name="check-db", train_data_dir=str(kohya), resolution=64,
        min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16,
        instance_prompt="a photo of zxq dog", max_train_steps=steps, learning_rate=1e-5,
        sample_at_first=False, save_precision="fp16", mixed_precision="bf16", seed=3)))
    found.append(("dreambooth tiny full_bf16 + fused backward (Adafactor)", "dreambooth",
                  DreamBoothConfig(
        model="tiny-demo", output_name="check-db-fused", train_data_dir=str(kohya), resolution=64,
        min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16,
        instance_prompt="a photo of zxq dog", max_train_steps=steps, learning_rate=1e-5,
        sample_at_first=False, save_precision="fp16", mixed_precision="bf16", seed=3,
        optimizer_type="Adafactor", max_grad_norm=0.0, full_bf16=True, fused_backward_pass=True)))
    found.append(("dreambooth tiny chroma transformer, full_bf16 + fused, TE cached", "dreambooth",
                  DreamBoothConfig(
        model="tiny-demo-chroma", output_name="check-db-chroma", train_data_dir=str(kohya),
        resolution=64, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16,
        max_train_steps=steps, learning_rate=1e-5, sample_at_first=False, save_precision="bf16",
        mixed_precision="bf16", seed=3, optimizer_type="Adafactor", max_grad_norm=0.0,
        full_bf16=True, fused_backward_pass=True, gradient_checkpointing=True,
        cache_text_encoder_outputs=True)))
    if sd15:
        big = make_images(work / "kohya512", 512, kohya=True)
        found.append(("lora sd1.5-shaped 512px bf16", "lora", LoraConfig(
            **{**lora, "model": str(sd15_model()), "train_data_dir": str(big), "resolution": 512,
               "min_bucket_reso": 256, "max_bucket_reso": 1024, "bucket_reso_steps": 64,
               "network_dim": 16, "network_alpha": 8.0, "mixed_precision": "bf16",
               "gradient_checkpointing": True, "cache_latents_to_disk": False},
            output_name="check-sd15")))
    return found


def sd15_model() -> Path:
    from bench.fixtures import build_model
    return build_model("sd15")


def run_case(name: str, method: str, cfg, paths) -> dict:
    import torch

    from trainers import catalog
    result = {"case": name}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    ctx = CheckContext(paths)
    began = time.perf_counter()
    try:
        path = catalog.get(method).runner()(cfg.validate(), ctx)
        result["file"] = Path(path).name
        result["loads"] = _loads(method, Path(path))
    except Exception as error:  # noqa: BLE001 - a check reports every case
        result["error"] = f"{type(error).__name__}: {error}"
        result["trace"] = traceback.format_exc(limit=4)
    result["seconds"] = round(time.perf_counter() - began, 2)
    gaps = [b - a for a, b in zip(ctx.step_times, ctx.step_times[1:])]
    if gaps:
        result["s_per_step"] = round(sorted(gaps)[len(gaps) // 2], 4)
    if ctx.losses:
        result["last_loss"] = ctx.losses[-1]
        result["finite"] = all(math.isfinite(x) for x in ctx.losses)
    if torch.cuda.is_available():
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return result


def _loads(method: str, path: Path) -> bool:
    if method == "lora":
        from trainers.formats.lora import load_lora
        return bool(load_lora(path)[0])
    if method == "textual_inversion":
        from trainers.formats.embedding import load_embedding
        return load_embedding(path).vectors is not None
    from safetensors import safe_open
    with safe_open(str(path), "pt") as handle:
        return len(list(handle.keys())) > 0


def line(result: dict) -> str:
    if "error" in result:
        return f"{result['case']:<32} FAILED {result['error']}"
    parts = [f"{result['case']:<32}", f"{result.get('s_per_step', float('nan')):.4f} s/step",
             f"loss {result.get('last_loss', float('nan')):.4f}",
             "finite" if result.get("finite") else "NOT FINITE",
             "loads" if result.get("loads") else "DOES NOT LOAD"]
    if "peak_gib" in result:
        parts.append(f"peak {result['peak_gib']:.3f} GiB")
    return "  ".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="steps per case (default 20)")
    parser.add_argument("--sd15", action="store_true",
                        help="add a LoRA on a random SD1.5-shaped model at 512 px")
    parser.add_argument("--json", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps: at least 2 (the first step is not timed)")
    from core.malloc_tuning import prefer_huge_pages
    prefer_huge_pages()
    from core.paths import Paths
    env = environment()
    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="danlu-gpu-check-") as work:
        paths = Paths(Path(work) / "data").ensure()
        for name, method, cfg in cases(args.steps, Path(work), args.sd15):
            result = run_case(name, method, cfg, paths)
            results.append(result)
            print(line(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "results": results}, indent=2))
    failed = [r["case"] for r in results if "error" in r or not r.get("finite", True)]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
