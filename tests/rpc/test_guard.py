"""The RPC guard is applied at registration (`GuardedServer`), on both ways grpc finds a
handler: generic handlers and registered method handlers. Streaming handlers pass as they
are. Each test calls a real grpc.aio server over loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from capi_server.logs import caller_var, request_id_var
from capi_server.rpc.interceptors import GuardedServer, RpcGuard

SERVICE = "test.Guarded"
TOKENS = {"secret-token": "agent-service"}
Register = Callable[[GuardedServer, dict[str, Any]], None]


async def _say(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return f"{caller_var.get()}|{request_id_var.get()}|".encode() + request


async def _count(
    request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
) -> AsyncIterator[bytes]:
    for i in range(2):
        yield str(i).encode()


def _handlers() -> dict[str, Any]:
    return {
        "Say": grpc.unary_unary_rpc_method_handler(_say),
        "Count": grpc.unary_stream_rpc_method_handler(_count),
    }


def _generic(guarded: GuardedServer, handlers: dict[str, Any]) -> None:
    guarded.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


def _registered(guarded: GuardedServer, handlers: dict[str, Any]) -> None:
    guarded.add_registered_method_handlers(SERVICE, handlers)


@pytest.fixture(params=[_generic, _registered], ids=["generic", "registered"])
async def target(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, list[Any]]]:
    register: Register = request.param
    seen: list[Any] = []
    server = grpc.aio.server()
    guard = RpcGuard(TOKENS, observe=lambda method, code, _s: seen.append((method, code)))
    register(GuardedServer(server, guard), _handlers())
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", seen
    finally:
        await server.stop(None)


def _say_call(channel: grpc.aio.Channel) -> Callable[..., Awaitable[bytes]]:
    call: Callable[..., Awaitable[bytes]] = channel.unary_unary(f"/{SERVICE}/Say")
    return call


async def test_a_call_without_a_token_is_refused_and_counted(
    target: tuple[str, list[Any]],
) -> None:
    address, seen = target
    async with grpc.aio.insecure_channel(address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _say_call(channel)(b"hi")
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert seen == [(f"/{SERVICE}/Say", "UNAUTHENTICATED")]


async def test_a_call_with_a_token_runs_as_its_caller_with_its_request_id(
    target: tuple[str, list[Any]],
) -> None:
    address, seen = target
    async with grpc.aio.insecure_channel(address) as channel:
        answer = await _say_call(channel)(
            b"hi",
            metadata=(("authorization", "Bearer secret-token"), ("x-request-id", "req-7")),
        )
    assert answer == b"agent-service|req-7|hi"
    assert seen == [(f"/{SERVICE}/Say", "OK")]


async def test_a_streaming_handler_is_left_unwrapped(target: tuple[str, list[Any]]) -> None:
    """Only unary RPCs are guarded (reflection's and health Watch's streams are open)."""
    address, seen = target
    async with grpc.aio.insecure_channel(address) as channel:
        call: Any = channel.unary_stream(f"/{SERVICE}/Count")
        answers = [message async for message in call(b"")]
    assert answers == [b"0", b"1"]
    assert seen == []


async def test_an_unknown_method_is_unimplemented(target: tuple[str, list[Any]]) -> None:
    address, seen = target
    async with grpc.aio.insecure_channel(address) as channel:
        call: Callable[..., Awaitable[bytes]] = channel.unary_unary(f"/{SERVICE}/Missing")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(b"", metadata=(("authorization", "Bearer secret-token"),))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert seen == []
