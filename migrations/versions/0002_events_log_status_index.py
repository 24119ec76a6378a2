"""Index for ListEvents filtered by status within a direction.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_capi_events_log_direction_id_status_id",
        "capi_events_log",
        ["direction_id", "status", "id"],
    )


def downgrade() -> None:
    op.drop_index("ix_capi_events_log_direction_id_status_id", table_name="capi_events_log")
