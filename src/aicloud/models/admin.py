"""The catalog, the pool and the pulls as admins act on them, with the admin key's role and
scope checked here: the admin API's model and pull routes and the console's Models page
both call these, so they allow, refuse and hide exactly the same things.

Catalog writes, loads and pulls need an installation-wide admin; any admin key lists the
models, an organization's only those its organization may use; pulls are listed to
installation-wide keys only (their sources name files and URLs of the installation)."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from typing import Any

from aicloud.accounts.base import AccountError, AdminScope, NotFound, Role
from aicloud.billing.money import Rates
from aicloud.billing.prices import PriceBook
from aicloud.engines.base import EngineError
from aicloud.models.catalog import Catalog, CatalogEntry, CatalogError, UnknownCatalogModel
from aicloud.models.engines import check_source
from aicloud.models.pool import ModelPool, ModelView, UnknownModel
from aicloud.models.pulls import PullError, PullProgress, PullRequest, Pulls

Described = tuple[CatalogEntry, ModelView]

# words of a catalog refusal -> the field it is about (a bad file is the source's fault)
CULPRITS = (("alias", "aliases"), ("keep_alive", "keep_alive"), ("provider", "provider"),
            ("upstream", "upstream_model"), ("source", "source"))


class PullConflict(PullError):
    """A well-formed pull that cannot start: its name is taken or it is already running
    (the API's 409, where a malformed one is a 400)."""


def visible(scope: AdminScope, entry: CatalogEntry) -> bool:
    """An organization's admin key sees the models its organization may use."""
    return scope.organization_id is None or entry.allows(scope.organization_id)


def culprit(exc: Exception) -> str:
    """The field a catalog refusal is about, as the admin API's body names it."""
    if isinstance(exc, EngineError):
        return exc.param or "source"
    if isinstance(exc, CatalogError) and exc.field is not None:
        return exc.field
    text = str(exc)
    return next((field for word, field in CULPRITS if word in text), "id")


@dataclass(slots=True, frozen=True)
class ModelAdmin:
    catalog: Catalog
    pool: ModelPool
    prices: PriceBook

    async def described(self, scope: AdminScope, only: str | None = None) -> list[Described]:
        """The catalog's models the scope may see (or the one called `only`), each beside
        its state in this server's pool, after a fresh read of the catalog."""
        await self.pool.refresh()
        return [(entry, view) for entry, view in self.pool.described()
                if (only is None or only in entry.names) and visible(scope, entry)]

    async def one(self, scope: AdminScope, model: str) -> Described:
        found = await self.described(scope, model)
        if not found:
            raise NotFound("model", model)
        return found[0]

    async def entry(self, scope: AdminScope, model: str) -> CatalogEntry:
        """The model called `model` (id or alias); one the scope may not see is a 404."""
        entry = await self.pool.find(model)
        if entry is None or not visible(scope, entry):
            raise NotFound("model", model)
        return entry

    async def add(self, scope: AdminScope, entry: CatalogEntry,
                  rates: Rates | None = None) -> CatalogEntry:
        """Add a model (and set its prices); a local source must be readable here. It
        loads on its first request, or at once when pinned."""
        scope.require(Role.ADMIN, installation=True)
        try:
            entry = await asyncio.to_thread(check_source, entry)
            await self.catalog.add(entry)
        except (CatalogError, EngineError) as exc:
            raise AccountError(str(exc), culprit(exc)) from None
        if rates is not None:
            await self.prices.set_price(scope, entry.id, rates)
        await self.pool.refresh()
        return entry

    async def remove(self, scope: AdminScope, model: str) -> Described:
        """New requests get a 404 at once, running ones finish, then it is unloaded.
        Returns the model as it was."""
        scope.require(Role.ADMIN, installation=True)
        shown = await self.one(scope, model)
        try:
            await self.catalog.remove(shown[0].id)
        except UnknownCatalogModel:
            raise NotFound("model", model) from None
        await self.pool.refresh()
        return shown

    async def load(self, scope: AdminScope, model: str) -> CatalogEntry:
        """Load now (a failed model tries again); raises the pool's EngineError when it
        cannot (the model is then `failed`, or busy models leave no room yet)."""
        scope.require(Role.ADMIN, installation=True)
        entry = await self.entry(scope, model)
        try:
            await self.pool.load(entry.id)
        except UnknownModel:
            raise NotFound("model", model) from None
        return entry

    async def unload(self, scope: AdminScope, model: str) -> CatalogEntry:
        scope.require(Role.ADMIN, installation=True)
        entry = await self.entry(scope, model)
        await self.pool.unload(entry.id)
        return entry

    async def set_pinned(self, scope: AdminScope, model: str, pinned: bool) -> CatalogEntry:
        """Pinned: loaded now and never unloaded for room or idleness."""
        scope.require(Role.ADMIN, installation=True)
        entry = await self.entry(scope, model)
        await self.catalog.update(entry.id, pinned=pinned)
        await self.pool.refresh()
        if pinned:
            await self.pool.load(entry.id)
        return entry

    async def update(self, scope: AdminScope, model: str, changes: dict[str, Any],
                     rates: Rates | None = None) -> CatalogEntry:
        """Change some of a model's catalog fields (`options` are merged into its own; a
        new source must be readable here) and set its prices. A new source or options
        take effect at its next load."""
        scope.require(Role.ADMIN, installation=True)
        entry = await self.entry(scope, model)
        if "options" in changes:
            changes = {**changes, "options": {**entry.options, **changes["options"]}}
        if changes:
            try:
                if "source" in changes or "options" in changes:  # as check_source
                    # resolves them: absolute paths to readable files
                    checked = await asyncio.to_thread(
                        check_source, dataclasses.replace(entry, **changes))
                    changes = {**changes, "source": checked.source,
                               "options": checked.options}
                entry = await self.catalog.update(entry.id, **changes)
            except (CatalogError, EngineError) as exc:
                raise AccountError(str(exc), culprit(exc)) from None
        if rates is not None:
            await self.prices.set_price(scope, entry.id, rates)
        await self.pool.refresh()
        if changes.get("pinned"):
            await self.pool.load(entry.id)
        return entry


# -- pulls ------------------------------------------------------------------------------------

async def start_pull(scope: AdminScope, pulls: Pulls, source: str, model_id: str | None = None,
                     sha256: str | None = None, **fields: Any) -> PullProgress:
    """Start pulling `source` into the catalog. Raises PullError or CatalogError for a
    malformed request, PullConflict for one that cannot start now."""
    scope.require(Role.ADMIN, installation=True)
    request = PullRequest.create(source, model_id, sha256, **fields)
    try:
        return await pulls.start(request)
    except (PullError, CatalogError) as exc:
        raise PullConflict(str(exc)) from None


def list_pulls(scope: AdminScope, pulls: Pulls) -> list[PullProgress]:
    scope.require(Role.VIEWER, installation=True)
    return pulls.items()


def get_pull(scope: AdminScope, pulls: Pulls, pull_id: str) -> PullProgress:
    scope.require(Role.VIEWER, installation=True)
    progress = pulls.get(pull_id)
    if progress is None:
        raise NotFound("pull", pull_id)
    return progress


def cancel_pull(scope: AdminScope, pulls: Pulls, pull_id: str) -> PullProgress:
    """Stop a running pull at its next chunk; its partial file stays for a resume."""
    scope.require(Role.ADMIN, installation=True)
    progress = pulls.cancel(pull_id)
    if progress is None:
        raise NotFound("pull", pull_id)
    return progress
