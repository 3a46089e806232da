"""The fake provider and the links to it that the upstream engine's tests share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from aicloud.providers.link import ProviderLinks
from aicloud.providers.secrets import Secret
from aicloud.providers.store import ProviderConfig, ProviderSettings
from tests.conftest import LoopThread
from tests.providers.fake import RunningFake, running_fake

CANARY = "sk-provider-CANARY-51d2"


class Configs:
    def __init__(self, config: ProviderConfig) -> None:
        self.current = config

    async def config(self, name: str) -> ProviderConfig:
        return self.current


@pytest.fixture(scope="module")
def fake() -> Iterator[RunningFake]:
    with running_fake() as running:
        yield running


@pytest.fixture
def links(fake: RunningFake, loop_thread: LoopThread) -> Iterator[ProviderLinks]:
    fake.reset()
    config = ProviderConfig("fake", fake.base_url, Secret(CANARY),
                            {"X-Tenant": Secret("hdr-canary")},
                            ProviderSettings(timeout=1.0, connect_timeout=1.0, retries=1,
                                             max_concurrency=5))
    made = ProviderLinks(Configs(config))
    yield made
    loop_thread.run(made.close())
