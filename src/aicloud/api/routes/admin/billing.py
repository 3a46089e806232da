"""Admin routes for prices, usage (summaries and CSV export), credits and invoices."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, StreamingResponse

from aicloud.accounts.base import AccountError, Role
from aicloud.api.deps import CloudDep, CurrentAdmin, parse_body
from aicloud.api.routes.admin.schemas import CreditCreate, PriceSet, documented, listing, price_json
from aicloud.billing.money import Rates, pico_to_usd, price_to_micro, usd_to_pico
from aicloud.billing.reports import UsageFilter, invoice_csv, invoice_json

router = APIRouter()

MODEL_PATH = "{model:path}"


@router.get("/prices")
async def list_prices(_: CurrentAdmin, cloud: CloudDep) -> dict[str, Any]:
    return listing([price_json(p) for p in await cloud.prices.current()])


@router.put(f"/prices/{MODEL_PATH}", **documented(PriceSet))
async def set_price(model: str, request: Request, scope: CurrentAdmin,
                    cloud: CloudDep) -> dict[str, Any]:
    body = await parse_body(request, PriceSet)
    if not 1 <= len(model) <= 128 or "\x00" in model:
        raise AccountError("model must be 1-128 characters", "model")
    cached = body.input_per_million if body.cached_input_per_million is None \
        else body.cached_input_per_million
    rates = Rates(price_to_micro(body.input_per_million, "input_per_million"),
                  price_to_micro(cached, "cached_input_per_million"),
                  price_to_micro(body.output_per_million, "output_per_million"))
    return price_json(await cloud.prices.set_price(scope, model, rates,
                                                   body.batch_discount_pct))


def usage_filter(organization_id: str | None = None, project_id: str | None = None,
                 api_key_id: str | None = None, model: str | None = None,
                 start: datetime | None = None, end: datetime | None = None) -> UsageFilter:
    return UsageFilter(organization_id, project_id, api_key_id, model, start, end)



@router.get("/usage")
async def usage(scope: CurrentAdmin, cloud: CloudDep, organization_id: str | None = None,
                project_id: str | None = None, api_key_id: str | None = None,
                model: str | None = None, start: datetime | None = None,
                end: datetime | None = None, group_by: str = "day") -> dict[str, Any]:
    """Totals grouped by any of day, model, project, key (comma separated)."""
    filt = usage_filter(organization_id, project_id, api_key_id, model, start, end)
    groups = tuple(g.strip() for g in group_by.split(",") if g.strip())
    return listing(await cloud.reports.summary(scope, filt, groups))


@router.get("/usage/export")
async def export_usage(scope: CurrentAdmin, cloud: CloudDep, organization_id: str | None = None,
                       project_id: str | None = None, api_key_id: str | None = None,
                       model: str | None = None, start: datetime | None = None,
                       end: datetime | None = None) -> StreamingResponse:
    """One CSV line per request, in the order they were recorded."""
    filt = usage_filter(organization_id, project_id, api_key_id, model, start, end)
    lines = cloud.reports.export_csv(scope, filt)
    first = await anext(lines)  # scope checks run here, so a foreign id is still a 404

    async def body() -> AsyncIterator[str]:
        yield first
        async for line in lines:
            yield line
    return StreamingResponse(body(), media_type="text/csv", headers={
        "content-disposition": 'attachment; filename="usage.csv"'})


@router.post("/credits", status_code=201, **documented(CreditCreate))
async def add_credit(request: Request, scope: CurrentAdmin, cloud: CloudDep) -> dict[str, Any]:
    body = await parse_body(request, CreditCreate)
    created, amount = await cloud.reports.add_credit(
        scope, body.organization_id, usd_to_pico(body.amount_usd, "amount_usd"),
        body.reference, body.note)
    return {"object": "credit", "organization_id": body.organization_id,
            "reference": body.reference, "amount_usd": pico_to_usd(amount), "created": created}


@router.get("/organizations/{org_id}/invoices/{month}", response_model=None)
async def invoice(org_id: str, month: str, scope: CurrentAdmin, cloud: CloudDep,
                  format: str = "json") -> dict[str, Any] | PlainTextResponse:
    scope.require(Role.VIEWER)
    if format not in ("json", "csv"):
        raise AccountError("format is json or csv", "format")
    bill = await cloud.reports.invoice(scope, org_id, month)
    if format == "csv":
        return PlainTextResponse(invoice_csv(bill), media_type="text/csv", headers={
            "content-disposition": f'attachment; filename="invoice-{month}.csv"'})
    return invoice_json(bill)
