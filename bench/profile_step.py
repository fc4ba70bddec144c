"""Where a training step's time goes: the U-Net forward + backward alone, in one process, with
the LoRA module set of diffusers' script vs Danlu's (kohya's), alternating step by step so
both see the same load. Prints a table and `BENCH_JSON {...}`; a diagnostic for BENCHMARKS.md.

    python -m bench.profile_step [--kind sd15] [--steps 6] [--profile]

Variants (same model, same latents, same text context, batch 1, fp32):
  frozen        no adapter; backward to the context only (what textual inversion needs)
  script-lora   peft LoRA r4 on to_q/to_k/to_v/to_out.0 (train_dreambooth_lora.py's set)
  danlu-lora    Danlu's LoraNetwork r4 (kohya's set: attention, feed-forward, proj_in/out)
  danlu-lora-cl the same in channels-last memory format (with --channels-last)
plus the per-step cost of the `unet.device` / `unet.dtype` lookups Danlu's step makes (diffusers
walks every sub-module for each). `--profile` adds torch.profiler's top operators per variant.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import fixtures  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=sorted(fixtures.MODELS), default="sd15")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--channels-last", action="store_true",
                        help="add danlu-lora-cl: Danlu's LoRA U-Net and latents in channels-last "
                             "memory format")
    args = parser.parse_args(argv)

    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from trainers.lora_network import LoraNetwork, LoraSpec

    folder = fixtures.build_model(args.kind)
    res = fixtures.MODELS[args.kind].resolution

    def load():
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        unet.requires_grad_(False)
        unet.train()
        return unet

    # two copies (~3.4 GB each for sd15): one with Danlu's network, one with the script's adapter
    danlu_unet, script_unet = load(), load()
    network = LoraNetwork(danlu_unet, None, LoraSpec(rank=4, alpha=4, train_text_encoder=False))
    script_unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                       target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    script_params = [p for n, p in script_unet.named_parameters() if "lora" in n]
    for p in script_params:
        p.requires_grad_(True)
    torch.manual_seed(0)
    latents = torch.randn(1, 4, res // 8, res // 8)
    width = danlu_unet.config.cross_attention_dim
    timestep = torch.tensor([500])

    def step(unet, params, context_grad: bool, sample=None) -> float:
        context = torch.randn(1, 77, width, requires_grad=context_grad)
        started = time.perf_counter()
        out = unet(latents if sample is None else sample, timestep, context).sample
        loss = torch.nn.functional.mse_loss(out, torch.zeros_like(out))
        loss.backward()
        seconds = time.perf_counter() - started
        for p in params:
            p.grad = None
        return seconds

    def frozen():
        script_unet.disable_adapters()
        try:
            return step(script_unet, [], True)
        finally:
            script_unet.enable_adapters()

    def channels_last():
        danlu_unet.to(memory_format=torch.channels_last)
        try:
            return step(danlu_unet, network.parameters(), False,
                        latents.contiguous(memory_format=torch.channels_last))
        finally:
            danlu_unet.to(memory_format=torch.contiguous_format)

    variants = {"frozen": frozen,
                "script-lora": lambda: step(script_unet, script_params, False),
                "danlu-lora": lambda: step(danlu_unet, network.parameters(), False)}
    if args.channels_last:
        variants["danlu-lora-cl"] = channels_last
    for fn in variants.values():  # warm-up
        fn()
    times = {name: [] for name in variants}
    for _ in range(args.steps):  # alternate, so every variant sees the same load
        for name, fn in variants.items():
            times[name].append(fn())

    lookups = []
    for _ in range(5):
        started = time.perf_counter()
        _ = (danlu_unet.device, danlu_unet.dtype, danlu_unet.device, danlu_unet.dtype)
        lookups.append(time.perf_counter() - started)
    modules = sum(1 for _ in danlu_unet.modules())
    lora_params = {"script-lora": sum(p.numel() for p in script_params),
                   "danlu-lora": sum(p.numel() for p in network.parameters())}

    out = {"kind": args.kind, "resolution": res,
           "median_s": {name: statistics.median(values) for name, values in times.items()},
           "runs": times, "device_dtype_lookups_s": statistics.median(lookups),
           "modules_with_danlu_lora": modules, "lora_params": lora_params}
    print(f"U-Net forward+backward, {args.kind} at {res} px, median of {args.steps} "
          "(alternating):")
    for name, value in out["median_s"].items():
        print(f"  {name:12s} {value:7.3f} s   runs {', '.join(f'{v:.2f}' for v in times[name])}")
    print(f"  LoRA parameters: {lora_params}")
    print(f"  4 x unet.device/dtype with Danlu's LoRA ({modules} modules): "
          f"{1000 * out['device_dtype_lookups_s']:.1f} ms per step")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        for name, fn in variants.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
            print(f"\n== {name}\n{table}")
    print("BENCH_JSON " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
