"""python -m trainers METHOD --config run.toml [--set key=value ...] [--print-config]

METHOD is a training method (textual_inversion, lora, ...) or a create verb (create_embedding,
create_hypernetwork, aesthetic_embedding: trainers/create_commands.py).

Exit codes: 0 done (also after a --stop-file stop), 1 failed, 2 invalid settings (ConfigError),
130 / 143 stopped by SIGINT / SIGTERM after saving (or aborted by a second one). Every failure
ends with one `error: ...` line on stderr (and a Failed event with --json-events); --debug or
DANLU_DEBUG=1 prints the traceback before it.

Under `accelerate launch` with several processes it trains data-parallel (trainers/distributed.py):
the main process prints progress and writes every file; the others print only their errors."""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from core.config import ConfigError, load_toml, to_toml
from core.malloc_tuning import prefer_huge_pages
from core.paths import REPO_DIR, Paths
from trainers import catalog
from trainers.create_commands import CREATE_COMMANDS

BAD_SETTINGS = 2


class _Parser(argparse.ArgumentParser):
    """argparse's usage errors (exit 2) also as a Failed event when --json-events is asked for."""
    json_events = False

    def error(self, message):
        if self.json_events:
            from core import events as ev
            print(ev.to_json(ev.Failed(message=f"error: {message}")), flush=True)
        super().error(message)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m trainers",
                     description="Train an embedding, hypernetwork, LoRA or DreamBooth model "
                                 "headless, with the app's code, or create an embedding, "
                                 "hypernetwork or aesthetic embedding as the Create tabs do.")
    parser.add_argument("method", nargs="?",
                        choices=sorted(catalog.names()) + sorted(CREATE_COMMANDS))
    parser.add_argument("--list", action="store_true",
                        help="list the training methods and the model families each trains")
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
                        help="save and stop when this file appears (as Ctrl-C does, but the "
                             "exit code stays 0)")
    parser.add_argument("--confine-paths", action="store_true",
                        help="refuse typed paths outside the data folder (as a shared app does)")
    parser.add_argument("--memory-report", action="store_true",
                        help="run one step of the job (LoRA, DreamBooth, fine-tuning) in a scratch "
                             "folder and print its measured memory, by part, next to the "
                             "estimate, as JSON")
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of a failure (as DANLU_DEBUG=1 does)")
    parser.json_events = "--json-events" in (sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.list:
        sys.stdout.write(catalog_table())
        return 0
    if not args.method:
        parser.error("the method is required (see --list)")
    debug = args.debug or os.environ.get("DANLU_DEBUG", "").strip() not in ("", "0")
    made: list = []  # the command's console context once there is one
    try:
        return _run(args, made)
    except KeyboardInterrupt:  # a second Ctrl-C / SIGTERM, or one before training began
        ctx = made[0] if made else None
        signum = getattr(ctx, "stop_signal", None) or 2  # SIGINT unless a handler saw another
        if debug:
            traceback.print_exc()
        return _fail(args, ctx, f"{args.method} aborted by {_signal_name(signum)} before it "
                                "finished; files saved before are kept", 128 + signum)
    except Exception as error:
        if debug:
            traceback.print_exc()
        from core.console import failure_message
        code = BAD_SETTINGS if isinstance(error, ConfigError) else 1
        return _fail(args, made[0] if made else None, failure_message(error, args.method), code)
    finally:
        if made:
            made[0].restore_signal_handlers()


def catalog_table() -> str:
    """The methods x the model families each one trains, as --list prints them."""
    from trainers.families import all_families
    rows = [["method", "title", *(f.label for f in all_families()), "what it makes"]]
    for method in catalog.methods():
        rows.append([method.name, method.title,
                     *("yes" if f.name in method.families else "-" for f in all_families()), method.help])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1]
                   + "\n" for row in rows)


def _signal_name(signum: int) -> str:
    import signal
    return signal.Signals(signum).name


def _fail(args, ctx, message: str, code: int) -> int:
    """The failure's one line on stderr, and its Failed event on stdout with --json-events."""
    from core import events as ev
    from core.console import JsonEventsContext
    event = ev.Failed(message=f"error: {message}")
    if ctx is not None and not isinstance(ctx, JsonEventsContext):
        ctx.emit(event)  # prints the line (after clearing a progress bar)
        return code
    print(event.message, file=sys.stderr, flush=True)
    if args.json_events:
        target = ctx if ctx is not None else JsonEventsContext(None, out=sys.stdout)
        target.emit(event)
    return code


def _run(args, made: list) -> int:
    prefer_huge_pages()  # before torch is imported
    cls = catalog.get(args.method).config if args.method in catalog.names() \
        else CREATE_COMMANDS[args.method]
    cfg = load_toml(cls, args.config, args.set)
    if args.print_config:
        sys.stdout.write(to_toml(cfg))
        return 0
    cfg.validate()

    parallel_method = args.method in catalog.names() and catalog.get(args.method).parallel
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and not parallel_method:
        return _fail(args, None, f"{args.method} runs in one process; start it without "
                                 "accelerate launch (or with --num_processes 1)", BAD_SETTINGS)

    if os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in os.environ \
            and "WORLD_SIZE" not in os.environ:
        print("note: `accelerate launch --cpu` started one process (several CPU processes need "
              "MPI there); use --multi_gpu --num_processes N, which trains on the CPU when "
              "there is no GPU", file=sys.stderr)

    from core.console import ConsoleContext, JsonEventsContext, QuietContext
    from trainers.distributed import DataParallel

    parallel = DataParallel.from_environment() if args.method in catalog.names() else None
    paths = Paths(Path(args.data_dir).resolve(), confine=args.confine_paths).ensure()
    if args.memory_report:
        import json

        from trainers.memory_report import measure
        sys.stdout.write(json.dumps(measure(args.method, cfg, paths), indent=1) + "\n")
        return 0
    stop_file = Path(args.stop_file) if args.stop_file else None
    if parallel is not None and not parallel.is_main:
        ctx = QuietContext(paths, f"process {parallel.index}", stream=sys.stderr,
                           stop_file=stop_file)
    elif args.json_events:
        ctx = JsonEventsContext(paths, out=sys.stdout, stop_file=stop_file)
    else:
        ctx = ConsoleContext(paths, stream=sys.stderr, stop_file=stop_file)
    made.append(ctx)
    ctx.parallel = parallel
    ctx.install_signal_handlers(repeat_aborts=parallel is None)
    if args.method in CREATE_COMMANDS:
        from trainers.create_commands import run_create
        run_create(args.method, cfg, ctx)
    else:
        from trainers.registry import runner
        runner(args.method)(cfg, ctx)  # a failure's exit ends the other processes of a run
    if parallel is not None:
        parallel.close()
    return ctx.exit_code()


if __name__ == "__main__":
    sys.exit(main())
