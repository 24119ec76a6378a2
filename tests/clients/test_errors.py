"""Rich error details decoded by hand match what googleapis-common-protos encodes."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from capi_client import (
    CapiError,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    Unauthenticated,
    Unimplemented,
    error_from_rpc,
)
from capi_client._errors import STATUS_DETAILS_KEY, parse_status_details


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str, trailers: Any = ()) -> None:
        self._code, self._details, self._trailers = code, details, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._trailers


def rich_trailer(*details: Any) -> tuple[tuple[str, bytes], ...]:
    packed = []
    for detail in details:
        item = any_pb2.Any()
        item.Pack(detail)
        packed.append(item)
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="m", details=packed)
    return (("other-bin", b"\x00"), (STATUS_DETAILS_KEY, status.SerializeToString()))


def test_error_info_and_bad_request_are_decoded() -> None:
    trailer = rich_trailer(
        error_details_pb2.ErrorInfo(
            reason="INVALID_ARGUMENT", domain="capi.v1", metadata={"a": "1", "b": "zwei ü"}
        ),
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field="direction.pixel_id", description="must be digits"
                ),
                error_details_pb2.BadRequest.FieldViolation(field="direction.name"),
            ]
        ),
    )
    err = error_from_rpc(FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "bad pixel", trailer))
    assert type(err) is InvalidArgument
    assert err.reason == "INVALID_ARGUMENT"
    assert err.metadata == {"a": "1", "b": "zwei ü"}
    assert err.field_violations == [
        ("direction.pixel_id", "must be digits"),
        ("direction.name", ""),
    ]
    assert err.message == "bad pixel"
    assert parse_status_details(trailer).domain == "capi.v1"


def test_str_is_one_operator_line() -> None:
    trailer = rich_trailer(error_details_pb2.ErrorInfo(reason="DIRECTION_NOT_FOUND"))
    err = error_from_rpc(FakeRpcError(grpc.StatusCode.NOT_FOUND, "direction 5 not found", trailer))
    assert isinstance(err, NotFound)
    assert str(err) == "NOT_FOUND (DIRECTION_NOT_FOUND): direction 5 not found"


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded),
        (grpc.StatusCode.UNIMPLEMENTED, Unimplemented),
        (grpc.StatusCode.UNKNOWN, CapiError),
    ],
)
def test_codes_map_to_classes_without_details(code: grpc.StatusCode, cls: type) -> None:
    err = error_from_rpc(FakeRpcError(code, "x"))
    assert isinstance(err, cls) and err.code == code
    assert (err.reason, err.metadata, err.field_violations) == ("", {}, [])


def test_garbled_trailer_keeps_the_code() -> None:
    trailer = ((STATUS_DETAILS_KEY, b"\x1a\xff\xff"),)  # field 3, truncated length
    err = error_from_rpc(FakeRpcError(grpc.StatusCode.NOT_FOUND, "gone", trailer))
    assert isinstance(err, NotFound) and err.reason == ""


def test_unknown_detail_types_are_ignored() -> None:
    trailer = rich_trailer(
        error_details_pb2.RetryInfo(), error_details_pb2.ErrorInfo(reason="OVERLOADED")
    )
    err = error_from_rpc(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", trailer))
    assert err.reason == "OVERLOADED"
