"""Property-based fuzzing of the whole API from the server's own /openapi.json, on SQLite and
on PostgreSQL: every operation, with data that fits its schema and (where the operation
takes any input it could refuse) data that does not,
sent with an API key and with an installation owner's admin key, must answer without a 5xx
and with a response that matches the document.

A few valid examples of each operation are also sent as hostile variants (`HOSTILE`): the
classes of input random generation rarely hits but issue 17's probes found 500s with.
Whatever the document describes is fuzzed, so request bodies documented later are fuzzed
too. Generations are kept short (a small context, max_tokens capped in `short`), so the
fuzz spends its time on inputs, not on decoding. Examples are derandomized: a run is
repeatable, and a failure names the operation and shows the request to replay it.

schemathesis' own pytest integration is not used: its lazy schemas rewrite a private
attribute of pytest's nodes that pytest 9.2 no longer has. Each operation is one test here,
driven by Hypothesis over `APIOperation.as_strategy`."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from aicloud.api.app import create_app
from aicloud.config import Settings
from aicloud.models.pool import ModelPool
from tests.conftest import Server, start_server

MAX_TOKENS = 4
EXAMPLES = 10  # per operation, per generation mode (valid, invalid), per database
HOSTILE_EXAMPLES = 2  # valid examples per operation that are also sent as hostile variants
CHECKS = [not_a_server_error, response_schema_conformance]
FAR_DATE = "9999-12-31T23:59:59-12:00"  # year 10000 in UTC


def _nul(value: Any) -> Any:
    return value + "\x00" if isinstance(value, str) else value


def _surrogate(value: Any) -> Any:
    return value + "\ud800" if isinstance(value, str) else value


def _int32(value: Any) -> Any:
    return 2**31 if isinstance(value, int) and not isinstance(value, bool) else value


def _far_date(value: Any) -> Any:
    if isinstance(value, str) and "T" in value:
        try:
            datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return value
        return FAR_DATE
    return value


# What random generation rarely hits and the probes of issue 17 found: a NUL in any string
# (PostgreSQL refuses it), a lone surrogate (no UTF-8 for it; JSON bodies only), integers
# past 32 bits, and a date-time past year 9999 in UTC. (name, change, also in the URL)
HOSTILE: list[tuple[str, Callable[[Any], Any], bool]] = [
    ("nul", _nul, True), ("surrogate", _surrogate, False), ("int32", _int32, False),
    ("far date", _far_date, True),
]


def _apply(value: Any, change: Callable[[Any], Any]) -> Any:
    if isinstance(value, dict):
        return {k: _apply(v, change) for k, v in value.items()}
    if isinstance(value, list):
        return [_apply(v, change) for v in value]
    return change(value)


def hostile_variants(case: Any) -> Iterator[tuple[str, Any]]:
    """Copies of a valid case with every value of one kind made hostile at once."""
    for name, change, in_url in HOSTILE:
        variant = case.derive()
        variant.body = _apply(case.body, change) if isinstance(case.body, dict | list) \
            else case.body
        if in_url:
            variant.query = _apply(case.query, change)
            variant.path_parameters = _apply(case.path_parameters, change)
        yield name, variant


def documented_operations() -> list[str]:
    """The operations the app documents, known at collection time (routes are static);
    each test checks that the live server documents the same."""
    doc = create_app(Settings(), ModelPool({})).openapi()
    return [f"{method.upper()} {path}" for path, item in doc["paths"].items()
            for method in item]


OPERATIONS = documented_operations()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fuzz_server(request: pytest.FixtureRequest,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env: dict[str, str] = {}
    database: str | None = None
    base = ""
    if request.param == "postgresql":
        import psycopg

        base = request.getfixturevalue("pg_url")
        database = f"fuzz_{secrets.token_hex(6)}"
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{database}"')
        env["AICLOUD_DATABASE_URL"] = f"{base.rsplit('/', 1)[0]}/{database}"
    srv = start_server(tmp_path_factory.mktemp(f"fuzz-{request.param}"), "--context", "256",
                       "--sequences", "4", extra_env=env)
    srv.keys["admin"] = srv.admin_key("owner")
    with srv.admin(srv.keys["admin"]) as admin:  # one CLI start fewer than `new_key`
        org = admin.post("/organizations", json={"name": "fuzz"}).json()
        project = admin.post("/projects", json={"organization_id": org["id"],
                                                "name": "fuzz"}).json()
        srv.keys["api"] = admin.post("/keys", json={"project_id": project["id"]}).json()["secret"]
    yield srv
    srv.stop()
    if database is not None:
        import psycopg

        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@pytest.fixture(scope="module")
def live_operations(fuzz_server: Server) -> dict[str, Any]:
    schema = schemathesis.openapi.from_url(fuzz_server.base_url + "/openapi.json", timeout=30)
    operations = {}
    for result in schema.get_all_operations():
        operation = result.ok()  # a document schemathesis cannot read fails here, loudly
        operations[operation.label] = operation
    assert sorted(operations) == sorted(OPERATIONS)
    return operations


def short(case: Any) -> None:
    """Cap how many tokens a generation may make; values the server must refuse (negative,
    not a number) are left as generated."""
    if not isinstance(case.body, dict) or not case.path.startswith("/v1/"):
        return
    for field in ("max_tokens", "max_completion_tokens"):
        value = case.body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS:
            case.body[field] = MAX_TOKENS
    case.body.setdefault("max_tokens", MAX_TOKENS)


@pytest.mark.parametrize("label", OPERATIONS)
def test_no_server_errors_and_responses_match_the_document(
        label: str, fuzz_server: Server, live_operations: dict[str, Any]) -> None:
    operation = live_operations[label]
    headers = [{"Authorization": f"Bearer {fuzz_server.keys[key]}"} for key in ("api", "admin")]

    hostile_left = HOSTILE_EXAMPLES

    def send(case: Any) -> None:
        for auth in headers:
            case.call_and_validate(base_url=fuzz_server.base_url, headers=auth,
                                   checks=CHECKS, timeout=60)

    def send_hostile(name: str, variant: Any) -> None:
        """Sent as a client would: a lone surrogate travels as its JSON escape. (schemathesis
        re-checks a changed case against the document by encoding its strings as UTF-8,
        which a lone surrogate cannot be, and fails before anything is sent.)"""
        body = json.dumps(variant.body) if isinstance(variant.body, dict | list) else None
        for auth in headers:
            kind = {} if body is None else {"content-type": "application/json"}
            response = httpx.request(
                variant.method, fuzz_server.base_url + variant.formatted_path,
                params=variant.query if isinstance(variant.query, dict) else None,
                headers={**auth, **kind}, content=body,
                timeout=60)
            assert response.status_code < 500, (name, variant.body, response.text[:300])
            if response.status_code >= 400:
                assert set(response.json()["error"]) >= {"message", "type", "param", "code"}

    def fuzz(mode: GenerationMode) -> None:
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        def run(case: Any) -> None:
            nonlocal hostile_left
            short(case)
            send(case)
            if mode is GenerationMode.POSITIVE and hostile_left > 0:
                hostile_left -= 1
                for name, variant in hostile_variants(case):
                    if name == "surrogate":  # in JSON bodies only (see `send_hostile`)
                        send_hostile(name, variant)
                    else:
                        send(variant)
        run()

    fuzz(GenerationMode.POSITIVE)
    try:
        fuzz(GenerationMode.NEGATIVE)
    except Unsatisfiable:
        # no parameters, or only free strings: nothing the operation could refuse exists
        assert not operation.body.items and not operation.query.items, label
