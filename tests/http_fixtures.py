"""A loopback HTTP server that produces every download outcome the dataset builder must handle.

Routes (all on http://127.0.0.1:PORT):
  /img/WxH.EXT?seed=N[&alpha=1]   a generated image (jpg/png/webp/gif); same parameters -> same bytes
  /status/CODE                    an empty response with that status
  /flaky/NAME?fails=K&code=C      status C for the first K requests of NAME, then an image
  /slow?delay=S                   an image after S seconds
  /text                           HTML served as image/jpeg
  /big?bytes=N&length=0|1         N bytes, with or without a Content-Length header
  /bomb?w=W&h=H                   a tiny PNG whose header claims WxH pixels
  /robots?tag=VALUE               an image with `X-Robots-Tag: VALUE`
  /redirect?to=PATH&hops=K        K redirects, then PATH (a path or an absolute URL); /redirect-loop never ends
  /drip?every=S&bytes=N&for=T     headers at once, then a body of N bytes at one byte every S seconds
  /drip-headers?every=S&for=T     a status line, then a header line one byte every S seconds, never finished
                                  (both drips give up after T seconds, 30 by default, and close the connection)
Every request is counted in `server.hits[path]`; `last_headers[path]` keeps its request headers and
`client_ports` the client port of every connection seen.
"""
from __future__ import annotations

import collections
import io
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, urlsplit

import numpy as np
from PIL import Image

_PIL_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF"}
_MIME = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp", "gif": "image/gif"}


def pattern_image(width: int, height: int, seed: int = 0, alpha: bool = False) -> Image.Image:
    """A deterministic colour pattern (different seeds give different images)."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x * 255 // max(width - 1, 1) + seed * 37) % 256,
                    (y * 255 // max(height - 1, 1) + seed * 91) % 256,
                    ((x // 8 + y // 8) % 2) * 200 + (seed * 13) % 56], axis=-1).astype(np.uint8)
    img = Image.fromarray(rgb, "RGB")
    if alpha:
        a = np.full((height, width), 255, np.uint8)
        a[:, : width // 2] = 0  # left half fully transparent
        img.putalpha(Image.fromarray(a, "L"))
    return img


def encode_image(img: Image.Image, ext: str) -> bytes:
    out = io.BytesIO()
    if ext in ("jpg", "jpeg") and img.mode == "RGBA":
        img = img.convert("RGB")
    img.save(out, format=_PIL_FORMATS[ext])
    return out.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A valid tiny PNG whose IHDR is patched to claim width x height (a decompression bomb header)."""
    data = bytearray(encode_image(pattern_image(4, 4), "png"))
    # Signature (8) + IHDR length (4) + b"IHDR" (4), then width and height; CRC covers type + 13 data bytes.
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so the builder's connection pooling is exercised
    server: "_Server"

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _send(self, code: int, body: bytes = b"", ctype: str = "application/octet-stream",
              headers: dict | None = None, length: bool = True) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if length:
            self.send_header("Content-Length", str(len(body)))
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading on purpose (size limit, timeout)

    def _image(self, headers: dict | None = None, w: int = 64, h: int = 48, ext: str = "jpg", seed: int = 0,
               alpha: bool = False) -> None:
        self._send(200, encode_image(pattern_image(w, h, seed, alpha), ext), _MIME[ext], headers)

    def _drip(self, head: bytes, slow: bytes, every: float, seconds: float) -> None:
        """Send `head` at once, then `slow` one byte every `every` seconds for at most `seconds`, then hang up."""
        self.close_connection = True
        end = time.monotonic() + seconds
        try:
            self.wfile.write(head)
            for i in range(len(slow)):
                if time.monotonic() >= end:
                    break
                time.sleep(every)
                self.wfile.write(slow[i:i + 1])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up: what a drip is there to test

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        path = parts.path
        with self.server.lock:
            self.server.hits[path] += 1
            count = self.server.hits[path]
            self.server.last_headers[path] = dict(self.headers.items())
            self.server.client_ports.add(self.client_address[1])
        if path.startswith("/img/"):
            size, ext = path[len("/img/"):].rsplit(".", 1)
            w, h = (int(v) for v in size.split("x"))
            self._image(w=w, h=h, ext=ext.lower(), seed=int(q.get("seed", 0)), alpha=q.get("alpha") == "1")
        elif path.startswith("/status/"):
            self._send(int(path.rsplit("/", 1)[1]))
        elif path.startswith("/flaky/"):
            if count <= int(q.get("fails", 1)):
                self._send(int(q.get("code", 500)), b"try again")
            else:
                self._image(seed=zlib.crc32(path.encode()) % 1000)  # each NAME its own image
        elif path == "/slow":
            time.sleep(float(q.get("delay", 5)))
            self._image()
        elif path == "/text":
            self._send(200, b"<html><body>not an image</body></html>", "image/jpeg")
        elif path == "/big":
            body = b"\xff\xd8\xff" + bytes(int(q.get("bytes", 2_000_000)))
            self._send(200, body, "image/jpeg", length=q.get("length", "1") == "1")
        elif path == "/bomb":
            self._send(200, png_claiming_size(int(q.get("w", 30000)), int(q.get("h", 30000))), "image/png")
        elif path == "/robots":
            self._image(headers={"X-Robots-Tag": q.get("tag", "noai")})
        elif path == "/redirect":
            hops = int(q.get("hops", 1))
            target = q.get("to", "/img/64x48.jpg")
            nxt = target if hops <= 1 else f"/redirect?hops={hops - 1}&to={quote(target, safe='')}"
            self._send(302, headers={"Location": nxt})
        elif path == "/redirect-loop":
            self._send(302, headers={"Location": "/redirect-loop"})
        elif path == "/drip":
            n = int(q.get("bytes", 1000))
            head = (f"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: {n}\r\n"
                    "Connection: close\r\n\r\n").encode()
            self._drip(head, b"\xff" * n, float(q.get("every", 1)), float(q.get("for", 30)))
        elif path == "/drip-headers":
            self._drip(b"HTTP/1.1 200 OK\r\nX-Drip: ", b"a" * 100_000, float(q.get("every", 1)),
                       float(q.get("for", 30)))
        else:
            self._send(404, b"no such route")


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a sleeping /slow handler must not block shutdown
    block_on_close = False

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hits: collections.Counter = collections.Counter()
        self.last_headers: dict[str, dict[str, str]] = {}
        self.client_ports: set[int] = set()  # one per TCP connection: shows whether clients reuse them
        self.lock = threading.Lock()

    def handle_error(self, request, client_address) -> None:
        # Clients hang up on purpose (size limits, timeouts); only unexpected errors are worth printing.
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class ImageServer:
    """Context manager running the server on a background thread; `url(path)` builds absolute URLs.

    Subclasses may answer with their own `handler` (a `_Handler` subclass), which can read `server.delay`
    (seconds given to the constructor), wait on `server.gate` (released at exit) and append to `server.stamps`.
    """

    handler: type = _Handler

    def __init__(self, host: str = "127.0.0.1", delay: float = 0.0):
        self.host = host
        self.delay = delay
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "ImageServer":
        server = _Server()
        server.RequestHandlerClass = self.handler
        server.delay = self.delay
        server.gate = threading.Event()
        server.stamps = []
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name=f"{type(self).__name__}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        assert self._server is not None
        self._server.gate.set()  # release handlers still waiting, so shutdown does not wait on them
        self._server.shutdown()
        self._server.server_close()

    @property
    def gate(self) -> threading.Event:
        assert self._server is not None
        return self._server.gate

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    @property
    def hits(self) -> collections.Counter:
        assert self._server is not None
        return self._server.hits

    @property
    def last_headers(self) -> dict[str, dict[str, str]]:
        assert self._server is not None
        return self._server.last_headers

    @property
    def client_ports(self) -> set[int]:
        assert self._server is not None
        return self._server.client_ports

    def url(self, path: str, host: str | None = None) -> str:
        return f"http://{host or self.host}:{self.port}{path}"
