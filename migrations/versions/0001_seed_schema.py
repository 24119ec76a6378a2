"""Seed schema: accounts, directions with CAPI settings, leads, dialogs, messages, log.

Table and column names of the seed (migrations 125_meta_capi_tracking.sql and
127_direction_capi_settings.sql) are kept verbatim.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from capi_server.adapters.db.types import BigId, JsonColumn, UtcDateTime

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _timestamps() -> list[sa.Column[object]]:
    return [
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
    ]


def _id() -> sa.Column[object]:
    return sa.Column("id", BigId, primary_key=True, autoincrement=True, nullable=False)


def upgrade() -> None:
    op.create_table(
        "user_accounts",
        _id(),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("access_token", sa.Text()),
        sa.Column("default_region", sa.String(2)),
        *_timestamps(),
        sa.PrimaryKeyConstraint("id", name="pk_user_accounts"),
    )
    op.create_table(
        "ad_accounts",
        _id(),
        sa.Column("user_account_id", BigId, nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("access_token", sa.Text()),
        *_timestamps(),
        sa.PrimaryKeyConstraint("id", name="pk_ad_accounts"),
        sa.ForeignKeyConstraint(
            ["user_account_id"],
            ["user_accounts.id"],
            name="fk_ad_accounts_user_account_id_user_accounts",
        ),
    )
    op.create_index("ix_ad_accounts_user_account_id", "ad_accounts", ["user_account_id"])
    op.create_table(
        "crm_connections",
        _id(),
        sa.Column("user_account_id", BigId, nullable=False),
        sa.Column("crm_type", sa.String(16), nullable=False),
        sa.Column("base_url", sa.Text(), nullable=False),
        sa.Column("portal", sa.String(255), nullable=False),
        sa.Column("access_token", sa.Text()),
        sa.Column("application_token", sa.Text()),
        sa.Column("reconcile_interval_seconds", sa.Integer(), nullable=False),
        sa.Column("last_reconciled_at", UtcDateTime()),
        *_timestamps(),
        sa.PrimaryKeyConstraint("id", name="pk_crm_connections"),
        sa.ForeignKeyConstraint(
            ["user_account_id"],
            ["user_accounts.id"],
            name="fk_crm_connections_user_account_id_user_accounts",
        ),
    )
    op.create_index("ix_crm_connections_user_account_id", "crm_connections", ["user_account_id"])
    op.create_index("ix_crm_connections_portal", "crm_connections", ["portal"])
    op.create_table(
        "account_directions",
        _id(),
        sa.Column("user_account_id", BigId, nullable=False),
        sa.Column("ad_account_id", BigId),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("instance_name", sa.String(200)),
        sa.Column("pixel_id", sa.String(64)),
        sa.Column("whatsapp_business_account_id", sa.String(64)),
        sa.Column("qualification_prompt", sa.Text()),
        sa.Column("capi_enabled", sa.Boolean(), nullable=False),
        sa.Column("capi_source", sa.Text()),
        sa.Column("capi_crm_type", sa.Text()),
        sa.Column("capi_crm_connection_id", BigId),
        sa.Column("capi_interest_fields", JsonColumn, nullable=False),
        sa.Column("capi_qualified_fields", JsonColumn, nullable=False),
        sa.Column("capi_scheduled_fields", JsonColumn, nullable=False),
        sa.Column("capi_test_event_code", sa.String(64)),
        sa.Column("capi_event_names", JsonColumn, nullable=False),
        sa.Column("capi_require_ctwa_clid", sa.Boolean(), nullable=False),
        sa.Column("capi_limited_data_use", sa.Boolean(), nullable=False),
        sa.Column("capi_review_confidence_threshold", sa.Float(), nullable=False),
        *_timestamps(),
        sa.PrimaryKeyConstraint("id", name="pk_account_directions"),
        sa.UniqueConstraint("instance_name", name="uq_account_directions_instance_name"),
        sa.ForeignKeyConstraint(
            ["user_account_id"],
            ["user_accounts.id"],
            name="fk_account_directions_user_account_id_user_accounts",
        ),
        sa.ForeignKeyConstraint(
            ["ad_account_id"],
            ["ad_accounts.id"],
            name="fk_account_directions_ad_account_id_ad_accounts",
        ),
        sa.ForeignKeyConstraint(
            ["capi_crm_connection_id"],
            ["crm_connections.id"],
            name="fk_account_directions_capi_crm_connection_id_crm_connections",
        ),
    )
    op.create_index(
        "ix_account_directions_user_account_id", "account_directions", ["user_account_id"]
    )
    op.create_table(
        "leads",
        _id(),
        sa.Column("direction_id", BigId, nullable=False),
        sa.Column("contact_key", sa.String(64), nullable=False),
        sa.Column("contact_phone", sa.String(32)),
        sa.Column("email", sa.String(320)),
        sa.Column("ctwa_clid", sa.Text()),
        sa.Column("from_ad_without_click_id", sa.Boolean(), nullable=False),
        sa.Column("crm_entity_type", sa.String(16)),
        sa.Column("crm_entity_id", sa.String(64)),
        *_timestamps(),
        sa.PrimaryKeyConstraint("id", name="pk_leads"),
        sa.UniqueConstraint(
            "direction_id", "contact_key", name="uq_leads_direction_id_contact_key"
        ),
        sa.ForeignKeyConstraint(
            ["direction_id"],
            ["account_directions.id"],
            name="fk_leads_direction_id_account_directions",
        ),
    )
    op.create_table(
        "dialog_analysis",
        _id(),
        sa.Column("lead_id", BigId, nullable=False),
        sa.Column("direction_id", BigId, nullable=False),
        sa.Column("instance_name", sa.String(200)),
        sa.Column("contact_phone", sa.String(64)),
        *[
            column
            for level in ("interest", "qualified", "scheduled")
            for column in (
                sa.Column(f"capi_{level}_sent", sa.Boolean(), nullable=False),
                sa.Column(f"capi_{level}_sent_at", UtcDateTime()),
                sa.Column(f"capi_{level}_event_id", sa.String(64)),
            )
        ],
        sa.Column("client_message_count", sa.Integer(), nullable=False),
        sa.Column("last_message_at", UtcDateTime()),
        sa.Column("analyzed_client_message_count", sa.Integer(), nullable=False),
        sa.Column("is_interested", sa.Boolean(), nullable=False),
        sa.Column("is_qualified", sa.Boolean(), nullable=False),
        sa.Column("is_scheduled", sa.Boolean(), nullable=False),
        sa.Column("analysis", JsonColumn),
        sa.Column("analysis_model", sa.String(100)),
        sa.Column("analysis_prompt_version", sa.String(32)),
        sa.Column("analysis_confidence", sa.Float()),
        sa.Column("analyzed_at", UtcDateTime()),
        sa.Column("held_levels", JsonColumn, nullable=False),
        *_timestamps(),
        sa.PrimaryKeyConstraint("id", name="pk_dialog_analysis"),
        sa.UniqueConstraint("lead_id", name="uq_dialog_analysis_lead_id"),
        sa.ForeignKeyConstraint(["lead_id"], ["leads.id"], name="fk_dialog_analysis_lead_id_leads"),
        sa.ForeignKeyConstraint(
            ["direction_id"],
            ["account_directions.id"],
            name="fk_dialog_analysis_direction_id_account_directions",
        ),
    )
    op.create_index("ix_dialog_analysis_direction_id", "dialog_analysis", ["direction_id"])
    op.create_table(
        "dialog_messages",
        _id(),
        sa.Column("dialog_id", BigId, nullable=False),
        sa.Column("message_id", sa.String(128), nullable=False),
        sa.Column("from_me", sa.Boolean(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("message_type", sa.String(32), nullable=False),
        sa.Column("sent_at", UtcDateTime(), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_dialog_messages"),
        sa.UniqueConstraint(
            "dialog_id", "message_id", name="uq_dialog_messages_dialog_id_message_id"
        ),
        sa.ForeignKeyConstraint(
            ["dialog_id"],
            ["dialog_analysis.id"],
            name="fk_dialog_messages_dialog_id_dialog_analysis",
        ),
    )
    op.create_table(
        "capi_events_log",
        _id(),
        sa.Column("direction_id", BigId),
        sa.Column("dialog_id", BigId),
        sa.Column("lead_id", BigId),
        sa.Column("level", sa.Integer(), nullable=False),
        sa.Column("event_name", sa.String(64), nullable=False),
        sa.Column("event_id", sa.String(64)),
        sa.Column("event_time", UtcDateTime()),
        sa.Column("pixel_id", sa.String(64)),
        sa.Column("source", sa.String(16)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("payload", JsonColumn),
        sa.Column("test_event_code", sa.String(64)),
        sa.Column("facebook_response", JsonColumn),
        sa.Column("error_code", sa.Integer()),
        sa.Column("error_subcode", sa.Integer()),
        sa.Column("error_message", sa.Text()),
        sa.Column("hint", sa.Text()),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", UtcDateTime()),
        sa.Column("locked_until", UtcDateTime()),
        *_timestamps(),
        sa.PrimaryKeyConstraint("id", name="pk_capi_events_log"),
        sa.ForeignKeyConstraint(
            ["direction_id"],
            ["account_directions.id"],
            name="fk_capi_events_log_direction_id_account_directions",
        ),
        sa.ForeignKeyConstraint(
            ["dialog_id"],
            ["dialog_analysis.id"],
            name="fk_capi_events_log_dialog_id_dialog_analysis",
        ),
        sa.ForeignKeyConstraint(["lead_id"], ["leads.id"], name="fk_capi_events_log_lead_id_leads"),
    )
    op.create_index(
        "ix_capi_events_log_pending_due",
        "capi_events_log",
        ["next_attempt_at"],
        postgresql_where=sa.text("status = 'pending'"),
        sqlite_where=sa.text("status = 'pending'"),
    )
    op.create_index("ix_capi_events_log_direction_id_id", "capi_events_log", ["direction_id", "id"])
    op.create_index("ix_capi_events_log_dialog_id_level", "capi_events_log", ["dialog_id", "level"])


def downgrade() -> None:
    op.drop_table("capi_events_log")
    op.drop_table("dialog_messages")
    op.drop_table("dialog_analysis")
    op.drop_table("leads")
    op.drop_table("account_directions")
    op.drop_table("crm_connections")
    op.drop_table("ad_accounts")
    op.drop_table("user_accounts")
