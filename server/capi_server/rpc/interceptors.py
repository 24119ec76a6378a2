"""One server interceptor for every unary RPC: request id, auth, load shedding, errors, logs."""

from __future__ import annotations

import hmac
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc
from google.protobuf.message import Message
from google.rpc import code_pb2

from capi_server.adapters.db.database import is_transient_db_error
from capi_server.domain.errors import DomainError
from capi_server.logs import caller_var, request_id_var
from capi_server.rpc.errors import status_of, to_status
from capi_server.rpc.validation import check_request

log = logging.getLogger("capi_server.rpc")

# Open without a token: operators and load balancers probe these.
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

RpcObserver = Callable[[str, str, float], None]


class ServerInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        tokens: Mapping[str, str],
        *,
        max_in_flight: int = 256,
        observe: RpcObserver | None = None,
    ) -> None:
        # token -> caller name
        self._tokens = dict(tokens)
        self._max_in_flight = max_in_flight
        self._in_flight = 0
        self._observe = observe
        # method -> (the handler it wrapped, the wrapping handler): built once per method.
        self._wrapped: dict[str, tuple[Any, grpc.RpcMethodHandler[Any, Any]]] = {}

    def _authenticate(self, metadata: Any) -> str | None:
        header = ""
        for key, value in metadata or ():
            if key == "authorization":
                header = value if isinstance(value, str) else value.decode()
                break
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            return None
        caller = None
        # Compare with every token in constant time, whatever matches first.
        for token, name in self._tokens.items():
            if hmac.compare_digest(token.encode(), presented.strip().encode()):
                caller = name
        return caller

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method: str = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapping = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapping)
        return wrapping

    def _wrap(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        inner: Any = handler.unary_unary
        open_method = method.startswith(OPEN_PREFIXES)

        async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            metadata = context.invocation_metadata()
            request_id = ""
            for key, value in metadata or ():
                if key == "x-request-id":
                    request_id = str(value)[:64]
            # Not a secret: a fast random id ties one call's records together.
            request_id = request_id or f"{random.getrandbits(64):016x}"
            request_id_var.set(request_id)
            caller = "anonymous"
            if self._tokens and not open_method:
                found = self._authenticate(metadata)
                if found is None:
                    log.warning("rejected call without a valid token", extra={"method": method})
                    self._record(method, "UNAUTHENTICATED", 0.0)
                    await context.abort_with_status(
                        status_of(
                            code_pb2.UNAUTHENTICATED,
                            "missing or invalid bearer token",
                            "UNAUTHENTICATED",
                        )
                    )
                caller = found or "anonymous"
            caller_var.set(caller)
            if self._in_flight >= self._max_in_flight and not open_method:
                self._record(method, "RESOURCE_EXHAUSTED", 0.0)
                await context.abort_with_status(
                    status_of(
                        code_pb2.RESOURCE_EXHAUSTED,
                        "server is overloaded; retry with backoff",
                        "OVERLOADED",
                    )
                )
            self._in_flight += 1
            started = time.perf_counter()
            code = "OK"
            try:
                if isinstance(request, Message):
                    check_request(request)
                return await inner(request, context)
            except DomainError as exc:
                status = to_status(exc)
                code = status.code.name
                log.info(
                    "rpc failed",
                    extra={"method": method, "code": code, "reason": exc.reason},
                )
                await context.abort_with_status(status)
            except grpc.aio.AbortError:
                # The handler aborted with a status of its own: count it under that code.
                code = _aborted_code(context)
                raise
            except NotImplementedError:
                code = "UNIMPLEMENTED"
                await context.abort_with_status(
                    status_of(
                        code_pb2.UNIMPLEMENTED, f"{method} is not implemented", "UNIMPLEMENTED"
                    )
                )
            except Exception as exc:
                if is_transient_db_error(exc):
                    code = "UNAVAILABLE"
                    log.warning(
                        "database unavailable",
                        extra={"method": method, "error": type(exc).__name__},
                    )
                    await context.abort_with_status(
                        status_of(
                            code_pb2.UNAVAILABLE,
                            "database unavailable; retry with backoff",
                            "DATABASE_UNAVAILABLE",
                        )
                    )
                code = "INTERNAL"
                log.exception("unhandled error", extra={"method": method})
                await context.abort_with_status(
                    status_of(code_pb2.INTERNAL, "internal error", "INTERNAL")
                )
            finally:
                self._in_flight -= 1
                self._record(method, code, time.perf_counter() - started)

        return grpc.unary_unary_rpc_method_handler(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _record(self, method: str, code: str, seconds: float) -> None:
        if self._observe is not None:
            self._observe(method, code, seconds)


def _aborted_code(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The status a handler aborted with, e.g. "UNIMPLEMENTED" (for metrics and logs)."""
    try:
        status = context.code()
    except Exception:  # an older grpcio without ServicerContext.code()
        return "ABORTED_BY_HANDLER"
    if isinstance(status, grpc.StatusCode):
        return status.name
    return "ABORTED_BY_HANDLER"
