"""The model catalog in the database, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from aicloud.models.catalog import (
    Catalog,
    CatalogEntry,
    CatalogError,
    EngineKind,
    ModelSpec,
    UnknownCatalogModel,
    spec_entry,
)
from aicloud.store import db, migrate


async def with_catalog(url: str, action):  # type: ignore[no-untyped-def]
    migrate.upgrade(url)
    engine = db.create_engine_async(url)
    try:
        return await action(Catalog(db.session_factory(engine)))
    finally:
        await engine.dispose()


def test_entries_round_trip_and_are_found_by_alias(db_url: str) -> None:
    async def scenario(catalog: Catalog) -> None:
        local = CatalogEntry("small", EngineKind.LLAMACPP, "/models/small.gguf",
                             {"weights": "q4_0", "context": 2048}, aliases=("tiny", "s:1"),
                             keep_alive=300.0, organizations=("org_a",))
        remote = CatalogEntry("partner-large", EngineKind.UPSTREAM, provider="acme",
                              upstream_model="large-v2", pinned=True)
        await catalog.add(local)
        await catalog.add(remote)
        assert await catalog.entries() == [remote, local]
        assert await catalog.find("tiny") == local
        assert await catalog.find("partner-large") == remote
        assert await catalog.find("nothing") is None
        assert local.allows("org_a") and not local.allows("org_b") and remote.allows("org_b")

    asyncio.run(with_catalog(db_url, scenario))


def test_names_stay_unique_across_ids_and_aliases(db_url: str) -> None:
    async def scenario(catalog: Catalog) -> None:
        await catalog.add(CatalogEntry("a", source="/m/a.gguf", aliases=("shared",)))
        with pytest.raises(CatalogError, match="already in the catalog"):
            await catalog.add(CatalogEntry("a", source="/m/other.gguf"))
        with pytest.raises(CatalogError, match="'shared' is already used by model a"):
            await catalog.add(CatalogEntry("b", source="/m/b.gguf", aliases=("shared",)))
        with pytest.raises(CatalogError, match="'a' is already used"):
            await catalog.add(CatalogEntry("b", source="/m/b.gguf", aliases=("a",)))
        await catalog.add(CatalogEntry("b", source="/m/b.gguf"))
        with pytest.raises(CatalogError, match="'shared' is already used"):
            await catalog.update("b", aliases=("shared",))
        assert [e.id for e in await catalog.entries()] == ["a", "b"]

    asyncio.run(with_catalog(db_url, scenario))


def test_update_replace_and_remove(db_url: str) -> None:
    async def scenario(catalog: Catalog) -> None:
        spec = ModelSpec("m", Path("/m/one.gguf"))
        await catalog.add(spec_entry(spec, EngineKind.LLAMACPP))
        assert (await catalog.find("m")).pinned  # type: ignore[union-attr]
        moved = spec_entry(ModelSpec("m", Path("/m/two.gguf")), EngineKind.LLAMACPP)
        await catalog.add(moved, replace=True)
        assert (await catalog.find("m")) == moved
        changed = await catalog.update("m", pinned=False, keep_alive=60.0)
        assert (changed.pinned, changed.keep_alive, changed.source) == (False, 60.0,
                                                                         "/m/two.gguf")
        with pytest.raises(CatalogError, match="cannot change"):
            await catalog.update("m", id="n")
        assert (await catalog.remove("m")).id == "m"
        with pytest.raises(UnknownCatalogModel):
            await catalog.remove("m")
        with pytest.raises(UnknownCatalogModel):
            await catalog.update("m", pinned=True)
        assert await catalog.find("m") is None

    asyncio.run(with_catalog(db_url, scenario))


@pytest.mark.parametrize("kwargs, message", [
    ({"id": "bad id"}, "invalid model name"),
    ({"id": "a", "aliases": ("a",)}, "must differ"),
    ({"id": "a", "source": ""}, "needs a source"),
    ({"id": "a", "engine": EngineKind.UPSTREAM}, "needs a provider"),
    ({"id": "a", "provider": "acme", "upstream_model": "x"}, "only an upstream model"),
    ({"id": "a", "keep_alive": -1.0}, "keep_alive"),
])
def test_bad_entries_are_refused(kwargs: dict, message: str) -> None:  # type: ignore[type-arg]
    kwargs = {"source": "/m/a.gguf", **kwargs}
    with pytest.raises(CatalogError, match=message):
        CatalogEntry(**kwargs)


def test_two_processes_registering_the_same_model_at_once_both_start(db_url: str) -> None:
    """Two servers started together each register their `--model`: the insert that loses
    the race becomes an update (CI saw the loser's startup fail on a duplicate key)."""
    migrate.upgrade(db_url)

    async def scenario() -> None:
        engines = [db.create_engine_async(db_url) for _ in range(2)]
        catalogs = [Catalog(db.session_factory(engine)) for engine in engines]
        try:
            for round_ in range(8):
                entry = CatalogEntry(f"m{round_}", source=f"/m/{round_}.gguf", pinned=True)
                await asyncio.gather(*(c.add(entry, replace=True) for c in catalogs))
                assert await catalogs[0].find(entry.id) == entry
                plain = CatalogEntry(f"p{round_}", source=f"/m/p{round_}.gguf")
                outcomes = await asyncio.gather(*(c.add(plain) for c in catalogs),
                                                return_exceptions=True)
                errors = [o for o in outcomes if isinstance(o, BaseException)]
                assert len(errors) <= 1 and all(isinstance(e, CatalogError) for e in errors)
        finally:
            for engine in engines:
                await engine.dispose()

    asyncio.run(scenario())
