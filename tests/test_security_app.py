"""The real app with a login (`--auth`), over HTTP.

Security: every route the server has refuses to give app data, files or actions to a visitor
who has not logged in; after logging in the same routes work; file routes never serve files
outside outputs/; typed paths outside the data folder are refused; failed logins are slowed
down. Reliability (last, because it ends the server): SIGTERM while a job trains makes the app
let the job save a resumable state before it exits."""
from __future__ import annotations

import json
import re
import shutil
import signal
import time

import httpx
import pytest

from tests.browser_support import AppProcess

USER, PASSWORD = "u", "p"
SECRET = "danlu-secret-in-outputs-7f3a"
OUTSIDE = "danlu-secret-outside-c91e"
EMBEDDING = "sekritemb5"
TITLE = "LoRA and DreamBooth on your own machine"  # the page's own text, in /config

# The routes the login page needs (webui/access.py lets only these through without a login);
# they must still not leak any marker. Every other route answers 401.
PUBLIC = re.compile(r"^/($|login/?$|logout$|favicon\.ico$|theme\.css$|robots\.txt$|"
                    r"manifest\.json$|static/|assets/|svelte/|"
                    r"gradio_api/(theme\.css|startup-events)$)")
# Routes that carry app data, files or actions: a visitor must get 401.
GUARDED = ["/config", "/gradio_api/info", "/gradio_api/openapi.json", "/gradio_api/file=",
           "/gradio_api/file/", "/gradio_api/upload", "/gradio_api/queue/join",
           "/gradio_api/queue/data", "/gradio_api/call/", "/gradio_api/run/",
           "/gradio_api/api/", "/gradio_api/component_server", "/gradio_api/deep_link",
           "/gradio_api/queue/status", "/gradio_api/upload_progress",
           "/gradio_api/process_recording", "/gradio_api/proxy=", "/gradio_api/dev/reload",
           "/monitoring/summary"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("shared")
    data = root / "data"
    (data / "outputs").mkdir(parents=True)
    (data / "outputs" / "secret.txt").write_text(SECRET)
    (data / "embeddings").mkdir()
    (data / "embeddings" / f"{EMBEDDING}.pt").write_bytes(b"listed by name only")
    (data / "models" / "Stable-diffusion").mkdir(parents=True)
    (data / "models" / "Stable-diffusion" / "weights.txt").write_text(OUTSIDE)
    (root / "outside.txt").write_text(OUTSIDE)
    make_training_data(data, tiny_model_dir)
    app = AppProcess(data, tiny_model_dir, extra=["--host", "127.0.0.1", "--auth",
                                                  f"{USER}:{PASSWORD}"])
    yield app, data, root
    app.stop()


def fetch(client: httpx.Client, method: str, url: str, pause: float = 1.0,
          **kw) -> tuple[int, str]:
    """Status and (up to 64 kB of) body; an event stream is read until it pauses `pause` s."""
    body = b""
    try:
        with client.stream(method, url, timeout=httpx.Timeout(10, read=pause), **kw) as response:
            status = response.status_code
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > 65536:
                    break
    except httpx.ReadTimeout:
        pass  # an open event stream (heartbeat): what arrived so far is its answer
    return status, body.decode("utf-8", "replace")


def routes(url: str) -> list[tuple[str, str]]:
    """The routes gradio documents (its OpenAPI schema, which needs a login)."""
    with httpx.Client(base_url=url) as member:
        assert login(member).status_code == 200
        schema = member.get("/openapi.json").json()
    found = [(method.upper(), path) for path, ops in schema["paths"].items() for method in ops]
    found += [("GET", "/openapi.json")]
    return sorted(set(found))


def concrete(path: str, file_path: str) -> str:
    values = {"api_name": "stop", "event_id": "0" * 32, "path_or_url": file_path,
              "path": file_path.lstrip("/"), "session_hash": "visitor1", "key": "k",
              "size": "192", "id": "x", "environment": "prod", "type": "index",
              "file_name": "x.js", "url_path": "http://127.0.0.1:9/x", "run": "0",
              "component_id": "1", "segment_id": "0", "ext": "ts"}
    return re.sub(r"\{(\w+)(?::\w+)?\}", lambda m: values[m.group(1)], path)


def request(client, method, path, file_path) -> tuple[int, str]:
    url = concrete(path, file_path)
    if path.startswith("/login"):
        return fetch(client, method, url, data={"username": "nobody", "password": "x"})
    if path == "/gradio_api/upload":
        return fetch(client, method, url, files={"files": ("a.txt", b"uploaded")})
    if method == "POST":
        body = {"data": [], "fn_index": 8, "session_hash": "visitor1", "event_data": None,
                "trigger_id": None, "event_id": "0" * 32, "bucket_id": "x/y"}
        return fetch(client, method, url, json=body)
    params = {"session_hash": "visitor1", "upload_id": "x", "url": "http://127.0.0.1:9/"}
    return fetch(client, method, url, params=params)


def login(client: httpx.Client, password: str = PASSWORD) -> httpx.Response:
    return client.post("/login", data={"username": USER, "password": password}, timeout=10)


def test_a_visitor_without_login_gets_nothing_from_any_route(server):
    app, data, root = server
    markers = [SECRET, OUTSIDE, EMBEDDING, TITLE, "train-start", "TextualInversionConfig"]
    with httpx.Client(base_url=app.url) as client:
        listed = routes(app.url)
        paths = {p for _, p in listed}
        for needed in ["/config", "/gradio_api/info", "/gradio_api/queue/join",
                       "/gradio_api/upload", "/gradio_api/file={path_or_url}",
                       "/gradio_api/call/{api_name}", "/gradio_api/run/{api_name}"]:
            assert needed in paths, needed
        assert not any("run-history" in p or p.startswith("/gradio_api/mcp") for p in paths)
        answers = {}
        for method, path in listed:
            tries = [data / "outputs" / "secret.txt", root / "outside.txt"] if "{path" in path \
                else [data / "outputs" / "secret.txt"]
            for file_path in map(str, tries):
                status, body = request(client, method, path, file_path)
                answers[(method, path, file_path)] = status
                leaked = [m for m in markers if m in body]
                assert not leaked, (method, path, status, leaked, body[:300])
                if not PUBLIC.match(path) or any(path.startswith(g) for g in GUARDED):
                    assert status == 401, (method, path, status, body[:300])
        assert len({(m, p) for m, p, _ in answers}) >= 60  # gradio 6 has ~90 routes
        for params in ({}, {"all_endpoints": "true"}, {"deep_link": "x"}):
            home = client.get("/", params=params)
            assert home.status_code == 200 and "auth_required" in home.text
            assert TITLE not in home.text and EMBEDDING not in home.text, params
        assert client.get("/gradio_api/user").status_code == 401


def test_after_login_the_same_routes_work_but_only_outputs_are_served(server):
    app, data, root = server
    with httpx.Client(base_url=app.url) as client:
        response = login(client)
        assert response.status_code == 200 and response.json() == {"success": True}
        config = client.get("/config")
        assert config.status_code == 200 and TITLE in config.text and EMBEDDING in config.text
        home = client.get("/").text  # the page a logged-in user gets keeps its API description
        assert "window.gradio_api_info" in home and EMBEDDING in home and "auth_required" not in home
        info = client.get("/gradio_api/info")
        assert info.status_code == 200 and "/start" in info.json()["named_endpoints"]
        assert client.get("/gradio_api/openapi.json").status_code == 200

        served = client.get(f"/gradio_api/file={data / 'outputs' / 'secret.txt'}")
        assert served.status_code == 200 and served.text == SECRET
        for path in [root / "outside.txt", data / "models" / "Stable-diffusion" / "weights.txt",
                     data / "outputs" / ".." / "models" / "Stable-diffusion" / "weights.txt",
                     "/etc/passwd"]:
            refused = client.get(f"/gradio_api/file={path}")
            assert refused.status_code == 403 and OUTSIDE not in refused.text, path

        uploaded = client.post("/gradio_api/upload", files={"files": ("a.txt", b"uploaded")})
        assert uploaded.status_code == 200
        assert str(data / ".cache" / "gradio") in uploaded.json()[0]

        assert call(client, "stop", []) == ["Nothing is running."]
        run = client.post("/gradio_api/run/stop", json={"data": []}, timeout=30)
        assert run.status_code == 200 and run.json()["data"] == ["Nothing is running."]
        joined = client.post("/gradio_api/queue/join", json={
            "data": [], "fn_index": fn_index(config.json(), "stop"), "session_hash": "member1",
            "event_data": None, "trigger_id": None})
        assert joined.status_code == 200 and joined.json()["event_id"]
        _, stream = fetch(client, "GET", "/gradio_api/queue/data", pause=5,
                          params={"session_hash": "member1"})
        assert "Nothing is running." in stream

        # typed paths outside the data folder are refused by the running app
        for typed in ["..", str(root), str(root / "outside.txt"), "../outside.txt", "/etc",
                      ".cache/gradio"]:
            note = call(client, "open_folder", [typed])[0]
            assert note.startswith("**Error:** folder:"), (typed, note)
        assert call(client, "open_folder", ["outputs"])[0].startswith("0 images")


def test_the_login_page_works_in_a_browser(server, page):
    """The page a visitor gets (with the API description blanked) still logs in."""
    app, _, _ = server
    page.goto(app.url)
    page.get_by_label("username").fill(USER)
    page.get_by_label("password").fill(PASSWORD)
    page.get_by_role("button", name="Login").click()
    page.get_by_text(TITLE).wait_for(timeout=30000)
    page.get_by_role("tab", name="Train").click()
    page.locator("#train-start").wait_for(timeout=10000)


def test_failed_logins_are_slowed_down(server):
    app, _, _ = server
    with httpx.Client(base_url=app.url) as client:
        for _ in range(6):  # five free failures, the sixth locks the name for a second
            assert login(client, "wrong").status_code == 400
        refused = login(client)  # the right password is not even looked at while locked
        assert refused.status_code == 429 and "Too many failed logins" in refused.text
        assert client.get("/config").status_code == 401
        time.sleep(1.2)
        assert login(client).status_code == 200
        assert client.get("/config").status_code == 200
    assert "failed attempts for user 'u'" in app.output()


def fn_index(config: dict, api_name: str) -> int:
    return next(d["id"] for d in config["dependencies"] if d.get("api_name") == api_name)


def call(client: httpx.Client, api_name: str, data: list):
    started = client.post(f"/gradio_api/call/{api_name}", json={"data": data}, timeout=30)
    assert started.status_code == 200, started.text
    _, stream = fetch(client, "GET", f"/gradio_api/call/{api_name}/{started.json()['event_id']}",
                      pause=30)
    events = re.findall(r"event: (\w+)\ndata: (.*)", stream)
    kind, payload = events[-1]
    assert kind == "complete", stream
    return json.loads(payload)


# --- closing the app while a job trains ------------------------------------------------------

def make_training_data(data, tiny_model_dir) -> None:
    """A real embedding and a small dataset inside the data folder (typed paths are confined)."""
    from core.paths import Paths
    from tests.conftest import photo
    from trainers.configs import CreateEmbeddingConfig
    from trainers.embeddings import create_embedding
    shutil.copytree(tiny_model_dir, data / ".cache" / "tiny-demo")
    create_embedding(CreateEmbeddingConfig(name="trainme", model="tiny-demo").validate(),
                     Paths(data).ensure())
    folder = data / "datasets" / "cats"
    folder.mkdir(parents=True)
    for i in range(2):
        photo(i).save(folder / f"{i}.png")


def form_values(config: dict, api_name: str, changes: dict) -> list:
    """The page's default input values for an event, with some changed (by elem_id suffix)."""
    components = {c["id"]: c for c in config["components"]}
    dependency = next(d for d in config["dependencies"] if d.get("api_name") == api_name)
    values = []
    for input_id in dependency["inputs"]:
        props = components[input_id]["props"]
        elem_id = props.get("elem_id") or ""
        key = next((k for k in changes if elem_id == k or elem_id.endswith("-" + k)), None)
        values.append(changes[key] if key else props.get("value"))
    return values


def test_closing_the_app_lets_the_running_job_save_first(server):
    from trainers.formats.embedding import load_embedding
    from trainers.formats.optim_sidecar import optim_path
    app, data, _ = server
    with httpx.Client(base_url=app.url) as client:
        assert login(client).status_code == 200
        config = client.get("/config").json()
        values = form_values(config, "start", {
            "train-method": "textual_inversion", "TextualInversionConfig-embedding": "trainme",
            "TextualInversionConfig-model": "tiny-demo",
            "TextualInversionConfig-data_root": "datasets/cats",
            "TextualInversionConfig-width": 64, "TextualInversionConfig-height": 64,
            "TextualInversionConfig-steps": 100000, "TextualInversionConfig-save_every": 10,
            "TextualInversionConfig-preview_every": 0})
        assert call(client, "start", values)[0].startswith("Started job")
    copy = data / "outputs" / "textual_inversion"
    deadline = time.time() + 60
    while not list(copy.glob("*/trainme/embeddings/trainme-10.pt")):
        assert time.time() < deadline and app.proc.poll() is None, app.output()
        time.sleep(0.2)

    app.proc.send_signal(signal.SIGTERM)
    assert app.proc.wait(timeout=70) == 0, app.output()
    output = app.output()
    assert "Closing: asking 'Textual inversion: trainme' to save and stop" in output
    found = re.search(r"Training interrupted at step (\d+); saved (\S+)", output)
    assert found, output
    step = int(found.group(1))
    path = data / "embeddings" / "trainme.pt"
    assert found.group(2) == str(path) and step >= 10
    assert load_embedding(path).step == step  # the state at the moment it stopped, resumable
    from trainers.formats.safe_load import safe_torch_load
    assert safe_torch_load(optim_path(path))["danlu"]["step"] == step
    assert "Traceback" not in output
