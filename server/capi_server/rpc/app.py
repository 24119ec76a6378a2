"""Server wiring: servicers, health, reflection, the RPC guard; serve() with graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from capi.v1 import (
    capi_sender_service_pb2,
    capi_sender_service_pb2_grpc,
    qualification_service_pb2,
    qualification_service_pb2_grpc,
    settings_service_pb2,
    settings_service_pb2_grpc,
)
from capi_server.adapters import metrics
from capi_server.bootstrap import App
from capi_server.rpc.interceptors import GuardedServer, RpcGuard
from capi_server.rpc.qualification_servicer import QualificationServicer
from capi_server.rpc.sender_servicer import SenderServicer
from capi_server.rpc.settings_servicer import SettingsServicer

log = logging.getLogger("capi_server")

SERVICE_NAMES = (
    qualification_service_pb2.DESCRIPTOR.services_by_name["QualificationService"].full_name,
    capi_sender_service_pb2.DESCRIPTOR.services_by_name["CapiSenderService"].full_name,
    settings_service_pb2.DESCRIPTOR.services_by_name["SettingsService"].full_name,
)


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    app: App
    _health_task: asyncio.Task[None] | None = None

    async def stop(self, grace: float | None) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def _set_health(servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ("", *SERVICE_NAMES):
        await servicer.set(name, status)


async def _watch_database(app: App, servicer: health.aio.HealthServicer) -> None:
    """SERVING while the database answers; NOT_SERVING while it does not."""
    last: bool | None = None
    while True:
        ok = await app.db.ping()
        if ok != last:
            await _set_health(servicer, ok)
            if last is not None:
                log.warning("database %s", "reachable again" if ok else "unreachable")
            last = ok
        await asyncio.sleep(5.0 if ok else 1.0)


async def start_server(app: App, listen: str | None = None) -> RunningServer:
    settings = app.settings
    guard = RpcGuard(
        settings.auth_token_map(),
        max_in_flight=settings.max_concurrent_rpcs,
        observe=metrics.observe_rpc,
    )
    server = grpc.aio.server(
        # Refused in the transport before any Python runs: a burst cannot pile up calls.
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", 4 * 1024 * 1024),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ],
    )
    # Every servicer is registered through the guard, which wraps its handlers once.
    guarded = GuardedServer(server, guard).as_server()
    settings_service_pb2_grpc.add_SettingsServiceServicer_to_server(
        SettingsServicer(app.settings_service, app.crm), guarded
    )
    qualification_service_pb2_grpc.add_QualificationServiceServicer_to_server(
        QualificationServicer(app.whatsapp, app.crm), guarded
    )
    capi_sender_service_pb2_grpc.add_CapiSenderServiceServicer_to_server(
        SenderServicer(app.sender, app.diagnostics), guarded
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, guarded)
    # The real server: reflection picks its aio servicer by the server's type, and its one
    # RPC is a stream, which the guard leaves as it is.
    reflection.enable_server_reflection(
        (
            *SERVICE_NAMES,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = listen or settings.listen
    if settings.tls_cert_file and settings.tls_key_file:
        key = Path(settings.tls_key_file).read_bytes()  # noqa: ASYNC240 (once, at start-up)
        cert = Path(settings.tls_cert_file).read_bytes()  # noqa: ASYNC240
        credentials = grpc.ssl_server_credentials([(key, cert)])
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"cannot listen on {address}")
    await _set_health(health_servicer, False)
    await server.start()
    running = RunningServer(server, port, health_servicer, app)
    running._health_task = asyncio.create_task(_watch_database(app, health_servicer))
    app.start_background()
    if not settings.auth_token_map():
        log.warning("authentication is OFF: set CAPI_AUTH_TOKENS=caller:token,... in production")
    log.info(
        "capi server listening",
        extra={
            "address": address,
            "port": port,
            # "uvloop" or "asyncio" (CAPI_EVENT_LOOP)
            "event_loop": type(asyncio.get_running_loop()).__module__.partition(".")[0],
        },
    )
    return running


async def serve(app: App) -> None:
    """Run until SIGTERM/SIGINT; then stop taking calls and drain in-flight ones."""
    running = await start_server(app)
    # What start-up made (modules, descriptors, the ORM's metadata, the pools) lives as
    # long as the process: out of the cyclic GC's way, a full collection under load scans
    # only what the calls and caches made since (SendConversion's p99 in make bench:
    # ~100 ms of GC pauses -> ~35 ms).
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down", extra={"grace_seconds": app.settings.shutdown_grace_seconds})
    await running.stop(app.settings.shutdown_grace_seconds)
    await app.aclose()
    log.info("stopped")
