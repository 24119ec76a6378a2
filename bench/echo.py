"""The baseline: a trivial grpc.aio unary echo server, in its own process.

It answers the request bytes back without parsing them: the ceiling of Python gRPC on
this machine, which every scenario is compared with.
"""

from __future__ import annotations

import asyncio
from multiprocessing.connection import Connection

import grpc

ECHO_METHOD = "/bench.v1.Echo/Echo"


async def _echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


async def _serve(ready: Connection) -> None:
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "bench.v1.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    ready.send(port)
    await server.wait_for_termination()


def serve_echo(ready: Connection) -> None:
    """Process entry: serves until terminated; sends its port on `ready`."""
    asyncio.run(_serve(ready))
