"""Load: many browser pages polling a running training job, against the real app (loopback only).

    python3 -m bench.load_test                       # 20 clients for 60 s (writes BENCHMARKS.md)
    python3 -m bench.load_test --clients 3 --seconds 5 --baseline 5 --no-write

The app runs in its own process (`app.py` on 127.0.0.1, a free port, a fresh data folder with
the tiny model) and trains a textual-inversion embedding (64 px) for the whole measurement.
Each client is what an open Train tab does once a second: one call of the tab's timer poll in
its own session (so the page state is kept between ticks as in a browser), the way the page
makes it: a POST to `/gradio_api/run/<name>` for an event with queue=False (the Train tab's
poll since issue #9), else joining gradio's queue (`/gradio_api/queue/join`) and reading the
answer from `/gradio_api/queue/data`. The poll latency is the time from the request to the answer.

Training speed is read from the job's own step counter (one poll of a fresh session at each
window edge): `baseline` seconds with no client, `seconds` with all clients, `baseline` seconds
with no client again; the speed without clients is the mean of the two quiet windows. The
clients run in this process (threads), on the same CPUs as the app, so their own CPU time is
reported too: on a machine with spare cores it would not slow training. The app trains in its
worker process (core/worker_process.py); the CPU of the server and of that worker are reported
apart.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

HEADING = "## Reliability under load"
SUBHEADING = "### Load: {clients} clients"
STEP = re.compile(r"step (\d+)/(\d+)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- the app

def dataset_pictures() -> tuple[str, list | None]:
    """(cache folder name, pictures for fixtures.make_dataset): scikit-image's sample photos
    when it is installed (requirements-dev.txt), else pictures drawn with PIL alone, so the
    README's command works after `pip install -r requirements.txt`. The load test measures
    polling, not what the images show; the two sets are cached apart."""
    try:
        import skimage.data  # noqa: F401
    except ImportError:
        return "drawn-64", drawn_pictures()
    return "photos-64", None


def drawn_pictures(count: int = 4, size: int = 64) -> list:
    """(name, image) pairs: distinct colour gradients with a few shapes each, the same every time."""
    from PIL import Image, ImageDraw
    pictures = []
    for index in range(count):
        red, green = (index * 67) % 256, (index * 131 + 40) % 256
        image = Image.new("RGB", (size, size))
        image.putdata([(red, (green + y * 2) % 256, (x * 4 + index * 50) % 256)
                       for y in range(size) for x in range(size)])
        draw = ImageDraw.Draw(image)
        for shape in range(3):
            box = [(shape * 17 + index * 5) % (size // 2), (shape * 23 + index * 11) % (size // 2)]
            box += [box[0] + size // 3, box[1] + size // 4]
            fill = ((shape * 90 + index * 40) % 256, 255 - red, (shape * 60) % 256)
            (draw.ellipse if shape % 2 else draw.rectangle)(box, fill=fill)
        pictures.append((f"drawn-{index}", image))
    return pictures


class App:
    """app.py in a child process on loopback, with a fresh data folder."""

    def __init__(self, work: Path):
        from bench import fixtures
        model = fixtures.build_model("tiny")
        fixtures.make_pristine_files("tiny")
        name, pictures = dataset_pictures()
        self.dataset = fixtures.make_dataset(fixtures.bench_cache() / "data" / name, 64,
                                             pictures)["captioned"]
        self.data = fixtures.fresh_data_dir("tiny", work / "data")
        shutil.copytree(model, self.data / ".cache" / "tiny-demo")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(work / "app.log", "w")
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
                   GRADIO_ANALYTICS_ENABLED="False")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), "--host", "127.0.0.1", "--port",
             str(self.port), "--data-dir", str(self.data)],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait()

    def _wait(self, timeout: float = 180) -> None:
        import httpx
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("the app exited:\n" + self.output())
            try:
                if httpx.get(self.url + "/config", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError("the app did not start:\n" + self.output())

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def form_values(config: dict, api_name: str, changes: dict) -> list:
    """The page's default inputs of an event, some changed (by elem_id or its suffix)."""
    components = {c["id"]: c for c in config["components"]}
    dependency = next(d for d in config["dependencies"] if d.get("api_name") == api_name)
    values = []
    for input_id in dependency["inputs"]:
        props = components[input_id]["props"]
        elem_id = props.get("elem_id") or ""
        key = next((k for k in changes if elem_id == k or elem_id.endswith("-" + k)), None)
        values.append(changes[key] if key else props.get("value"))
    return values


def train_poll(config: dict) -> tuple[int, int, int, str | None]:
    """(fn_index, trigger id, number of inputs, route) of the Train tab's timer poll; route is
    None when the poll goes through gradio's queue, else the `/gradio_api/run/...` path a
    browser posts to for an event with queue=False."""
    components = {c["id"]: c for c in config["components"]}
    for dependency in config["dependencies"]:
        outputs = {components[i]["props"].get("elem_id") for i in dependency["outputs"]}
        ticks = [t for t in dependency.get("targets", []) if t[1] == "tick"]
        if "train-status" in outputs and ticks:
            route = None
            if dependency.get("queue") is False:
                route = "/gradio_api/run/" + str(dependency.get("api_name") or "predict").lstrip("/")
            return dependency["id"], ticks[0][0], len(dependency["inputs"]), route
    raise RuntimeError("the Train tab has no timer poll")


# ---------------------------------------------------------------- one page's poll

def poll_once(client, fn_index: int, trigger: int, inputs: int, route: str | None,
              session: str, timeout: float = 30.0) -> tuple[float, list | None]:
    """One timer tick of one page: (seconds from the request to the answer, output data).
    Through the queue (join, then read the event stream) or, for an event with queue=False,
    one POST as the browser does."""
    if route is not None:
        started = time.perf_counter()
        answer = client.post(route, json={
            "data": [None] * inputs, "event_data": None, "fn_index": fn_index,
            "trigger_id": trigger, "session_hash": session}, timeout=timeout)
        if answer.status_code != 200:
            raise RuntimeError(f"poll failed: HTTP {answer.status_code} {answer.text[:300]}")
        return time.perf_counter() - started, answer.json().get("data")
    started = time.perf_counter()
    joined = client.post("/gradio_api/queue/join", json={
        "data": [None] * inputs, "event_data": None, "fn_index": fn_index,
        "trigger_id": trigger, "session_hash": session}, timeout=timeout)
    joined.raise_for_status()
    event_id = joined.json()["event_id"]
    with client.stream("GET", "/gradio_api/queue/data", params={"session_hash": session},
                       timeout=timeout) as stream:
        for line in stream.iter_lines():
            if not line.startswith("data:"):
                continue
            message = json.loads(line[5:])
            if message.get("msg") == "process_completed" and message.get("event_id") == event_id:
                if not message.get("success"):
                    raise RuntimeError(f"poll failed: {str(message)[:300]}")
                return time.perf_counter() - started, message["output"].get("data")
    raise RuntimeError("the queue stream closed without an answer")


def job_step(url: str, poll: tuple, started: bool = True) -> tuple[int, float]:
    """The running job's step now, from the status a fresh page gets (0 while it loads, unless
    it must have `started`)."""
    import httpx
    with httpx.Client(base_url=url) as client:
        _, data = poll_once(client, *poll, session=uuid.uuid4().hex[:11])
    status = str(data[0]) if data else ""
    found = STEP.search(status)
    if not found and (started or "— running" not in status):
        raise RuntimeError(f"no step in the status: {status[:300]}")
    return (int(found.group(1)) if found else 0), time.perf_counter()


class Page(threading.Thread):
    """A client that polls once a second (like an open Train tab) until told to stop."""

    def __init__(self, url: str, poll: tuple, stop: threading.Event,
                 period: float = 1.0):
        super().__init__(daemon=True)
        self.url, self.poll, self.stop_event, self.period = url, poll, stop, period
        self.latencies: list[float] = []
        self.errors: list[str] = []

    def run(self) -> None:
        import httpx
        session = uuid.uuid4().hex[:11]
        with httpx.Client(base_url=self.url) as client:
            next_tick = time.perf_counter()
            while not self.stop_event.is_set():
                try:
                    seconds, _ = poll_once(client, *self.poll, session=session)
                    self.latencies.append(seconds)
                except Exception as error:  # counted and reported, the page keeps polling
                    self.errors.append(f"{type(error).__name__}: {error}"[:200])
                next_tick += self.period
                self.stop_event.wait(max(0.0, next_tick - time.perf_counter()))


# ---------------------------------------------------------------- the measurement

def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def children(pid: int) -> list[int]:
    """The pids of a process's children (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(x) for x in (task / "children").read_text().split()]
        except (OSError, ValueError):
            pass
    return found


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def measure(clients: int, seconds: float, baseline: float, warmup: float, work: Path) -> dict:
    import httpx
    app = App(work)
    try:
        with httpx.Client(base_url=app.url, timeout=60) as client:
            config = client.get("/config").json()
            from bench import fixtures
            values = form_values(config, "start", {
                "train-method": "textual_inversion",
                "TextualInversionConfig-embedding": fixtures.EMBEDDING_NAME,
                "TextualInversionConfig-model": "tiny-demo",
                "TextualInversionConfig-data_root": str(app.dataset),
                "TextualInversionConfig-template": "subject.txt",
                "TextualInversionConfig-width": 64, "TextualInversionConfig-height": 64,
                "TextualInversionConfig-steps": 1_000_000, "TextualInversionConfig-save_every": 0,
                "TextualInversionConfig-preview_every": 0})
            started = client.post("/gradio_api/run/start", json={"data": values}).json()
            if not str(started.get("data", [""])[0]).startswith("Started job"):
                raise RuntimeError(f"training did not start: {started}")
        poll = train_poll(config)
        deadline = time.time() + 300  # the worker process starts and loads the model
        while job_step(app.url, poll, started=False)[0] < 3:  # the model is loaded and steps run
            if time.time() > deadline:
                raise TimeoutError("training made no steps:\n" + app.output()[-2000:])
            time.sleep(0.5)
        time.sleep(warmup)
        workers = children(app.proc.pid)

        def window(length: float, pages: int) -> dict:
            stop = threading.Event()
            threads = [Page(app.url, poll, stop) for _ in range(pages)]
            cpu0, app0 = time.process_time(), process_cpu(app.proc.pid)
            worker0 = sum(process_cpu(pid) for pid in workers)
            step0, t0 = job_step(app.url, poll)
            for thread in threads:
                thread.start()
            time.sleep(length)
            step1, t1 = job_step(app.url, poll)
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
            return {"steps": step1 - step0, "seconds": t1 - t0,
                    "app_cpu_s": process_cpu(app.proc.pid) - app0,
                    "worker_cpu_s": sum(process_cpu(pid) for pid in workers) - worker0,
                    "steps_per_s": (step1 - step0) / (t1 - t0),
                    "client_cpu_s": time.process_time() - cpu0,
                    "latencies": [x for t in threads for x in t.latencies],
                    "errors": [e for t in threads for e in t.errors]}

        quiet_before = window(baseline, 0)
        loaded = window(seconds, clients)
        quiet_after = window(baseline, 0)
        with httpx.Client(base_url=app.url, timeout=60) as client:
            client.post("/gradio_api/run/stop", json={"data": []})
    finally:
        app.stop()
    quiet = (quiet_before["steps"] + quiet_after["steps"]) / \
        (quiet_before["seconds"] + quiet_after["seconds"])
    latencies = loaded["latencies"]
    return {
        "clients": clients, "seconds": seconds, "baseline_seconds": baseline,
        "polls": len(latencies), "errors": len(loaded["errors"]),
        "error_examples": sorted(set(loaded["errors"]))[:3],
        "polls_per_client_per_s": len(latencies) / clients / loaded["seconds"] if clients else 0.0,
        "latency_median_s": statistics.median(latencies) if latencies else None,
        "latency_p95_s": percentile(latencies, 0.95),
        "latency_max_s": max(latencies) if latencies else None,
        "steps_per_s_quiet": quiet, "steps_per_s_before": quiet_before["steps_per_s"],
        "steps_per_s_after": quiet_after["steps_per_s"],
        "steps_per_s_loaded": loaded["steps_per_s"],
        "speed_change_pct": 100.0 * (loaded["steps_per_s"] / quiet - 1.0) if quiet else None,
        "client_cpu_s_per_s": loaded["client_cpu_s"] / loaded["seconds"],
        "app_cpu_s_per_s_quiet": (quiet_before["app_cpu_s"] + quiet_after["app_cpu_s"]) /
        (quiet_before["seconds"] + quiet_after["seconds"]),
        "app_cpu_s_per_s_loaded": loaded["app_cpu_s"] / loaded["seconds"],
        "worker_cpu_s_per_s_quiet": (quiet_before["worker_cpu_s"] + quiet_after["worker_cpu_s"]) /
        (quiet_before["seconds"] + quiet_after["seconds"]),
        "worker_cpu_s_per_s_loaded": loaded["worker_cpu_s"] / loaded["seconds"],
        "worker_processes": len(workers),
        "cpus": os.cpu_count(), "load_average": list(os.getloadavg()),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


# ---------------------------------------------------------------- BENCHMARKS.md

def _f(value, digits: int = 3, unit: str = "") -> str:
    return "—" if value is None else f"{value:.{digits}g}{unit}"


def poll_cpu_ms(r: dict) -> float | None:
    """App CPU per poll (ms). With a training worker process: the server's extra CPU in the
    loaded window over the quiet ones, per poll answered. Training on the app's thread: the
    loaded window's app CPU minus what its steps cost at the quiet windows' CPU per step."""
    rate = r["polls_per_client_per_s"] * r["clients"]
    if not rate or not r["steps_per_s_quiet"] or "app_cpu_s_per_s_quiet" not in r:
        return None
    if r.get("worker_processes"):
        return 1000.0 * (r["app_cpu_s_per_s_loaded"] - r["app_cpu_s_per_s_quiet"]) / rate
    per_step = r["app_cpu_s_per_s_quiet"] / r["steps_per_s_quiet"]
    return 1000.0 * (r["app_cpu_s_per_s_loaded"] - per_step * r["steps_per_s_loaded"]) / rate


def render(result: dict) -> str:
    r = result
    separate = bool(r.get("worker_processes"))
    if separate:
        cpu_rows = [
            f"| CPU used by the server (app process), quiet / {r['clients']} clients | "
            f"{r['app_cpu_s_per_s_quiet']:.2f} / {r['app_cpu_s_per_s_loaded']:.2f} "
            "core-seconds per second |",
            f"| CPU used by the training worker process, quiet / {r['clients']} clients | "
            f"{r['worker_cpu_s_per_s_quiet']:.2f} / {r['worker_cpu_s_per_s_loaded']:.2f} "
            "core-seconds per second |",
            f"| server CPU per poll (loaded minus quiet, per poll) | "
            f"{_f(poll_cpu_ms(r), 2, ' ms')} |"]
    else:
        cpu_rows = [
            f"| CPU used by the app (training + server), quiet / {r['clients']} clients | "
            f"{r['app_cpu_s_per_s_quiet']:.2f} / {r['app_cpu_s_per_s_loaded']:.2f} "
            "core-seconds per second |",
            f"| app CPU per poll (estimate: loaded minus its steps' quiet cost) | "
            f"{_f(poll_cpu_ms(r), 2, ' ms')} |"]
    lines = [HEADING, "",
             "The real app (`app.py` on 127.0.0.1) trains a textual-inversion embedding on the "
             "tiny model (64 px) while browser-like clients poll the Train tab's progress once a "
             "second, each in its own session, as the page does (`bench/load_test.py`).",
             "", SUBHEADING.format(clients=r["clients"]), "",
             "| | value |", "|---|---|",
             f"| clients × duration | {r['clients']} × {r['seconds']:.0f} s "
             f"(quiet windows: {r['baseline_seconds']:.0f} s before and after) |",
             f"| polls answered / failed | {r['polls']} / {r['errors']} "
             f"({r['polls_per_client_per_s']:.2f} per client per second) |",
             f"| poll latency median / p95 / max | {_f(r['latency_median_s'], 3, ' s')} / "
             f"{_f(r['latency_p95_s'], 3, ' s')} / {_f(r['latency_max_s'], 3, ' s')} |",
             f"| training speed, no clients (before, after) | {r['steps_per_s_quiet']:.2f} "
             f"steps/s ({r['steps_per_s_before']:.2f}, {r['steps_per_s_after']:.2f}) |",
             f"| training speed, {r['clients']} clients | {r['steps_per_s_loaded']:.2f} steps/s "
             f"(**{_f(r['speed_change_pct'], 3)} %**) |",
             *cpu_rows,
             f"| CPU used by the clients themselves | {r['client_cpu_s_per_s']:.2f} "
             f"core-seconds per second |",
             f"| machine | {r['cpus']} CPUs, load average {r['load_average'][0]:.1f} at the end; "
             f"{r['when']} |", ""]
    met = r["speed_change_pct"] is not None and r["speed_change_pct"] >= -5.0
    where = ("in the server process; training runs in its own worker process" if separate
             else "in the same process as training and under the same GIL")
    lines += [f"Target (training speed within a few percent, -5 % at most): "
              f"**{'met' if met else 'not met'}**. Each poll costs the app about "
              f"{_f(poll_cpu_ms(r), 2, ' ms')} of CPU, {where}.", ""]
    if r["load_average"][0] > r["cpus"]:
        lines += [f"The machine was oversubscribed during this run (load average "
                  f"{r['load_average'][0]:.1f} on {r['cpus']} CPUs, from other work): the app "
                  "got only part of a CPU, so both speeds are far below an idle machine's and "
                  "every poll's CPU cost weighs more.", ""]
    if r["error_examples"]:
        lines += ["Errors: " + "; ".join(f"`{e}`" for e in r["error_examples"]), ""]
    lines += ["The clients run on the same CPUs as the app, so the change in training speed "
              "includes their own CPU use (and that of anything else running on the machine; "
              "compare the two quiet windows). Command: `python3 -m bench.load_test --clients "
              f"{r['clients']} --seconds {r['seconds']:.0f}`.", ""]
    return "\n".join(lines)


def write(result: dict, path: Path) -> None:
    from bench.report import write_section
    write_section(path, HEADING, render(result), before=None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--baseline", type=float, default=30.0,
                        help="seconds of each quiet window (before and after)")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    parser.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args(argv)
    if args.clients < 0 or args.seconds <= 0 or args.baseline <= 0:
        parser.error("--clients must be >= 0, --seconds and --baseline > 0")
    work = Path(tempfile.mkdtemp(prefix="danlu-load-"))
    try:
        result = measure(args.clients, args.seconds, args.baseline, args.warmup, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not args.no_write:
        write(result, Path(args.output))
    print("BENCH_JSON " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
