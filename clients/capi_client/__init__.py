"""capi_client: Python client of the capi gRPC service (needs only grpcio and protobuf).

    from capi_client import CapiClient, NotFound

    with CapiClient("127.0.0.1:50051", token="...") as capi:
        try:
            direction = capi.get_direction("5").direction
        except NotFound as exc:
            print(exc.reason)  # DIRECTION_NOT_FOUND

`AsyncCapiClient` has the same methods as coroutines; `BackgroundAnalyzer` queues
AnalyzeDialog calls for a chatbot without ever blocking it. Every failed RPC raises a
`CapiError` subclass (see `capi_client._errors` for the hierarchy).
"""

from capi_client._async_client import AsyncCapiClient
from capi_client._background import BackgroundAnalyzer
from capi_client._channel import create_aio_channel, create_channel, parse_target
from capi_client._client import CapiClient
from capi_client._errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    CapiError,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
    error_from_rpc,
)

__all__ = [
    "Aborted",
    "AlreadyExists",
    "AsyncCapiClient",
    "BackgroundAnalyzer",
    "Cancelled",
    "CapiClient",
    "CapiError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "create_aio_channel",
    "create_channel",
    "error_from_rpc",
    "parse_target",
]
