"""The model catalog: what the installation offers, loaded or not.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "catalog_models",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("aliases", sa.JSON, nullable=False),
        sa.Column("engine", sa.String(16), nullable=False),
        sa.Column("source", sa.String(1000), nullable=False),
        sa.Column("options", sa.JSON, nullable=False),
        sa.Column("provider", sa.String(64), nullable=True),
        sa.Column("upstream_model", sa.String(200), nullable=True),
        sa.Column("keep_alive_s", sa.Float, nullable=True),
        sa.Column("pinned", sa.Boolean, nullable=False),
        sa.Column("organizations", sa.JSON, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("catalog_models")
