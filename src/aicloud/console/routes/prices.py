"""Prices per model (USD per million tokens); setting one is for installation admins, as
on `/admin/v1/prices`."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from aicloud.accounts.base import AccountError, Role
from aicloud.billing.money import MoneyError, Rates, price_to_micro
from aicloud.console.forms import FieldError, errors_of, text, values
from aicloud.console.web import (
    ActingDep,
    ConsoleRoute,
    Form,
    SignedInDep,
    cloud_of,
    nav_page,
    pool_of,
    render,
    see_other,
)

router = APIRouter(prefix="/console", route_class=ConsoleRoute)

PRICE_FIELDS = ("input_per_million", "cached_input_per_million", "output_per_million")


def _price(raw: str, field: str) -> int:
    try:
        return price_to_micro(raw.removeprefix("$").strip() or "0", field)
    except MoneyError as exc:
        raise FieldError(str(exc), field) from None


async def _prices_page(request: Request, signed: SignedInDep, form: Form,
                       status: int = 200) -> HTMLResponse:
    scope = signed.scope
    return await render(request, "prices.html", status,
                        prices=await cloud_of(request).prices.current(), form=form,
                        models=[c.id for c in pool_of(request).cards()],
                        may_set=scope.role >= Role.ADMIN and scope.installation_wide)


@nav_page(router, "/prices", "Prices", 50)
async def prices(request: Request, signed: SignedInDep) -> HTMLResponse:
    return await _prices_page(request, signed, Form())


@router.post("/prices", response_class=HTMLResponse)
async def set_price(request: Request, signed: ActingDep) -> Response:
    form = await request.form()
    try:
        model = text(form, "model")
        if not 1 <= len(model) <= 128:
            raise FieldError("model must be 1-128 characters", "model")
        given = {f: text(form, f) for f in PRICE_FIELDS}
        cached = given["cached_input_per_million"] or given["input_per_million"]
        rates = Rates(_price(given["input_per_million"], "input_per_million"),
                      _price(cached, "cached_input_per_million"),
                      _price(given["output_per_million"], "output_per_million"))
        await cloud_of(request).prices.set_price(signed.scope, model, rates)
    except AccountError as exc:
        return await _prices_page(request, signed, Form(values(form), errors_of(exc, "model")),
                                  400)
    return see_other("/console/prices")
