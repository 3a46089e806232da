from __future__ import annotations

import asyncio
import logging

from aicloud.providers.link import ProviderLink, ProviderLinks
from aicloud.providers.secrets import Secret
from aicloud.providers.store import ProviderConfig

CANARY = "sk-provider-CANARY-link"


def test_a_providers_secrets_and_host_are_scrubbed_from_its_messages() -> None:
    link = ProviderLink(ProviderConfig("p", "http://partner.internal:8080/v1", Secret(CANARY),
                                       {"X-Org": Secret("org-CANARY")}))
    text = (f"you sent Bearer {CANARY} and org-CANARY to http://partner.internal:8080/v1 "
            "(partner.internal:8080)")
    scrubbed = link.scrub(text)
    assert "CANARY" not in scrubbed and "partner.internal" not in scrubbed
    assert dict(link.headers) == {"x-org": "org-CANARY", "authorization": f"Bearer {CANARY}"}
    asyncio.run(link.close())


def test_hpack_never_logs_header_values_once_a_provider_speaks_http2() -> None:
    logging.getLogger("hpack").setLevel(logging.DEBUG)
    link = ProviderLink(ProviderConfig("p", "https://partner.example/v1", Secret(CANARY)))
    assert not logging.getLogger("hpack").isEnabledFor(logging.DEBUG)
    asyncio.run(link.close())


def test_a_stale_link_is_reread_once_while_requests_keep_using_it() -> None:
    reads = 0
    config = ProviderConfig("p", "http://127.0.0.1:9/v1", Secret(CANARY))

    class SlowStore:
        async def config(self, name: str) -> ProviderConfig:
            nonlocal reads
            reads += 1
            await asyncio.sleep(0.1)
            return config

    async def scenario() -> None:
        links = ProviderLinks(SlowStore())
        first = await links.link("p")
        first.checked -= 10  # stale
        got = await asyncio.gather(*(links.link("p") for _ in range(10)))
        assert all(link is first for link in got)
        await links.close()

    asyncio.run(scenario())
    assert reads == 2  # the first build, then one re-read for ten requests
