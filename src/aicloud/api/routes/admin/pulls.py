"""Admin routes for pulls: start one in the server, watch its bytes, cancel it. A pull
runs in a worker thread of this server process; the finished file enters the catalog."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from aicloud.accounts.base import Role, iso
from aicloud.api.deps import CurrentAdmin, parse_body
from aicloud.api.errors import APIError
from aicloud.api.routes.admin.schemas import Strict, documented
from aicloud.models import admin
from aicloud.models.catalog import MAX_KEEP_ALIVE, CatalogError
from aicloud.models.pulls import PullError, PullProgress, Pulls

router = APIRouter()


async def pull_registry(request: Request) -> Pulls:
    pulls: Pulls = request.app.state.pulls  # set by create_app's lifespan
    return pulls


PullsDep = Annotated[Pulls, Depends(pull_registry)]


class PullCreate(Strict):
    source: str = Field(max_length=2048, description="hf://OWNER/REPO/FILE.gguf or an "
                        "http(s) URL of a GGUF file")
    id: str | None = Field(default=None, max_length=128,
                           description="the model's id (default: the file's name)")
    sha256: str | None = Field(default=None, pattern="^[0-9a-fA-F]{64}$")
    aliases: list[str] = Field(default_factory=list, max_length=64)
    pinned: bool = False
    keep_alive: float | None = Field(default=None, ge=0, le=MAX_KEEP_ALIVE)
    organizations: list[str] | None = Field(default=None, max_length=1024)
    options: dict[str, Any] = Field(default_factory=dict, description="the engine's "
                                    "options (weights, context, ...)")


class PullView(BaseModel):
    object: Literal["model.pull"] = "model.pull"
    id: str
    source: str
    model: str
    state: str
    bytes_done: int
    bytes_total: int | None
    resumed_from: int = Field(description="bytes already on disk from an earlier try: "
                              "not fetched again")
    sha256: str | None
    path: str | None
    error: str | None
    created_at: str | None
    finished_at: str | None


class PullList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PullView]


def pull_view(p: PullProgress) -> PullView:
    return PullView(id=p.id, source=p.source, model=p.model_id, state=p.state.value,
                    bytes_done=p.counter.done, bytes_total=p.counter.total,
                    resumed_from=p.counter.resumed_from, sha256=p.sha256, path=p.path,
                    error=p.error, created_at=iso(p.created_at), finished_at=iso(p.finished_at))


@router.post("/models/pulls", status_code=202, response_model=PullView,
             **documented(PullCreate))
async def start_pull(request: Request, scope: CurrentAdmin, pulls: PullsDep) -> PullView:
    """Start pulling a GGUF into AICLOUD_HOME/models; it enters the catalog once it is
    whole, its sha256 matches and llama.cpp can read it."""
    scope.require(Role.ADMIN, installation=True)
    body = await parse_body(request, PullCreate)
    try:
        return pull_view(await admin.start_pull(
            scope, pulls, body.source, body.id, body.sha256, aliases=tuple(body.aliases),
            pinned=body.pinned, keep_alive=body.keep_alive, options=body.options,
            organizations=None if body.organizations is None else tuple(body.organizations)))
    except admin.PullConflict as exc:  # the name is taken, or already being pulled
        raise APIError(409, str(exc), code="model_exists") from None
    except (PullError, CatalogError) as exc:
        raise APIError(400, str(exc)) from None


@router.get("/models/pulls", response_model=PullList)
async def list_pulls(scope: CurrentAdmin, pulls: PullsDep) -> PullList:
    return PullList(data=[pull_view(p) for p in admin.list_pulls(scope, pulls)])


@router.get("/models/pulls/{pull_id}", response_model=PullView)
async def get_pull(pull_id: str, scope: CurrentAdmin, pulls: PullsDep) -> PullView:
    return pull_view(admin.get_pull(scope, pulls, pull_id))


@router.delete("/models/pulls/{pull_id}", response_model=PullView)
async def cancel_pull(pull_id: str, scope: CurrentAdmin, pulls: PullsDep) -> PullView:
    """Stop a running pull at its next chunk; its partial file stays, so pulling the same
    source again resumes it."""
    return pull_view(admin.cancel_pull(scope, pulls, pull_id))
