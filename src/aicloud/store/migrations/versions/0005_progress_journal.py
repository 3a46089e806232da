"""The progress journal: running requests and the server instances that run them.

A server killed with SIGKILL never writes the usage rows of its running requests. Each
server now registers itself in `server_instances` (with a heartbeat) and, about once a
second, writes the token counts of its running requests to `progress_journal` in one
statement. When a server is known dead (restarted on the same home and port, or silent
past the heartbeat timeout), its journal rows become `interrupted` usage rows and its
budget holds, tagged with its instance id, are released.

Revision ID: 0005_progress_journal
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_progress_journal"
down_revision = "0003"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "server_instances",
        sa.Column("id", sa.String(32), primary_key=True),
        # host, home and port of a server that holds their lock: a new holder proves it dead
        sa.Column("slot", sa.String(600), nullable=True, index=True),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("heartbeat_at", TS, nullable=False, index=True),
    )
    op.create_table(
        "progress_journal",
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("instance_id", sa.String(32), nullable=False, index=True),
        sa.Column("organization_id", sa.String(40), nullable=False),
        sa.Column("project_id", sa.String(40), nullable=False),
        sa.Column("api_key_id", sa.String(40), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("cached_tokens", sa.Integer, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
        sa.Column("input_micro", sa.BigInteger, nullable=False),
        sa.Column("cached_input_micro", sa.BigInteger, nullable=False),
        sa.Column("output_micro", sa.BigInteger, nullable=False),
        sa.Column("hold_pico", sa.BigInteger, nullable=True),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("progress_at", TS, nullable=False),
    )
    with op.batch_alter_table("reservations") as batch:
        batch.add_column(sa.Column("instance_id", sa.String(32), nullable=True))
        batch.create_index("ix_reservations_instance_id", ["instance_id"])


def downgrade() -> None:
    with op.batch_alter_table("reservations") as batch:
        batch.drop_index("ix_reservations_instance_id")
        batch.drop_column("instance_id")
    op.drop_table("progress_journal")
    op.drop_table("server_instances")
