"""Every route of a shared app refuses a visitor who has not logged in.

The app is started in this process exactly as `app.py --auth` starts it, so the routes are read
from its own FastAPI router (a route gradio adds in a later release is covered without editing
this file). Each is called without a login, with a body that would start a training job; each
must answer 401, except the few the login page needs, which must not leak app data. No job may
start. After logging in, the same request does start the job."""
from __future__ import annotations

import re
import shutil

import httpx
import pytest
from starlette.routing import Mount, Route, WebSocketRoute

from tests.browser_support import free_port
from tests.conftest import photo

USER, PASSWORD = "u", "p"
SECRET = "danlu-secret-in-outputs-5be1"
EMBEDDING = "routesecretemb"
TITLE = "LoRA and DreamBooth on your own machine"
PUBLIC = {"/", "/login", "/login/", "/logout", "/favicon.ico", "/theme.css",
          "/gradio_api/theme.css", "/robots.txt", "/manifest.json",
          "/gradio_api/startup-events"}  # gradio calls it at launch; later a no-op
PUBLIC_PREFIXES = ("/static/", "/assets/", "/svelte/")


@pytest.fixture(scope="module")
def shared_app(tmp_path_factory, tiny_model_dir):
    import os

    import app as entry
    from core.paths import Paths
    from trainers.configs import CreateEmbeddingConfig
    from trainers.embeddings import create_embedding
    data = tmp_path_factory.mktemp("routes") / "data"
    (data / "outputs").mkdir(parents=True)
    (data / "outputs" / "secret.txt").write_text(SECRET)
    shutil.copytree(tiny_model_dir, data / ".cache" / "tiny-demo")
    create_embedding(CreateEmbeddingConfig(name=EMBEDDING, model="tiny-demo").validate(),
                     Paths(data).ensure())
    (data / "datasets" / "cats").mkdir(parents=True)
    for i in range(2):
        photo(i).save(data / "datasets" / "cats" / f"{i}.png")
    cwd, temp = os.getcwd(), os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(data / ".cache" / "gradio")
    port = free_port()
    app, runner = entry.start(entry.parse_args(["--port", str(port), "--data-dir", str(data),
                                                "--auth", f"{USER}:{PASSWORD}"]))
    try:
        yield app, runner, f"http://127.0.0.1:{port}", data
    finally:
        runner.shutdown(30)
        app.close()
        os.chdir(cwd)
        if temp is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = temp


def router_routes(routes, prefix: str = "") -> list[tuple[str, str]]:
    """(method, path) of every HTTP route and ("WS", path) of every websocket, mounts included."""
    found = []
    for route in routes:
        included = getattr(route, "original_router", None)  # fastapi includes routers lazily
        if included is not None:
            found += router_routes(included.routes, prefix + route.include_context.prefix)
        elif isinstance(route, Mount):
            found += router_routes(route.routes or [], prefix + route.path)
        elif isinstance(route, WebSocketRoute):
            found.append(("WS", prefix + route.path))
        elif isinstance(route, Route):
            found += [(method, prefix + route.path) for method in sorted(route.methods or [])]
    return sorted(set(found))


def concrete(path: str) -> str:
    values = {"api_name": "start", "event_id": "0" * 32, "path_or_url": "secret.txt",
              "path": "secret.txt", "session_hash": "visitor1", "key": "k", "size": "192",
              "id": "x", "environment": "prod", "type": "index", "file_name": "x.js",
              "url_path": "http://127.0.0.1:9/x", "run": "0", "component_id": "1",
              "segment_id": "0", "ext": "ts", "endpoint": "start", "record_id": "1",
              "asset_id": "1", "page": "x"}
    return re.sub(r"\{(\w+)(?::\w+)?\}", lambda m: values.get(m.group(1), "x"), path)


def form_values(config: dict, api_name: str, changes: dict) -> list:
    components = {c["id"]: c for c in config["components"]}
    dependency = next(d for d in config["dependencies"] if d.get("api_name") == api_name)
    values = []
    for input_id in dependency["inputs"]:
        elem_id = components[input_id]["props"].get("elem_id") or ""
        key = next((k for k in changes if elem_id == k or elem_id.endswith("-" + k)), None)
        values.append(changes[key] if key else components[input_id]["props"].get("value"))
    return values


def start_request(config: dict, steps: int = 2) -> dict:
    """The body of a request that starts a textual-inversion job (a short one by default)."""
    values = form_values(config, "start", {
        "train-method": "textual_inversion", "TextualInversionConfig-embedding": EMBEDDING,
        "TextualInversionConfig-model": "tiny-demo",
        "TextualInversionConfig-data_root": "datasets/cats",
        "TextualInversionConfig-width": 64, "TextualInversionConfig-height": 64,
        "TextualInversionConfig-steps": steps, "TextualInversionConfig-save_every": 0,
        "TextualInversionConfig-preview_every": 0})
    index = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "start")
    return {"data": values, "fn_index": index, "session_hash": "visitor1", "event_data": None,
            "trigger_id": None, "event_id": "0" * 32, "bucket_id": "x/y"}


def public(method: str, path: str) -> bool:
    return path in PUBLIC or (method in ("GET", "HEAD") and path.startswith(PUBLIC_PREFIXES))


def visit(client: httpx.Client, method: str, path: str, body: dict) -> tuple[int, str]:
    """Status and body (of an event stream, its first bytes) of a visitor's request."""
    url = concrete(path)
    params = {"session_hash": "visitor1", "upload_id": "x", "url": "http://127.0.0.1:9/"}
    if path.startswith("/login"):
        kw = {"data": {"username": "nobody", "password": "x"}}
    elif path.endswith("/upload"):
        kw = {"files": {"files": ("a.txt", b"uploaded")}, "params": params}
    elif method in ("POST", "PUT", "PATCH", "DELETE"):
        kw = {"json": body, "params": params}
    else:
        kw = {"params": params}
    with client.stream(method, url, **kw) as response:
        first = next(response.iter_bytes(), b"")
        return response.status_code, first.decode("utf-8", "replace")


def test_every_route_of_the_router_refuses_a_visitor_and_starts_nothing(shared_app):
    app, runner, url, data = shared_app
    with httpx.Client(base_url=url, timeout=10) as member:
        assert member.post("/login", data={"username": USER, "password": PASSWORD}).status_code == 200
        config = member.get("/config").json()
    body = start_request(config)
    listed = router_routes(app.server_app.routes)
    paths = {p for _, p in listed}
    for needed in ["/gradio_api/cancel", "/gradio_api/heartbeat/{session_hash}",
                   "/gradio_api/reset", "/gradio_api/queue/join", "/gradio_api/upload",
                   "/gradio_api/app_id", "/openapi.json", "/config"]:
        assert needed in paths, needed  # the routes gradio left open are among those checked
    assert len(listed) >= 60
    markers = [SECRET, EMBEDDING, TITLE, "TextualInversionConfig", "ALIVE"]
    checked = []
    with httpx.Client(base_url=url, timeout=10) as visitor:
        for method, path in listed:
            if method == "WS":
                continue  # websockets are refused by the same gate (unit test below)
            status, text = visit(visitor, method, path, body)
            leaked = [m for m in markers if m in text]
            assert not leaked, (method, path, status, leaked)
            if public(method, path):
                continue
            assert status == 401, (method, path, status, text[:200])
            assert method == "HEAD" or "Not authenticated" in text, (method, path)
            checked.append((method, path))
    assert ("POST", "/gradio_api/cancel") in checked and ("POST", "/gradio_api/queue/join") in checked
    assert runner.latest() is None and runner.queued() == []  # nothing started or queued
    assert not list((data / "outputs").glob("textual_inversion"))

    with httpx.Client(base_url=url, timeout=30) as member:  # the same request, logged in
        assert member.post("/login", data={"username": USER, "password": PASSWORD}).status_code == 200
        run = member.post("/gradio_api/run/start", json={"data": body["data"]})
        assert run.status_code == 200, run.text
        assert run.json()["data"][0].startswith("Started job"), run.json()
        assert member.get(f"/gradio_api/file={data / 'outputs' / 'secret.txt'}").text == SECRET
    job = runner.latest()
    assert job is not None and runner.wait(job, 120) and job.state == "done", job.snapshot()


def test_the_gate_lets_only_the_login_page_through():
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

    from webui.access import RequireLogin, is_public

    async def ok(request):
        return PlainTextResponse("app data")

    async def socket(websocket):
        await websocket.accept()
        await websocket.send_text("app data")

    inner = Starlette(routes=[Route("/{path:path}", ok, methods=["GET", "POST", "HEAD"]),
                              WebSocketRoute("/ws", socket)])
    client = TestClient(RequireLogin(inner))
    assert client.get("/").text == "app data"
    assert client.get("/static/fonts/x.woff2").text == "app data"
    assert client.post("/login").text == "app data"
    for method, path in [("GET", "/config"), ("POST", "/gradio_api/cancel"),
                         ("GET", "/gradio_api/heartbeat/abc"), ("POST", "/"),
                         ("POST", "/static/x"), ("GET", "/static/../config"),
                         ("GET", "/gradio_api/app_id"), ("GET", "/openapi.json")]:
        response = client.request(method, path)
        assert response.status_code == 401 and "app data" not in response.text, (method, path)
    with pytest.raises(WebSocketDisconnect):
        with client.websocket_connect("/ws") as ws:
            ws.receive_text()
    assert is_public("GET", "/assets/index.js") and not is_public("GET", "/assets/../config")


def test_two_users_pressing_train_at_once_start_one_job(shared_app):
    """Double clicks and several users: the start requests race through gradio's queue (4 run
    at once) and the runner, and exactly one job starts; the rest are told it is running."""
    import threading
    app, runner, url, data = shared_app
    before = runner.latest()
    assert before is None or runner.wait(before, 120)
    with httpx.Client(base_url=url, timeout=30) as member:
        assert member.post("/login", data={"username": USER, "password": PASSWORD}).status_code == 200
        # a long job: one that ended before the last request came in would let it start another
        body = start_request(member.get("/config").json(), steps=100_000)
        cookies = dict(member.cookies)
    barrier, answers = threading.Barrier(8), []

    def press():
        with httpx.Client(base_url=url, timeout=60, cookies=cookies) as client:
            barrier.wait()
            answers.append(client.post("/gradio_api/run/start", json={"data": body["data"]}))

    threads = [threading.Thread(target=press) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    texts = [a.json()["data"][0] for a in answers]
    assert len(texts) == 8 and all(a.status_code == 200 for a in answers)
    assert sum(t.startswith("Started job") for t in texts) == 1, texts
    assert all(t.startswith("Started job") or "already running" in t for t in texts), texts
    job = runner.latest()
    assert job is not before and runner.queued() == []
    runner.stop()
    assert runner.wait(job, 120)


def test_concurrent_submits_to_the_runner_start_one_job(tmp_path):
    import threading

    from core.jobs import Busy, JobRunner
    from core.paths import Paths
    runner = JobRunner(Paths(tmp_path).ensure())
    release = threading.Event()
    barrier, started, refused = threading.Barrier(16), [], []

    def submit():
        barrier.wait()
        try:
            started.append(runner.submit("ti", "train", lambda ctx: release.wait(30)))
        except Busy:
            refused.append(1)

    threads = [threading.Thread(target=submit) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(started) == 1 and len(refused) == 15
    release.set()
    assert runner.wait(started[0], 30)


def test_the_train_tabs_direct_poll_needs_the_login_and_keeps_the_page_state(shared_app):
    """The timer polls skip gradio's queue (queue=False): a browser POSTs them to
    /gradio_api/run/<name>. The gate refuses that to a visitor; a member gets the status, and
    the session's Watch state makes a second poll with nothing new skip every output."""
    app, runner, url, data = shared_app
    with httpx.Client(base_url=url, timeout=30) as member:
        assert member.post("/login", data={"username": USER, "password": PASSWORD}).status_code == 200
        config = member.get("/config").json()
        components = {c["id"]: c for c in config["components"]}
        polls = [d for d in config["dependencies"]
                 if any(t[1] == "tick" for t in d.get("targets", []))]
        # the Train tab's, the Checkpoints tab's and its LoRA tools', and the Preprocess tab's
        assert len(polls) == 4 and all(d["queue"] is False for d in polls), polls
        train = next(d for d in polls if any(components[i]["props"].get("elem_id") ==
                                             "train-status" for i in d["outputs"]))
        route = "/gradio_api/run/" + train["api_name"]
        body = {"data": [None] * len(train["inputs"]), "event_data": None,
                "fn_index": train["id"], "trigger_id": train["targets"][0][0],
                "session_hash": "member-page"}
        with httpx.Client(base_url=url, timeout=10) as visitor:
            refused = visitor.post(route, json=body)
            assert refused.status_code == 401 and "Not authenticated" in refused.text
        job = runner.latest("train")
        if job is None:  # this test alone: run a short job first
            assert member.post("/gradio_api/run/start", json={
                "data": start_request(config)["data"]}).status_code == 200
            job = runner.latest("train")
        assert runner.wait(job, 120), job.snapshot()  # ended (done, or failed: a name reused)
        first = member.post(route, json=body)
        assert first.status_code == 200, first.text
        status = first.json()["data"][0]
        assert job.name in str(status) and f"— {job.state}" in str(status), status
        again = member.post(route, json=body)  # same page, nothing new: every output skipped
        assert again.status_code == 200, again.text
        assert all(isinstance(v, dict) and v.get("__type__") == "update" and "value" not in v
                   for v in again.json()["data"][:4]), again.json()["data"]
