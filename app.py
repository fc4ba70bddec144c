"""Start Danlu: flags -> Paths + JobRunner -> webui.build_app(...).queue().launch()."""
from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Danlu: train Stable Diffusion embeddings, "
                                     "hypernetworks, LoRA and DreamBooth in the browser.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (0.0.0.0 for the local network; needs --auth)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true",
                        help="open a public gradio.live link (needs --auth, else a password is "
                             "generated and printed)")
    parser.add_argument("--auth", metavar="USER:PASS",
                        help="require this login; always on for --share and non-loopback hosts")
    parser.add_argument("--data-dir", default=str(REPO_DIR),
                        help="folder with models/, embeddings/, outputs/ (an A1111 folder works)")
    parser.add_argument("--demo", action="store_true",
                        help="build the tiny demo model now instead of on first use")
    return parser.parse_args(argv)


def credentials(args) -> tuple[str, str] | None:
    """The login to require, or None for a private loopback app."""
    exposed = args.share or args.host not in LOOPBACK
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            sys.exit("error: --auth must be USER:PASS")
        return user, password
    if exposed:
        password = secrets.token_urlsafe(12)
        print("=" * 70, file=sys.stderr)
        print("This app is reachable by others and no --auth was given, so a login was made:",
              file=sys.stderr)
        print(f"    user: danlu    password: {password}", file=sys.stderr)
        print("=" * 70, file=sys.stderr)
        return "danlu", password
    return None


def main(argv=None) -> None:
    args = parse_args(argv)
    data_dir = Path(args.data_dir).expanduser().resolve()
    login = credentials(args)
    os.environ.setdefault("GRADIO_TEMP_DIR", str(data_dir / ".cache" / "gradio"))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

    from core.jobs import JobRunner
    from core.paths import Paths
    from webui.app import build_app

    paths = Paths(data_dir, confine=login is not None).ensure()
    if args.demo:
        from trainers.models import load_model
        from trainers.tiny_model import DEMO_NAME
        load_model(paths, DEMO_NAME)
    runner = JobRunner(paths)
    app = build_app(paths, runner)
    app.queue(default_concurrency_limit=4).launch(
        server_name=args.host, server_port=args.port, share=args.share, auth=login,
        allowed_paths=[str(paths.outputs)], show_error=False)


if __name__ == "__main__":
    main()
