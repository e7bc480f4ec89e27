"""An HTTP image server on 127.0.0.1 for the download tests: real JPEG/PNG/WebP bodies and the faults the
web has (404, 500, slow, redirect, truncated body, a non-image body, X-Robots-Tag: noai, a huge image), a
count of requests per path, and a gate that holds chosen paths until it is opened."""

from __future__ import annotations

import io
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

TYPES = {"jpg": ("JPEG", "image/jpeg"), "png": ("PNG", "image/png"), "webp": ("WEBP", "image/webp")}


def image_bytes(colour: tuple[int, int, int], fmt: str = "png", size: tuple[int, int] = (48, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=TYPES[fmt][0])
    return buf.getvalue()


class ImageServer:
    """``routes[path] = (kind, body, content_type)``; kinds: ok, status:<code>, slow:<seconds>, redirect (body
    is the target path), truncated, noai. Paths in ``gated`` wait until ``gate`` is set."""

    def __init__(self):
        self.routes: dict[str, tuple[str, bytes, str]] = {}
        self.counts: Counter = Counter()
        self.gated: set[str] = set()
        self.gate = threading.Event()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                with server._lock:
                    server.counts[self.path] += 1
                if self.path in server.gated:
                    server.gate.wait(120)
                kind, body, ctype = server.routes.get(self.path, ("status:404", b"", "text/plain"))
                try:
                    self._answer(kind, body, ctype)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout, killed): nothing to answer

            def _answer(self, kind, body, ctype):
                if kind.startswith("status:"):
                    self.send_error(int(kind.split(":")[1]))
                    return
                if kind == "redirect":
                    self.send_response(302)
                    self.send_header("Location", body.decode())
                    self.end_headers()
                    return
                if kind.startswith("slow:"):
                    time.sleep(float(kind.split(":")[1]))
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                if kind == "noai":
                    self.send_header("X-Robots-Tag", "noai")
                self.end_headers()
                # a truncated body: the promised length, half of it sent, then the connection closes
                self.wfile.write(body[: len(body) // 2] if kind == "truncated" else body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def add_image(self, path: str, colour, fmt: str = "png", kind: str = "ok", size=(48, 40)) -> str:
        self.routes[path] = (kind, image_bytes(colour, fmt, size), TYPES[fmt][1])
        return self.url + path

    def __enter__(self) -> ImageServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(10)
