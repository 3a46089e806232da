"""Providers in the database, on SQLite and PostgreSQL: secrets sealed at rest, never in
what admins read back."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
import sqlalchemy as sa

from aicloud.accounts.base import AccountError, AdminScope, Forbidden, NotFound, Role
from aicloud.providers.admin import ProviderAdmin
from aicloud.providers.secrets import SecretBox
from aicloud.providers.store import ProviderSettings, ProviderStore
from aicloud.store import db, migrate

T = TypeVar("T")
CANARY = "sk-provider-CANARY-7f3a9"


def with_store(url: str, home: Path, action: Callable[[ProviderStore], Awaitable[T]]) -> T:
    migrate.upgrade(url)

    async def go() -> T:
        engine = db.create_engine_async(url)
        try:
            return await action(ProviderStore(db.session_factory(engine), SecretBox(home)))
        finally:
            await engine.dispose()

    return asyncio.run(go())


def raw_rows(url: str) -> str:
    engine = sa.create_engine(db.sync_url(url))
    try:
        with engine.connect() as conn:
            return repr(conn.execute(sa.text("SELECT * FROM providers")).all())
    finally:
        engine.dispose()


def test_a_key_is_sealed_at_rest_and_never_read_back(db_url: str, tmp_path: Path) -> None:
    async def scenario(store: ProviderStore) -> None:
        view = await store.add("acme", "https://api.acme.test/v1/", api_key=CANARY,
                               headers={"X-Org": "secret-org-header"},
                               settings=ProviderSettings(timeout=5, retries=1))
        assert view.base_url == "https://api.acme.test/v1"
        assert view.has_api_key and view.header_names == ("X-Org",)
        assert CANARY not in repr(await store.views())
        config = await store.config("acme")
        assert config.api_key is not None and config.api_key.reveal() == CANARY
        assert config.headers["X-Org"].reveal() == "secret-org-header"
        assert config.settings.timeout == 5 and config.settings.retries == 1
        assert CANARY not in repr(config)

    with_store(db_url, tmp_path, scenario)
    stored = raw_rows(db_url)
    assert "acme" in stored
    assert CANARY not in stored and "secret-org-header" not in stored


def test_a_key_named_by_environment_variable_is_read_at_use(db_url: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    async def scenario(store: ProviderStore) -> None:
        await store.add("envy", "http://127.0.0.1:9", api_key_env="ENVY_KEY")
        monkeypatch.setenv("ENVY_KEY", "first")
        assert (await store.config("envy")).api_key.reveal() == "first"  # type: ignore[union-attr]
        monkeypatch.setenv("ENVY_KEY", "second")
        assert (await store.config("envy")).api_key.reveal() == "second"  # type: ignore[union-attr]
        view = await store.update("envy", api_key="sealed")
        assert view.has_api_key and view.api_key_env is None
        assert (await store.config("envy")).api_key.reveal() == "sealed"  # type: ignore[union-attr]

    with_store(db_url, tmp_path, scenario)


@pytest.mark.parametrize("url", ["ftp://x/v1", "https://user:pw@host/v1", "https://h/v1?k=1",
                                 "not a url", "http:///v1"])
def test_bad_base_urls_are_refused(url: str, tmp_path: Path) -> None:
    async def scenario(store: ProviderStore) -> None:
        with pytest.raises(AccountError) as caught:
            await store.add("bad", url)
        assert caught.value.param == "base_url"
        assert "pw" not in str(caught.value)

    with_store(f"sqlite:///{tmp_path / 'a.db'}", tmp_path, scenario)


def test_names_headers_and_settings_are_checked(tmp_path: Path) -> None:
    async def scenario(store: ProviderStore) -> None:
        for kwargs, param in (({"headers": {"Authorization": "x"}}, "headers"),
                              ({"headers": {"X-A": "a\r\nb"}}, "headers"),
                              ({"api_key_env": "1BAD"}, "api_key_env")):
            with pytest.raises(AccountError) as caught:
                await store.add("p", "http://127.0.0.1:9", **kwargs)  # type: ignore[arg-type]
            assert caught.value.param == param
        with pytest.raises(AccountError):
            await store.add("../etc", "http://127.0.0.1:9")
        with pytest.raises(AccountError):
            ProviderSettings(retries=99)
        await store.add("p", "http://127.0.0.1:9")
        with pytest.raises(AccountError):
            await store.add("p", "http://127.0.0.1:9")
        await store.remove("p")
        with pytest.raises(NotFound):
            await store.view("p")

    with_store(f"sqlite:///{tmp_path / 'a.db'}", tmp_path, scenario)


def test_the_admin_service_checks_roles_and_merges_settings(db_url: str,
                                                            tmp_path: Path) -> None:
    """ProviderAdmin, which the admin API and the console both call: installation-wide keys
    only, read-only roles change nothing, settings left out keep their values, headers are
    kept unless given ({} clears them)."""
    owner = AdminScope("akey_o", Role.OWNER, None)

    async def scenario(store: ProviderStore) -> None:
        providers = ProviderAdmin(store)
        await providers.add(owner, "acme", "https://api.acme.test/v1", api_key=CANARY,
                            headers={"X-Org": "h"}, settings={"retries": 4, "timeout": None})
        for scope in (AdminScope("akey_v", Role.VIEWER, None),
                      AdminScope("akey_a", Role.OWNER, "org_x")):
            with pytest.raises(Forbidden):
                await providers.update(scope, "acme", settings={"retries": 1})
            with pytest.raises(Forbidden):
                await providers.remove(scope, "acme")
        with pytest.raises(Forbidden):
            await providers.views(AdminScope("akey_a", Role.OWNER, "org_x"))
        assert [v.name for v in await providers.views(AdminScope("v", Role.VIEWER, None))] == [
            "acme"]
        view = await providers.update(owner, "acme", settings={"timeout": 9})
        assert (view.settings.timeout, view.settings.retries) == (9, 4)
        assert view.has_api_key and view.header_names == ("X-Org",)
        with pytest.raises(AccountError) as refused:
            await providers.update(owner, "acme", settings={"max_concurrency": 0})
        assert refused.value.param == "max_concurrency"
        with pytest.raises(AccountError):
            await providers.update(owner, "acme", api_key="a", api_key_env="B")
        view = await providers.update(owner, "acme", headers={})
        assert view.header_names == () and view.has_api_key

    with_store(db_url, tmp_path, scenario)
