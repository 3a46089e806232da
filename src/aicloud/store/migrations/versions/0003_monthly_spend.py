"""Monthly spend and live holds per project and organization, kept beside their rows.

A budget hold needs this month's settled spend and the live holds. Summing the month's
usage rows made each hold cost more as the month went on, and summing `reservations` (a
table every request inserts into and deletes from) made PostgreSQL wade through dead
index entries until the next vacuum. Each counter changes in the same transaction as the
rows it counts, and only when those rows really change (a new usage row, a hold inserted
or deleted), so it always equals their sum (the ledger tests check this); the rows stay
the record.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "monthly_spend",
        sa.Column("scope", sa.String(60), primary_key=True),  # project:<id> / organization:<id>
        sa.Column("month", sa.String(7), primary_key=True),  # YYYY-MM, UTC
        sa.Column("spent_pico", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "budget_held",
        sa.Column("scope", sa.String(60), primary_key=True),
        sa.Column("held_pico", sa.BigInteger, nullable=False),
    )
    month = ("substr(finished_at, 1, 7)" if op.get_bind().dialect.name == "sqlite"
             else "to_char(finished_at AT TIME ZONE 'UTC', 'YYYY-MM')")
    for kind, column in (("project", "project_id"), ("organization", "organization_id")):
        op.execute(
            f"INSERT INTO monthly_spend (scope, month, spent_pico) "
            f"SELECT '{kind}:' || {column}, {month}, SUM(cost_pico) FROM usage "
            f"GROUP BY {column}, {month}")
        op.execute(
            f"INSERT INTO budget_held (scope, held_pico) "
            f"SELECT '{kind}:' || {column}, SUM(amount_pico) FROM reservations "
            f"GROUP BY {column}")


def downgrade() -> None:
    op.drop_table("budget_held")
    op.drop_table("monthly_spend")
