"""Providers in the database: where an upstream model's requests go, with what credentials,
timeouts, retries and concurrency. Admin routes and the CLI share these services.

A provider's key is sealed (secrets.py) on the way in and only opened for the engine that
calls the provider; what callers read back is a `ProviderView`, which says whether a key
is set and which header names are sent, never their values.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from aicloud.accounts.base import AccountError, NotFound, now
from aicloud.config import Settings
from aicloud.providers.secrets import Secret, SecretBox
from aicloud.store.tables import Provider

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
HEADER_NAME = re.compile(r"^[A-Za-z0-9-]{1,64}$")
# headers aicloud sets itself on every upstream call
RESERVED_HEADERS = {"authorization", "content-type", "content-length", "host", "accept",
                    "transfer-encoding", "connection"}


@dataclass(slots=True, frozen=True)
class ProviderSettings:
    """What an admin sets besides the name, URL and key. The timeout bounds the wait for
    the first byte and for each later chunk; `retries` are extra attempts before the first
    byte; `max_concurrency` is how many requests this server sends the provider at once."""

    timeout: float = 60.0
    connect_timeout: float = 5.0
    retries: int = 2
    max_concurrency: int = 64

    def __post_init__(self) -> None:
        if not 0 < self.timeout <= 3600:
            raise AccountError("timeout must be in (0, 3600] seconds", "timeout")
        if not 0 < self.connect_timeout <= 600:
            raise AccountError("connect_timeout must be in (0, 600] seconds", "connect_timeout")
        if not 0 <= self.retries <= 10:
            raise AccountError("retries must be between 0 and 10", "retries")
        if not 1 <= self.max_concurrency <= 10_000:
            raise AccountError("max_concurrency must be between 1 and 10000",
                               "max_concurrency")


@dataclass(slots=True, frozen=True)
class ProviderConfig:
    """A provider as the upstream engine needs it, secrets opened (but unprintable)."""

    name: str
    base_url: str
    api_key: Secret | None
    headers: dict[str, Secret] = field(default_factory=dict)
    settings: ProviderSettings = field(default_factory=ProviderSettings)


@dataclass(slots=True, frozen=True)
class ProviderView:
    """A provider as admins read it: no secret, only whether there is one."""

    name: str
    base_url: str
    has_api_key: bool
    api_key_env: str | None
    header_names: tuple[str, ...]
    settings: ProviderSettings
    created_at: datetime
    updated_at: datetime


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise AccountError("a provider name is 1-64 letters, digits, '.', '_' or '-'", "name")
    return name


def check_base_url(url: str) -> str:
    """An http(s) URL without credentials in it (they belong in the key or the headers,
    where they are encrypted), query or fragment; the trailing slash is dropped."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise AccountError("base_url is not a valid URL", "base_url") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise AccountError("base_url must be an http:// or https:// URL with a host",
                           "base_url")
    if parts.username or parts.password:
        raise AccountError("base_url must not carry credentials: set api_key or headers",
                           "base_url")
    if parts.query or parts.fragment or port == 0:
        raise AccountError("base_url must not have a query, a fragment or port 0", "base_url")
    if len(url) > 1000:
        raise AccountError("base_url is longer than 1000 characters", "base_url")
    return url.rstrip("/")


def check_headers(headers: dict[str, str]) -> dict[str, str]:
    if len(headers) > 32:
        raise AccountError("at most 32 extra headers", "headers")
    for name, value in headers.items():
        if not HEADER_NAME.match(name) or name.lower() in RESERVED_HEADERS:
            raise AccountError(f"header {name[:64]!r} cannot be set (letters, digits and "
                               "'-'; not one aicloud sets itself)", "headers")
        if any(c in value for c in "\r\n\x00") or len(value) > 8192:
            raise AccountError(f"the value of header {name} is not a valid header value",
                               "headers")
    return headers


def check_env_name(name: str) -> str:
    if not ENV_NAME.match(name):
        raise AccountError("api_key_env must be an environment variable name", "api_key_env")
    return name


class ProviderStore:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], box: SecretBox) -> None:
        self._sessions = sessions
        self._box = box

    async def add(self, name: str, base_url: str, *, api_key: str | None = None,
                  api_key_env: str | None = None, headers: dict[str, str] | None = None,
                  settings: ProviderSettings | None = None) -> ProviderView:
        check_name(name)
        row = Provider(name=name, created_at=now())
        self._apply(row, base_url=base_url, api_key=api_key, api_key_env=api_key_env,
                    headers=headers or {}, settings=settings or ProviderSettings())
        async with self._sessions.begin() as session:
            if await session.get(Provider, name) is not None:
                raise AccountError(f"provider {name} already exists", "name")
            session.add(row)
        return _view(row)

    async def update(self, name: str, **changes: Any) -> ProviderView:
        """Change any of base_url, api_key, api_key_env, headers, settings; a new key
        replaces the old one (and api_key_env is cleared), and the other way round."""
        async with self._sessions.begin() as session:
            row = await session.get(Provider, name, with_for_update=True)
            if row is None:
                raise NotFound("provider", name)
            self._apply(row, **changes)
        return _view(row)

    async def remove(self, name: str) -> None:
        async with self._sessions.begin() as session:
            row = await session.get(Provider, name)
            if row is None:
                raise NotFound("provider", name)
            await session.delete(row)

    async def views(self) -> list[ProviderView]:
        async with self._sessions() as session:
            rows = await session.scalars(select(Provider).order_by(Provider.name))
            return [_view(r) for r in rows]

    async def view(self, name: str) -> ProviderView:
        async with self._sessions() as session:
            row = await session.get(Provider, name)
        if row is None:
            raise NotFound("provider", name)
        return _view(row)

    async def config(self, name: str) -> ProviderConfig:
        """The provider with its secrets opened, for the engine; a key named by an
        environment variable is read from this process's environment now."""
        async with self._sessions() as session:
            row = await session.get(Provider, name)
        if row is None:
            raise NotFound("provider", name)
        key = self._box.open(row.api_key_cipher) if row.api_key_cipher else None
        if row.api_key_env:
            value = os.environ.get(row.api_key_env)
            key = Secret(value) if value else None
        headers = ({k: Secret(v) for k, v in json.loads(
            self._box.open(row.headers_cipher).reveal()).items()}
            if row.headers_cipher else {})
        return ProviderConfig(row.name, row.base_url, key, headers, _settings(row))

    def _apply(self, row: Provider, **changes: Any) -> None:
        stamp = now()
        if "base_url" in changes:
            row.base_url = check_base_url(changes["base_url"])
        if changes.get("api_key") is not None:
            if not changes["api_key"] or len(changes["api_key"]) > 8192:
                raise AccountError("api_key must be 1-8192 characters", "api_key")
            row.api_key_cipher, row.api_key_env = self._box.seal(changes["api_key"]), None
        elif changes.get("api_key_env") is not None:
            row.api_key_env = check_env_name(changes["api_key_env"])
            row.api_key_cipher = None
        if "headers" in changes:
            headers = check_headers(dict(changes["headers"] or {}))
            row.headers_cipher = self._box.seal(json.dumps(headers)) if headers else None
            row.header_names = ",".join(sorted(headers))
        if "settings" in changes:
            s: ProviderSettings = changes["settings"]
            row.timeout_s, row.connect_timeout_s = s.timeout, s.connect_timeout
            row.retries, row.max_concurrency = s.retries, s.max_concurrency
        row.updated_at = stamp


def _settings(row: Provider) -> ProviderSettings:
    return ProviderSettings(row.timeout_s, row.connect_timeout_s, row.retries,
                            row.max_concurrency)


def _view(row: Provider) -> ProviderView:
    names = tuple(n for n in (row.header_names or "").split(",") if n)
    return ProviderView(row.name, row.base_url, bool(row.api_key_cipher), row.api_key_env,
                        names, _settings(row), row.created_at, row.updated_at)


def secret_box(settings: Settings) -> SecretBox:
    key = settings.secret_key.get_secret_value() if settings.secret_key else None
    return SecretBox(settings.home_dir, key)
