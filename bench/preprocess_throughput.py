"""Preprocess throughput: images/s of `preprocess.pipeline.run` (crop-and-resize to 512 x 512 +
flipped copy + captions) against a plain single-process PIL loop doing the same work (open,
convert to RGB, crop-and-resize to 512, save PNG + caption, mirror, save PNG + caption).

The sources are scikit-image's sample photos resized to 512 px on the short side (JPEG, q95),
cycled to the requested count, each with a caption file. The two are run alternately
(A, B, A, B, ...) in one process after one untimed warm-up of each, into fresh folders; the
table gives the median images/s (source images per second) of each and their ratio.

    python3 -m bench.preprocess_throughput                 # 40 images, 3 rounds, BENCHMARKS.md
    python3 -m bench.preprocess_throughput --no-write      # print only
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SAMPLES = ["astronaut", "coffee", "chelsea", "rocket", "retina", "immunohistochemistry",
           "hubble_deep_field", "camera"]
SIZE = 512
HEADING = "## Preprocess throughput"
COMMAND = "python3 -m bench.preprocess_throughput"


def make_sources(folder: Path, count: int = 40, short_side: int = SIZE) -> Path:
    """`count` JPEG photos (short side `short_side`) with `<stem>.txt` captions."""
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    photos = []
    for name in SAMPLES:
        image = Image.fromarray(getattr(data, name)()).convert("RGB")
        scale = short_side / min(image.size)
        photos.append((name, image.resize((round(image.width * scale),
                                           round(image.height * scale)), Image.LANCZOS)))
    for i in range(count):
        name, image = photos[i % len(photos)]
        image.save(folder / f"{i:03}-{name}.jpg", quality=95)
        (folder / f"{i:03}-{name}.txt").write_text(f"sks, {name}, photo", encoding="utf-8")
    return folder


class _Recorder:
    """What a job context does with events (keeps them), without a UI."""
    paths = None

    def __init__(self):
        self.events = []

    def emit(self, event) -> None:
        self.events.append(event)

    def should_stop(self) -> bool:
        return False


def run_pipeline(source: Path, destination: Path, size: int = SIZE) -> int:
    from preprocess.config import PreprocessConfig
    from preprocess.pipeline import run
    cfg = PreprocessConfig(source=str(source), destination=str(destination), width=size,
                           height=size, flip=True, existing_caption="copy")
    summary = run(cfg, _Recorder())
    return len(summary.written)


def run_plain(source: Path, destination: Path, size: int = SIZE) -> int:
    """The baseline: one process, one loop, plain PIL."""
    from PIL import Image, ImageOps
    destination.mkdir(parents=True, exist_ok=True)
    written = 0
    files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() != ".txt")
    for index, file in enumerate(files):
        caption_file = file.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.exists() else ""
        with Image.open(file) as opened:
            image = opened.convert("RGB")
        image = ImageOps.fit(image, (size, size), Image.LANCZOS)
        for sub, output in enumerate((image, ImageOps.mirror(image))):
            out = destination / f"{index:05}-{sub}-{file.stem}.png"
            output.save(out, format="PNG")
            if caption:
                out.with_suffix(".txt").write_text(caption, encoding="utf-8")
            written += 1
    return written


def _timed(fn, source: Path, destination: Path) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process, images written)."""
    if destination.exists():
        shutil.rmtree(destination)
    start, cpu = time.perf_counter(), time.process_time()
    written = fn(source, destination)
    return time.perf_counter() - start, time.process_time() - cpu, written


def measure(images: int = 40, rounds: int = 3, workdir: Path | None = None) -> dict:
    """Alternate pipeline (A) and plain loop (B) `rounds` times; images/s per run and medians."""
    own = workdir is None
    work = Path(tempfile.mkdtemp(prefix="danlu-bench-")) if own else Path(workdir)
    try:
        source = make_sources(work / "source", images)
        contenders = {"pipeline": run_pipeline, "plain": run_plain}
        for name, fn in contenders.items():  # warm-up: imports, page cache
            _timed(fn, source, work / f"warm-{name}")
        rates: dict[str, list[float]] = {name: [] for name in contenders}
        cpu_ms: dict[str, list[float]] = {name: [] for name in contenders}
        outputs = {}
        for _ in range(rounds):
            for name, fn in contenders.items():
                seconds, cpu, written = _timed(fn, source, work / f"out-{name}")
                rates[name].append(images / seconds)
                cpu_ms[name].append(1000 * cpu / images)
                outputs[name] = written
        medians = {name: statistics.median(values) for name, values in rates.items()}
        cpu_medians = {name: statistics.median(values) for name, values in cpu_ms.items()}
        return {"images": images, "rounds": rounds, "rates": rates, "medians": medians,
                "cpu_ms": cpu_ms, "cpu_medians": cpu_medians, "outputs": outputs,
                "ratio": medians["pipeline"] / medians["plain"],
                "cpu_ratio": cpu_medians["plain"] / cpu_medians["pipeline"]}
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def machine() -> dict[str, str]:
    import numpy
    import PIL
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return {"nproc": str(usable), "cpu": cpu, "load": load, "python": platform.python_version(),
            "pillow": PIL.__version__, "numpy": numpy.__version__,
            "os": f"{platform.system()} {platform.release()}"}


def markdown(result: dict, info: dict[str, str], command: str = COMMAND) -> str:
    med, rates, cpu = result["medians"], result["rates"], result["cpu_medians"]

    def runs(name):
        return ", ".join(f"{r:.2f}" for r in rates[name])

    lines = [
        HEADING, "",
        f"`{command}` — {result['images']} scikit-image sample photos (512 px short side, JPEG) "
        "-> 512 x 512 crop-and-resize + flipped copy, PNG + caption for each "
        f"({result['outputs']['pipeline']} images out); pipeline and plain loop run alternately, "
        f"{result['rounds']} rounds after one untimed warm-up each, in one process.",
        "",
        "| | median images/s (wall) | runs (images/s) | median CPU ms / image |",
        "|---|---:|---|---:|",
        f"| `preprocess.pipeline.run` | {med['pipeline']:.2f} | {runs('pipeline')} | "
        f"{cpu['pipeline']:.0f} |",
        f"| plain PIL loop (baseline) | {med['plain']:.2f} | {runs('plain')} | "
        f"{cpu['plain']:.0f} |",
        f"| **ratio pipeline / plain** | **{result['ratio']:.2f}** | | "
        f"**{result['cpu_ratio']:.2f}** (throughput by CPU time) |",
        "",
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), {info['os']}; Python {info['python']}, "
        f"Pillow {info['pillow']}, numpy {info['numpy']}; load average at the end "
        f"{info['load']} (1/5/15 min; other work on the machine slows both sides alike, "
        "which the alternation and the ratio allow for; the CPU time per image depends much less on it"
        "). Both are single-process; images/s counts source images; each source "
        "image costs two PNG encodes (zlib level 6), which dominate both.",
        "",
    ]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Replace the section under HEADING in `path` (or append it); other sections are kept."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.strip() == HEADING), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                   len(lines))
        tail = "".join(lines[end:])
        new = "".join(lines[:start]) + section + ("\n" + tail if tail else "")
    path.write_text(new, encoding="utf-8")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"),
                        help="Markdown file whose 'Preprocess throughput' section is replaced")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    result = measure(args.images, args.rounds)
    command = COMMAND
    if args.images != 40 or args.rounds != 3:
        command += f" --images {args.images} --rounds {args.rounds}"
    section = markdown(result, machine(), command)
    print(section)
    if not args.no_write:
        write_section(Path(args.output), section)
        print(f"written to {args.output}")


if __name__ == "__main__":
    main()
