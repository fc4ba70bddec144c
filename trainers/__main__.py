"""python -m trainers METHOD --config run.toml [--set key=value ...] [--print-config]"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.config import ConfigError, load_toml, to_toml
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
    args = parser.parse_args(argv)
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

    from core.console import ConsoleContext
    from core import events as ev
    from trainers.registry import runner

    paths = Paths(Path(args.data_dir).resolve()).ensure()
    ctx = ConsoleContext(paths)
    ctx.install_signal_handlers()
    try:
        runner(args.method)(cfg, ctx)
    except Exception as error:  # one clear line, not a traceback, for known failures
        message = getattr(error, "user_message", None) or str(error)
        if not isinstance(error, (ValueError, RuntimeError, OSError)):
            raise
        ctx.emit(ev.Failed(message=f"error: {message}"))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
