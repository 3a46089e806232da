"""/metrics lines per upstream provider: requests by outcome (ok, cancelled, or the
error's kind: connect, timeout, stall, status_429, status_5xx, status_4xx, cut, protocol,
breaker_open, busy), retries, requests in flight, breaker state and time to first byte."""

from __future__ import annotations

from collections.abc import Iterator

from aicloud.engines.base import Engine
from aicloud.providers.link import LATENCY_BUCKETS, ProviderLink
from aicloud.scheduling.admission import unwrap


def links_of(models: list[tuple[str, Engine]]) -> list[ProviderLink]:
    """The provider links the engines use (engines without any have no `links`)."""
    found: dict[str, ProviderLink] = {}
    for _, engine in models:
        links = getattr(unwrap(engine), "links", None)  # behind the admission layer
        for link in links() if links is not None else ():
            found[link.name] = link
    return [found[name] for name in sorted(found)]


def provider_lines(models: list[tuple[str, Engine]]) -> Iterator[str]:
    links = links_of(models)

    def head(name: str, text: str, kind: str) -> str:
        return f"# HELP {name} {text}\n# TYPE {name} {kind}"

    name = "aicloud_provider_requests_total"
    yield head(name, "Requests sent to the provider, by outcome", "counter")
    for link in links:
        for outcome, n in sorted(link.metrics.requests.items()):
            yield f'{name}{{provider="{link.name}",outcome="{outcome}"}} {n}'
    for name, text, kind, value in (
            ("aicloud_provider_retries_total", "Attempts after a failure", "counter",
             lambda link: link.metrics.retries),
            ("aicloud_provider_in_flight", "Requests streaming from the provider", "gauge",
             lambda link: link.metrics.in_flight),
            ("aicloud_provider_breaker_state", "0 closed, 1 half-open, 2 open", "gauge",
             lambda link: int(link.breaker.state))):
        yield head(name, text, kind)
        for link in links:
            yield f'{name}{{provider="{link.name}"}} {value(link)}'
    name = "aicloud_provider_first_byte_seconds"
    yield head(name, "Time from sending to the provider's first chunk", "histogram")
    for link in links:
        running = 0
        for bound, count in zip((*map(str, LATENCY_BUCKETS), "+Inf"),
                                link.metrics.latency_counts, strict=True):
            running += count
            yield f'{name}_bucket{{provider="{link.name}",le="{bound}"}} {running}'
        yield f'{name}_sum{{provider="{link.name}"}} {link.metrics.latency_sum:.6f}'
        yield f'{name}_count{{provider="{link.name}"}} {running}'
