"""A model file whose chat template never ends: a clear 400 in time, a responsive server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from aicloud.models.catalog import bundled_model
from tests.conftest import Server, start_server

FOREVER = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


def with_template(source: Path, out: Path, template: str) -> Path:
    """A copy of `source` whose metadata carries `template` as its chat template."""
    import gguf
    from gguf.scripts.gguf_new_metadata import (
        MetadataDetails,
        copy_with_new_metadata,
        get_field_data,
    )

    reader = gguf.GGUFReader(source, "r")
    writer = gguf.GGUFWriter(out, arch=get_field_data(reader, gguf.Keys.General.ARCHITECTURE),
                             endianess=reader.endianess)
    copy_with_new_metadata(reader, writer, {gguf.Keys.Tokenizer.CHAT_TEMPLATE: MetadataDetails(
        gguf.GGUFValueType.STRING, template)}, [])
    return out


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("hostile-template")
    model = with_template(bundled_model().path, home / "forever.gguf", FOREVER)
    srv = start_server(home, "--model", f"forever={model}", "--context", "256",
                       "--sequences", "2")
    srv.keys["alpha"] = srv.new_key("alpha")
    yield srv
    srv.stop()


def test_endless_template_is_a_clear_400_and_health_stays_fast(hostile: Server) -> None:
    api = openai.OpenAI(base_url=f"{hostile.base_url}/v1", api_key=hostile.keys["alpha"],
                        max_retries=0, timeout=60)
    health: list[float] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            started = time.perf_counter()
            assert httpx.get(f"{hostile.base_url}/healthz", timeout=10).status_code == 200
            health.append(time.perf_counter() - started)
            time.sleep(0.05)

    watcher = threading.Thread(target=poll)
    watcher.start()
    try:
        for _ in range(2):
            started = time.perf_counter()
            with pytest.raises(openai.BadRequestError) as caught:
                api.chat.completions.create(model="forever", max_tokens=4,
                                            messages=[{"role": "user", "content": "hi"}])
            assert time.perf_counter() - started < 1.0 + 4.0  # the limit, a busy machine
            error = caught.value.body
            assert isinstance(error, dict)
            assert (error["code"], error["param"]) == ("chat_template_limit", "messages")
    finally:
        done.set()
        watcher.join()
    assert health and max(health) < 0.5  # 2.8 s when the template ran on the event loop
    log = hostile.log.read_text()
    assert log.count("chat template of model forever went past its limits") == 1
