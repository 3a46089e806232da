"""Usage: tokens and spend per day by project and by model (inline SVG), the newest
requests, CSV export, and monthly invoices. Everything is read through `Reports`, whose
scope checks make a foreign organization, project or key a 404."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, Response, StreamingResponse

from aicloud.accounts.base import AdminScope, now
from aicloud.billing.reports import UsageFilter, invoice_csv, invoice_json
from aicloud.console.charts import Chart, stacked_bars
from aicloud.console.forms import FieldError
from aicloud.console.web import (
    ConsoleRoute,
    Form,
    SignedInDep,
    cloud_of,
    nav_page,
    render,
)
from aicloud.services import Cloud

router = APIRouter(prefix="/console", route_class=ConsoleRoute)

DEFAULT_DAYS = 30
TABLE_ROWS = 100
MAX_AXIS_DAYS = 366
FILTERS = ("organization_id", "project_id", "model", "start", "end")


def _day(request: Request, name: str) -> datetime | None:
    raw = request.query_params.get(name, "").strip()
    if not raw:
        return None
    try:
        return datetime.combine(date.fromisoformat(raw), datetime.min.time(), UTC)
    except ValueError:
        raise FieldError("enter a date like 2026-11-30", name) from None


def usage_filter(request: Request) -> tuple[UsageFilter, Form]:
    """The page's filters; dates are whole UTC days, `end` included."""
    form = Form({k: request.query_params.get(k, "").strip() for k in FILTERS})
    try:
        start, end = _day(request, "start"), _day(request, "end")
    except FieldError as exc:
        form.errors[exc.param or "start"] = str(exc)
        start = end = None
    if not form.values["start"] and "start" not in form.errors:
        start = datetime.combine(now().date() - timedelta(days=DEFAULT_DAYS - 1),
                                 datetime.min.time(), UTC)
        form.values["start"] = start.date().isoformat()
    filt = UsageFilter(organization_id=form.values["organization_id"] or None,
                       project_id=form.values["project_id"] or None,
                       model=form.values["model"] or None, start=start,
                       end=end + timedelta(days=1) if end else None)
    return filt, form


@dataclass(slots=True, frozen=True)
class Names:
    """Ids as people know them: project names, key prefixes."""

    projects: dict[str, str]
    keys: dict[str, str]
    orgs: dict[str, str]

    def project(self, ident: str) -> str:
        return self.projects.get(ident, ident)

    def key(self, ident: str) -> str:
        if ident.startswith("akey_"):
            return "console playground"
        return self.keys.get(ident, ident)


async def names_for(cloud: Cloud, scope: AdminScope) -> Names:
    projects, keys, orgs = await asyncio.gather(
        cloud.orgs.list_projects(scope), cloud.keys.list_keys(scope), cloud.orgs.list_orgs(scope))
    return Names({p.id: p.name for p in projects}, {k.id: k.prefix + "…" for k in keys},
                 {o.id: o.name for o in orgs})


def _tokens(value: float) -> str:
    return f"{value:,.0f}"


def _dollars(value: float) -> str:
    if value == 0:
        return "$0"
    return f"${value:,.4f}" if value < 1 else f"${value:,.2f}"


def days_of(filt: UsageFilter) -> list[str]:
    """The period's days, for the charts' axis (none for a period without a start, or
    longer than a year: then the days with data)."""
    if filt.start is None:
        return []
    end = filt.end or datetime.combine(now().date() + timedelta(days=1), datetime.min.time(),
                                       UTC)
    count = (end - filt.start).days
    if not 0 < count <= MAX_AXIS_DAYS:
        return []
    return [(filt.start + timedelta(days=i)).date().isoformat() for i in range(count)]


def charts(summary: list[dict[str, Any]], names: Names, days: list[str]) -> list[Chart]:
    """Four charts from one summary grouped by day, project and model (on 10,000 rows a
    second query cost as much as the rest of the page)."""
    out = []
    for group, label in (("project", "project"), ("model", "model")):
        series = names.project if group == "project" else str
        tokens = [(r["day"], series(r[group]), float(r["prompt_tokens"]
                                                     + r["completion_tokens"]))
                  for r in summary]
        spend = [(r["day"], series(r[group]), float(Decimal(r["cost_usd"]))) for r in summary]
        out.append(stacked_bars(f"Tokens per day by {label}", tokens, _tokens, days))
        out.append(stacked_bars(f"Spend per day by {label}", spend, _dollars, days))
    return out


@nav_page(router, "/usage", "Usage", 40)
async def usage(request: Request, signed: SignedInDep) -> HTMLResponse:
    """The page's three reads run at once (each on its own connection); the charts are
    laid out on a worker thread."""
    cloud, scope = cloud_of(request), signed.scope
    filt, form = usage_filter(request)
    names, rows, summary = await asyncio.gather(
        names_for(cloud, scope), cloud.reports.rows(scope, filt, TABLE_ROWS),
        cloud.reports.summary(scope, filt, ("day", "project", "model")))
    drawn = await asyncio.to_thread(charts, summary, names, days_of(filt))
    return await render(
        request, "usage.html", 400 if form.errors else 200, form=form, names=names,
        charts=drawn, rows=rows, query=request.url.query,
        org_options=list(names.orgs.items()), month=now().strftime("%Y-%m"))


@router.get("/usage/export.csv", response_class=StreamingResponse)
async def export_usage(request: Request, signed: SignedInDep) -> Response:
    """The same CSV as `/admin/v1/usage/export`, for the page's filters."""
    filt, form = usage_filter(request)
    if form.errors:
        raise FieldError(next(iter(form.errors.values())))
    lines = cloud_of(request).reports.export_csv(signed.scope, filt)
    first = await anext(lines)  # the scope checks run here: a foreign id is still a 404

    async def body() -> AsyncIterator[str]:
        yield first
        async for line in lines:
            yield line
    return StreamingResponse(body(), media_type="text/csv", headers={
        "content-disposition": 'attachment; filename="usage.csv"'})


@router.get("/invoices", response_class=HTMLResponse)
async def invoice(request: Request, signed: SignedInDep) -> Response:
    org_id = request.query_params.get("organization_id", "")
    month = request.query_params.get("month", "") or now().strftime("%Y-%m")
    bill = await cloud_of(request).reports.invoice(signed.scope, org_id, month)
    if request.query_params.get("format") == "csv":
        return PlainTextResponse(invoice_csv(bill), media_type="text/csv", headers={
            "content-disposition": f'attachment; filename="invoice-{bill.month}.csv"'})
    return await render(request, "invoice.html", bill=bill, view=invoice_json(bill))
