"""What this server holds per provider while it runs: one pooled `httpx.AsyncClient`
(HTTP/2 where the provider offers it over TLS), the breaker, its places in flight given
out fairly (gate.py), and the counters /metrics shows. Every upstream model of a
provider shares its link.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

import httpx

from aicloud.providers.breaker import Breaker
from aicloud.providers.gate import FairGate
from aicloud.providers.store import ProviderConfig

log = logging.getLogger(__name__)

# time to the first relayed byte, seconds
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# A config is re-read at most this often, so an admin's change reaches running servers.
REFRESH_SECONDS = 2.0


@dataclass(slots=True)
class LinkMetrics:
    requests: Counter[str] = field(default_factory=Counter)  # by outcome: ok, or error kind
    retries: int = 0
    in_flight: int = 0
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0

    def first_byte(self, seconds: float) -> None:
        index = next((i for i, b in enumerate(LATENCY_BUCKETS) if seconds <= b),
                     len(LATENCY_BUCKETS))
        self.latency_counts[index] += 1
        self.latency_sum += seconds


class ProviderLink:
    def __init__(self, config: ProviderConfig, transport: httpx.AsyncBaseTransport | None = None
                 ) -> None:
        self.config = config
        s = config.settings
        self.breaker = Breaker()
        self.metrics = LinkMetrics()
        self.gate = FairGate(s.max_concurrency)
        limits = httpx.Limits(max_connections=s.max_concurrency,
                              max_keepalive_connections=s.max_concurrency)
        # http2 only matters over TLS (ALPN); plain http stays HTTP/1.1 keep-alive
        http2 = config.base_url.startswith("https://")
        if http2:
            # hpack's DEBUG lines print header values (a provider's extra headers among
            # them): it never logs below INFO in a server that holds provider secrets
            logging.getLogger("hpack").setLevel(logging.INFO)
        self.client = httpx.AsyncClient(
            base_url=config.base_url, http2=http2,
            limits=limits, transport=transport, trust_env=False, follow_redirects=False,
            timeout=httpx.Timeout(s.timeout, connect=s.connect_timeout))
        self.checked = time.monotonic()
        # built once: a config never changes (a changed provider gets a new link)
        self.headers = self._headers()
        self._urls: dict[str, httpx.URL] = {}

    @property
    def name(self) -> str:
        return self.config.name

    def url(self, endpoint: str) -> httpx.URL:
        """The provider's URL of an endpoint ("chat/completions"), parsed once."""
        url = self._urls.get(endpoint)
        if url is None:
            url = self._urls[endpoint] = httpx.URL(f"{self.config.base_url}/{endpoint}")
        return url

    def _headers(self) -> httpx.Headers:
        out = {name: value.reveal() for name, value in self.config.headers.items()}
        if self.config.api_key is not None:
            out["authorization"] = f"Bearer {self.config.api_key.reveal()}"
        return httpx.Headers(out)

    def scrub(self, text: str) -> str:
        """`text` (a provider's error message) without any of our secrets for it, nor its
        URL or host: a provider that echoes the request must not leak them to our callers."""
        where = urlsplit(self.config.base_url)
        secrets = [self.config.base_url, where.netloc, where.hostname or ""]
        secrets += [v.reveal() for v in self.config.headers.values()]
        if self.config.api_key is not None:
            secrets.append(self.config.api_key.reveal())
        for secret in sorted(secrets, key=len, reverse=True):
            if secret:
                text = text.replace(secret, "***")
        return text

    async def close(self) -> None:
        await self.client.aclose()


class ConfigSource(Protocol):
    async def config(self, name: str) -> ProviderConfig: ...


class ProviderLinks:
    """The links of this process by provider name, built on first use from the store and
    rebuilt when an admin changed the provider (checked every REFRESH_SECONDS); a link
    replaced keeps serving the requests it had."""

    def __init__(self, source: ConfigSource,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._source = source
        self._transport = transport
        self._links: dict[str, ProviderLink] = {}
        self._old: list[ProviderLink] = []
        self._lock = asyncio.Lock()

    async def link(self, name: str) -> ProviderLink:
        """Raises the store's NotFound when the provider was removed."""
        link = self._links.get(name)
        if link is not None and (time.monotonic() - link.checked < REFRESH_SECONDS
                                 or self._lock.locked()):
            return link  # fresh, or being refreshed: requests never queue behind a read
        async with self._lock:
            link = self._links.get(name)
            if link is not None and time.monotonic() - link.checked < REFRESH_SECONDS:
                return link
            config = await self._source.config(name)
            if link is not None and link.config == config:
                link.checked = time.monotonic()
                return link
            fresh = ProviderLink(config, self._transport)
            if link is not None:
                fresh.metrics = link.metrics  # the counters of a provider outlive a change
                self._old.append(link)
            self._links[name] = fresh
            return fresh

    def all(self) -> list[ProviderLink]:
        return list(self._links.values())

    async def close(self) -> None:
        for link in (*self._links.values(), *self._old):
            await link.close()
        self._links.clear()
        self._old.clear()
