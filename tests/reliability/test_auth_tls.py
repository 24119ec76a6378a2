"""Authentication (bearer tokens per caller) and TLS on the in-process server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from capi.v1 import capi_sender_service_pb2 as spb
from capi.v1 import resources_pb2 as res
from capi.v1 import settings_service_pb2 as setpb
from capi_server.logs import ContextFilter
from capi_server.rpc.app import SERVICE_NAMES
from tests.conftest import Stubs, make_settings, start_stubs, stop_stubs
from tests.fakes.graph import FakeGraph
from tests.reliability.support import (
    Client,
    create_direction,
    self_signed_certificate,
    wait_serving,
)

TOKENS = "agent:tokA,chatbot:tokB"
AGENT = (("authorization", "Bearer tokA"),)
CHATBOT = (("authorization", "Bearer tokB"),)


def every_method() -> list[tuple[str, str, Any, Any]]:
    """(service, method, request class, response class) of every method of our services."""
    pool = descriptor_pool.Default()
    methods = []
    for service_name in SERVICE_NAMES:
        service = pool.FindServiceByName(service_name)
        for method in service.methods:
            methods.append(
                (
                    service_name,
                    method.name,
                    message_factory.GetMessageClass(method.input_type),
                    message_factory.GetMessageClass(method.output_type),
                )
            )
    return methods


@pytest.fixture
def graph() -> Iterator[FakeGraph]:
    with FakeGraph() as fake:
        yield fake


@pytest.fixture
async def stubs(sqlite_url: str, graph: FakeGraph) -> AsyncIterator[Stubs]:
    s = await start_stubs(
        make_settings(sqlite_url, auth_tokens=TOKENS, meta_graph_url=graph.base_url)
    )
    try:
        yield s
    finally:
        await stop_stubs(s)


def test_every_service_method_is_unary() -> None:
    """The auth interceptor guards unary-unary handlers only; proves no streaming RPC exists
    that would bypass it (a new streaming method must fail this test and extend the guard)."""
    pool = descriptor_pool.Default()
    for service_name in SERVICE_NAMES:
        for method in pool.FindServiceByName(service_name).methods:
            assert not method.client_streaming and not method.server_streaming, method.full_name


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        (("authorization", "Bearer wrong"),),
        (("authorization", "Bearer "),),
        (("authorization", "tokA"),),
        (("authorization", "Basic tokA"),),
        (("authorization", "Bearer tokAtokB"),),
        (("authorization", "Bearer tokA,tokB"),),
        (("authorization", "Bearer agent:tokA"),),
    ],
    ids=["missing", "wrong", "empty", "no-scheme", "basic", "concatenated", "two", "pair"],
)
async def test_every_method_rejects_missing_or_wrong_token(
    stubs: Stubs, metadata: tuple[tuple[str, str], ...]
) -> None:
    """Proves every RPC of every service answers UNAUTHENTICATED without a valid bearer
    token, before doing any work (the rejection happens even for empty requests)."""
    for service, method, request_cls, response_cls in every_method():
        call = stubs.channel.unary_unary(
            f"/{service}/{method}",
            request_serializer=request_cls.SerializeToString,
            response_deserializer=response_cls.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(request_cls(), metadata=metadata, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, (method, info.value)


async def test_right_tokens_are_accepted_per_caller(stubs: Stubs) -> None:
    """Proves each configured caller's token works (both callers, with a real write and read)."""
    direction = await create_direction(stubs.settings, metadata=AGENT)
    listed = await stubs.settings.ListDirections(
        setpb.ListDirectionsRequest(user_account_id=direction.account_id), metadata=CHATBOT
    )
    assert [d.id for d in listed.directions] == [direction.direction_id]


async def test_health_and_reflection_stay_open(stubs: Stubs) -> None:
    """Proves the health Check and server reflection answer without any token."""
    await wait_serving(stubs.target)
    health: Any = health_pb2_grpc.HealthStub(stubs.channel)
    resp = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    named = await health.Check(
        health_pb2.HealthCheckRequest(service="capi.v1.CapiSenderService"), timeout=5
    )
    assert named.status == health_pb2.HealthCheckResponse.SERVING
    reflection: Any = reflection_pb2_grpc.ServerReflectionStub(stubs.channel)  # type: ignore[arg-type]
    names: set[str] = set()
    async for answer in reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    ):
        names |= {s.name for s in answer.list_services_response.service}
    assert set(SERVICE_NAMES) <= names


async def test_log_records_of_a_call_carry_the_callers_name(
    stubs: Stubs, graph: FakeGraph, caplog: pytest.LogCaptureFixture
) -> None:
    """Proves the records logged while serving an RPC carry caller=<name of the token's
    caller> (set by the interceptor, read by the ContextFilter), per caller."""
    direction = await create_direction(stubs.settings, metadata=AGENT)
    caplog.handler.addFilter(ContextFilter())
    caplog.set_level(logging.DEBUG)
    for metadata, caller, phone in (
        (AGENT, "agent", "+77011112233"),
        (CHATBOT, "chatbot", "+77011112244"),
    ):
        caplog.clear()
        await stubs.sender.SendConversion(
            spb.SendConversionRequest(
                instance_name=direction.instance_name, contact_phone=phone, level=res.LEVEL_INTEREST
            ),
            metadata=metadata,
        )
        records = [r for r in caplog.records if r.name.startswith("capi_server")]
        # The Graph client logs "Sending CAPI event" and "sent successfully" inside the call.
        assert len(records) >= 2, [r.getMessage() for r in caplog.records]
        assert {getattr(r, "caller", None) for r in records} == {caller}


async def test_tls_with_self_signed_certificate(sqlite_url: str, tmp_path: Path) -> None:
    """Proves the server serves TLS with the configured certificate and key: a client that
    trusts the certificate works (health and an authenticated RPC), a plaintext client fails."""
    cert_path, key_path, cert_pem = self_signed_certificate(tmp_path)
    stubs = await start_stubs(
        make_settings(
            sqlite_url,
            auth_tokens=TOKENS,
            tls_cert_file=str(cert_path),
            tls_key_file=str(key_path),
        )
    )
    try:
        port = stubs.running.port
        credentials = grpc.ssl_channel_credentials(root_certificates=cert_pem)
        for host in ("localhost", "127.0.0.1"):
            client = Client(grpc.aio.secure_channel(f"{host}:{port}", credentials))
            try:
                health: Any = health_pb2_grpc.HealthStub(client.channel)
                for _ in range(50):
                    resp = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                    await asyncio.sleep(0.1)
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
                direction = await create_direction(client.settings, metadata=AGENT)
                assert direction.direction_id
            finally:
                await client.close()
        plain = Client.insecure(f"127.0.0.1:{port}")
        try:
            health = health_pb2_grpc.HealthStub(plain.channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await health.Check(health_pb2.HealthCheckRequest(), timeout=3)
            assert info.value.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )
        finally:
            await plain.close()
    finally:
        await stop_stubs(stubs)
