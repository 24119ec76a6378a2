"""A tiny grpc.aio server whose capi.v1 methods behave as a test says (slow, flaky, down)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from capi_client._methods import RPCS

Behaviour = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


class FakeServer:
    """Serves the given full method paths ("/capi.v1.SettingsService/GetDirection")."""

    def __init__(self, behaviours: dict[str, Behaviour]) -> None:
        self.behaviours = behaviours
        self.attempts: dict[str, int] = dict.fromkeys(behaviours, 0)
        self.requests: list[Any] = []
        self.metadata: list[dict[str, str]] = []
        self.server: grpc.aio.Server | None = None
        self.port = 0

    def _handler(self, path: str) -> grpc.RpcMethodHandler[Any, Any]:
        rpc = RPCS[path.rsplit("/", 1)[1]]

        async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            self.attempts[path] += 1
            self.requests.append(request)
            self.metadata.append({k: str(v) for k, v in context.invocation_metadata() or ()})
            return await self.behaviours[path](request, context)

        return grpc.unary_unary_rpc_method_handler(
            handle,
            request_deserializer=rpc.request_type.FromString,
            response_serializer=lambda message: message.SerializeToString(),
        )

    async def start(self, port: int = 0) -> int:
        by_service: dict[str, dict[str, grpc.RpcMethodHandler[Any, Any]]] = {}
        for path in self.behaviours:
            service, method = path.strip("/").rsplit("/", 1)
            by_service.setdefault(service, {})[method] = self._handler(path)
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers(
            tuple(
                grpc.method_handlers_generic_handler(service, handlers)
                for service, handlers in by_service.items()
            )
        )
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        await self.server.start()
        return self.port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(None)
