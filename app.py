"""Start Danlu: flags -> Paths + JobRunner -> webui.build_app(...).queue().launch().

Two things only the entry point can do live here too: who may log in (and how fast anyone may
guess), and closing cleanly (SIGTERM or Ctrl-C ask the running job to save before the process
ends)."""
from __future__ import annotations

import argparse
import hmac
import math
import os
import secrets
import signal
import sys
import threading
import time
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
SHUTDOWN_TIMEOUT = 60.0  # seconds a running job gets to save when the app is closed
SHORT_PASSWORD = 12
# what the training worker imports while the page loads, so the first Train click does not wait
WORKER_WARM_MODULES = ("torch", "diffusers", "trainers.models")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Danlu: train Stable Diffusion embeddings, "
                                     "hypernetworks, LoRA and DreamBooth in the browser.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (0.0.0.0 for the local network; needs a login)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true",
                        help="open a public gradio.live link (needs a login: --auth or "
                             "--auth-file, else a password is generated and printed)")
    parser.add_argument("--auth", metavar="USER:PASS",
                        help="require this login; always on for --share and non-loopback hosts")
    parser.add_argument("--auth-file", metavar="FILE",
                        help="require one of the logins in FILE (USER:PASS lines; # comments); "
                             "keeps passwords out of the process list")
    parser.add_argument("--data-dir", default=str(REPO_DIR),
                        help="folder with models/, embeddings/, outputs/ (an A1111 folder works)")
    parser.add_argument("--demo", action="store_true",
                        help="build the tiny demo model now instead of on first use")
    parser.add_argument("--vram", metavar="CARD", default=None,
                        help="the card the Train tab's 'Fit my GPU' starts on: '8 GB', "
                             "'12 GB', '16 GB (Colab T4)', '24 GB' or 'detect'")
    return parser.parse_args(argv)


def _split_login(text: str, where: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    user = user.strip()
    if not sep or not user or not password:
        sys.exit(f"error: {where} must be USER:PASS")
    return user, password


def read_auth_file(path: str) -> list[tuple[str, str]]:
    """USER:PASS lines (the password may contain ':'); blank lines and # comments skipped."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        sys.exit(f"error: --auth-file: cannot read {path}: {getattr(error, 'strerror', error)}")
    logins: list[tuple[str, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, password = _split_login(line, f"--auth-file {path}, line {number},")
        if any(user == known for known, _ in logins):
            sys.exit(f"error: --auth-file {path}, line {number}: user {user!r} is listed twice")
        logins.append((user, password))
    if not logins:
        sys.exit(f"error: --auth-file {path} holds no USER:PASS line")
    return logins


def credentials(args) -> tuple[str, str] | list[tuple[str, str]] | None:
    """The login(s) to require: one (user, password) pair, a list of pairs, or None for a
    private loopback app."""
    exposed = args.share or args.host not in LOOPBACK
    logins: list[tuple[str, str]] = []
    if args.auth:
        logins.append(_split_login(args.auth, "--auth"))
    if getattr(args, "auth_file", None):
        logins += [login for login in read_auth_file(args.auth_file)
                   if login[0] not in {user for user, _ in logins}]
    if logins:
        if exposed:
            for user, password in logins:
                if len(password) < SHORT_PASSWORD:
                    print(f"warning: the password of {user!r} is shorter than {SHORT_PASSWORD} "
                          "characters; anyone who has the address can try to guess it",
                          file=sys.stderr)
        return logins[0] if len(logins) == 1 else logins
    if exposed:
        password = secrets.token_urlsafe(12)
        print("=" * 70, file=sys.stderr)
        print("This app is reachable by others and no --auth was given, so a login was made:",
              file=sys.stderr)
        print(f"    user: danlu    password: {password}", file=sys.stderr)
        print("=" * 70, file=sys.stderr)
        return "danlu", password
    return None


class LoginGuard:
    """gradio's `auth` callable: checks a login in constant time and slows down guessing.

    Each user name gets `free` failed attempts; after that every failure locks the name for
    `base` * 2**k seconds (k = 0, 1, 2, ... for each further failure), at most `cap`. Failures
    under all names together get `global_free` attempts before the same lock holds for every
    name, so trying many names at once does not help. While locked, a login is refused with
    HTTP 429 without looking at the password. A successful login clears the name's count;
    counts are forgotten `forget` seconds after their last failure."""

    MAX_NAMES = 10_000

    def __init__(self, logins, free: int = 5, global_free: int = 30, base: float = 1.0,
                 cap: float = 300.0, forget: float = 3600.0, clock=time.monotonic,
                 stream=sys.stderr):
        pairs = [logins] if isinstance(logins, tuple) else list(logins)
        self._logins = [(user.encode("utf-8"), password.encode("utf-8")) for user, password in pairs]
        self.free, self.global_free, self.base, self.cap, self.forget = \
            free, global_free, base, cap, forget
        self.clock = clock
        self.stream = stream
        self._lock = threading.Lock()
        self._names: dict[str, list[float]] = {}  # name -> [failures, last failure, locked until]
        self._all = [0.0, 0.0, 0.0]

    def check(self, username: str, password: str) -> bool:
        """True for a known login; False for a wrong one; HTTPException(429) while locked."""
        name = (username or "")[:256]
        now = self.clock()
        with self._lock:
            self._expire(now)
            record = self._names.get(name)
            wait = max(record[2] if record else 0.0, self._all[2]) - now
        if wait > 0:
            from fastapi import HTTPException
            raise HTTPException(status_code=429, detail="Too many failed logins; try again in "
                                f"{math.ceil(wait)} s")
        if self._matches(username or "", password or ""):
            with self._lock:
                self._names.pop(name, None)
            return True
        with self._lock:
            record = self._names.setdefault(name, [0.0, 0.0, 0.0])
            for counts, free, who in ((record, self.free, f"user {name[:64]!r}"),
                                      (self._all, self.global_free, "all users")):
                counts[0] += 1
                counts[1] = now
                if counts[0] > free:
                    delay = min(self.cap, self.base * 2 ** (counts[0] - free - 1))
                    counts[2] = now + delay
                    print(f"login: {int(counts[0])} failed attempts for {who}; refusing logins "
                          f"for {delay:.0f} s", file=self.stream, flush=True)
            if len(self._names) > self.MAX_NAMES:
                oldest = sorted(self._names, key=lambda key: self._names[key][1])
                for key in oldest[: len(self._names) - self.MAX_NAMES]:
                    del self._names[key]
        return False

    def _matches(self, username: str, password: str) -> bool:
        user, word = username.encode("utf-8"), password.encode("utf-8")
        found = False
        for known_user, known_word in self._logins:  # every pair, so timing says nothing
            found |= hmac.compare_digest(known_user, user) & hmac.compare_digest(known_word, word)
        return bool(found)

    def _expire(self, now: float) -> None:
        for key in [k for k, (_, last, until) in self._names.items()
                    if now - last > self.forget and now >= until]:
            del self._names[key]
        if now - self._all[1] > self.forget and now >= self._all[2]:
            self._all[:] = [0.0, 0.0, 0.0]


def wait_for_stop_signal(app) -> None:
    """Block until SIGTERM or SIGINT (or the server stopped); a second signal exits at once."""
    asked = threading.Event()

    def on_signal(signum, frame):
        if asked.is_set():
            print("Second signal: exiting without waiting for the job to save.",
                  file=sys.stderr, flush=True)
            os._exit(1)
        asked.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while getattr(app, "is_running", True) and not asked.wait(0.5):
        pass


def close(app, runner, timeout: float = SHUTDOWN_TIMEOUT) -> bool:
    """Let the running job save and stop (up to `timeout` s), then close the server.
    True if nothing was left running."""
    job = runner.current()
    if job is not None:
        print(f"Closing: asking '{job.name}' to save and stop (waiting up to {timeout:.0f} s)...",
              file=sys.stderr, flush=True)
    job = runner.shutdown(timeout)
    clean = job is None or not job.active
    if job is not None:
        if clean:
            message = job.result.message if job.result is not None else job.state
            print(f"'{job.name}' {job.state}: {message}", file=sys.stderr, flush=True)
        else:
            print(f"'{job.name}' did not stop within {timeout:.0f} s; its last saved file is "
                  "kept", file=sys.stderr, flush=True)
    app.close()
    return clean


def start(args: argparse.Namespace):
    """Build and launch the app (without blocking); returns (gradio app, JobRunner)."""
    data_dir = Path(args.data_dir).expanduser().resolve()
    login = credentials(args)
    os.environ.setdefault("GRADIO_TEMP_DIR", str(data_dir / ".cache" / "gradio"))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if args.vram:
        from trainers.vram_fit import CHOICES, DETECT
        if args.vram not in (*CHOICES, DETECT):
            sys.exit(f"error: --vram must be one of {', '.join([*CHOICES, DETECT])}")
        os.environ["DANLU_VRAM"] = args.vram
    from core.malloc_tuning import prefer_huge_pages
    prefer_huge_pages()  # before torch loads, here and in the training worker

    from core.jobs import JobRunner
    from core.paths import Paths
    from webui.app import build_app

    paths = Paths(data_dir, confine=login is not None).ensure()
    if args.demo:
        from trainers.models import load_model
        from trainers.tiny_model import DEMO_NAME
        load_model(paths, DEMO_NAME)
    runner = JobRunner(paths, queue_file=paths.cache / "queue.json", warm_modules=WORKER_WARM_MODULES)
    if runner.process is not None:
        runner.process.start()  # importing torch there overlaps with the page loading
    from webui.jobs import rebuild
    restored = runner.restore(rebuild)
    if restored:
        print(f"Queued again {len(restored)} job(s) pending when the app last closed.")
    app = build_app(paths, runner)
    if login is not None:
        # gradio also serves files a handler returns from the working directory; make that an
        # empty private folder, so only outputs/ (allowed_paths) and gradio's own cache remain.
        workdir = paths.cache / "workdir"
        workdir.mkdir(parents=True, exist_ok=True)
        os.chdir(workdir)
    app_kwargs = {}
    if login is not None:
        # one gate in front of every route (gradio leaves some open), then the login page
        # without the app's API description
        from starlette.middleware import Middleware
        from webui.access import HideApiInfoFromVisitors, RequireLogin
        app_kwargs["middleware"] = [Middleware(RequireLogin), Middleware(HideApiInfoFromVisitors)]
    app.queue(default_concurrency_limit=4).launch(
        server_name=args.host, server_port=args.port, share=args.share,
        auth=LoginGuard(login).check if login is not None else None,
        allowed_paths=[str(paths.outputs)], show_error=False, prevent_thread_lock=True,
        run_history=False, enable_monitoring=False, mcp_server=False, ssr_mode=False,
        app_kwargs=app_kwargs,
        # gradio's start-up probe of its own URL gives up after one 3 s timeout and refuses
        # to start on a busy machine; the server is already listening when it runs
        _frontend=False)
    return app, runner


def main(argv=None) -> int:
    app, runner = start(parse_args(argv))
    wait_for_stop_signal(app)
    return 0 if close(app, runner) else 1


if __name__ == "__main__":
    sys.exit(main())
