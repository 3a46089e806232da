"""Form fields to service arguments. A bad value is a `FieldError` naming its field, so the
page shows the message next to it; the services' own refusals (`AccountError.param`) use
the same names, as the admin API's JSON fields do."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData

from aicloud.accounts.base import AccountError
from aicloud.billing.money import MoneyError, usd_to_pico

MAX_FIELD = 4096
Schema = TypeVar("Schema", bound=BaseModel)


class FieldError(AccountError):
    """A form value that cannot be read, by field name."""


def text(form: FormData, name: str) -> str:
    value = form.get(name)
    if not isinstance(value, str):
        return ""
    if len(value) > MAX_FIELD or "\x00" in value:
        raise FieldError("the value is too long or contains a NUL character", name)
    return value.strip()


def optional_int(form: FormData, name: str) -> int | None:
    raw = text(form, name)
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise FieldError("enter a whole number, or leave it empty", name) from None


def number(form: FormData, name: str, default: float) -> float:
    raw = text(form, name)
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise FieldError("enter a number", name) from None


def optional_usd(form: FormData, name: str) -> int | None:
    """Dollars (a leading $ is fine) as picodollars; empty is none."""
    raw = text(form, name).removeprefix("$").strip()
    if not raw:
        return None
    try:
        return usd_to_pico(raw, name)
    except MoneyError as exc:
        raise FieldError(str(exc), name) from None


def optional_moment(form: FormData, name: str) -> datetime | None:
    """A browser's datetime-local value (no zone), taken as UTC as the page says."""
    raw = text(form, name)
    if not raw:
        return None
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        raise FieldError("enter a date and time like 2027-01-31T18:00", name) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def model_list(form: FormData, name: str) -> list[str] | None:
    """Model ids separated by commas, spaces or lines; empty means every model."""
    raw = text(form, name).replace(",", " ").split()
    return raw or None


def values(form: FormData, secrets: tuple[str, ...] = ()) -> dict[str, str]:
    """The fields to show again after a refusal, never the CSRF token nor the form's
    `secrets` (a provider's key and header values: typed once, never sent back)."""
    return {k: v for k, v in form.items()
            if isinstance(v, str) and k != "csrf_token" and k not in secrets}


def errors_of(exc: AccountError, fallback: str) -> dict[str, str]:
    return {exc.param or fallback: str(exc)}


def changes_only(sent: dict[str, Any], present: FormData) -> dict[str, Any]:
    """Keep the fields the form actually had (a field the page did not offer, such as an
    organization budget for an organization's own admin, is left alone)."""
    return {k: v for k, v in sent.items() if k in present or k.replace("_pico", "_usd")
            in present}


def filled(form: FormData, *names: str, prefix: str = "") -> dict[str, str]:
    """The named fields that are not empty (an empty field is the API's default), keyed
    without `prefix` (a page with two forms prefixes one's names: ids stay unique)."""
    return {name: value for name in names if (value := text(form, prefix + name))}


def validated(schema: type[Schema], data: dict[str, Any], prefix: str = "") -> Schema:
    """`data` checked by the admin API's own body schema, so a form and a JSON body obey
    the same rules; a refusal names its form field (an engine option by its own name,
    `weights`, not `options`)."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        loc = [str(p) for p in first.get("loc", ()) if not isinstance(p, int)]
        name = loc[1] if len(loc) > 1 and loc[0] == "options" else (loc[0] if loc else "")
        message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        raise FieldError(message, prefix + name if name else None) from None
