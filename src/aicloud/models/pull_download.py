"""One file over HTTP into a partial file, resumed with a Range request after a broken
connection (in this pull, or a later one), hashed as it arrives.

Blocking by design: a pull runs in its own worker thread, never on the event loop."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import urljoin

import httpx

from aicloud.models.pull_sources import PullError, Remote, check_web_url, origin, shown_url

CHUNK = 1 << 20
# a connection that breaks is resumed where it stopped, this many times within one pull
ATTEMPTS = 4
MAX_REDIRECTS = 5
# what a pull leaves free on the disk beyond the file itself
HEADROOM = 64 << 20
TIMEOUT = httpx.Timeout(30.0, connect=10.0)
RETRY_PAUSE = 0.5  # seconds before the first resume; then twice, three times that
CONTENT_RANGE = re.compile(r"^bytes (?:(\d+)-\d+|\*)/(\d+|\*)$")


class PullCancelled(Exception):
    """The pull was asked to stop; its partial file stays for a later pull to resume."""


@dataclass(slots=True)
class Counter:
    """Bytes on disk so far, read by whoever shows progress (another thread)."""

    done: int = 0
    total: int | None = None
    resumed_from: int = 0


class Download:
    """Fetch `remote` into `partial`. A JSON file beside it records what the partial bytes
    are (the remote's identity and validator), so a later pull resumes only the same file."""

    def __init__(self, remote: Remote, partial: Path, counter: Counter,
                 cancel: threading.Event) -> None:
        self.remote, self.partial, self.counter, self.cancel = remote, partial, counter, cancel
        self.state_file = partial.with_name(partial.name + ".json")
        self.hasher = hashlib.sha256()
        self.validator: str | None = None  # the remote's ETag or Last-Modified, for If-Range

    def run(self) -> str:
        """Download what is missing; returns the whole file's sha256 (hex)."""
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        with _locked(self.partial) as fh, httpx.Client(timeout=TIMEOUT) as client:
            self._resume(fh)
            failure: Exception | None = None
            for attempt in range(ATTEMPTS):
                try:
                    self._fetch(client, fh)
                    return self.hasher.hexdigest()
                except (httpx.TransportError, _Incomplete) as exc:
                    failure = exc
                    if attempt + 1 < ATTEMPTS and self.cancel.wait(RETRY_PAUSE * (attempt + 1)):
                        raise PullCancelled() from None
            raise PullError(
                f"the download of {self.remote.shown} failed {ATTEMPTS} times "
                f"({type(failure).__name__}) at {self.counter.done} bytes; pull it again to "
                "resume") from None

    def discard(self) -> None:
        """Forget the partial file: its bytes are known bad (checksum, not a GGUF)."""
        self.partial.unlink(missing_ok=True)
        self.state_file.unlink(missing_ok=True)

    def _resume(self, fh: IO[bytes]) -> None:
        """Keep the partial bytes if they are of this very file, hashing them again."""
        try:
            saved = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            saved = {}
        if saved.get("identity") != self.remote.identity:
            self._restart(fh)
            return
        fh.seek(0)
        for block in iter(lambda: fh.read(CHUNK), b""):
            self._check_cancel()
            self.hasher.update(block)
        self.counter.done = self.counter.resumed_from = fh.tell()
        self.validator = saved.get("validator") or None

    def _restart(self, fh: IO[bytes]) -> None:
        fh.seek(0)
        fh.truncate()
        self.hasher = hashlib.sha256()
        self.counter.done = self.counter.resumed_from = 0
        self.validator = None

    def _fetch(self, client: httpx.Client, fh: IO[bytes]) -> None:
        offset = self.counter.done
        with self._open(client, offset) as response:
            if response.status_code == 416 and offset:
                self._at_end(fh, response)
                return
            total = self._position(fh, response, offset)
            self.counter.total = total
            self._check_space(total)
            self.validator = _validator(response)
            self.state_file.write_text(json.dumps(
                {"identity": self.remote.identity, "validator": self.validator}))
            for chunk in response.iter_raw():  # as received: a break loses no byte
                self._check_cancel()
                fh.write(chunk)
                self.hasher.update(chunk)
                self.counter.done += len(chunk)
        fh.flush()
        os.fsync(fh.fileno())
        if total is not None and self.counter.done != total:
            raise _Incomplete()

    def _at_end(self, fh: IO[bytes], response: httpx.Response) -> None:
        """416 on a resume: either the partial file is already whole, or it is not the
        remote's file any more (start over on the next attempt)."""
        match = CONTENT_RANGE.match(response.headers.get("content-range", ""))
        if match and match[2] != "*" and int(match[2]) == self.counter.done:
            self.counter.total = self.counter.done
            return
        self._restart(fh)
        raise _Incomplete()

    def _position(self, fh: IO[bytes], response: httpx.Response, offset: int) -> int | None:
        """Where this response's body starts: at `offset` (206), or at 0 (200: the server
        ignored the Range, or the file changed since the partial bytes came)."""
        if response.status_code == 206:
            match = CONTENT_RANGE.match(response.headers.get("content-range", ""))
            if match is None or match[1] is None or int(match[1]) != offset:
                raise PullError(f"{self.remote.shown} answered a Range request with another "
                                "range")
            return None if match[2] == "*" else int(match[2])
        if response.status_code != 200:
            raise PullError(f"{self.remote.shown} answered HTTP {response.status_code}")
        if offset:
            self._restart(fh)
        length = response.headers.get("content-length")
        return int(length) if length and length.isdigit() else None

    def _check_space(self, total: int | None) -> None:
        """Refuse before writing what cannot fit, from the size the remote announced."""
        if total is None:
            return
        need = total - self.counter.done
        free = shutil.disk_usage(self.partial.parent).free
        if need + HEADROOM > free:
            raise PullError(f"not enough disk space for {self.remote.file_name}: it needs "
                            f"{_size(need)} more and {self.partial.parent} has {_size(free)} "
                            f"free (keeping {_size(HEADROOM)} spare)")

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise PullCancelled()

    @contextmanager
    def _open(self, client: httpx.Client, offset: int) -> Iterator[httpx.Response]:
        """GET the remote from `offset`, following redirects by hand: only to http(s), and
        the remote's headers (the hub's token) only within the origin they were meant for."""
        url, headers = self.remote.url, dict(self.remote.headers)
        extra = {"accept-encoding": "identity"}
        if offset:
            extra["range"] = f"bytes={offset}-"
            if self.validator:
                extra["if-range"] = self.validator
        for _ in range(MAX_REDIRECTS + 1):
            request = client.build_request("GET", url, headers={**headers, **extra})
            response = client.send(request, stream=True)
            if not response.is_redirect:
                try:
                    yield response
                finally:
                    response.close()
                return
            response.close()
            target = check_web_url(urljoin(url, response.headers["location"]))
            if origin(target) != origin(url):
                headers = {}
            url = target
        raise PullError(f"{shown_url(self.remote.url)} redirects more than {MAX_REDIRECTS} "
                        "times")


class _Incomplete(Exception):
    """The body ended before the announced size: resume it."""


@contextmanager
def _locked(path: Path) -> Iterator[IO[bytes]]:
    """The partial file, opened for writing by one pull at a time on this machine (the
    server's and a CLI's pulls of the same model included)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fh = os.fdopen(fd, "r+b")
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PullError(f"another pull is writing {path.name}") from None
        fh.seek(0, os.SEEK_END)
        yield fh
    finally:
        fh.close()


def _validator(response: httpx.Response) -> str | None:
    """A strong ETag (or Last-Modified) for If-Range: a changed file is then sent whole."""
    etag: str = response.headers.get("etag", "")
    if etag and not etag.startswith("W/"):
        return etag
    modified: str | None = response.headers.get("last-modified")
    return modified


def _size(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / (1 << 20):.1f} MiB" if n < 1 << 30 else \
        f"{n / (1 << 30):.1f} GiB"

