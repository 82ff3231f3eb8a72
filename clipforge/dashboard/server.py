"""The dashboard's HTTP server (standard library only): pages, static assets and the JSON API.

Read-only: the only POST is the 'try it' inference, which writes nothing. Static files are served
from a fixed list of the package's own assets, never from a path taken from the URL. When bound to
a loopback address, requests must name a loopback host (a page on another site cannot reach the
dashboard through a DNS name that resolves to 127.0.0.1).
"""
from __future__ import annotations

import json
import logging
import math
import re
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import cast
from urllib.parse import parse_qs, urlsplit

from clipforge.dashboard.app import Dashboard
from clipforge.dashboard.spec import DashboardSpec

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
PAGES = {"/": "runs.html", "/run": "run.html", "/compare": "compare.html", "/scaling": "scaling.html",
         "/try": "try.html", "/sweep": "sweep.html"}
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}
_ASSET_NAME = re.compile(r"^[a-z0-9_-]+\.(html|js|css|svg|png)$")
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
       "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


def load_assets() -> dict[str, bytes]:
    """Every asset of the package, read once: what is not in this table cannot be served."""
    return {p.name: p.read_bytes() for p in STATIC_DIR.iterdir() if p.is_file() and _ASSET_NAME.match(p.name)}


def _clean_json(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_json(v) for v in obj]
    return obj


def to_json(obj) -> bytes:
    """JSON that browsers accept: NaN and infinities (a diverged loss, CLIP_benchmark's acc5) become null."""
    try:
        text = json.dumps(obj, allow_nan=False, separators=(",", ":"), default=str)
    except ValueError:
        text = json.dumps(_clean_json(obj), allow_nan=False, separators=(",", ":"), default=str)
    return text.encode("utf-8")


def serves_this_machine_only(host: str) -> bool:
    """Whether binding `host` keeps the dashboard reachable from this machine only (a loopback address)."""
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def exposure_warning(host: str, port: int, try_page: bool) -> str | None:
    """What binding a host that is not loopback exposes, and how to keep the dashboard local (None: loopback).

    The dashboard has no login: whoever reaches the port reads every run under --runs and, with the
    'try it' page on, uploads images that this machine decodes and runs through the runs' checkpoints.
    """
    if serves_this_machine_only(host):
        return None
    exposed = "every run's pages, specs and metrics" + (
        ", and the 'try it' page, which accepts image uploads and runs the checkpoints on them" if try_page else "")
    return (f"warning: --host {host}: anyone who can reach this machine on port {port} can use the dashboard "
            f"(it has no login): {exposed}. To keep it local, leave --host at 127.0.0.1 and reach it from "
            f"elsewhere through an SSH tunnel: ssh -N -L {port}:127.0.0.1:{port} USER@THIS-MACHINE, then open "
            f"http://127.0.0.1:{port}/")


def _host_name(host_header: str) -> str:
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class DashboardServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, spec: DashboardSpec, dashboard: Dashboard | None = None):
        self.spec = spec
        self.dashboard = dashboard or Dashboard(spec)
        self.assets = load_assets()
        self.loopback_only = serves_this_machine_only(spec.host)
        if ":" in spec.host:
            self.address_family = socket.AF_INET6
        super().__init__((spec.host, spec.port), Handler)

    @property
    def url(self) -> str:
        # An IPv4/IPv6 server's address starts (host, port); typeshed also allows a Unix socket's path in bytes.
        host, port = cast("tuple[str, int]", self.server_address[:2])
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}"


class Handler(BaseHTTPRequestHandler):
    server: DashboardServer
    server_version = "clipforge-dashboard"
    sys_version = ""

    def log_message(self, fmt: str, *args) -> None:
        log.debug("%s %s", self.address_string(), fmt % args)

    def _send(self, status: int, body: bytes, content_type: str, cache: str = "no-store") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        if content_type.startswith("text/html"):
            self.send_header("Content-Security-Policy", CSP)
            self.send_header("X-Frame-Options", "DENY")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: dict) -> None:
        self._send(status, to_json(payload), "application/json")

    def _host_allowed(self) -> bool:
        if not self.server.loopback_only:
            return True
        return _host_name(self.headers.get("Host", "")) in LOOPBACK_HOSTS

    def _params(self, query: str) -> dict[str, str]:
        # One decoding only: '%252e' arrives as the literal '%2e', which path checks refuse.
        return {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        if not self._host_allowed():
            return self._json(HTTPStatus.FORBIDDEN, {"error": "unexpected Host header"})
        parts = urlsplit(self.path)
        path, params = parts.path, self._params(parts.query)
        app = self.server.dashboard
        api = {"/api/runs": app.runs, "/api/run": app.run, "/api/metrics": app.metrics,
               "/api/scaling": app.scaling, "/api/sweep": app.sweep, "/api/compare": app.compare,
               "/api/checkpoints": app.checkpoints}
        if path in api:
            try:
                status, payload = app.handle(api[path], params)
            except Exception as e:  # one bad run folder must not take the page down
                log.exception("GET %s", self.path)
                status, payload = 500, {"error": f"{type(e).__name__}: {e}"}
            return self._json(status, payload)
        if path in PAGES:
            name = PAGES[path]
            if name == "try.html" and not self.server.spec.enable_try:
                return self._json(HTTPStatus.NOT_FOUND, {"error": "the 'try it' page is disabled"})
            return self._send(200, self.server.assets[name], CONTENT_TYPES[".html"])
        if path.startswith("/static/"):
            name = path[len("/static/"):]
            body = self.server.assets.get(name) if _ASSET_NAME.match(name) else None
            if body is not None:
                return self._send(200, body, CONTENT_TYPES[Path(name).suffix], cache="max-age=60")
        return self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})

    def do_POST(self) -> None:
        if not self._host_allowed():
            return self._json(HTTPStatus.FORBIDDEN, {"error": "unexpected Host header"})
        if urlsplit(self.path).path != "/api/try":
            return self._json(HTTPStatus.NOT_FOUND, {"error": "only /api/try accepts POST"})
        if not self.headers.get("Content-Type", "").startswith("application/json"):
            return self._json(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"error": "send the request as application/json"})
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._json(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length is required"})
        limit = int(self.server.spec.max_upload_mb * 2**20 * 4 / 3) + 65536  # base64 grows data by 4/3
        if length > limit:
            return self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                              {"error": f"request larger than {self.server.spec.max_upload_mb:g} MiB of image"})
        try:
            body = json.loads(self.rfile.read(length))
        except ValueError:
            return self._json(HTTPStatus.BAD_REQUEST, {"error": "request body is not JSON"})
        if not isinstance(body, dict):
            return self._json(HTTPStatus.BAD_REQUEST, {"error": "request body must be a JSON object"})
        app = self.server.dashboard
        status, payload = app.handle(app.try_it, body)
        return self._json(status, payload)


def start_in_thread(spec: DashboardSpec,
                    dashboard: Dashboard | None = None) -> tuple[DashboardServer, threading.Thread]:
    """A running server in a background thread (for tests and embedding); stop with `server.shutdown()`."""
    server = DashboardServer(spec, dashboard)
    thread = threading.Thread(target=server.serve_forever, name="dashboard-http", daemon=True)
    thread.start()
    return server, thread
