"""The admin API's operations as CLI commands, run straight against the database with an
installation-wide owner scope (whoever can run this on the server can read the database).

Reads print JSON, the same objects the admin API returns; secrets print once, last.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any, TypeVar

import typer

from aicloud.accounts.base import AccountError, AdminScope, Forbidden, NotFound
from aicloud.api.routes.admin.schemas import (
    admin_key_json,
    key_json,
    listing,
    org_json,
    price_json,
    project_json,
)
from aicloud.api.routes.batches import BatchObject
from aicloud.batches import BatchStateError, BatchView
from aicloud.billing.money import MoneyError, Rates, price_to_micro, usd_to_pico
from aicloud.billing.reports import UsageFilter, invoice_csv, invoice_json
from aicloud.config import Settings
from aicloud.services import Cloud, open_cloud
from aicloud.store import migrate

T = TypeVar("T")
SCOPE = AdminScope.installation()

orgs = typer.Typer(help="Organizations.", no_args_is_help=True)
projects = typer.Typer(help="Projects: limits, budgets, fair-share weight.", no_args_is_help=True)
keys = typer.Typer(help="API keys for the OpenAI API.", no_args_is_help=True)
admin_keys = typer.Typer(help="Admin keys for /admin/v1.", no_args_is_help=True)
prices = typer.Typer(help="Per-model prices (USD per million tokens).", no_args_is_help=True)
billing = typer.Typer(help="Usage, credits and invoices.", no_args_is_help=True)
batches = typer.Typer(help="Batch API batches, of every project.", no_args_is_help=True)

Unset = Annotated[str | None, typer.Option(help="a number, or 'none' to clear")]


def run(action: Callable[[Cloud], Awaitable[T]]) -> T:
    """One operation against the database; errors print as one line, exit code 1."""
    settings = Settings()
    settings.prepare_home()
    migrate.upgrade(settings.db_url)

    async def go() -> T:
        cloud = open_cloud(settings)
        try:
            return await action(cloud)
        finally:
            await cloud.close()

    try:
        return asyncio.run(go())
    except (AccountError, NotFound, Forbidden, MoneyError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def show(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


def _number(text: str | None, convert: Callable[[str], Any]) -> Any:
    return None if text is None or text.lower() == "none" else convert(text)


def settings_from(**options: str | None) -> dict[str, Any]:
    """Only options given on the command line; 'none' clears a setting."""
    converters: dict[str, tuple[str, Callable[[str], Any]]] = {
        "rpm": ("rpm_limit", int), "tpm": ("tpm_limit", int), "weight": ("weight", float),
        "budget_usd": ("budget_pico", lambda t: usd_to_pico(t, "budget")),
    }
    out: dict[str, Any] = {}
    for option, text in options.items():
        if text is None:
            continue
        field, convert = converters[option]
        try:
            out[field] = _number(text, convert)
        except ValueError as exc:
            raise typer.BadParameter(f"--{option.replace('_', '-')}: {exc}") from None
    return out


# -- organizations ------------------------------------------------------------------------

@orgs.command("create")
def orgs_create(name: str, budget_usd: Unset = None) -> None:
    """Create an organization, optionally with a monthly budget."""
    budget = settings_from(budget_usd=budget_usd).get("budget_pico")
    show(org_json(run(lambda c: c.orgs.create_org(SCOPE, name, budget))))


@orgs.command("list")
def orgs_list() -> None:
    show(listing([org_json(o) for o in run(lambda c: c.orgs.list_orgs(SCOPE))]))


@orgs.command("update")
def orgs_update(org_id: str, name: Annotated[str | None, typer.Option()] = None,
                budget_usd: Unset = None) -> None:
    changes = settings_from(budget_usd=budget_usd) | ({"name": name} if name else {})
    show(org_json(run(lambda c: c.orgs.update_org(SCOPE, org_id, changes))))


# -- projects -----------------------------------------------------------------------------

@projects.command("create")
def projects_create(name: str, org: Annotated[str, typer.Option(help="organization id")],
                    rpm: Unset = None, tpm: Unset = None, budget_usd: Unset = None,
                    weight: Unset = None) -> None:
    settings = settings_from(rpm=rpm, tpm=tpm, budget_usd=budget_usd, weight=weight)
    show(project_json(run(lambda c: c.orgs.create_project(SCOPE, org, name, settings))))


@projects.command("list")
def projects_list(org: Annotated[str | None, typer.Option(help="organization id")] = None
                  ) -> None:
    show(listing([project_json(p) for p in run(lambda c: c.orgs.list_projects(SCOPE, org))]))


@projects.command("update")
def projects_update(project_id: str, name: Annotated[str | None, typer.Option()] = None,
                    rpm: Unset = None, tpm: Unset = None, budget_usd: Unset = None,
                    weight: Unset = None) -> None:
    changes = settings_from(rpm=rpm, tpm=tpm, budget_usd=budget_usd, weight=weight)
    changes |= {"name": name} if name else {}
    show(project_json(run(lambda c: c.orgs.update_project(SCOPE, project_id, changes))))


# -- API keys -----------------------------------------------------------------------------

def key_settings(name: str | None, models: str | None, expires: datetime | None,
                 rpm: str | None, tpm: str | None) -> dict[str, Any]:
    out = settings_from(rpm=rpm, tpm=tpm)
    if name is not None:
        out["name"] = name
    if models is not None:
        out["allowed_models"] = None if models.lower() == "none" else [
            m.strip() for m in models.split(",") if m.strip()]
    if expires is not None:
        out["expires_at"] = expires
    return out


Models = Annotated[str | None, typer.Option(help="comma-separated allow-list, or 'none'")]
Expires = Annotated[datetime | None, typer.Option(help="when the key stops working (UTC)")]


@keys.command("create")
def keys_create(
    project: Annotated[str | None, typer.Option(
        help="project name in the default organization (created if new)")] = None,
    project_id: Annotated[str | None, typer.Option(help="project id, in any organization")
                          ] = None,
    name: Annotated[str, typer.Option(help="a label for the key")] = "",
    models: Models = None, expires: Expires = None, rpm: Unset = None, tpm: Unset = None,
) -> None:
    """Create a key. The secret is printed once, as the last line."""
    if (project is None) == (project_id is None):
        raise typer.BadParameter("give exactly one of --project and --project-id")
    settings = key_settings(name, models, expires, rpm, tpm)

    async def create(c: Cloud) -> tuple[Any, str]:
        pid = project_id or (await c.orgs.project_by_name(project or "")).id
        return await c.keys.create_key(SCOPE, pid, settings)

    view, secret = run(create)
    typer.echo(f"created key {view.id} for project {view.project} ({view.project_id})")
    typer.echo("store this secret now; it cannot be shown again:")
    typer.echo(secret)


@keys.command("list")
def keys_list(project_id: Annotated[str | None, typer.Option()] = None) -> None:
    """List keys (prefixes only; secrets are never stored)."""
    show(listing([key_json(k) for k in run(lambda c: c.keys.list_keys(SCOPE, project_id))]))


@keys.command("update")
def keys_update(key_id: str, name: Annotated[str | None, typer.Option()] = None,
                models: Models = None, expires: Expires = None, rpm: Unset = None,
                tpm: Unset = None) -> None:
    changes = key_settings(name, models, expires, rpm, tpm)
    show(key_json(run(lambda c: c.keys.update_key(SCOPE, key_id, changes))))


@keys.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="the key's id")]) -> None:
    """Revoke a key; requests with it fail from now on."""
    run(lambda c: c.keys.revoke(SCOPE, key_id))
    typer.echo(f"revoked {key_id}")


@keys.command("rotate")
def keys_rotate(key_id: str) -> None:
    """Give a key a new secret (printed last); the old one stops working at once."""
    view, secret = run(lambda c: c.keys.rotate(SCOPE, key_id))
    typer.echo(f"rotated key {view.id}; store this secret now:")
    typer.echo(secret)


# -- admin keys ---------------------------------------------------------------------------

@admin_keys.command("create")
def admin_keys_create(
    role: Annotated[str, typer.Option(help="owner, admin or viewer")],
    org: Annotated[str | None, typer.Option(help="organization id; none = installation")
                   ] = None,
    name: Annotated[str, typer.Option()] = "",
) -> None:
    """Create an admin key. The secret is printed once, as the last line."""
    view, secret = run(lambda c: c.admin_keys.create(SCOPE, role, org, name))
    typer.echo(f"created admin key {view.id} ({view.role}, "
               f"{view.organization_id or 'whole installation'})")
    typer.echo("store this secret now; it cannot be shown again:")
    typer.echo(secret)


@admin_keys.command("list")
def admin_keys_list() -> None:
    show(listing([admin_key_json(k) for k in run(lambda c: c.admin_keys.list(SCOPE))]))


@admin_keys.command("revoke")
def admin_keys_revoke(key_id: str) -> None:
    run(lambda c: c.admin_keys.revoke(SCOPE, key_id))
    typer.echo(f"revoked {key_id}")


# -- prices and billing ---------------------------------------------------------------------

@prices.command("set")
def prices_set(model: str, input: Annotated[str, typer.Option(help="USD per 1M input tokens")],
               output: Annotated[str, typer.Option(help="USD per 1M output tokens")],
               cached_input: Annotated[str | None, typer.Option(
                   help="USD per 1M cached input tokens (default: the input price)")] = None,
               batch_discount: Annotated[int, typer.Option(
                   min=0, max=100, help="percent off for Batch API lines")] = 50,
               ) -> None:
    try:
        rates = Rates(price_to_micro(input, "--input"),
                      price_to_micro(cached_input or input, "--cached-input"),
                      price_to_micro(output, "--output"))
    except MoneyError as exc:
        raise typer.BadParameter(str(exc)) from None
    show(price_json(run(lambda c: c.prices.set_price(SCOPE, model, rates, batch_discount))))


@prices.command("list")
def prices_list() -> None:
    show(listing([price_json(p) for p in run(lambda c: c.prices.current())]))


@billing.command("usage")
def billing_usage(
    org: Annotated[str | None, typer.Option()] = None,
    project_id: Annotated[str | None, typer.Option()] = None,
    key_id: Annotated[str | None, typer.Option()] = None,
    model: Annotated[str | None, typer.Option()] = None,
    start: Annotated[datetime | None, typer.Option()] = None,
    end: Annotated[datetime | None, typer.Option()] = None,
    group_by: Annotated[str, typer.Option(help="day, model, project, key; comma-separated")
                        ] = "day",
    csv: Annotated[bool, typer.Option("--csv", help="every request as CSV instead")] = False,
) -> None:
    filt = UsageFilter(org, project_id, key_id, model, start, end)
    if csv:
        async def export(c: Cloud) -> None:
            async for line in c.reports.export_csv(SCOPE, filt):
                sys.stdout.write(line)
        run(export)
        return
    groups = tuple(g.strip() for g in group_by.split(",") if g.strip())
    show(listing(run(lambda c: c.reports.summary(SCOPE, filt, groups))))


@billing.command("invoice")
def billing_invoice(org_id: str, month: Annotated[str, typer.Argument(help="YYYY-MM")],
                    csv: Annotated[bool, typer.Option("--csv")] = False) -> None:
    bill = run(lambda c: c.reports.invoice(SCOPE, org_id, month))
    if csv:
        sys.stdout.write(invoice_csv(bill))
    else:
        show(invoice_json(bill))


@billing.command("credit")
def billing_credit(org_id: str, amount_usd: str,
                   reference: Annotated[str, typer.Option(help="unique; a retry adds nothing")],
                   note: Annotated[str, typer.Option()] = "") -> None:
    """Grant an organization a credit, shown on its invoice for this month."""
    try:
        amount = usd_to_pico(amount_usd, "amount")
    except MoneyError as exc:
        raise typer.BadParameter(str(exc)) from None
    created, _ = run(lambda c: c.reports.add_credit(SCOPE, org_id, amount, reference, note))
    typer.echo("credit added" if created else "credit already recorded under that reference")


# -- batches ------------------------------------------------------------------------------

def _batch_json(view: BatchView) -> dict[str, Any]:
    return {**BatchObject.of(view).model_dump(), "project_id": view.project_id}


@batches.command("list")
def batches_list(project_id: Annotated[str | None, typer.Option()] = None,
                 status: Annotated[str | None, typer.Option()] = None,
                 limit: Annotated[int, typer.Option(min=1, max=1000)] = 100) -> None:
    """Newest first."""
    views = run(lambda c: c.batches.find(project_id, limit=limit, status=status))
    show(listing([_batch_json(v) for v in views]))


@batches.command("show")
def batches_show(batch_id: str) -> None:
    show(_batch_json(run(lambda c: c.batches.get(None, batch_id))))


@batches.command("cancel")
def batches_cancel(batch_id: str) -> None:
    """Stop starting its lines; the server running it fails the rest and ends it."""
    async def cancel(c: Cloud) -> BatchView:
        try:
            return await c.batches.cancel(None, batch_id)
        except BatchStateError as exc:
            raise AccountError(str(exc)) from None

    show(_batch_json(run(cancel)))
