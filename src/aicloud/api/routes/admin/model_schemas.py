"""The catalog's admin bodies and the JSON a model is shown as (the admin API and
`aicloud models` print the same objects)."""

from __future__ import annotations

from dataclasses import asdict
from decimal import Decimal
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field

from aicloud.api.routes.admin.schemas import Strict
from aicloud.billing.money import Rates, price_to_micro
from aicloud.engines.base import EngineStats, TenantLoad
from aicloud.models.catalog import MAX_KEEP_ALIVE, CatalogEntry, EngineKind
from aicloud.models.pool import ModelView


class ModelOptions(Strict):
    """Engine options: the weight format and layout for local models; for upstream ones,
    fallbacks (other model names, tried in order) and a tokenizer (a GGUF on this server
    whose vocabulary counts tokens when the provider reports no usage)."""

    weights: Literal["native", "q4_0", "q8_0", "bf16", "f16"] | None = None
    context: int | None = Field(default=None, ge=64, le=1 << 20)
    sequences: int | None = Field(default=None, ge=1, le=256)
    fallbacks: list[str] | None = Field(default=None, max_length=16)
    tokenizer: str | None = Field(default=None, max_length=1000)

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class ModelPrices(Strict):
    """USD per million tokens, as the prices admin API takes them."""

    input: Decimal
    output: Decimal
    cached_input: Decimal | None = None

    def rates(self) -> Rates:
        cached = self.input if self.cached_input is None else self.cached_input
        return Rates(price_to_micro(self.input, "prices.input"),
                     price_to_micro(cached, "prices.cached_input"),
                     price_to_micro(self.output, "prices.output"))


class ModelCreate(Strict):
    id: str = Field(max_length=128)
    engine: EngineKind = EngineKind.LLAMACPP
    source: str = Field(default="", max_length=1000)
    options: ModelOptions = Field(default_factory=ModelOptions)
    aliases: list[str] = Field(default_factory=list, max_length=32)
    provider: str | None = Field(default=None, max_length=64)
    upstream_model: str | None = Field(default=None, max_length=200)
    keep_alive: float | None = Field(default=None, ge=0, le=MAX_KEEP_ALIVE)
    pinned: bool = False
    organizations: list[str] | None = Field(default=None, max_length=1000)
    prices: ModelPrices | None = None

    def entry(self) -> CatalogEntry:
        return CatalogEntry(
            id=self.id, engine=self.engine, source=self.source,
            options=self.options.as_dict(), aliases=tuple(self.aliases),
            provider=self.provider, upstream_model=self.upstream_model,
            keep_alive=self.keep_alive, pinned=self.pinned,
            organizations=None if self.organizations is None else tuple(self.organizations))


class ModelUpdate(Strict):
    """A change to a catalog model: only the fields sent change (`options` are merged into
    the model's own; `null` puts back the default: the server's keep_alive, every
    organization). A new source or options take
    effect at the model's next load; on Ray, `replicas` and its bounds scale it now."""

    source: str | None = Field(default=None, max_length=1000)
    options: ModelOptions | None = None
    aliases: list[str] | None = Field(default=None, max_length=32)
    upstream_model: str | None = Field(default=None, max_length=200)
    keep_alive: float | None = Field(default=None, ge=0, le=MAX_KEEP_ALIVE)
    pinned: bool | None = None
    organizations: list[str] | None = Field(default=None, max_length=1000)
    prices: ModelPrices | None = None
    replicas: int | None = Field(default=None, ge=1, le=256)
    min_replicas: int | None = Field(default=None, ge=1, le=256)
    max_replicas: int | None = Field(default=None, ge=1, le=256)

    NOT_NULL: ClassVar[tuple[str, ...]] = ("source", "options", "aliases", "pinned", "prices")
    REPLICAS: ClassVar[tuple[str, ...]] = ("replicas", "min_replicas", "max_replicas")

    def catalog_changes(self) -> dict[str, Any]:
        """The catalog fields sent, as CatalogEntry's values."""
        sent = self.model_fields_set - {"prices", *self.REPLICAS}
        changes: dict[str, Any] = {}
        for name in sent:
            value = getattr(self, name)
            if value is None and name in self.NOT_NULL:
                raise ValueError(name)
            if name == "options":
                value = value.as_dict()
            elif name in ("aliases", "organizations") and value is not None:
                value = tuple(value)
            changes[name] = value
        return changes

    def scales(self) -> bool:
        return bool(self.model_fields_set & set(self.REPLICAS))


class TenantJson(BaseModel):
    tenant: str
    waiting: int
    running: int
    served_input_tokens: int
    served_output_tokens: int
    counter: float
    weight: float


class ModelJson(BaseModel):
    """A catalog model and its state in this server's pool. `memory_bytes` is what its
    last load measurably cost, or the estimate before one (`memory_measured`);
    `keep_alive_effective` the idle seconds after which it unloads now (the last
    request's X-Keep-Alive, else its own, else the server's); `error` why it failed."""

    object: Literal["model"] = "model"
    id: str
    engine: str
    source: str | None
    aliases: list[str]
    provider: str | None
    upstream_model: str | None
    options: dict[str, Any]
    keep_alive: float | None
    pinned: bool
    organizations: list[str] | None
    state: str
    error: str | None
    memory_bytes: int
    memory_measured: bool
    keep_alive_effective: float
    in_flight: int
    idle_seconds: float | None
    running: int = 0
    waiting: int = 0
    tokens_per_second: float = 0.0
    kv_cells_used: int = 0
    kv_cells_total: int = 0
    placement: dict[str, Any] | None = None
    tenants: list[TenantJson] = Field(default_factory=list)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelJson]


def model_json(entry: CatalogEntry, view: ModelView, *, private: bool = True,
               load: dict[str, Any] | None = None,
               tenants: list[TenantLoad] | None = None) -> ModelJson:
    """`private`: the source and a failure's reason (they name files), for
    installation-wide admins only."""
    stats = load or asdict(EngineStats(0, 0, 0.0, 0, 0))
    return ModelJson(
        id=entry.id, engine=entry.engine.value, source=entry.source if private else None,
        aliases=list(entry.aliases), provider=entry.provider,
        upstream_model=entry.upstream_model, options=dict(entry.options),
        keep_alive=entry.keep_alive, pinned=view.pinned,
        organizations=None if entry.organizations is None else list(entry.organizations),
        state=view.state.value, error=view.error if private else None,
        memory_bytes=view.memory_bytes, memory_measured=view.measured,
        keep_alive_effective=view.keep_alive, in_flight=view.in_flight,
        idle_seconds=None if view.idle_seconds is None else round(view.idle_seconds, 1),
        tenants=[TenantJson(**asdict(t)) for t in tenants or []], **stats)
