"""BackgroundAnalyzer: never blocks, bounded, coalesces, logs drops without phones."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from capi.v1 import qualification_service_pb2 as qual_pb
from capi_client import AsyncCapiClient, BackgroundAnalyzer
from tests.clients.fake_server import FakeServer

ANALYZE = "/capi.v1.QualificationService/AnalyzeDialog"
PHONE = "77011234567"


class Gate:
    """AnalyzeDialog that waits until the test opens the gate; fails for dialog "bad"."""

    def __init__(self) -> None:
        self.open = asyncio.Event()

    async def __call__(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await self.open.wait()
        if request.dialog_id == "bad":
            await context.abort(grpc.StatusCode.NOT_FOUND, "dialog bad not found")
        return qual_pb.AnalyzeDialogResponse(dialog_id=request.dialog_id or "from-chat")


@pytest.fixture
async def gate() -> Gate:
    return Gate()


@pytest.fixture
async def server(gate: Gate) -> AsyncIterator[FakeServer]:
    fake = FakeServer({ANALYZE: gate})
    await fake.start()
    yield fake
    gate.open.set()
    await fake.stop()


@pytest.fixture
async def client(server: FakeServer) -> AsyncIterator[AsyncCapiClient]:
    async with AsyncCapiClient(server.target, timeout=5) as capi:
        yield capi


async def wait_until(condition: Any, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def test_full_queue_drops_with_a_masked_warning(
    client: AsyncCapiClient, server: FakeServer, gate: Gate, caplog: pytest.LogCaptureFixture
) -> None:
    analyzer = BackgroundAnalyzer(client, max_queue=2, workers=1)
    assert analyzer.submit("d1")
    await wait_until(lambda: server.attempts[ANALYZE] == 1)  # the worker is busy with d1
    assert analyzer.submit("d2")
    assert analyzer.submit(instance_name="inst", contact_phone=PHONE)
    with caplog.at_level(logging.WARNING, logger="capi_client"):
        assert analyzer.submit("d3") is False
    assert "capi: analyze queue full, dropped dialog d3" in caplog.text
    with caplog.at_level(logging.WARNING, logger="capi_client"):
        assert analyzer.submit(instance_name="inst", contact_phone="77019998877") is False
    assert "inst/***8877" in caplog.text
    assert "77019998877" not in caplog.text
    assert analyzer.dropped == 2
    gate.open.set()
    await analyzer.close(drain_timeout=5)
    served = [(r.dialog_id, r.instance_name, r.contact_phone) for r in server.requests]
    assert served == [("d1", "", ""), ("d2", "", ""), ("", "inst", PHONE)]
    assert analyzer.analyzed == 3


async def test_duplicate_pending_submissions_coalesce(
    client: AsyncCapiClient, server: FakeServer, gate: Gate
) -> None:
    analyzer = BackgroundAnalyzer(client, max_queue=10, workers=1)
    analyzer.submit("busy")
    await wait_until(lambda: server.attempts[ANALYZE] == 1)
    for _ in range(5):
        assert analyzer.submit("d1")
    assert analyzer.queued == 1
    gate.open.set()
    await analyzer.close(drain_timeout=5)
    assert [r.dialog_id for r in server.requests] == ["busy", "d1"]


async def test_failures_are_logged_and_workers_go_on(
    client: AsyncCapiClient, server: FakeServer, gate: Gate, caplog: pytest.LogCaptureFixture
) -> None:
    gate.open.set()
    analyzer = BackgroundAnalyzer(client, workers=2)
    with caplog.at_level(logging.WARNING, logger="capi_client"):
        analyzer.submit("bad")
        analyzer.submit("good")
        await analyzer.close(drain_timeout=5)
    assert "analyze failed for dialog bad: NOT_FOUND" in caplog.text
    assert (analyzer.failed, analyzer.analyzed) == (1, 1)
    assert analyzer.submit("late") is False  # closed


async def test_submit_never_waits_for_the_server(client: AsyncCapiClient, gate: Gate) -> None:
    analyzer = BackgroundAnalyzer(client, max_queue=1000, workers=2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    accepted = [analyzer.submit(f"d{i}") for i in range(1000)]
    assert loop.time() - started < 0.5
    assert all(accepted)
    await analyzer.close(drain_timeout=0.05)  # the gate is shut: gives up quickly


def test_submit_needs_a_dialog(client: AsyncCapiClient) -> None:
    with pytest.raises(ValueError):
        BackgroundAnalyzer(client).submit(instance_name="inst")


async def test_examples_forward_webhooks_unchanged() -> None:
    from capi_client.examples import forward_crm_webhook, forward_evolution_webhook

    async def ingest(request: Any, context: Any) -> qual_pb.IngestMessageResponse:
        return qual_pb.IngestMessageResponse(dialog_id="d9", stored=True)

    async def analyze(request: Any, context: Any) -> qual_pb.AnalyzeDialogResponse:
        return qual_pb.AnalyzeDialogResponse(dialog_id=request.dialog_id)

    async def crm(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if request.body == b"broken":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "unreadable body")
        return qual_pb.HandleCrmWebhookResponse()

    fake = FakeServer(
        {
            "/capi.v1.QualificationService/IngestMessage": ingest,
            ANALYZE: analyze,
            "/capi.v1.QualificationService/HandleCrmWebhook": crm,
        }
    )
    await fake.start()
    evolution = '{"event":"messages.upsert","data":{"message":{"conversation":"привет"}}}'
    crm_body = b"leads%5Bstatus%5D%5B0%5D%5Bid%5D=1&account%5Bsubdomain%5D=shop"
    try:
        async with AsyncCapiClient(fake.target) as client:
            analyzer = BackgroundAnalyzer(client)
            await forward_evolution_webhook(client, analyzer, evolution.encode())
            await analyzer.close(drain_timeout=5)
            content_type = "application/x-www-form-urlencoded"
            assert await forward_crm_webhook(client, crm_body, content_type) == 200
            assert await forward_crm_webhook(client, b"broken", content_type) == 400
    finally:
        await fake.stop()
    ingest_request, analyze_request, crm_request = fake.requests[:3]
    assert ingest_request.raw_evolution_event == evolution
    assert analyze_request.dialog_id == "d9"
    assert (crm_request.body, crm_request.content_type) == (crm_body, content_type)
