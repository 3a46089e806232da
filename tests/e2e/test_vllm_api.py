"""The openai-client suite of test_openai_api.py, against `aicloud serve --engine vllm`.

The same test functions run here, collected again in this module, where `server` is a
vLLM-backed server serving the bundled model (converted to a Hugging Face folder) under the
same id. vLLM starts slowly on a CPU, so the server is started once for the module.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import Server, start_server
from tests.e2e import test_openai_api as suite
from tests.e2e import test_structured_outputs as structured

STARTED: dict[str, float] = {}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, hf_model: Path) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("aicloud-vllm")
    t0 = time.monotonic()
    srv = start_server(home, "--engine", "vllm", "--model", f"{suite.MODEL}={hf_model}",
                       "--context", "1024", "--sequences", "20", "--kv-budget-mb", "512",
                       extra_env={"AICLOUD_VLLM_EAGER": "1"}, ready_within=600)
    STARTED["seconds"] = time.monotonic() - t0
    srv.keys["alpha"] = srv.new_key("alpha")
    yield srv
    srv.stop()


client = suite.client
test_models_list = suite.test_models_list
test_chat_completion_records_usage = suite.test_chat_completion_records_usage
test_stream_usage_chunk_equals_stored_row = suite.test_stream_usage_chunk_equals_stored_row
test_stream_matches_non_stream_at_temperature_zero = (
    suite.test_stream_matches_non_stream_at_temperature_zero)
test_max_tokens_gives_length = suite.test_max_tokens_gives_length
test_stop_sequence_is_honoured = suite.test_stop_sequence_is_honoured
test_completions_both_modes = suite.test_completions_both_modes
test_completion_defaults_to_sixteen_tokens = suite.test_completion_defaults_to_sixteen_tokens
test_sixteen_concurrent_streams_complete = suite.test_sixteen_concurrent_streams_complete
test_healthz_answers_while_model_busy = suite.test_healthz_answers_while_model_busy
test_client_disconnect_cancels_and_bills = suite.test_client_disconnect_cancels_and_bills
# structured outputs through vLLM's guidance backend: the same grammar, the same checks
http = structured.http
test_parse_with_a_pydantic_model = structured.test_parse_with_a_pydantic_model
test_structured_stream_joins_into_valid_json = structured.test_streamed_deltas_join_into_valid_json
test_max_tokens_inside_the_json_is_length = structured.test_max_tokens_inside_the_json_is_length
test_bad_response_formats_are_400 = structured.test_bad_response_formats_are_400


def test_served_by_vllm(server: Server) -> None:
    print(f"vLLM server ready in {STARTED['seconds']:.0f} s")
    key = {"Authorization": f"Bearer {server.admin_key()}"}
    models = httpx.get(f"{server.base_url}/admin/v1/models", headers=key, timeout=30).json()
    assert [(m["id"], m["engine"]) for m in models["data"]] == [(suite.MODEL, "vllm")]


def test_vllm_model_says_it_does_not_embed(server: Server) -> None:
    """This engine generates only: its card says so and embeddings get a 400 naming the
    model, never a crash or a silent difference."""
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=server.keys["alpha"],
                           max_retries=0)
    assert client.models.retrieve(suite.MODEL).capabilities == ["generate"]  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model=suite.MODEL, input="hello")
    assert exc.value.param == "model" and "embeddings" in exc.value.message
