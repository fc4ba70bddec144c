"""python -m preprocess --config prep.toml [--set key=value ...] [--resume] [--print-config]
python -m preprocess check FOLDER [--resolution 512] [--max-token-length 75] [--tokenizer DIR]

Runs the same `run()` as the Preprocess tab with a console context: a progress bar, status lines
and the summary at the end. Ctrl-C once stops after the current image (a VLM stops inside its
generation; that batch is captioned again by a run with --resume); twice aborts. `check`
prints the dataset check of a training folder (preprocess/dataset_check.py), as the dataset
editor's Check button does."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from core import events as ev
from core.config import ConfigError, load_toml, to_toml
from core.paths import REPO_DIR, Paths


class ConsoleContext:
    def __init__(self, paths: Paths, quiet: bool = False, stream=None):
        self.paths = paths
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.stop = threading.Event()
        self._bar = None

    def emit(self, event) -> None:
        if isinstance(event, ev.Progress):
            if self.quiet:
                return
            if self._bar is None:
                from tqdm import tqdm
                self._bar = tqdm(total=event.total, unit="img", file=self.stream,
                                 desc="preprocess", dynamic_ncols=True)
            self._bar.update(event.step - self._bar.n)
        elif isinstance(event, ev.Status):
            if not self.quiet:
                self._write(event.text)
        elif isinstance(event, ev.Finished):
            self._close()
            print(event.message, file=sys.stdout)
        elif isinstance(event, ev.Failed):
            self._close()
            self._write(f"error: {event.message}")

    def _write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream)

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def should_stop(self) -> bool:
        return self.stop.is_set()


def _absolute(text: str) -> str:
    """Paths typed on the command line or in the TOML are relative to the working folder."""
    if not text.strip():
        return text
    path = Path(text.strip()).expanduser()
    return str(path if path.is_absolute() else Path.cwd() / path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m preprocess", description=(
        "Crop, resize, split, flip and caption a folder of images into a training dataset."))
    parser.add_argument("--config", help="TOML file with PreprocessConfig settings")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override one setting (repeatable)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resulting settings as TOML and exit")
    parser.add_argument("--data-dir", default=os.environ.get("DANLU_DATA_DIR", str(REPO_DIR)),
                        help="folder holding models/ (default: $DANLU_DATA_DIR or the repo)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or status lines")
    parser.add_argument("--resume", action="store_true",
                        help="skip outputs already captioned in the destination (skip_existing): "
                        "continue a stopped run with the same settings")
    return parser.parse_args(argv)


def check_main(argv) -> int:
    from preprocess.dataset_check import TOKEN_LIMITS, check_dataset
    parser = argparse.ArgumentParser(prog="python -m preprocess check", description=(
        "Report what in a training folder (flat, or kohya <repeats>_<tokens> sub-folders) will "
        "hurt a run: small images, near-duplicates, missing, empty or over-long captions, and "
        "the most frequent tags."))
    parser.add_argument("folder", help="the training folder")
    parser.add_argument("--resolution", type=int, nargs="+", default=[512], metavar="PX",
                        help="training resolution: one size, or width height (default 512)")
    parser.add_argument("--max-token-length", type=int, default=75, choices=TOKEN_LIMITS,
                        help="the trainer's max_token_length (default 75)")
    parser.add_argument("--tokenizer", help="a CLIP tokenizer folder or a diffusers model "
                        "folder (default: CLIP's vocabulary from the openai-clip package)")
    parser.add_argument("--caption-extension", default=".txt")
    parser.add_argument("--top", type=int, default=20, help="how many frequent tags to list")
    args = parser.parse_args(argv)
    if len(args.resolution) > 2:
        parser.error("--resolution: give one size or width and height")
    resolution = tuple(args.resolution * 2)[:2]
    try:
        report = check_dataset(_absolute(args.folder), resolution, args.max_token_length,
                               _absolute(args.tokenizer) if args.tokenizer else None,
                               args.caption_extension, top=args.top)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report.text())
    return 0


def main(argv=None) -> int:
    from preprocess.config import PreprocessConfig
    from preprocess.pipeline import run

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["check"]:
        return check_main(argv[1:])
    args = parse_args(argv)
    overrides = args.overrides + (["skip_existing=true"] if args.resume else [])
    try:
        cfg = load_toml(PreprocessConfig, args.config, overrides)
    except ConfigError as error:
        print(error.user_message, file=sys.stderr)
        return 2
    if args.print_config:
        sys.stdout.write(to_toml(cfg))
        return 0
    cfg.source, cfg.destination = _absolute(cfg.source), _absolute(cfg.destination)
    ctx = ConsoleContext(Paths(Path(args.data_dir).expanduser().absolute()), quiet=args.quiet)

    def interrupt(signum, frame):
        if ctx.stop.is_set():
            raise KeyboardInterrupt
        ctx.stop.set()
        ctx._write("stopping after the current image (Ctrl-C again to abort)")

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        run(cfg, ctx)
    except ConfigError as error:
        ctx._close()
        print(error.user_message, file=sys.stderr)
        return 2
    except Exception as error:
        message = getattr(error, "user_message", None)
        if message is None:
            raise
        ctx.emit(ev.Failed(message=message))
        return 1
    finally:
        signal.signal(signal.SIGINT, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
