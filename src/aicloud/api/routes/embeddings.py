"""POST /v1/embeddings: admitted, limited, held and billed like a generation.

The prompt tokens are known before anything runs (strings are tokenized here, token
arrays are counted), so the rate limits take them and the budget holds their price up
front; the usage row has the prompt tokens and no completion tokens.

A provider's model (an engine with RELAY) is not tokenized here: the caller's request is
relayed as sent, the hold takes each string's UTF-8 bytes as the bound of its tokens (as
api/relay.py does for chat), the provider's usage is billed (or the model's tokenizer
counts, else an estimate, marked), and while the provider is unavailable the model's
fallbacks are tried in order, a local model that embeds included.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from aicloud.accounts.keys import Principal
from aicloud.api.admission import Admission, admit, check_prompt_size, withdraw
from aicloud.api.deps import CurrentPrincipal, PoolDep, parse_body
from aicloud.api.errors import APIError, invalid
from aicloud.api.generation import Serving, refused, serving, tenant_of
from aicloud.api.relay import fallbacks_of
from aicloud.api.routes.openai import engine_for, not_local
from aicloud.api.schemas import EmbeddingRequest as EmbeddingBody
from aicloud.billing.usage import Alongside, UsageEntry
from aicloud.engines.base import (
    EMBED,
    RELAY,
    EmbeddingRequest,
    Embeddings,
    Engine,
    EngineError,
    EngineUnavailable,
    RelayBody,
    check_embedding_inputs,
)
from aicloud.engines.upstream import estimate_tokens
from aicloud.models.pool import ModelPool
from aicloud.services import Cloud

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1")


@router.post("/embeddings")
async def embeddings(request: Request, principal: CurrentPrincipal,
                     pool: PoolDep) -> JSONResponse:
    body = await parse_body(request, EmbeddingBody)
    engine = await engine_for(request, pool, body.model, principal)
    if engine.info().can(RELAY):
        data, admission = await relay_with_fallbacks(request, principal, pool, engine, body)
    else:
        data, admission = await embed(serving(request), principal, engine, body)
    return JSONResponse(data, headers={**admission.headers,
                                       "x-request-id": admission.request_id})


async def relay_with_fallbacks(request: Request, principal: Principal, pool: ModelPool,
                               engine: Engine, body: EmbeddingBody
                               ) -> tuple[dict[str, Any], Admission]:
    """`body.model` relayed; while it is unavailable, each of its fallbacks that can
    embed (relayed, or run here), as the chat route's fallbacks."""
    shared = serving(request)
    try:
        return await relay(shared, principal, engine, body)
    except EngineUnavailable as exc:
        unavailable = exc  # only now are the fallbacks read: nothing on the happy path
    for name in dict.fromkeys(await fallbacks_of(shared.cloud, body.model)):
        if name == body.model:
            continue
        try:
            fallback = await engine_for(request, pool, name, principal)
            info = fallback.info()
        except (APIError, EngineError):
            continue  # one the caller may not use, one that is gone or cannot load
        if not info.can(RELAY) and not info.can(EMBED):
            continue
        log.warning("model %s unavailable (%s); trying its fallback %s", body.model,
                    unavailable.message, name)
        moved = body.model_copy(update={"model": name})
        try:
            if info.can(RELAY):
                return await relay(shared, principal, fallback, moved)
            return await embed(shared, principal, fallback, moved)
        except EngineUnavailable as exc:
            unavailable = exc
    raise unavailable


async def relay(serving: Serving, principal: Principal, engine: Engine, body: EmbeddingBody
                ) -> tuple[dict[str, Any], Admission]:
    """A provider's model: admitted and held from the inputs' bound (nothing tokenized
    here), then relayed; EngineUnavailable when the provider cannot answer."""
    items = body.texts_or_tokens
    sizes = [len(i.encode()) if isinstance(i, str) else len(i) for i in items]
    check_prompt_size(max(sizes), engine.info().context_length, "input")
    estimate = sum(estimate_tokens(n) if isinstance(i, str) else n
                   for i, n in zip(items, sizes, strict=True))
    fields = body.model_dump(mode="json", exclude_unset=True)
    job = EmbeddingRequest(f"embd-{secrets.token_hex(12)}", [],
                           tenant_of(principal, serving.fair_share_by),
                           relay=RelayBody("embeddings", fields, estimate))
    admission = await admit(serving.cloud, principal, body.model, job.request_id,
                            sum(sizes), 0)
    return await _shielded(serving, engine, job, admission, body, None,
                           "upstream_invalid_request"), admission


async def embed(serving: Serving, principal: Principal, engine: Engine, body: EmbeddingBody,
                batch_line: str | None = None,
                answer: Callable[[dict[str, Any]], Alongside] | None = None
                ) -> tuple[dict[str, Any], Admission]:
    """Check, tokenize, admit and run an embeddings request on `engine` (leased from the
    pool by the caller): the part an HTTP request and a batch line share. `batch_line`:
    the line attempt's request id (the batch price); `answer`: the line's answer, written
    with the usage row."""
    try:
        info = engine.info()
    except EngineError as exc:
        raise invalid(exc.message, "model") from None
    if info.can(RELAY):
        raise not_local(body.model)
    if not info.can(EMBED):
        raise invalid(f"The model '{body.model}' does not support embeddings.", "model",
                      "model_not_supported")
    if body.dimensions is not None:
        raise invalid(f"The model '{body.model}' does not support specifying dimensions.",
                      "dimensions")
    # billed, priced and answered as the catalog's id, whichever alias the caller used
    body = body.model_copy(update={"model": info.model_id})
    job = EmbeddingRequest(batch_line or f"embd-{secrets.token_hex(12)}",
                           await _tokens(engine, body),
                           tenant_of(principal, serving.fair_share_by))
    try:
        check_embedding_inputs(job, info.context_length)
    except EngineError as exc:
        raise invalid(exc.message, exc.param, exc.code) from None
    cloud = serving.cloud
    admission = await admit(cloud, principal, body.model, job.request_id,
                            sum(len(t) for t in job.inputs), 0, batch=batch_line is not None)
    return await _shielded(serving, engine, job, admission, body, answer), admission


async def _shielded(serving: Serving, engine: Engine, job: EmbeddingRequest,
                    admission: Admission, body: EmbeddingBody,
                    answer: Callable[[dict[str, Any]], Alongside] | None,
                    code: str | None = None) -> dict[str, Any]:
    """`_run` shielded: a client that leaves (or a cancelled handler) still gets its
    usage billed."""
    task = asyncio.ensure_future(_run(serving.cloud, engine, job, admission, body, answer,
                                      code))
    serving.background.add(task)
    task.add_done_callback(serving.background.discard)
    return await asyncio.shield(task)


async def _tokens(engine: Engine, body: EmbeddingBody) -> list[list[int]]:
    """Strings tokenized one by one, letting the loop run between them (up to 2048
    inputs); token arrays as sent (the engine checks them against its vocabulary)."""
    out: list[list[int]] = []
    for item in body.texts_or_tokens:
        if isinstance(item, str):
            out.append(await engine.encode_text(item))
            await asyncio.sleep(0)
        else:
            out.append(item)
    return out


async def _run(cloud: Cloud, engine: Engine, job: EmbeddingRequest, admission: Admission,
               body: EmbeddingBody, answer: Callable[[dict[str, Any]], Alongside] | None,
               code: str | None = None) -> dict[str, Any]:
    """`code`: the error code of the engine's refusals (a provider's are
    `upstream_invalid_request`); back-pressure is a 429 or 503, as on every route."""
    started = datetime.now(UTC)
    try:
        result = await engine.embed(job)
    except EngineError as exc:
        await withdraw(cloud, admission)
        raise refused(exc, code) from None
    except BaseException:
        await withdraw(cloud, admission)
        raise
    data = _response(body, result)
    await _record(cloud, admission, body.model, result, started,
                  answer(data) if answer is not None else None)
    return data


async def _record(cloud: Cloud, admission: Admission, model: str, result: Embeddings,
                  started: datetime, alongside: Alongside | None) -> None:
    principal: Principal = admission.principal
    usage = result.usage
    await cloud.ledger.record(UsageEntry(
        request_id=admission.request_id, organization_id=principal.organization_id,
        api_key_id=principal.api_key_id, project_id=principal.project_id, model=model,
        prompt_tokens=usage.prompt_tokens, cached_tokens=0, completion_tokens=0,
        cost_pico=admission.cost(usage), status="completed", started_at=started,
        finished_at=datetime.now(UTC), provider=result.provider, estimated=usage.estimated,
    ), admission.hold, alongside)
    await cloud.limits.settle(admission.ticket, usage.total_tokens)


def _response(body: EmbeddingBody, result: Embeddings) -> dict[str, Any]:
    def encode(vector: list[float]) -> list[float] | str:
        if body.encoding_format == "base64":
            return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
        return vector

    tokens = result.usage.prompt_tokens
    return {"object": "list", "model": body.model,
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)}
                     for i, v in enumerate(result.vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
