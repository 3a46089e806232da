"""A Batch API input file, checked line by line: the first bad line is named by number.

Each line is one request, `{"custom_id", "method": "POST", "url", "body"}`, as OpenAI's
Batch API takes them; every line names the same endpoint and a distinct custom_id. The
bodies themselves are checked when their line runs, by the very code that checks an HTTP
request to that endpoint, so a bad body fails its own line, not the file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
MAX_LINES = 50_000  # OpenAI's limit per batch
MAX_CUSTOM_ID = 512
FIELDS = {"custom_id", "method", "url", "body"}
# neither can be stored (PostgreSQL text refuses NUL; UTF-8 has no lone surrogates)
UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


class InvalidFile(ValueError):
    """The file is not a valid batch input; `line` is 1-based (None: the whole file)."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(f"line {line}: {message}" if line is not None else message)
        self.line = line


@dataclass(slots=True, frozen=True)
class Request:
    """One line of a batch input file."""

    line: int  # 1-based, as the error messages count
    custom_id: str
    url: str
    body: dict[str, Any]


def _unstorable(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if UNSTORABLE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def parse_line(raw: bytes, number: int) -> Request:
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidFile("not UTF-8 text", number) from None
    except (ValueError, RecursionError):
        raise InvalidFile("not valid JSON", number) from None
    if not isinstance(data, dict):
        raise InvalidFile("each line must be a JSON object", number)
    if extra := sorted(set(data) - FIELDS):
        raise InvalidFile(f"unknown field {extra[0]!r}", number)
    custom_id, url, body = data.get("custom_id"), data.get("url"), data.get("body")
    if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= MAX_CUSTOM_ID:
        raise InvalidFile(f"custom_id must be a string of 1 to {MAX_CUSTOM_ID} characters",
                          number)
    if data.get("method") != "POST":
        raise InvalidFile('method must be "POST"', number)
    if url not in ENDPOINTS:
        raise InvalidFile(f"url must be one of {', '.join(ENDPOINTS)}", number)
    if not isinstance(body, dict):
        raise InvalidFile("body must be a JSON object", number)
    if _unstorable(data):
        raise InvalidFile("a string contains a NUL character or a lone surrogate", number)
    return Request(number, custom_id, url, body)


def parse(lines: Iterable[bytes]) -> list[Request]:
    """Every request of a file, or InvalidFile naming its first bad line. Blank lines
    are skipped (but counted, so numbers match an editor's)."""
    requests: list[Request] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        request = parse_line(raw, number)
        if request.custom_id in seen:
            raise InvalidFile(f"custom_id {request.custom_id[:64]!r} repeats line "
                              f"{seen[request.custom_id]}", number)
        if requests and request.url != requests[0].url:
            raise InvalidFile(f"url {request.url} differs from line {requests[0].line}'s "
                              f"{requests[0].url}: a batch runs one endpoint", number)
        seen[request.custom_id] = number
        requests.append(request)
        if len(requests) > MAX_LINES:
            raise InvalidFile(f"a batch file holds at most {MAX_LINES} requests", number)
    if not requests:
        raise InvalidFile("the file holds no requests")
    return requests
