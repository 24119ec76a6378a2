"""The Prometheus endpoint scraped over HTTP after real flows, and the structured logs.

Counters live in one process-wide registry, so every assertion compares a scrape taken
before the flow with one taken after it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from capi.v1 import capi_sender_service_pb2 as pb
from capi.v1 import capi_sender_service_pb2_grpc as pb_grpc
from capi.v1 import resources_pb2 as res
from capi_server.adapters import metrics
from capi_server.adapters.llm import LlmUnavailable, OpenAiQualificationLlm
from capi_server.domain.qualification import DialogMessage
from capi_server.logs import ContextFilter, JsonFormatter
from capi_server.rpc.interceptors import GuardedServer, RpcGuard
from capi_server.rpc.sender_servicer import SenderServicer
from tests.builders import AD_TOKEN, pending_event, whatsapp_direction
from tests.conftest import Stubs, make_settings, start_stubs, stop_stubs
from tests.fakes.graph import FakeGraph
from tests.fakes.openai_server import FakeOpenAi, ScriptedReply

PHONE = "+7 701 555 44 33"
SENDER = "capi.v1.CapiSenderService"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def graph() -> Iterator[FakeGraph]:
    with FakeGraph() as fake:
        yield fake


@pytest.fixture(autouse=True)
def _fresh_graph(graph: FakeGraph) -> None:
    graph.reset()


@pytest.fixture
async def stubs(database_url: str, graph: FakeGraph) -> AsyncIterator[Stubs]:
    settings = make_settings(
        database_url, meta_graph_url=graph.base_url, metrics_listen="127.0.0.1:0"
    )
    s = await start_stubs(settings)
    try:
        yield s
    finally:
        await stop_stubs(s)


async def scrape(stubs: Stubs) -> Samples:
    endpoint = stubs.app.metrics_endpoint
    assert endpoint is not None
    # Asynchronously: the scrape reads the retry queue through this event loop.
    async with httpx2.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{endpoint.port}/metrics")
    assert response.status_code == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def send(stubs: Stubs, instance: str, **kw: Any) -> pb.SendConversionResponse:
    return await stubs.sender.SendConversion(
        pb.SendConversionRequest(
            instance_name=instance, contact_phone=PHONE, level=res.LEVEL_INTEREST, **kw
        )
    )


async def test_scrape_after_send_conversion_shows_the_flow(stubs: Stubs, graph: FakeGraph) -> None:
    setup = await whatsapp_direction(stubs, ad_token=AD_TOKEN)
    before = await scrape(stubs)
    sent = await send(stubs, setup.instance_name)
    assert sent.events[0].outcome == res.SEND_OUTCOME_SENT
    again = await send(stubs, setup.instance_name)
    assert again.events[0].outcome == res.SEND_OUTCOME_ALREADY_SENT
    after = await scrape(stubs)

    rpc = {"service": SENDER, "method": "SendConversion"}
    assert delta(before, after, "capi_rpc_requests_total", code="OK", **rpc) == 2
    assert delta(before, after, "capi_rpc_duration_seconds_count", **rpc) == 2
    assert (
        delta(before, after, "capi_events_total", level="1", status="success", error_code="") == 1
    )
    assert delta(before, after, "capi_dedup_hits_total", level="1") == 1
    graph_ok = {"edge": "events", "outcome": "ok"}
    assert delta(before, after, "capi_graph_request_duration_seconds_count", **graph_ok) == 1
    assert delta(before, after, "capi_graph_batch_events_count") == 1
    assert delta(before, after, "capi_graph_batch_events_sum") == 1
    # One after the other: each call went through a batch of one (the tests' settings
    # cache is off, so the second cannot be answered from the caches alone).
    assert delta(before, after, "capi_batch_items_count", batch="plan_sends") == 2
    assert delta(before, after, "capi_batch_items_sum", batch="plan_sends") == 2
    assert len(graph.posts()) == 1


async def test_failed_events_and_rpc_errors_are_counted_by_code(
    stubs: Stubs, graph: FakeGraph
) -> None:
    setup = await whatsapp_direction(stubs, ad_token=AD_TOKEN)
    before = await scrape(stubs)
    graph.fail_next_with_fixture("invalid_parameter_generic")
    failed = await send(stubs, setup.instance_name)
    assert failed.events[0].outcome == res.SEND_OUTCOME_FAILED
    with pytest.raises(grpc.aio.AioRpcError):
        await stubs.sender.Diagnose(pb.DiagnoseRequest(direction_id="987654321"))
    after = await scrape(stubs)
    assert (
        delta(before, after, "capi_events_total", level="1", status="error", error_code="100") == 1
    )
    failed_graph = {"edge": "events", "outcome": "graph_error"}
    assert delta(before, after, "capi_graph_request_duration_seconds_count", **failed_graph) == 1
    assert (
        delta(
            before,
            after,
            "capi_rpc_requests_total",
            service=SENDER,
            method="Diagnose",
            code="NOT_FOUND",
        )
        == 1
    )


async def test_retry_queue_gauges_are_read_at_scrape_time(stubs: Stubs) -> None:
    setup = await whatsapp_direction(stubs)
    async with pending_event(stubs, setup.direction_id, event_name="Lead", attempts=1, hours_ago=2):
        samples = await scrape(stubs)
    # The database is shared by the tests of a run: at least this row is pending.
    assert value(samples, "capi_retry_queue_depth") >= 1
    assert value(samples, "capi_retry_queue_oldest_pending_age_seconds") >= 7200


async def test_endpoint_is_off_by_default_and_stops_at_shutdown(
    database_url: str, graph: FakeGraph
) -> None:
    plain = await start_stubs(make_settings(database_url))
    try:
        assert plain.app.metrics_endpoint is None
    finally:
        await stop_stubs(plain)
    s = await start_stubs(make_settings(database_url, metrics_listen="127.0.0.1:0"))
    endpoint = s.app.metrics_endpoint
    assert endpoint is not None
    port = endpoint.port
    await stop_stubs(s)
    with pytest.raises(httpx2.ConnectError):
        async with httpx2.AsyncClient() as client:
            await client.get(f"http://127.0.0.1:{port}/metrics")


async def test_a_handler_abort_is_counted_under_its_status_code() -> None:
    """SenderServicer without diagnostics aborts Diagnose with UNIMPLEMENTED itself."""
    seen: list[tuple[str, str]] = []
    server = grpc.aio.server()
    guard = RpcGuard({}, observe=lambda m, c, _s: seen.append((m, c)))
    sender: Any = None
    pb_grpc.add_CapiSenderServiceServicer_to_server(
        SenderServicer(sender), GuardedServer(server, guard).as_server()
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await pb_grpc.CapiSenderServiceStub(channel).Diagnose(
                    pb.DiagnoseRequest(direction_id="1")
                )
    finally:
        await server.stop(None)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert seen == [(f"/{SENDER}/Diagnose", "UNIMPLEMENTED")]


def test_parse_listen() -> None:
    assert metrics.parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert metrics.parse_listen(":9464") == ("0.0.0.0", 9464)
    assert metrics.parse_listen("[::1]:9464") == ("::1", 9464)
    for bad in ("9464x", "host", "host:99999"):
        with pytest.raises(ValueError, match="CAPI_METRICS_LISTEN"):
            metrics.parse_listen(bad)


def test_crm_helper_counts_by_type_and_outcome() -> None:
    def current() -> float:
        return (
            metrics.REGISTRY.get_sample_value(
                "capi_crm_calls_total", {"crm_type": "amocrm", "outcome": "auth"}
            )
            or 0.0
        )

    start = current()
    metrics.observe_crm_call("amocrm", "auth")
    assert current() == start + 1


async def test_llm_calls_tokens_and_latency() -> None:
    def sample(name: str, **labels: str) -> float:
        return metrics.REGISTRY.get_sample_value(name, labels) or 0.0

    names = [
        ("capi_llm_calls_total", {"operation": "analyze", "outcome": "ok"}),
        ("capi_llm_calls_total", {"operation": "analyze", "outcome": "permanent_error"}),
        ("capi_llm_tokens_total", {"operation": "analyze", "kind": "prompt"}),
        ("capi_llm_tokens_total", {"operation": "analyze", "kind": "completion"}),
        ("capi_llm_request_duration_seconds_count", {"operation": "analyze"}),
    ]
    before = [sample(name, **labels) for name, labels in names]
    with FakeOpenAi() as fake:
        fake.enqueue(
            ScriptedReply.verdict(interested=True, prompt_tokens=120, completion_tokens=30),
            ScriptedReply.error(401, "invalid_api_key"),
        )
        async with OpenAiQualificationLlm(
            api_key="sk-test", base_url=fake.sdk_base_url, max_retries=0
        ) as llm:
            dialog = [DialogMessage("m1", False, "hello", 1)]
            await llm.analyze("Qualified: a budget is named.", dialog)
            with pytest.raises(LlmUnavailable):
                await llm.analyze("Qualified: a budget is named.", dialog)
    after = [sample(name, **labels) for name, labels in names]
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 120, 30, 1]


# -- logs ------------------------------------------------------------------------------------


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []
        self.addFilter(ContextFilter())

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def by_message(self, message: str) -> list[logging.LogRecord]:
        return [r for r in self.records if r.getMessage() == message]


@pytest.fixture
def captured() -> Iterator[Capture]:
    handler = Capture()
    logger = logging.getLogger("capi_server")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def test_seed_log_lines_carry_their_fields_and_one_request_id(
    stubs: Stubs, captured: Capture
) -> None:
    setup = await whatsapp_direction(stubs, ad_token=AD_TOKEN)
    captured.records.clear()
    sent = await stubs.sender.SendConversion(
        pb.SendConversionRequest(
            instance_name=setup.instance_name, contact_phone=PHONE, level=res.LEVEL_INTEREST
        ),
        metadata=(("x-request-id", "req-from-caller-42"),),
    )
    [sending] = captured.by_message("[metaCapiClient] Sending CAPI event")
    [success] = captured.by_message("[metaCapiClient] CAPI event sent successfully")
    assert sending.request_id == success.request_id == "req-from-caller-42"  # type: ignore[attr-defined]
    line = json.loads(JsonFormatter().format(sending))
    assert line["request_id"] == "req-from-caller-42"
    assert (line["pixelId"], line["eventName"], line["eventLevel"]) == (setup.pixel_id, "Lead", 1)
    line = json.loads(JsonFormatter().format(success))
    assert (line["eventId"], line["eventsReceived"]) == (sent.events[0].event_id, 1)
    assert PHONE.replace(" ", "")[1:] not in JsonFormatter().format(sending)

    # Without x-request-id each call gets its own id, shared by all of its records.
    captured.records.clear()
    await stubs.sender.SendConversion(
        pb.SendConversionRequest(
            instance_name=setup.instance_name,
            contact_phone="+7 701 555 44 34",
            level=res.LEVEL_INTEREST,
        )
    )
    ids = {r.request_id for r in captured.records if r.name.startswith("capi_server.meta")}  # type: ignore[attr-defined]
    assert len(ids) == 1 and "" not in ids and "req-from-caller-42" not in ids
