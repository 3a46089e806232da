"""Reading a provider's SSE body as bytes (engines/upstream.sse_lines): lines split across
network pieces, CRLF endings, a last line without an end, compressed bodies."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator

import httpx

from aicloud.engines.upstream import sse_lines
from aicloud.providers.link import ProviderLink
from aicloud.providers.secrets import Secret
from aicloud.providers.store import ProviderConfig


class Pieces(httpx.AsyncByteStream):
    def __init__(self, *pieces: bytes) -> None:
        self.pieces = pieces

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            yield piece


def lines_of(response: httpx.Response) -> list[bytes]:
    async def read() -> list[bytes]:
        return [line async for line in sse_lines(response)]

    return asyncio.run(read())


def test_lines_are_whole_whatever_the_pieces() -> None:
    body = Pieces(b'data: {"a"', b': 1}\r\n\r\n: keep-alive\n', b"\ndata: [DO", b"NE]")
    assert lines_of(httpx.Response(200, stream=body)) == [
        b'data: {"a": 1}', b"", b": keep-alive", b"", b"data: [DONE]"]


def test_a_compressed_body_is_decompressed() -> None:
    packed = gzip.compress(b"data: 1\n\ndata: [DONE]\n\n")
    response = httpx.Response(200, headers={"content-encoding": "gzip"},
                              stream=Pieces(packed[:7], packed[7:]))
    assert lines_of(response) == [b"data: 1", b"", b"data: [DONE]", b""]


def test_a_links_url_and_headers_are_built_once() -> None:
    link = ProviderLink(ProviderConfig("p", "http://partner:8080/v1", Secret("k")))
    assert link.url("chat/completions") is link.url("chat/completions")
    assert str(link.url("embeddings")) == "http://partner:8080/v1/embeddings"
    assert link.headers is link.headers and link.headers["authorization"] == "Bearer k"
    asyncio.run(link.close())
