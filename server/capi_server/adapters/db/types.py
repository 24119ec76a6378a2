"""Column types that behave the same on PostgreSQL and SQLite."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Dialect, Integer, TypeDecorator
from sqlalchemy.dialects.postgresql import JSONB

# JSONB on PostgreSQL (the seed's column type), JSON text on SQLite, from one definition.
JsonColumn = JSON().with_variant(JSONB(), "postgresql")

# SQLite only auto-increments an INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UtcDateTime(TypeDecorator[datetime]):
    """timestamptz on PostgreSQL; on SQLite naive UTC in, aware UTC out."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UtcDateTime column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def json_rows(rows: Iterable[dict[str, Any]]) -> str:
    """Rows as one JSON array for PostgreSQL's json_to_recordset / json_populate_recordset:
    one statement text and one parameter for any number of rows, encoded in C (psycopg
    dumps list parameters in Python, element by element). None is left out, so the column
    is SQL NULL (for a JSON column too, where SQLAlchemy's JSON type would have stored a
    JSON null; both read back as None); datetimes travel as ISO 8601 with their offset."""
    return json.dumps(
        [{k: v for k, v in row.items() if v is not None} for row in rows],
        ensure_ascii=False,
        # Called by the encoder only for what JSON has no type for: no Python call for
        # each of the other values (a log row has about fifteen).
        default=_json_default,
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UtcDateTime column")
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
