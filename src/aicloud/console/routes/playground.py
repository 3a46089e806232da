"""The playground: chat with a model as a project, streamed, with each answer's usage and
cost read back from the ledger.

The API takes API keys only; here the signed-in admin acts for a project it administers.
The chat goes through `run_chat`, the very path of /v1/chat/completions (the project's
limits, budget hold, fair queue, usage row and settlement), with the admin key's id as the
usage row's key, so the usage page shows it beside the project's other requests.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from aicloud.accounts.base import Role
from aicloud.accounts.keys import Principal
from aicloud.api.deps import parse_body
from aicloud.api.errors import invalid, validation_message
from aicloud.api.routes.openai import run_chat
from aicloud.api.schemas import ChatCompletionRequest
from aicloud.billing.money import pico_to_usd
from aicloud.console.web import (
    ActingDep,
    ConsoleRoute,
    SignedInDep,
    cloud_of,
    nav_page,
    pool_of,
    render,
)

router = APIRouter(prefix="/console", route_class=ConsoleRoute)


class Turn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: Annotated[str, Field(max_length=100_000)]


class PlaygroundChat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Annotated[str, Field(min_length=1, max_length=128)]
    project_id: Annotated[str, Field(min_length=1, max_length=64)]
    messages: Annotated[list[Turn], Field(min_length=1, max_length=200)]
    max_tokens: Annotated[int, Field(ge=1, le=4096)] = 256
    temperature: Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)] = 0.7


class AnswerUsage(BaseModel):
    """One answer as the ledger billed it."""

    request_id: str
    model: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost_usd: str
    status: str


@nav_page(router, "/playground", "Playground", 90)
async def playground(request: Request, signed: SignedInDep) -> HTMLResponse:
    cards = [c for c in pool_of(request).cards() if "generate" in c.capabilities]
    projects = await cloud_of(request).orgs.list_projects(signed.scope)
    return await render(request, "playground.html", models=[c.id for c in cards],
                        projects=projects, may_chat=signed.scope.role >= Role.ADMIN)


@router.post("/playground/chat", response_model=None)
async def chat(request: Request, signed: ActingDep) -> StreamingResponse | JSONResponse:
    """OpenAI's streamed chat chunks, usage included; spending a project's budget is a
    change, so a viewer cannot."""
    signed.scope.require(Role.ADMIN)
    body = await parse_body(request, PlaygroundChat, text_fields=("messages",))
    cloud = cloud_of(request)
    project = await cloud.orgs.get_project(signed.scope, body.project_id)
    org = await cloud.orgs.get_org(signed.scope, project.organization_id)
    principal = Principal(org.id, project.id, project.name, signed.scope.key_id,
                          project_rpm=project.rpm_limit, project_tpm=project.tpm_limit,
                          project_budget_pico=project.budget_pico,
                          org_budget_pico=org.budget_pico, weight=project.weight)
    try:
        completion = ChatCompletionRequest.model_validate({
            "model": body.model, "messages": [t.model_dump() for t in body.messages],
            "max_tokens": body.max_tokens, "temperature": body.temperature, "stream": True,
            "stream_options": {"include_usage": True}})
    except ValidationError as exc:
        message, param = validation_message(exc.errors(include_url=False))
        raise invalid(message, param) from None
    return await run_chat(request, principal, pool_of(request), completion)


@router.get("/playground/usage/{request_id}", response_model=AnswerUsage)
async def answer_usage(request: Request, request_id: str, signed: SignedInDep) -> AnswerUsage:
    row = await cloud_of(request).reports.request(signed.scope, request_id)
    return AnswerUsage(request_id=row.request_id, model=row.model,
                       prompt_tokens=row.prompt_tokens, cached_tokens=row.cached_tokens,
                       completion_tokens=row.completion_tokens,
                       cost_usd=pico_to_usd(row.cost_pico), status=row.status)
