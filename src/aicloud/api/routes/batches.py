"""OpenAI's Batch API: create, retrieve, list, cancel. The batch runner (batches/runner.py)
does the work; these routes read and write the batches' rows, per project."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from aicloud.api.deps import CloudDep, CurrentPrincipal, parse_body
from aicloud.api.errors import APIError
from aicloud.api.openapi import request_body
from aicloud.api.routes.files import no_such_file
from aicloud.batches import BatchStateError, BatchView

router = APIRouter(prefix="/v1")

MAX_METADATA = 16


class BatchCreate(BaseModel):
    """Fields OpenAI's API has and this one does not honour are refused by name."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(min_length=1, max_length=64)
    endpoint: Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
    completion_window: Literal["24h"]
    metadata: dict[Annotated[str, Field(max_length=64)],
                   Annotated[str, Field(max_length=512)]] | None = None

    @field_validator("metadata")
    @classmethod
    def _few(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and len(value) > MAX_METADATA:
            raise ValueError(f"at most {MAX_METADATA} metadata pairs")
        return value


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchError(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: str
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    metadata: dict[str, str] | None

    @classmethod
    def of(cls, view: BatchView) -> BatchObject:
        def stamp(moment: datetime | None) -> int | None:
            return None if moment is None else int(moment.timestamp())

        errors = None if view.errors is None else BatchErrors(
            data=[BatchError(**e) for e in view.errors])
        return cls(id=view.id, endpoint=view.endpoint, errors=errors,
                   input_file_id=view.input_file_id, completion_window=view.completion_window,
                   status=view.status.value, output_file_id=view.output_file_id,
                   error_file_id=view.error_file_id, created_at=int(view.created_at.timestamp()),
                   expires_at=stamp(view.expires_at),
                   in_progress_at=stamp(view.moments.get("in_progress")),
                   finalizing_at=stamp(view.moments.get("finalizing")),
                   completed_at=stamp(view.moments.get("completed")),
                   failed_at=stamp(view.moments.get("failed")),
                   expired_at=stamp(view.moments.get("expired")),
                   cancelling_at=stamp(view.moments.get("cancelling")),
                   cancelled_at=stamp(view.moments.get("cancelled")),
                   request_counts=RequestCounts(total=view.counts.total,
                                                completed=view.counts.completed,
                                                failed=view.counts.failed),
                   metadata=view.metadata)


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    has_more: bool
    first_id: str | None
    last_id: str | None


@router.post("/batches", **request_body(BatchCreate))
async def create_batch(request: Request, principal: CurrentPrincipal,
                       cloud: CloudDep) -> BatchObject:
    body = await parse_body(request, BatchCreate)
    source = await cloud.files.get(principal.project_id, body.input_file_id)
    if source is None:
        raise no_such_file(body.input_file_id, "input_file_id")
    if source.purpose != "batch":
        raise APIError(400, f"The file {source.id} has purpose {source.purpose!r}; a batch "
                       "needs one uploaded with purpose 'batch'.", param="input_file_id")
    view = await cloud.batches.create(principal.project_id, principal.api_key_id,
                                      body.endpoint, source.id, body.completion_window,
                                      body.metadata)
    return BatchObject.of(view)


@router.get("/batches")
async def list_batches(principal: CurrentPrincipal, cloud: CloudDep,
                       after: str | None = None,
                       limit: Annotated[int, Query(ge=1, le=100)] = 20) -> BatchList:
    views = await cloud.batches.find(principal.project_id, after, limit + 1)
    data = [BatchObject.of(v) for v in views[:limit]]
    return BatchList(data=data, has_more=len(views) > limit,
                     first_id=data[0].id if data else None,
                     last_id=data[-1].id if data else None)


@router.get("/batches/{batch_id}")
async def retrieve_batch(batch_id: str, principal: CurrentPrincipal,
                         cloud: CloudDep) -> BatchObject:
    return BatchObject.of(await cloud.batches.get(principal.project_id, batch_id))


@router.post("/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, principal: CurrentPrincipal,
                       cloud: CloudDep) -> BatchObject:
    try:
        return BatchObject.of(await cloud.batches.cancel(principal.project_id, batch_id))
    except BatchStateError as exc:
        raise APIError(409, str(exc), code="batch_not_cancellable") from None
