"""Upstream providers (OpenAI-compatible services whose models the catalog offers), and
two columns of the usage ledger: which provider served a request, and whether its counts
are estimates (the provider sent none).

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "providers",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("base_url", sa.String(1000), nullable=False),
        sa.Column("api_key_cipher", sa.Text, nullable=True),
        sa.Column("api_key_env", sa.String(128), nullable=True),
        sa.Column("headers_cipher", sa.Text, nullable=True),
        sa.Column("header_names", sa.String(2000), nullable=True),
        sa.Column("timeout_s", sa.Float, nullable=False),
        sa.Column("connect_timeout_s", sa.Float, nullable=False),
        sa.Column("retries", sa.Integer, nullable=False),
        sa.Column("max_concurrency", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    with op.batch_alter_table("usage") as batch:
        batch.add_column(sa.Column("provider", sa.String(64), nullable=True))
        batch.add_column(sa.Column("estimated", sa.Boolean, nullable=False,
                                   server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("usage") as batch:
        batch.drop_column("estimated")
        batch.drop_column("provider")
    op.drop_table("providers")
