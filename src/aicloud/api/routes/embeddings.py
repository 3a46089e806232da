"""POST /v1/embeddings: admitted, limited, held and billed like a generation.

The prompt tokens are known before anything runs (strings are tokenized here, token
arrays are counted), so the rate limits take them and the budget holds their price up
front; the usage row has the prompt tokens and no completion tokens.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from aicloud.accounts.keys import Principal
from aicloud.api.admission import Admission, admit, withdraw
from aicloud.api.deps import CurrentPrincipal, PoolDep, parse_body
from aicloud.api.errors import invalid
from aicloud.api.generation import Serving, serving, tenant_of
from aicloud.api.routes.openai import engine_for
from aicloud.api.schemas import EmbeddingRequest as EmbeddingBody
from aicloud.billing.usage import Alongside, UsageEntry
from aicloud.engines.base import (
    EMBED,
    EmbeddingRequest,
    Embeddings,
    Engine,
    EngineError,
    check_embedding_inputs,
)
from aicloud.services import Cloud

router = APIRouter(prefix="/v1")


@router.post("/embeddings")
async def embeddings(request: Request, principal: CurrentPrincipal,
                     pool: PoolDep) -> JSONResponse:
    body = await parse_body(request, EmbeddingBody)
    engine = await engine_for(request, pool, body.model, principal)
    data, admission = await embed(serving(request), principal, engine, body)
    return JSONResponse(data, headers={**admission.headers,
                                       "x-request-id": admission.request_id})


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
    # shielded: a client that leaves (or a cancelled handler) still gets its usage billed
    task = asyncio.ensure_future(_run(cloud, engine, job, admission, body, answer))
    serving.background.add(task)
    task.add_done_callback(serving.background.discard)
    return await asyncio.shield(task), admission


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
               body: EmbeddingBody, answer: Callable[[dict[str, Any]], Alongside] | None
               ) -> dict[str, Any]:
    started = datetime.now(UTC)
    try:
        result = await engine.embed(job)
    except EngineError as exc:
        await withdraw(cloud, admission)
        raise invalid(exc.message, exc.param, exc.code) from None
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
        finished_at=datetime.now(UTC),
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
