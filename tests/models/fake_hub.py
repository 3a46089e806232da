"""A small HTTP server on 127.0.0.1 for pull tests: plain files with Range support, and one
Hugging Face repository the way the hub answers for it.

The hub part answers `HEAD/GET /{owner}/{repo}/resolve/{revision}/{file}` as huggingface.co
does for an LFS file: a 302 to a CDN (here `localhost`, another origin than `127.0.0.1`)
with `X-Repo-Commit`, `ETag`, `X-Linked-Etag` (the file's sha256) and `X-Linked-Size`;
huggingface_hub reads those from the redirect itself and does not follow it. Faults are
set per test: `cuts` drops the connection after that many body bytes (one GET each),
`delay` slows every chunk, `huge` announces a file no disk holds."""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CHUNK = 64 << 10


@dataclass
class Seen:
    method: str
    path: str
    range: str | None
    authorization: str | None
    body_bytes: int = 0


@dataclass
class FakeHub:
    files: dict[str, bytes] = field(default_factory=dict)
    repo: str = "acme/tiny"
    token: str | None = None  # when set, the resolve endpoint wants it
    cuts: list[int] = field(default_factory=list)
    delay: float = 0.0
    huge: int = 1 << 50
    linked_sha: str | None = None  # what the hub claims, when not the file's own
    redirects: dict[str, str] = field(default_factory=dict)  # path -> Location
    seen: list[Seen] = field(default_factory=list)
    base_url: str = ""
    cdn_url: str = ""

    def url(self, name: str) -> str:
        return f"{self.base_url}/files/{name}"

    def gets(self, prefix: str = "/") -> list[Seen]:
        return [s for s in self.seen if s.method == "GET" and s.path.startswith(prefix)]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self.route()

    def do_GET(self) -> None:
        self.route()

    def route(self) -> None:
        seen = Seen(self.command, self.path, self.headers.get("range"),
                    self.headers.get("authorization"))
        self.hub.seen.append(seen)
        path = self.path.split("?", 1)[0]
        resolve = re.match(rf"^/{self.hub.repo}/resolve/([^/]+)/(.+)$", path)
        if resolve:
            self.resolve(resolve[1], resolve[2])
        elif path in self.hub.redirects:
            self.send_response(302)
            self.send_header("location", self.hub.redirects[path])
            self.send_header("content-length", "0")
            self.end_headers()
        elif path == "/files/huge.gguf":
            self.send_response(200)
            self.send_header("content-length", str(self.hub.huge))
            self.end_headers()
            self.close_connection = True
        elif path.startswith(("/files/", "/cdn/")) and path.split("/")[-1] in self.hub.files:
            self.serve(self.hub.files[path.split("/")[-1]], seen)
        else:
            self.plain(404)

    def resolve(self, revision: str, name: str) -> None:
        if self.hub.token and self.headers.get("authorization") != f"Bearer {self.hub.token}":
            self.plain(401)
            return
        if revision not in ("main", COMMIT) or name not in self.hub.files:
            self.send_response(404)
            self.send_header("x-error-code", "EntryNotFound")
            self.send_header("content-length", "0")
            self.end_headers()
            return
        data = self.hub.files[name]
        self.send_response(302)
        self.send_header("location", f"{self.hub.cdn_url}/cdn/{name}?signature=cdn-only")
        self.send_header("x-repo-commit", COMMIT)
        self.send_header("etag", '"a1b2c3"')
        self.send_header("x-linked-etag", f'"{self.hub.linked_sha or sha256(data)}"')
        self.send_header("x-linked-size", str(len(data)))
        self.send_header("content-length", "0")
        self.end_headers()

    def serve(self, data: bytes, seen: Seen) -> None:
        start = 0
        ranged = re.match(r"^bytes=(\d+)-$", self.headers.get("range") or "")
        etag = f'"{sha256(data)[:16]}"'
        if ranged and self.headers.get("if-range", etag) == etag:
            start = int(ranged[1])
            if start >= len(data):
                self.send_response(416)
                self.send_header("content-range", f"bytes */{len(data)}")
                self.send_header("content-length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("content-range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("content-length", str(len(data) - start))
        self.send_header("etag", etag)
        self.send_header("accept-ranges", "bytes")
        self.end_headers()
        if self.command == "HEAD":
            return
        limit = self.hub.cuts.pop(0) if self.hub.cuts else None
        for at in range(start, len(data), CHUNK):
            chunk = data[at:at + CHUNK]
            if limit is not None and seen.body_bytes + len(chunk) > limit:
                chunk = chunk[:limit - seen.body_bytes]
                self.wfile.write(chunk)
                seen.body_bytes += len(chunk)
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(chunk)
            seen.body_bytes += len(chunk)
            if self.hub.delay:
                time.sleep(self.hub.delay)

    def plain(self, status: int) -> None:
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()


@contextmanager
def running(hub: FakeHub) -> Iterator[FakeHub]:
    handler = type("BoundHandler", (Handler,), {"hub": hub})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    port = server.server_address[1]
    hub.base_url, hub.cdn_url = f"http://127.0.0.1:{port}", f"http://localhost:{port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
