"""Admin request bodies (unknown fields are refused) and the JSON each object is shown as.

Amounts travel as decimal strings of US dollars, so no bill passes through a float.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from aicloud.accounts.admin_keys import AdminKeyView
from aicloud.accounts.base import iso
from aicloud.accounts.keys import KeyView
from aicloud.accounts.orgs import OrgView, ProjectView
from aicloud.billing.money import micro_to_usd, pico_to_usd, usd_to_pico
from aicloud.billing.prices import PriceView

Name = str
Money = Decimal | None
Limit = int | None


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def changes(self) -> dict[str, Any]:
        """Only the fields the caller sent (null included: it clears a setting), with
        dollar amounts turned into the stored units."""
        out = {name: getattr(self, name) for name in self.model_fields_set}
        if "budget_usd" in out:
            budget = out.pop("budget_usd")
            out["budget_pico"] = None if budget is None else usd_to_pico(budget, "budget_usd")
        return out


class OrgCreate(Strict):
    name: Name = Field(max_length=200)
    budget_usd: Money = None


class OrgUpdate(Strict):
    name: Name = Field(default="", max_length=200)
    budget_usd: Money = None


class ProjectCreate(Strict):
    name: Name = Field(max_length=200)
    organization_id: str | None = Field(default=None, max_length=64)
    rpm_limit: Limit = None
    tpm_limit: Limit = None
    budget_usd: Money = None
    weight: float = 1.0


class ProjectUpdate(Strict):
    name: Name = Field(default="", max_length=200)
    rpm_limit: Limit = None
    tpm_limit: Limit = None
    budget_usd: Money = None
    weight: float = 1.0


class KeyUpdate(Strict):
    name: Name = Field(default="", max_length=200)
    allowed_models: list[str] | None = Field(default=None, max_length=256)
    expires_at: datetime | None = None
    rpm_limit: Limit = None
    tpm_limit: Limit = None


class KeyCreate(KeyUpdate):
    project_id: str = Field(max_length=64)

    def changes(self) -> dict[str, Any]:
        out = super().changes()
        out.pop("project_id", None)
        return out


class AdminKeyCreate(Strict):
    role: str = Field(max_length=16)
    organization_id: str | None = Field(default=None, max_length=64)
    name: Name = Field(default="", max_length=200)


class PriceSet(Strict):
    input_per_million: Decimal
    output_per_million: Decimal
    cached_input_per_million: Decimal | None = None
    batch_discount_pct: int = Field(default=50, ge=0, le=100)


class CreditCreate(Strict):
    organization_id: str = Field(max_length=64)
    amount_usd: Decimal
    reference: str = Field(max_length=64)
    note: str = Field(default="", max_length=200)


def _usd(pico: int | None) -> str | None:
    return None if pico is None else pico_to_usd(pico)


def org_json(org: OrgView) -> dict[str, Any]:
    return {"object": "organization", "id": org.id, "name": org.name,
            "budget_usd": _usd(org.budget_pico), "created_at": iso(org.created_at)}


def project_json(p: ProjectView) -> dict[str, Any]:
    return {"object": "project", "id": p.id, "organization_id": p.organization_id,
            "name": p.name, "rpm_limit": p.rpm_limit, "tpm_limit": p.tpm_limit,
            "budget_usd": _usd(p.budget_pico), "weight": p.weight,
            "created_at": iso(p.created_at)}


def key_json(k: KeyView, secret: str | None = None) -> dict[str, Any]:
    out = {"object": "api_key", "id": k.id, "project_id": k.project_id, "name": k.name,
           "prefix": k.prefix, "status": k.status,
           "allowed_models": list(k.allowed_models) if k.allowed_models is not None else None,
           "rpm_limit": k.rpm_limit, "tpm_limit": k.tpm_limit,
           "expires_at": iso(k.expires_at), "created_at": iso(k.created_at),
           "revoked_at": iso(k.revoked_at)}
    if secret is not None:
        out["secret"] = secret
    return out


def admin_key_json(k: AdminKeyView, secret: str | None = None) -> dict[str, Any]:
    out = {"object": "admin_key", "id": k.id, "organization_id": k.organization_id,
           "role": k.role, "name": k.name, "prefix": k.prefix,
           "created_at": iso(k.created_at), "revoked_at": iso(k.revoked_at)}
    if secret is not None:
        out["secret"] = secret
    return out


def price_json(p: PriceView) -> dict[str, Any]:
    return {"object": "price", "model": p.model, "currency": "usd", "per": "1M tokens",
            "input_per_million": micro_to_usd(p.rates.input_micro),
            "cached_input_per_million": micro_to_usd(p.rates.cached_input_micro),
            "output_per_million": micro_to_usd(p.rates.output_micro),
            "batch_discount_pct": p.batch_discount_pct,
            "effective_at": iso(p.effective_at)}


def spend_json(spent: int, held: int, budget: int | None) -> dict[str, Any]:
    left = None if budget is None else pico_to_usd(max(budget - spent - held, 0))
    return {"spent_usd": pico_to_usd(spent), "held_usd": pico_to_usd(held),
            "budget_usd": _usd(budget), "remaining_usd": left}


def documented(model: type[BaseModel]) -> dict[str, Any]:
    """Bodies are parsed by `parse_body` (strict JSON, clean 400s), so FastAPI does not see
    them; this puts their schema into the OpenAPI document all the same."""
    return {"openapi_extra": {"requestBody": {"required": True, "content": {
        "application/json": {"schema": model.model_json_schema()}}}}}


def listing(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": items}
