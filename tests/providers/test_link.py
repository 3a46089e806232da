from __future__ import annotations

import asyncio
import logging

from aicloud.providers.link import ProviderLink
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
    assert link.headers() == {"X-Org": "org-CANARY", "authorization": f"Bearer {CANARY}"}
    asyncio.run(link.close())


def test_hpack_never_logs_header_values_once_a_provider_speaks_http2() -> None:
    logging.getLogger("hpack").setLevel(logging.DEBUG)
    link = ProviderLink(ProviderConfig("p", "https://partner.example/v1", Secret(CANARY)))
    assert not logging.getLogger("hpack").isEnabledFor(logging.DEBUG)
    asyncio.run(link.close())
