"""The cloud layer: limits, budgets, prices, admin keys, reservations, credits.

Project names become unique per organization instead of across the installation.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
BIGINT_ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def _projects_as_in_0001() -> sa.Table:
    """SQLite cannot drop the unnamed UNIQUE(name) of 0001, so batch mode rebuilds the table
    from this definition, which leaves it out."""
    return sa.Table(
        "projects", sa.MetaData(),
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("organization_id", sa.String(40), sa.ForeignKey("organizations.id"),
                  nullable=False, index=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )


def _limit_columns() -> list[sa.Column[int]]:
    return [sa.Column("rpm_limit", sa.Integer, nullable=True),
            sa.Column("tpm_limit", sa.Integer, nullable=True)]


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    op.add_column("organizations", sa.Column("budget_pico", sa.BigInteger, nullable=True))
    if not sqlite:
        op.drop_constraint("projects_name_key", "projects", type_="unique")
    with op.batch_alter_table("projects", recreate="always" if sqlite else "never",
                              copy_from=_projects_as_in_0001() if sqlite else None) as batch:
        for column in _limit_columns():
            batch.add_column(column)
        batch.add_column(sa.Column("budget_pico", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("weight", sa.Float, nullable=False, server_default="1"))
        batch.create_unique_constraint("uq_projects_org_name", ["organization_id", "name"])
    for column in [sa.Column("expires_at", TS, nullable=True),
                   sa.Column("allowed_models", sa.JSON, nullable=True), *_limit_columns()]:
        op.add_column("api_keys", column)
    op.add_column("usage", sa.Column("organization_id", sa.String(40), nullable=False,
                                     server_default=""))
    op.add_column("usage", sa.Column("cost_pico", sa.BigInteger, nullable=False,
                                     server_default="0"))
    op.execute("UPDATE usage SET organization_id = (SELECT p.organization_id FROM projects p "
               "WHERE p.id = usage.project_id) WHERE organization_id = ''")
    op.create_index("ix_usage_project_finished", "usage", ["project_id", "finished_at"])
    op.create_index("ix_usage_org_finished", "usage", ["organization_id", "finished_at"])
    op.create_table(
        "admin_keys",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("organization_id", sa.String(40), sa.ForeignKey("organizations.id"),
                  nullable=True, index=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("prefix", sa.String(24), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("revoked_at", TS, nullable=True),
    )
    op.create_table(
        "prices",
        sa.Column("id", BIGINT_ID, primary_key=True, autoincrement=True),
        sa.Column("model", sa.String(128), nullable=False, index=True),
        sa.Column("input_micro", sa.BigInteger, nullable=False),
        sa.Column("cached_input_micro", sa.BigInteger, nullable=False),
        sa.Column("output_micro", sa.BigInteger, nullable=False),
        sa.Column("effective_at", TS, nullable=False),
    )
    op.create_table(
        "reservations",
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("organization_id", sa.String(40), nullable=False, index=True),
        sa.Column("project_id", sa.String(40), nullable=False, index=True),
        sa.Column("amount_pico", sa.BigInteger, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
    )
    op.create_table(
        "credits",
        sa.Column("id", BIGINT_ID, primary_key=True, autoincrement=True),
        sa.Column("reference", sa.String(64), nullable=False, unique=True),
        sa.Column("organization_id", sa.String(40), sa.ForeignKey("organizations.id"),
                  nullable=False, index=True),
        sa.Column("amount_pico", sa.BigInteger, nullable=False),
        sa.Column("note", sa.String(200), nullable=False),
        sa.Column("created_at", TS, nullable=False, index=True),
    )


def downgrade() -> None:
    for table in ("credits", "reservations", "prices", "admin_keys"):
        op.drop_table(table)
    op.drop_index("ix_usage_org_finished", "usage")
    op.drop_index("ix_usage_project_finished", "usage")
    with op.batch_alter_table("usage") as batch:
        batch.drop_column("cost_pico")
        batch.drop_column("organization_id")
    with op.batch_alter_table("api_keys") as batch:
        for name in ("tpm_limit", "rpm_limit", "allowed_models", "expires_at"):
            batch.drop_column(name)
    with op.batch_alter_table("projects") as batch:
        batch.drop_constraint("uq_projects_org_name", type_="unique")
        for name in ("weight", "budget_pico", "tpm_limit", "rpm_limit"):
            batch.drop_column(name)
        batch.create_unique_constraint("projects_name_key", ["name"])
    op.drop_column("organizations", "budget_pico")
