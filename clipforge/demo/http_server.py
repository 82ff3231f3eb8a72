"""A local web server for the demo's images, so the pipeline downloads them over real HTTP."""
from __future__ import annotations

import functools
import threading
from contextlib import contextmanager
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator, cast


class _FilesOnlyHandler(SimpleHTTPRequestHandler):
    """Serves regular files under the root directory; no listings, nothing reachable through symlinks or `..`."""

    def translate_path(self, path: str) -> str:
        # The base class already drops `..` segments; resolving catches symlinks that point outside.
        translated = super().translate_path(path)
        root = Path(self.directory)
        missing = str(root / ".missing")
        try:
            resolved = Path(translated).resolve()
        except (OSError, RuntimeError):
            return missing
        if resolved != root and root not in resolved.parents:
            return missing
        # Keep a trailing slash: the base class answers 404 for "file.png/".
        return str(resolved) + ("/" if translated.endswith("/") and resolved != root else "")

    def list_directory(self, path):
        self.send_error(HTTPStatus.NOT_FOUND, "File not found")
        return None

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - name fixed by the base class
        # Thousands of image requests per run: logging each one would drown the pipeline's own output.
        return


@contextmanager
def serve_directory(root: Path, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve the files under `root` over HTTP while the block runs; yield the base URL ("http://host:port")."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"serve_directory: {root} is not a directory")
    handler = functools.partial(_FilesOnlyHandler, directory=str(root.resolve()))
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name=f"http-{root.name}", daemon=True)
    thread.start()
    # An IPv4/IPv6 server's address starts (host, port); typeshed also allows a Unix socket's path in bytes.
    bound_host, bound_port = cast("tuple[str, int]", server.server_address[:2])
    try:
        yield f"http://{bound_host}:{bound_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
