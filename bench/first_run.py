"""A newcomer's first textual-inversion run on the built-in demo model, timed.

    python3 -m bench.first_run               # at the size the Train tab picks for tiny-demo
    python3 -m bench.first_run --size 512    # at the form's size for a real model (before)
    python3 -m bench.first_run --profile     # also the top operators of one training step

What it times is what the page does after *Create embedding* and *Train* with the form's
defaults, 40 steps and a preview every 10: build the demo model (as on first use), create an
embedding, train on 4 images of 512 px (drawn here, so only the README's install is needed;
resized by the trainer as a user's photos would be). Everything runs in this process, in a fresh temporary data folder.
Prints one line per phase and `FIRST_RUN {json}` at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STEPS, PREVIEW_EVERY = 40, 10


class TimingContext:
    """A job context that keeps when each step and preview ended."""

    def __init__(self, paths):
        self.paths = paths
        self.steps: list[float] = []
        self.previews: list[float] = []
        self.result = None

    def emit(self, event) -> None:
        from core import events as ev
        if isinstance(event, ev.Progress):
            self.steps.append(time.perf_counter())
        elif isinstance(event, ev.Preview):
            self.previews.append(time.perf_counter())
        elif isinstance(event, (ev.Finished, ev.Failed)):
            self.result = event

    def should_stop(self) -> bool:
        return False


def draw_dataset(folder: Path, count: int = 4, size: int = 512) -> Path:
    """`count` captioned images of `size` px: smooth colour fields with a few shapes."""
    import numpy as np
    from PIL import Image, ImageDraw
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    ramp = np.linspace(0.0, 1.0, size)
    for index in range(count):
        low, high = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        field = low + (high - low) * (ramp[:, None, None] + ramp[None, :, None]) / 2
        image = Image.fromarray(field.astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(5):
            x, y = rng.integers(0, size - 64, 2)
            draw.ellipse([int(x), int(y), int(x) + 64, int(y) + 64],
                         fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        image.save(folder / f"{index:02}.png")
        (folder / f"{index:02}.txt").write_text("shapes", encoding="utf-8")
    return folder


def first_run(folder: Path, size: int | None) -> dict:
    import torch
    from core.paths import Paths
    from trainers.configs import CreateEmbeddingConfig, TextualInversionConfig
    from trainers.embeddings import create_embedding
    from trainers.methods.textual_inversion import run
    from trainers.models import load_model
    from trainers.tiny_model import DEMO_NAME, demo_size

    size = size or demo_size(DEMO_NAME)
    paths = Paths(folder / "data").ensure()
    photos = draw_dataset(folder / "photos")
    started = time.perf_counter()
    load_model(paths, DEMO_NAME)  # builds the demo model as the page does on first use
    built = time.perf_counter()
    create_embedding(CreateEmbeddingConfig(name="firstrun", init_text="photo",
                                           model=DEMO_NAME).validate(), paths)
    cfg = TextualInversionConfig(model=DEMO_NAME, embedding="firstrun", data_root=str(photos),
                                 width=size, height=size, steps=STEPS,
                                 save_every=PREVIEW_EVERY, preview_every=PREVIEW_EVERY).validate()
    ctx = TimingContext(paths)
    trained_from = time.perf_counter()
    run(cfg, ctx)
    done = time.perf_counter()
    from core import events as ev
    if not isinstance(ctx.result, ev.Finished):
        raise SystemExit(f"the run did not finish: {ctx.result}")
    gaps = [b - a for a, b in zip(ctx.steps, ctx.steps[1:])]
    plain = sorted(gaps)[:max(1, len(gaps) - len(ctx.previews))]  # steps without a preview
    return {"size": size, "steps": STEPS, "previews": len(ctx.previews),
            "threads": torch.get_num_threads(),
            "total_s": round(done - started, 2), "model_s": round(built - started, 2),
            "to_first_step_s": round(ctx.steps[0] - trained_from, 2),
            "step_s_median": round(sorted(plain)[len(plain) // 2], 4),
            "preview_s": round((sum(gaps) - sum(plain)) / max(1, len(ctx.previews)), 3),
            "load_average": round(os.getloadavg()[0], 2)}


def profile_step(folder: Path, size: int, rows: int = 12) -> str:
    """The operators of one demo U-Net training step at `size` px, by total CPU time."""
    import torch
    from core.paths import Paths
    from trainers.models import load_model
    from trainers.tiny_model import DEMO_NAME
    model = load_model(Paths(folder / "data").ensure(), DEMO_NAME)
    latents = torch.randn(1, 4, size // 8, size // 8)
    context = torch.randn(1, 77, model.unet.config.cross_attention_dim)
    model.unet.requires_grad_(False)
    context.requires_grad_(True)  # gradients flow back to the prompt, as in textual inversion
    for _ in range(2):
        model.unet(latents, 500, context).sample.pow(2).mean().backward()
    with torch.profiler.profile() as prof:
        model.unet(latents, 500, context).sample.pow(2).mean().backward()
    return prof.key_averages().table(sort_by="cpu_time_total", row_limit=rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=None,
                        help="training size in px (default: the Train tab's size for tiny-demo)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: the app's training worker's, all CPUs but one)")
    parser.add_argument("--profile", action="store_true",
                        help="print the operators of one training step at that size")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from core.malloc_tuning import tune_malloc
    from core.worker_process import worker_threads
    tune_malloc()  # as the app's training worker does
    import torch
    torch.set_num_threads(args.threads or worker_threads())
    with tempfile.TemporaryDirectory(prefix="danlu-first-run-") as tmp:
        result = first_run(Path(tmp), args.size)
        for key, value in result.items():
            print(f"{key:>16}: {value}")
        if args.profile:
            print(profile_step(Path(tmp), result["size"]))
    print("FIRST_RUN " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
