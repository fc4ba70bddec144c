"""What the training loop's NaN/inf gradient check costs per optimizer step, before and after it
became one reduction per gradient read with the loss in one host sync (trainers/grad_check.py).

    python -m bench.grad_check_cost [--rounds 15] [--threads 1]

Gradient sets (random values, fp32): the tiny model's whole U-Net (what DreamBooth trains on
it), and the first ~100M parameters of the SD1.5 U-Net in its own layer order and shapes (the
shapes come from the shipped config on the meta device; only those grads are allocated).
Variants, alternated round by round so both see the same load:
  before        torch.isfinite(g).all() per gradient (a bool copy of each), stacked, then a
                host sync for the verdict and another for the loss
  after         trainers.grad_check: the total 2-norm of the gradients (one read-only
                reduction per gradient), read together with the loss in one copy
  before+clip   `before`, then clip_grad_norm_ (a second pass over every gradient)
  after+clip    clip_grad_norm_'s own total norm is the gauge (no pass of its own)
Prints a table and `BENCH_JSON {...}`; a diagnostic for BENCHMARKS.md.
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


def _shapes_sd15(limit: int) -> list[tuple[int, ...]]:
    import torch
    from diffusers import UNet2DConditionModel
    config = UNet2DConditionModel.load_config(ROOT / "trainers" / "model_configs" / "sd1" / "unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    shapes, total = [], 0
    for param in unet.parameters():
        if total >= limit:
            break
        shapes.append(tuple(param.shape))
        total += param.numel()
    return shapes


def _shapes_tiny() -> list[tuple[int, ...]]:
    from trainers.tiny_model import build_components
    return [tuple(p.shape) for p in build_components()[0].parameters()]


def _params(shapes):
    import torch
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        param = torch.nn.Parameter(torch.empty(shape), requires_grad=True)
        param.grad = torch.randn(shape, generator=generator) * 1e-3
        params.append(param)
    return params


def before(params, loss, clip: bool) -> None:
    import torch
    total = loss.item()
    grads = [p.grad for p in params if p.grad is not None]
    ok = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
    assert ok and total == total
    if clip:
        torch.nn.utils.clip_grad_norm_(params, 1e9)


def after(params, loss, clip: bool) -> None:
    from trainers import grad_check
    gauge, _ = grad_check.gauge(params, "norm" if clip else "disabled", 1e9)
    total, value = grad_check.read(loss, gauge)
    assert grad_check.verdict(total, value) is None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--params", type=int, default=100_000_000,
                        help="how many of the SD1.5 U-Net's parameters to allocate grads for")
    args = parser.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    loss = torch.tensor(0.1)
    sets = {"tiny U-Net (DreamBooth on tiny-demo)": _shapes_tiny(),
            f"SD1.5 U-Net, first {args.params / 1e6:.0f}M parameters": _shapes_sd15(args.params)}
    variants = {"before": (before, False), "after": (after, False),
                "before+clip": (before, True), "after+clip": (after, True)}
    out = {"threads": args.threads, "rounds": args.rounds, "sets": {}}
    for label, shapes in sets.items():
        params = _params(shapes)
        count = sum(p.numel() for p in params)
        times = {name: [] for name in variants}
        for fn, clip in variants.values():  # warm-up
            fn(params, loss, clip)
        for _ in range(args.rounds):
            for name, (fn, clip) in variants.items():
                started = time.perf_counter()
                fn(params, loss, clip)
                times[name].append(time.perf_counter() - started)
        medians = {name: statistics.median(values) for name, values in times.items()}
        out["sets"][label] = {"parameters": count, "tensors": len(params), "median_s": medians}
        print(f"{label}: {count / 1e6:.1f}M parameters in {len(params)} tensors, "
              f"{args.threads} thread(s), median of {args.rounds}:")
        for name, value in medians.items():
            print(f"  {name:12s} {1000 * value:9.2f} ms")
        del params
    print("BENCH_JSON " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
