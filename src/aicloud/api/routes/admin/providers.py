"""Admin routes for upstream providers: add, list, show, update, remove. Installation-wide
admin keys only (a provider is shared by every organization). A provider's API key goes
in and never comes out: responses say only whether one is set."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, model_validator

from aicloud.accounts.base import AccountError, Role, iso
from aicloud.api.deps import CloudDep, CurrentAdmin, parse_body
from aicloud.api.routes.admin.schemas import Strict, documented
from aicloud.providers.store import ProviderSettings, ProviderView

router = APIRouter()

Seconds = float | None


class SettingsFields(Strict):
    timeout: Seconds = Field(default=None, gt=0, le=3600)
    connect_timeout: Seconds = Field(default=None, gt=0, le=600)
    retries: int | None = Field(default=None, ge=0, le=10)
    max_concurrency: int | None = Field(default=None, ge=1, le=10_000)

    def settings(self, base: ProviderSettings) -> ProviderSettings:
        given = {k: v for k in ("timeout", "connect_timeout", "retries", "max_concurrency")
                 if (v := getattr(self, k)) is not None}
        return ProviderSettings(**{**{k: getattr(base, k) for k in (
            "timeout", "connect_timeout", "retries", "max_concurrency")}, **given})


class ProviderCreate(SettingsFields):
    name: str = Field(max_length=64)
    base_url: str = Field(max_length=1000)
    api_key: str | None = Field(default=None, max_length=8192)
    api_key_env: str | None = Field(default=None, max_length=128)
    headers: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_key(self) -> ProviderCreate:
        if self.api_key is not None and self.api_key_env is not None:
            raise ValueError("give api_key or api_key_env, not both")
        return self


class ProviderUpdate(SettingsFields):
    base_url: str | None = Field(default=None, max_length=1000)
    api_key: str | None = Field(default=None, max_length=8192)
    api_key_env: str | None = Field(default=None, max_length=128)
    headers: dict[str, str] | None = None


class ProviderOut(BaseModel):
    object: Literal["provider"] = "provider"
    name: str
    base_url: str
    has_api_key: bool
    api_key_env: str | None
    header_names: list[str]
    timeout: float
    connect_timeout: float
    retries: int
    max_concurrency: int
    created_at: str | None
    updated_at: str | None


class ProviderList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ProviderOut]


class ProviderDeleted(BaseModel):
    object: Literal["provider.deleted"] = "provider.deleted"
    name: str
    deleted: bool = True


def provider_json(view: ProviderView) -> ProviderOut:
    s = view.settings
    return ProviderOut(name=view.name, base_url=view.base_url, has_api_key=view.has_api_key,
                       api_key_env=view.api_key_env, header_names=list(view.header_names),
                       timeout=s.timeout, connect_timeout=s.connect_timeout,
                       retries=s.retries, max_concurrency=s.max_concurrency,
                       created_at=iso(view.created_at), updated_at=iso(view.updated_at))


@router.post("/providers", status_code=201, response_model=ProviderOut,
             **documented(ProviderCreate))
async def add_provider(request: Request, scope: CurrentAdmin, cloud: CloudDep) -> ProviderOut:
    scope.require(Role.ADMIN, installation=True)
    body = await parse_body(request, ProviderCreate)
    view = await cloud.providers.add(
        body.name, body.base_url, api_key=body.api_key, api_key_env=body.api_key_env,
        headers=body.headers, settings=body.settings(ProviderSettings()))
    return provider_json(view)


@router.get("/providers", response_model=ProviderList)
async def list_providers(scope: CurrentAdmin, cloud: CloudDep) -> ProviderList:
    scope.require(Role.VIEWER, installation=True)
    return ProviderList(data=[provider_json(v) for v in await cloud.providers.views()])


@router.get("/providers/{name}", response_model=ProviderOut)
async def get_provider(name: str, scope: CurrentAdmin, cloud: CloudDep) -> ProviderOut:
    scope.require(Role.VIEWER, installation=True)
    return provider_json(await cloud.providers.view(name))


@router.patch("/providers/{name}", response_model=ProviderOut, **documented(ProviderUpdate))
async def update_provider(name: str, request: Request, scope: CurrentAdmin,
                          cloud: CloudDep) -> ProviderOut:
    scope.require(Role.ADMIN, installation=True)
    body = await parse_body(request, ProviderUpdate)
    if body.api_key is not None and body.api_key_env is not None:
        raise AccountError("give api_key or api_key_env, not both", "api_key")
    current = await cloud.providers.view(name)
    fields = ("base_url", "api_key", "api_key_env", "headers")
    changes: dict[str, Any] = {k: getattr(body, k) for k in fields
                               if k in body.model_fields_set and getattr(body, k) is not None}
    if "headers" in body.model_fields_set and body.headers is None:
        changes["headers"] = {}
    changes["settings"] = body.settings(current.settings)
    return provider_json(await cloud.providers.update(name, **changes))


@router.delete("/providers/{name}", response_model=ProviderDeleted)
async def remove_provider(name: str, scope: CurrentAdmin, cloud: CloudDep) -> ProviderDeleted:
    scope.require(Role.ADMIN, installation=True)
    await cloud.providers.remove(name)
    return ProviderDeleted(name=name)
