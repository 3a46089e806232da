"""Admin routes for upstream providers: add, list, show, update, remove. Installation-wide
admin keys only (a provider is shared by every organization). A provider's API key goes
in and never comes out: responses say only whether one is set."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field, model_validator

from aicloud.accounts.base import Role, iso
from aicloud.api.deps import CloudDep, CurrentAdmin, parse_body
from aicloud.api.routes.admin.schemas import Strict, documented
from aicloud.providers.admin import SETTINGS, ProviderAdmin
from aicloud.providers.store import ProviderView

router = APIRouter()

Seconds = float | None


class SettingsFields(Strict):
    timeout: Seconds = Field(default=None, gt=0, le=3600)
    connect_timeout: Seconds = Field(default=None, gt=0, le=600)
    retries: int | None = Field(default=None, ge=0, le=10)
    max_concurrency: int | None = Field(default=None, ge=1, le=10_000)

    def settings(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in SETTINGS}


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


def provider_admin(cloud: CloudDep) -> ProviderAdmin:
    return ProviderAdmin(cloud.providers)


ProviderAdminDep = Annotated[ProviderAdmin, Depends(provider_admin)]


@router.post("/providers", status_code=201, response_model=ProviderOut,
             **documented(ProviderCreate))
async def add_provider(request: Request, scope: CurrentAdmin,
                       providers: ProviderAdminDep) -> ProviderOut:
    scope.require(Role.ADMIN, installation=True)
    body = await parse_body(request, ProviderCreate)
    return provider_json(await providers.add(
        scope, body.name, body.base_url, api_key=body.api_key, api_key_env=body.api_key_env,
        headers=body.headers, settings=body.settings()))


@router.get("/providers", response_model=ProviderList)
async def list_providers(scope: CurrentAdmin, providers: ProviderAdminDep) -> ProviderList:
    return ProviderList(data=[provider_json(v) for v in await providers.views(scope)])


@router.get("/providers/{name}", response_model=ProviderOut)
async def get_provider(name: str, scope: CurrentAdmin,
                       providers: ProviderAdminDep) -> ProviderOut:
    return provider_json(await providers.view(scope, name))


@router.patch("/providers/{name}", response_model=ProviderOut, **documented(ProviderUpdate))
async def update_provider(name: str, request: Request, scope: CurrentAdmin,
                          providers: ProviderAdminDep) -> ProviderOut:
    scope.require(Role.ADMIN, installation=True)
    body = await parse_body(request, ProviderUpdate)
    # headers sent as null clear them, as {} does; left out, they stay
    headers = (body.headers or {}) if "headers" in body.model_fields_set else None
    return provider_json(await providers.update(
        scope, name, base_url=body.base_url, api_key=body.api_key,
        api_key_env=body.api_key_env, headers=headers, settings=body.settings()))


@router.delete("/providers/{name}", response_model=ProviderDeleted)
async def remove_provider(name: str, scope: CurrentAdmin,
                          providers: ProviderAdminDep) -> ProviderDeleted:
    await providers.remove(scope, name)
    return ProviderDeleted(name=name)
