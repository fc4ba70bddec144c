"""python -m trainers METHOD --config run.toml [--set key=value ...] [--print-config]

Under `accelerate launch` with several processes it trains data-parallel (trainers/distributed.py):
the main process prints progress and writes every file; the others print only their errors."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from core.config import ConfigError, load_toml, to_toml
from core.malloc_tuning import prefer_huge_pages
from core.paths import REPO_DIR, Paths
from trainers.configs import METHOD_CONFIGS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainers",
                                     description="Train an embedding, hypernetwork, LoRA or "
                                                 "DreamBooth model headless, with the app's code.")
    parser.add_argument("method", choices=sorted(METHOD_CONFIGS))
    parser.add_argument("--config", help="TOML file of settings (see --print-config)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting; repeatable")
    parser.add_argument("--data-dir", default=str(REPO_DIR),
                        help="folder holding models/, embeddings/, outputs/ (default: the repo)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the complete commented settings (defaults, or the given "
                             "config with overrides) and exit")
    parser.add_argument("--json-events", action="store_true",
                        help="print progress as JSON lines on stdout (core/events.py), for "
                             "programs that run training, such as the app")
    parser.add_argument("--stop-file", metavar="PATH",
                        help="save and stop when this file appears (as Ctrl-C does)")
    parser.add_argument("--confine-paths", action="store_true",
                        help="refuse typed paths outside the data folder (as a shared app does)")
    args = parser.parse_args(argv)
    prefer_huge_pages()  # before torch is imported
    cls = METHOD_CONFIGS[args.method]
    try:
        cfg = load_toml(cls, args.config, args.set)
        if args.print_config:
            sys.stdout.write(to_toml(cfg))
            return 0
        cfg.validate()
    except ConfigError as error:
        print(f"error: {error.user_message}", file=sys.stderr)
        return 2

    from trainers.launch import PARALLEL_METHODS
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and args.method not in PARALLEL_METHODS:
        print(f"error: {args.method} runs in one process; start it without accelerate launch "
              f"(or with --num_processes 1)", file=sys.stderr)
        return 2

    if os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in os.environ \
            and "WORLD_SIZE" not in os.environ:
        print("note: `accelerate launch --cpu` started one process (several CPU processes need "
              "MPI there); use --multi_gpu --num_processes N, which trains on the CPU when "
              "there is no GPU", file=sys.stderr)

    from core import events as ev
    from core.console import ConsoleContext, JsonEventsContext, QuietContext
    from trainers.distributed import DataParallel
    from trainers.registry import runner

    parallel = DataParallel.from_environment()
    paths = Paths(Path(args.data_dir).resolve(), confine=args.confine_paths).ensure()
    stop_file = Path(args.stop_file) if args.stop_file else None
    if parallel is not None and not parallel.is_main:
        ctx = QuietContext(paths, f"process {parallel.index}", stop_file=stop_file)
    elif args.json_events:
        ctx = JsonEventsContext(paths, stop_file=stop_file)
    else:
        ctx = ConsoleContext(paths, stop_file=stop_file)
    ctx.parallel = parallel
    ctx.install_signal_handlers(repeat_aborts=parallel is None)
    try:
        runner(args.method)(cfg, ctx)
    except Exception as error:  # one clear line, not a traceback, for known failures
        message = getattr(error, "user_message", None) or str(error)
        if not isinstance(error, (ValueError, RuntimeError, OSError)):
            raise
        ctx.emit(ev.Failed(message=f"error: {message}"))
        return 1  # the launcher ends the other processes of a failed run
    if parallel is not None:
        parallel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
