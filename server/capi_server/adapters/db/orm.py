"""Tables. The seed's table and column names are kept verbatim (ARCHITECTURE.md section 4).

Schema changes go through Alembic revisions in migrations/; tests check that the
revisions and these models agree.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from capi_server.adapters.db.types import BigId, JsonColumn, UtcDateTime

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Timestamps:
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, onupdate=utcnow)


class UserAccountRow(Timestamps, Base):
    __tablename__ = "user_accounts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    # Encrypted at rest (capi_server.adapters.db.secrets) when keys are configured.
    access_token: Mapped[str | None] = mapped_column(Text)
    default_region: Mapped[str | None] = mapped_column(String(2))


class AdAccountRow(Timestamps, Base):
    __tablename__ = "ad_accounts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    user_account_id: Mapped[int] = mapped_column(ForeignKey("user_accounts.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    access_token: Mapped[str | None] = mapped_column(Text)


class CrmConnectionRow(Timestamps, Base):
    __tablename__ = "crm_connections"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    user_account_id: Mapped[int] = mapped_column(ForeignKey("user_accounts.id"), index=True)
    crm_type: Mapped[str] = mapped_column(String(16))
    base_url: Mapped[str] = mapped_column(Text)
    # amoCRM subdomain or Bitrix24 host: how a webhook finds its connection.
    portal: Mapped[str] = mapped_column(String(255), index=True)
    access_token: Mapped[str | None] = mapped_column(Text)
    application_token: Mapped[str | None] = mapped_column(Text)
    reconcile_interval_seconds: Mapped[int] = mapped_column(Integer, default=0)
    last_reconciled_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class DirectionRow(Timestamps, Base):
    __tablename__ = "account_directions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    user_account_id: Mapped[int] = mapped_column(ForeignKey("user_accounts.id"), index=True)
    ad_account_id: Mapped[int | None] = mapped_column(ForeignKey("ad_accounts.id"))
    name: Mapped[str] = mapped_column(String(200))
    instance_name: Mapped[str | None] = mapped_column(String(200), unique=True)
    pixel_id: Mapped[str | None] = mapped_column(String(64))
    whatsapp_business_account_id: Mapped[str | None] = mapped_column(String(64))
    qualification_prompt: Mapped[str | None] = mapped_column(Text)
    capi_enabled: Mapped[bool] = mapped_column(Boolean, default=False)
    capi_source: Mapped[str | None] = mapped_column(Text)
    capi_crm_type: Mapped[str | None] = mapped_column(Text)
    capi_crm_connection_id: Mapped[int | None] = mapped_column(ForeignKey("crm_connections.id"))
    capi_interest_fields: Mapped[list[dict[str, Any]]] = mapped_column(JsonColumn, default=list)
    capi_qualified_fields: Mapped[list[dict[str, Any]]] = mapped_column(JsonColumn, default=list)
    capi_scheduled_fields: Mapped[list[dict[str, Any]]] = mapped_column(JsonColumn, default=list)
    capi_test_event_code: Mapped[str | None] = mapped_column(String(64))
    capi_event_names: Mapped[dict[str, str]] = mapped_column(JsonColumn, default=dict)
    capi_require_ctwa_clid: Mapped[bool] = mapped_column(Boolean, default=False)
    capi_limited_data_use: Mapped[bool] = mapped_column(Boolean, default=False)
    capi_review_confidence_threshold: Mapped[float] = mapped_column(Float, default=0.0)


class LeadRow(Timestamps, Base):
    __tablename__ = "leads"
    __table_args__ = (UniqueConstraint("direction_id", "contact_key"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    direction_id: Mapped[int] = mapped_column(ForeignKey("account_directions.id"))
    # Normalised phone digits, or "lid:<id>" for a WhatsApp LID contact without a phone.
    contact_key: Mapped[str] = mapped_column(String(64))
    contact_phone: Mapped[str | None] = mapped_column(String(32))
    email: Mapped[str | None] = mapped_column(String(320))
    ctwa_clid: Mapped[str | None] = mapped_column(Text)
    # The chat came from an ad but the webhook carried no click id.
    from_ad_without_click_id: Mapped[bool] = mapped_column(Boolean, default=False)
    crm_entity_type: Mapped[str | None] = mapped_column(String(16))
    crm_entity_id: Mapped[str | None] = mapped_column(String(64))


class DialogAnalysisRow(Timestamps, Base):
    """One row per dialog: the seed's capi_<level>_{sent,sent_at,event_id} flags."""

    __tablename__ = "dialog_analysis"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    lead_id: Mapped[int] = mapped_column(ForeignKey("leads.id"), unique=True)
    direction_id: Mapped[int] = mapped_column(ForeignKey("account_directions.id"), index=True)
    instance_name: Mapped[str | None] = mapped_column(String(200))
    contact_phone: Mapped[str | None] = mapped_column(String(64))
    capi_interest_sent: Mapped[bool] = mapped_column(Boolean, default=False)
    capi_interest_sent_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    capi_interest_event_id: Mapped[str | None] = mapped_column(String(64))
    capi_qualified_sent: Mapped[bool] = mapped_column(Boolean, default=False)
    capi_qualified_sent_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    capi_qualified_event_id: Mapped[str | None] = mapped_column(String(64))
    capi_scheduled_sent: Mapped[bool] = mapped_column(Boolean, default=False)
    capi_scheduled_sent_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    capi_scheduled_event_id: Mapped[str | None] = mapped_column(String(64))
    # Analysis state (WhatsApp source).
    client_message_count: Mapped[int] = mapped_column(Integer, default=0)
    last_message_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    analyzed_client_message_count: Mapped[int] = mapped_column(Integer, default=0)
    is_interested: Mapped[bool] = mapped_column(Boolean, default=False)
    is_qualified: Mapped[bool] = mapped_column(Boolean, default=False)
    is_scheduled: Mapped[bool] = mapped_column(Boolean, default=False)
    analysis: Mapped[dict[str, Any] | None] = mapped_column(JsonColumn)
    analysis_model: Mapped[str | None] = mapped_column(String(100))
    analysis_prompt_version: Mapped[str | None] = mapped_column(String(32))
    analysis_confidence: Mapped[float | None] = mapped_column(Float)
    analyzed_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # Levels held for review: {"2": {"reason": ..., "confidence": ...}}.
    held_levels: Mapped[dict[str, Any]] = mapped_column(JsonColumn, default=dict)


class DialogMessageRow(Base):
    __tablename__ = "dialog_messages"
    __table_args__ = (UniqueConstraint("dialog_id", "message_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    dialog_id: Mapped[int] = mapped_column(ForeignKey("dialog_analysis.id"))
    message_id: Mapped[str] = mapped_column(String(128))
    from_me: Mapped[bool] = mapped_column(Boolean, default=False)
    text: Mapped[str] = mapped_column(Text, default="")
    message_type: Mapped[str] = mapped_column(String(32), default="text")
    sent_at: Mapped[datetime] = mapped_column(UtcDateTime)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class CapiEventLogRow(Timestamps, Base):
    """The seed's audit log: one row per event attempt series."""

    __tablename__ = "capi_events_log"
    __table_args__ = (
        # The retry worker's query: due pending rows.
        Index(
            "ix_capi_events_log_pending_due",
            "next_attempt_at",
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
        Index("ix_capi_events_log_direction_id_id", "direction_id", "id"),
        # ListEvents filtered by status (errors are rare: without it a page scans many rows).
        Index("ix_capi_events_log_direction_id_status_id", "direction_id", "status", "id"),
        Index("ix_capi_events_log_dialog_id_level", "dialog_id", "level"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    direction_id: Mapped[int | None] = mapped_column(ForeignKey("account_directions.id"))
    dialog_id: Mapped[int | None] = mapped_column(ForeignKey("dialog_analysis.id"))
    lead_id: Mapped[int | None] = mapped_column(ForeignKey("leads.id"))
    level: Mapped[int] = mapped_column(Integer)
    event_name: Mapped[str] = mapped_column(String(64))
    event_id: Mapped[str | None] = mapped_column(String(64))
    event_time: Mapped[datetime | None] = mapped_column(UtcDateTime)
    pixel_id: Mapped[str | None] = mapped_column(String(64))
    source: Mapped[str | None] = mapped_column(String(16))
    # success | error | skipped (the seed's values) | pending (queued work).
    status: Mapped[str] = mapped_column(String(16))
    # The event as sent to Meta (hashed user data only) and Meta's answer.
    payload: Mapped[dict[str, Any] | None] = mapped_column(JsonColumn)
    test_event_code: Mapped[str | None] = mapped_column(String(64))
    facebook_response: Mapped[dict[str, Any] | None] = mapped_column(JsonColumn)
    error_code: Mapped[int | None] = mapped_column(Integer)
    error_subcode: Mapped[int | None] = mapped_column(Integer)
    error_message: Mapped[str | None] = mapped_column(Text)
    hint: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # A worker that took the row sends it until then; another worker may take it after.
    locked_until: Mapped[datetime | None] = mapped_column(UtcDateTime)
