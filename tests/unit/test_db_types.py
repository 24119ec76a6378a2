from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from capi_server.adapters.db.types import json_rows


def test_json_rows_leave_out_none_and_give_datetimes_with_their_offset() -> None:
    almaty = timezone(timedelta(hours=5))
    text = json_rows(
        [
            {"id": 1, "error_message": None, "event_time": datetime(2026, 12, 7, tzinfo=UTC)},
            {"id": 2, "payload": {"event_name": "Lead", "name": "Алия"}, "at": None},
            {"id": 3, "updated_at": datetime(2026, 12, 7, 5, tzinfo=almaty)},
        ]
    )
    assert json.loads(text) == [
        {"id": 1, "event_time": "2026-12-07T00:00:00+00:00"},
        {"id": 2, "payload": {"event_name": "Lead", "name": "Алия"}},
        {"id": 3, "updated_at": "2026-12-07T05:00:00+05:00"},
    ]
    assert "Алия" in text  # not \\u-escaped: PostgreSQL reads UTF-8


def test_json_rows_refuse_a_naive_datetime_and_what_json_cannot_hold() -> None:
    with pytest.raises(ValueError, match="naive"):
        json_rows([{"event_time": datetime(2026, 12, 7)}])
    with pytest.raises(TypeError):
        json_rows([{"ids": {1, 2}}])
