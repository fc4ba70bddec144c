"""ASGI middlewares for an app with a login: every route needs the login cookie except what the
login page itself needs, and that page carries no app data.

gradio checks the login on most of its routes, but not on all of them (its cancel, heartbeat,
reset, stream, startup-events, app_id, custom-component routes, FastAPI's own /openapi.json and
/docs, ...), and each gradio release may add more. So instead of trusting each route, one gate
in front of all of them lets through only the short list below; everything else gets 401
unless the request carries a valid login cookie."""
from __future__ import annotations

import json
import re

# What a visitor's browser needs to show the login page and log in (measured with a real
# browser on gradio 6): the page, its static files and theme, the favicon, the login itself.
PUBLIC_EXACT = {("GET", "/"), ("HEAD", "/"), ("POST", "/login"), ("POST", "/login/"),
                ("GET", "/logout"), ("GET", "/favicon.ico"), ("GET", "/theme.css"),
                ("GET", "/gradio_api/theme.css"), ("GET", "/robots.txt"),
                ("GET", "/manifest.json"),
                # gradio calls this itself while launching; after that it only answers False
                ("GET", "/gradio_api/startup-events")}
PUBLIC_PREFIXES = ("/static/", "/assets/", "/svelte/")  # gradio's own built files (GET/HEAD)


def logged_in(scope) -> bool:
    """True when the request carries a login cookie that gradio issued and still knows."""
    from starlette.requests import HTTPConnection
    server = scope.get("app")
    tokens, cookie_id = getattr(server, "tokens", None), getattr(server, "cookie_id", None)
    if tokens is None or cookie_id is None:
        return False
    cookies = HTTPConnection(scope).cookies
    token = cookies.get(f"access-token-{cookie_id}") or \
        cookies.get(f"access-token-unsecure-{cookie_id}")
    return token is not None and tokens.get(token) is not None


def is_public(method: str, path: str) -> bool:
    if (method, path) in PUBLIC_EXACT:
        return True
    return method in ("GET", "HEAD") and path.startswith(PUBLIC_PREFIXES) and ".." not in path


class RequireLogin:
    """Refuse (401) every HTTP request and websocket that is not logged in, except the routes
    the login page needs (`is_public`)."""

    BODY = json.dumps({"detail": {"error": "Not authenticated"}}).encode()

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        kind = scope["type"]
        if kind not in ("http", "websocket") or logged_in(scope) or \
                (kind == "http" and is_public(scope["method"], scope["path"])):
            await self.app(scope, receive, send)
            return
        if kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(self.BODY)).encode())]})
        await send({"type": "http.response.body", "body": self.BODY})


class HideApiInfoFromVisitors:
    """ASGI middleware: gradio 6 writes the app's API description (every endpoint with its
    defaults and dropdown choices, e.g. the names of the user's models and embeddings) into
    the login page it shows to visitors who are not logged in. This blanks it in every page
    sent without a valid login cookie, and refuses a page it cannot blank."""

    SCRIPT = re.compile(rb"<script>window\.gradio_api_info = .*?;</script>", re.DOTALL)
    EMPTY = b'<script>window.gradio_api_info = {"named_endpoints":{},"unnamed_endpoints":{}};</script>'

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD") or \
                logged_in(scope):
            await self.app(scope, receive, send)
            return
        start: dict = {}
        parts: list[bytes] = []

        async def filtered(message):
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                if not headers.get(b"content-type", b"").startswith(b"text/html"):
                    await send(message)  # not a page: pass it (and its body) through
                    return
                start.update(message)
                return
            if not start or message["type"] != "http.response.body":
                await send(message)
                return
            parts.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body, count = self.SCRIPT.subn(self.EMPTY, b"".join(parts))
            if not count and b"gradio_api_info" in body:
                start["status"] = 500
                body = b"This page could not be shown safely; log in first."
            headers = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, filtered)
