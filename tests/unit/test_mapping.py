"""rpc.mapping's own Timestamp conversion gives what protobuf's FromDatetime gives."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st

from capi_server.rpc import mapping


@given(
    st.datetimes(
        min_value=datetime(1970, 1, 2),
        max_value=datetime(2200, 1, 1),
        timezones=st.sampled_from(
            [UTC, timezone(timedelta(hours=5)), timezone(-timedelta(hours=3, minutes=30))]
        ),
    )
)
def test_timestamp_equals_protobufs_from_datetime(value: datetime) -> None:
    expected = Timestamp()
    expected.FromDatetime(value.astimezone(UTC))
    assert mapping.timestamp(value) == expected
    assert mapping.from_timestamp(expected, True) == value


def test_no_timestamp_for_none() -> None:
    assert mapping.timestamp(None) is None
