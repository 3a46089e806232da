"""The schema. Alembic migrations in `migrations/` create exactly these tables.

Money is stored as integer picodollars (1e-12 USD): a price in micro-USD per million tokens
times a token count is then exact, so bills never drift by rounding.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """A moment stored as UTC on every database. SQLite's DATETIME keeps only the wall
    clock: `12:00+10:00` was stored as `12:00` and read back as 12:00 UTC, so a key set to
    expire in 8 s worked 10 more hours. Naive values are taken as UTC, as we read them."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if isinstance(value, datetime):
            return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        if isinstance(value, datetime):
            return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value


TS = UTCDateTime()
BIGINT_ID = BigInteger().with_variant(Integer, "sqlite")


class Base(DeclarativeBase):
    pass


class Organization(Base):
    __tablename__ = "organizations"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(TS)
    budget_pico: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # per month


class Project(Base):
    __tablename__ = "projects"
    __table_args__ = (UniqueConstraint("organization_id", "name", name="uq_projects_org_name"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    organization_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(TS)
    rpm_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tpm_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    budget_pico: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # per month
    weight: Mapped[float] = mapped_column(Float, default=1.0)  # share under contention


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    prefix: Mapped[str] = mapped_column(String(24))  # shown in listings, never enough to use
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(TS)
    revoked_at: Mapped[datetime | None] = mapped_column(TS, nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(TS, nullable=True)
    allowed_models: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    rpm_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tpm_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)


class AdminKey(Base):
    """A key for the admin API. No organization means the whole installation."""

    __tablename__ = "admin_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    organization_id: Mapped[str | None] = mapped_column(
        ForeignKey("organizations.id"), nullable=True, index=True)
    role: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(200), default="")
    prefix: Mapped[str] = mapped_column(String(24))
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(TS)
    revoked_at: Mapped[datetime | None] = mapped_column(TS, nullable=True)


class Price(Base):
    """Append-only price history per model; the newest row in effect is the price."""

    __tablename__ = "prices"

    id: Mapped[int] = mapped_column(BIGINT_ID, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(128), index=True)
    input_micro: Mapped[int] = mapped_column(BigInteger)  # micro-USD per million tokens
    cached_input_micro: Mapped[int] = mapped_column(BigInteger)
    output_micro: Mapped[int] = mapped_column(BigInteger)
    effective_at: Mapped[datetime] = mapped_column(TS)


class UsageRecord(Base):
    """One row per finished request; the request id makes a replayed write a no-op."""

    __tablename__ = "usage"
    __table_args__ = (
        Index("ix_usage_project_finished", "project_id", "finished_at"),
        Index("ix_usage_org_finished", "organization_id", "finished_at"),
    )

    id: Mapped[int] = mapped_column(BIGINT_ID, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(64), unique=True)
    organization_id: Mapped[str] = mapped_column(String(40), default="")
    api_key_id: Mapped[str] = mapped_column(String(40), index=True)
    project_id: Mapped[str] = mapped_column(String(40), index=True)
    model: Mapped[str] = mapped_column(String(128))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    cached_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    cost_pico: Mapped[int] = mapped_column(BigInteger, default=0)
    status: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime] = mapped_column(TS)
    finished_at: Mapped[datetime] = mapped_column(TS, index=True)
    provider: Mapped[str | None] = mapped_column(String(64), nullable=True)  # None: local
    estimated: Mapped[bool] = mapped_column(Boolean, default=False)  # no counts came


class Reservation(Base):
    """Budget held by a running request: its maximum possible cost, until it settles."""

    __tablename__ = "reservations"

    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(40), index=True)
    project_id: Mapped[str] = mapped_column(String(40), index=True)
    amount_pico: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[datetime] = mapped_column(TS)
    # the server instance that runs the request: released when that server is known dead
    instance_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)


class ServerInstance(Base):
    """A running server process, alive while its heartbeat is recent."""

    __tablename__ = "server_instances"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    # host, home and port: a new server that takes their lock proves this one dead
    slot: Mapped[str | None] = mapped_column(String(600), nullable=True, index=True)
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(TS)
    heartbeat_at: Mapped[datetime] = mapped_column(TS, index=True)


class JournalEntry(Base):
    """A running request's progress, written about once a second for all of them at once;
    what its usage row would say if its server died now (status `interrupted`)."""

    __tablename__ = "progress_journal"

    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    instance_id: Mapped[str] = mapped_column(String(32), index=True)
    organization_id: Mapped[str] = mapped_column(String(40))
    project_id: Mapped[str] = mapped_column(String(40))
    api_key_id: Mapped[str] = mapped_column(String(40))
    model: Mapped[str] = mapped_column(String(128))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    cached_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    input_micro: Mapped[int] = mapped_column(BigInteger)  # the price it was admitted at
    cached_input_micro: Mapped[int] = mapped_column(BigInteger)
    output_micro: Mapped[int] = mapped_column(BigInteger)
    hold_pico: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    started_at: Mapped[datetime] = mapped_column(TS)
    progress_at: Mapped[datetime] = mapped_column(TS)


class MonthlySpend(Base):
    """Settled spend of one project or organization in one UTC month: the sum of its usage
    rows' costs, kept in step by the ledger so a budget hold reads one row."""

    __tablename__ = "monthly_spend"

    scope: Mapped[str] = mapped_column(String(60), primary_key=True)  # project:<id>, ...
    month: Mapped[str] = mapped_column(String(7), primary_key=True)  # YYYY-MM
    spent_pico: Mapped[int] = mapped_column(BigInteger)


class BudgetHeld(Base):
    """What a project's or organization's live holds add up to: the sum of its
    `reservations` rows, kept in step with them so a budget check reads one row."""

    __tablename__ = "budget_held"

    scope: Mapped[str] = mapped_column(String(60), primary_key=True)
    held_pico: Mapped[int] = mapped_column(BigInteger)


class Credit(Base):
    """Money granted to an organization (top-up, refund); keyed so a retry adds it once."""

    __tablename__ = "credits"

    id: Mapped[int] = mapped_column(BIGINT_ID, primary_key=True, autoincrement=True)
    reference: Mapped[str] = mapped_column(String(64), unique=True)
    organization_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    amount_pico: Mapped[int] = mapped_column(BigInteger)
    note: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(TS, index=True)


class StoredResponse(Base):
    """A response of `/v1/responses`, kept for `GET` and `previous_response_id`: readable
    only by its own project. `context` is the whole conversation up to and including its
    output, so a follow-up never walks a chain (and survives a deleted predecessor)."""

    __tablename__ = "responses"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(40), index=True)
    created_at: Mapped[datetime] = mapped_column(TS)
    body: Mapped[dict[str, Any]] = mapped_column(JSON)  # the response object
    input_items: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    context: Mapped[list[dict[str, Any]]] = mapped_column(JSON)


class CatalogModel(Base):
    """A model the installation offers, loaded or not: where its weights come from (a
    local file or folder, or an upstream provider's model), how to run it, who may use it
    and how long it stays loaded when idle. Names (ids and aliases) are unique together,
    which the catalog checks, since one column cannot say so."""

    __tablename__ = "catalog_models"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    aliases: Mapped[list[str]] = mapped_column(JSON)
    engine: Mapped[str] = mapped_column(String(16))  # llamacpp | vllm | upstream
    source: Mapped[str] = mapped_column(String(1000))  # a path; "" for upstream models
    options: Mapped[dict[str, Any]] = mapped_column(JSON)  # engine options (weights, ...)
    provider: Mapped[str | None] = mapped_column(String(64), nullable=True)
    upstream_model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    keep_alive_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    pinned: Mapped[bool] = mapped_column(Boolean, default=False)
    organizations: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)  # None: all
    created_at: Mapped[datetime] = mapped_column(TS)
    updated_at: Mapped[datetime] = mapped_column(TS)


class ConsoleSession(Base):
    """A signed-in admin console: only a hash of its cookie's token is kept, and it ends at
    `expires_at` (or with its admin key), whatever the browser's cookie says."""

    __tablename__ = "console_sessions"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    admin_key_id: Mapped[str] = mapped_column(ForeignKey("admin_keys.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(TS)
    expires_at: Mapped[datetime] = mapped_column(TS, index=True)


class Provider(Base):
    """An OpenAI-compatible service whose models the catalog offers (engine `upstream`).
    Its API key and extra headers are stored encrypted (providers/secrets.py); a key can
    instead be named by the environment variable that holds it."""

    __tablename__ = "providers"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    base_url: Mapped[str] = mapped_column(String(1000))
    api_key_cipher: Mapped[str | None] = mapped_column(Text, nullable=True)
    api_key_env: Mapped[str | None] = mapped_column(String(128), nullable=True)
    headers_cipher: Mapped[str | None] = mapped_column(Text, nullable=True)
    header_names: Mapped[str | None] = mapped_column(String(2000), nullable=True)  # a,b
    timeout_s: Mapped[float] = mapped_column(Float)
    connect_timeout_s: Mapped[float] = mapped_column(Float)
    retries: Mapped[int] = mapped_column(Integer)
    max_concurrency: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(TS)
    updated_at: Mapped[datetime] = mapped_column(TS)
