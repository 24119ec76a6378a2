"""Checks every request gets before its handler: no NUL in strings, valid Timestamps.

PostgreSQL text cannot hold NUL, and protobuf Timestamps outside 0001..9999 (or with
negative nanos) cannot become datetimes; both are bad input, answered INVALID_ARGUMENT
with the field's path, whatever RPC carries them.
"""

from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from capi_server.domain.errors import InvalidArgument

MIN_TIMESTAMP_SECONDS = -62_135_596_800  # 0001-01-01T00:00:00Z
MAX_TIMESTAMP_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z
_TIMESTAMP = "google.protobuf.Timestamp"


def check_request(message: Message, prefix: str = "") -> None:
    for field, value in message.ListFields():
        if field.type == FieldDescriptor.TYPE_STRING:
            values = value if _is_repeated(field) else [value]
            for index, item in enumerate(values):
                if "\x00" in item:
                    path = f"{prefix}{field.name}"
                    where = f"{path}[{index}]" if _is_repeated(field) else path
                    raise InvalidArgument.field(where, "must not contain NUL characters")
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            path = f"{prefix}{field.name}"
            items = value if _is_repeated(field) else [value]
            for index, item in enumerate(items):
                where = f"{path}[{index}]" if _is_repeated(field) else path
                if field.message_type is not None and field.message_type.full_name == _TIMESTAMP:
                    _check_timestamp(item, where)
                else:
                    check_request(item, f"{where}.")


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _check_timestamp(value: Message, path: str) -> None:
    seconds = getattr(value, "seconds", 0)
    nanos = getattr(value, "nanos", 0)
    if not 0 <= nanos < 1_000_000_000:
        raise InvalidArgument.field(path, "nanos must be in 0..999999999")
    if not MIN_TIMESTAMP_SECONDS <= seconds <= MAX_TIMESTAMP_SECONDS:
        raise InvalidArgument.field(path, "must be between years 0001 and 9999")
