"""Providers as admins manage them, the admin key's role checked here: the admin API's
provider routes and the console's Providers page both call these. A provider is shared by
every organization, so only installation-wide keys see or change one; its key and header
values go in and never come out (the store's `ProviderView` says only whether they are set).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aicloud.accounts.base import AccountError, AdminScope, Role
from aicloud.providers.store import ProviderSettings, ProviderStore, ProviderView

SETTINGS = ("timeout", "connect_timeout", "retries", "max_concurrency")


def merged_settings(base: ProviderSettings, given: Mapping[str, Any] | None) -> ProviderSettings:
    """`base` with the settings given (a None keeps its own); checked as ProviderSettings
    checks them, each refusal naming its field."""
    changes = {k: v for k, v in (given or {}).items() if v is not None}
    unknown = set(changes) - set(SETTINGS)
    if unknown:
        raise AccountError(f"unknown provider setting {sorted(unknown)[0]!r}", "settings")
    return dataclasses.replace(base, **changes)


def _one_key(api_key: str | None, api_key_env: str | None) -> None:
    if api_key is not None and api_key_env is not None:
        raise AccountError("give api_key or api_key_env, not both", "api_key")


@dataclass(slots=True, frozen=True)
class ProviderAdmin:
    store: ProviderStore

    async def views(self, scope: AdminScope) -> list[ProviderView]:
        scope.require(Role.VIEWER, installation=True)
        return await self.store.views()

    async def view(self, scope: AdminScope, name: str) -> ProviderView:
        scope.require(Role.VIEWER, installation=True)
        return await self.store.view(name)

    async def add(self, scope: AdminScope, name: str, base_url: str, *,
                  api_key: str | None = None, api_key_env: str | None = None,
                  headers: dict[str, str] | None = None,
                  settings: Mapping[str, Any] | None = None) -> ProviderView:
        """`settings`: any of SETTINGS (None or left out: the default)."""
        scope.require(Role.ADMIN, installation=True)
        _one_key(api_key, api_key_env)
        return await self.store.add(name, base_url, api_key=api_key, api_key_env=api_key_env,
                                    headers=headers,
                                    settings=merged_settings(ProviderSettings(), settings))

    async def update(self, scope: AdminScope, name: str, *, base_url: str | None = None,
                     api_key: str | None = None, api_key_env: str | None = None,
                     headers: dict[str, str] | None = None,
                     settings: Mapping[str, Any] | None = None) -> ProviderView:
        """Change what is given (None keeps it; `headers` replaces them all, `{}` clears
        them); a new key replaces the old one or the environment variable, and the other
        way round."""
        scope.require(Role.ADMIN, installation=True)
        _one_key(api_key, api_key_env)
        current = await self.store.view(name)
        changes = {k: v for k, v in (("base_url", base_url), ("api_key", api_key),
                                     ("api_key_env", api_key_env), ("headers", headers))
                   if v is not None}
        return await self.store.update(
            name, **changes, settings=merged_settings(current.settings, settings))

    async def remove(self, scope: AdminScope, name: str) -> None:
        scope.require(Role.ADMIN, installation=True)
        await self.store.remove(name)
