"""SendConversion and the event log through gRPC, against a fake Graph server.

Each test runs on SQLite and PostgreSQL; what reached the fake Graph server, what the RPC
returned and what is in capi_events_log are the assertions.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import select, text, update

from capi.v1 import capi_sender_service_pb2 as pb
from capi.v1 import resources_pb2 as res
from capi_server.adapters.db.orm import CapiEventLogRow, LeadRow
from tests.builders import AD_TOKEN, USER_TOKEN, DirectionSetup, set_ctwa_clid, whatsapp_direction
from tests.conftest import Stubs, make_settings, start_stubs, stop_stubs
from tests.fakes.graph import FakeGraph, error_fixture
from tests.fakes.http import FakeResponse, RecordedRequest
from tests.helpers import bad_fields

PHONE = "+7 701 123 45 67"
PHONE_DIGITS = "77011234567"
PHONE_HASH = hashlib.sha256(PHONE_DIGITS.encode()).hexdigest()


@pytest.fixture
def graph() -> Iterator[FakeGraph]:
    with FakeGraph() as fake:
        yield fake


def sender_settings(database_url: str, graph: FakeGraph, **overrides: Any) -> Any:
    return make_settings(
        database_url,
        meta_graph_url=graph.base_url,
        retry_base_seconds=0.0,
        retry_max_seconds=0.0,
        **overrides,
    )


@pytest.fixture
async def stubs(database_url: str, graph: FakeGraph) -> AsyncIterator[Stubs]:
    s = await start_stubs(sender_settings(database_url, graph))
    try:
        yield s
    finally:
        await stop_stubs(s)


async def send(
    stubs: Stubs, setup: DirectionSetup, level: Any, phone: str = PHONE, **kw: Any
) -> pb.SendConversionResponse:
    return await stubs.sender.SendConversion(
        pb.SendConversionRequest(
            instance_name=setup.instance_name, contact_phone=phone, level=level, **kw
        )
    )


async def log_rows(stubs: Stubs, dialog_id: str) -> list[CapiEventLogRow]:
    async with stubs.app.db.session() as session:
        rows = await session.execute(
            select(CapiEventLogRow)
            .where(CapiEventLogRow.dialog_id == int(dialog_id))
            .order_by(CapiEventLogRow.id)
        )
        return list(rows.scalars())


def at(dt: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(dt)
    return ts


async def test_exact_json_reaching_meta_for_each_level(stubs: Stubs, graph: FakeGraph) -> None:
    setup = await whatsapp_direction(stubs, waba="1029384756", ad_token=AD_TOKEN)
    event_time = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    # Create the dialog (level 1), give the lead a click id, then send level 3.
    first = await send(stubs, setup, res.LEVEL_INTEREST, event_time=at(event_time))
    dialog_id = first.dialog_id
    await set_ctwa_clid(stubs, dialog_id, "ARAkLkA8rmlFeiCktEJQ-QTwRqEtS")
    third = await send(stubs, setup, res.LEVEL_SCHEDULED, event_time=at(event_time))
    posts = graph.posts()
    assert [p.path for p in posts] == [f"/v25.0/{setup.pixel_id}/events"] * 2
    # The ad account's token wins over the user account's, and only in the header.
    assert graph.tokens() == [AD_TOKEN, AD_TOKEN]
    for post in posts:
        assert AD_TOKEN not in post.body.decode() and "access_token" not in post.query
    first_event = posts[0].json()["data"][0]
    assert first_event == {
        "event_name": "Lead",
        "event_time": int(event_time.timestamp()),
        "event_id": first.events[0].event_id,
        "event_source_url": "https://wa.me/",
        "action_source": "business_messaging",
        "messaging_channel": "whatsapp",
        "user_data": {"ph": [PHONE_HASH], "whatsapp_business_account_id": "1029384756"},
        "custom_data": {"event_level": 1},
    }
    body = posts[1].json()
    assert [e["event_name"] for e in body["data"]] == ["CompleteRegistration", "Schedule"]
    for event, level in zip(body["data"], (2, 3), strict=True):
        assert event["user_data"] == {
            "ph": [PHONE_HASH],
            "ctwa_clid": "ARAkLkA8rmlFeiCktEJQ-QTwRqEtS",
            "whatsapp_business_account_id": "1029384756",
        }
        assert event["custom_data"] == {"event_level": level}
        assert event["action_source"] == "business_messaging"
    assert [(e.level, e.outcome) for e in third.events] == [
        (res.LEVEL_INTEREST, res.SEND_OUTCOME_ALREADY_SENT),
        (res.LEVEL_QUALIFIED, res.SEND_OUTCOME_SENT),
        (res.LEVEL_SCHEDULED, res.SEND_OUTCOME_SENT),
    ]
    assert third.events[0].event_id == first.events[0].event_id
    # The seed's troubleshooting query sees the flags.
    async with stubs.app.db.session() as session:
        rows = (
            await session.execute(
                text(
                    "SELECT id, contact_phone, capi_interest_sent, capi_qualified_sent, "
                    "capi_scheduled_sent FROM dialog_analysis WHERE capi_interest_sent = true "
                    "AND id = :d"
                ),
                {"d": int(dialog_id)},
            )
        ).all()
    assert [tuple(r)[1:] for r in rows] == [(PHONE_DIGITS, True, True, True)]
    statuses = [(r.level, r.status) for r in await log_rows(stubs, dialog_id)]
    assert statuses == [(1, "success"), (2, "success"), (3, "success")]


async def test_second_send_is_already_sent_with_original_ids(
    stubs: Stubs, graph: FakeGraph
) -> None:
    setup = await whatsapp_direction(stubs)
    first = await send(stubs, setup, res.LEVEL_INTEREST)
    again = await send(stubs, setup, res.LEVEL_INTEREST, phone="87011234567")  # local KZ format
    assert first.events[0].outcome == res.SEND_OUTCOME_SENT
    assert again.dialog_id == first.dialog_id
    assert again.events[0].outcome == res.SEND_OUTCOME_ALREADY_SENT
    assert again.events[0].event_id == first.events[0].event_id
    assert again.events[0].sent_at == first.events[0].sent_at
    assert len(graph.posts()) == 1
    assert graph.tokens() == [USER_TOKEN]


async def test_concurrent_sends_make_one_event_and_one_request(
    stubs: Stubs, graph: FakeGraph
) -> None:
    setup = await whatsapp_direction(stubs)
    graph.set_delay(0.05)
    responses = await asyncio.gather(*(send(stubs, setup, res.LEVEL_QUALIFIED) for _ in range(50)))
    assert len(graph.posts()) == 1
    events = graph.events()
    assert [e["event_name"] for e in events] == ["Lead", "CompleteRegistration"]
    ids = {e.event_id for r in responses for e in r.events if e.level == res.LEVEL_QUALIFIED}
    assert len(ids) == 1
    sent = [r for r in responses if r.events[1].outcome == res.SEND_OUTCOME_SENT]
    assert len(sent) == 1
    rows = await log_rows(stubs, responses[0].dialog_id)
    assert [(r.level, r.status) for r in rows] == [(1, "success"), (2, "success")]


async def test_transient_error_then_success_keeps_event_id(stubs: Stubs, graph: FakeGraph) -> None:
    setup = await whatsapp_direction(stubs)
    graph.fail_next(500, "<html><body>502 Bad Gateway</body></html>")
    first = await send(stubs, setup, res.LEVEL_INTEREST)
    assert first.events[0].outcome == res.SEND_OUTCOME_QUEUED
    rows = await log_rows(stubs, first.dialog_id)
    assert [(r.status, r.attempts) for r in rows] == [("pending", 1)]
    handled = await stubs.app.sender.process_due()
    assert handled == 1
    ids = [e["event_id"] for e in graph.events()]
    assert ids == [first.events[0].event_id] * 2
    rows = await log_rows(stubs, first.dialog_id)
    assert [(r.status, r.attempts) for r in rows] == [("success", 2)]
    status = await stubs.sender.GetDialogStatus(
        pb.GetDialogStatusRequest(dialog_id=first.dialog_id)
    )
    assert status.levels[0].sent and status.levels[0].event_id == ids[0]
    assert status.levels[0].status == res.EVENT_STATUS_SUCCESS
    assert not status.levels[1].sent


@pytest.mark.parametrize(
    ("fixture", "code", "hint_words"),
    [
        ("object_does_not_exist_or_no_permission", 100, "pixel"),
        ("token_expired_190_463", 190, "access token"),
        ("business_messaging_invalid_event_type", 100, "business_messaging"),
    ],
)
async def test_permanent_errors_fail_with_hint_and_no_retry(
    stubs: Stubs, graph: FakeGraph, fixture: str, code: int, hint_words: str
) -> None:
    setup = await whatsapp_direction(stubs)
    graph.fail_next_with_fixture(fixture)
    resp = await send(stubs, setup, res.LEVEL_INTEREST)
    result = resp.events[0]
    assert result.outcome == res.SEND_OUTCOME_FAILED
    assert result.error_code == code
    assert hint_words in result.hint
    assert await stubs.app.sender.process_due() == 0
    assert len(graph.posts()) == 1
    again = await send(stubs, setup, res.LEVEL_INTEREST)
    assert again.events[0].outcome == res.SEND_OUTCOME_FAILED
    assert len(graph.posts()) == 1
    rows = await log_rows(stubs, resp.dialog_id)
    assert [(r.status, r.error_code) for r in rows] == [("error", code)]
    assert rows[0].hint and hint_words in rows[0].hint


async def test_retry_events_after_token_fix(stubs: Stubs, graph: FakeGraph) -> None:
    setup = await whatsapp_direction(stubs)
    graph.fail_next_with_fixture("token_expired_190_463")
    failed = await send(stubs, setup, res.LEVEL_INTEREST)
    log_id = failed.events[0].log_id
    retried = await stubs.sender.RetryEvents(pb.RetryEventsRequest(event_ids=[log_id]))
    assert retried.requeued == 1
    assert await stubs.app.sender.process_due() == 1
    assert [e["event_id"] for e in graph.events()] == [failed.events[0].event_id] * 2
    rows = await log_rows(stubs, failed.dialog_id)
    assert [r.status for r in rows] == ["success"]


@pytest.mark.parametrize(
    ("direction_kw", "reason"),
    [
        ({"enabled": False}, "CAPI disabled for the direction"),
        ({"user_token": None}, "no access token"),
        ({"require_ctwa_clid": True}, "no ctwa_clid"),
    ],
)
async def test_decisions_not_to_send_are_results(
    stubs: Stubs, graph: FakeGraph, direction_kw: dict[str, Any], reason: str
) -> None:
    setup = await whatsapp_direction(stubs, **direction_kw)
    resp = await send(stubs, setup, res.LEVEL_QUALIFIED)
    assert [(e.outcome, e.reason) for e in resp.events] == [
        (res.SEND_OUTCOME_SKIPPED, reason),
        (res.SEND_OUTCOME_SKIPPED, reason),
    ]
    assert graph.posts() == []
    rows = await log_rows(stubs, resp.dialog_id)
    assert [(r.status, r.error_message) for r in rows] == [("skipped", reason)] * 2
    listed = await stubs.sender.ListEvents(
        pb.ListEventsRequest(direction_id=setup.direction_id, status=res.EVENT_STATUS_SKIPPED)
    )
    assert len(listed.events) == 2


async def test_dry_run_logs_payload_without_calling_meta(stubs: Stubs, graph: FakeGraph) -> None:
    setup = await whatsapp_direction(stubs)
    resp = await send(stubs, setup, res.LEVEL_INTEREST, dry_run=True)
    assert resp.events[0].outcome == res.SEND_OUTCOME_SKIPPED
    assert resp.events[0].reason == "dry run"
    assert graph.posts() == []
    rows = await log_rows(stubs, resp.dialog_id)
    assert rows[0].status == "skipped" and rows[0].payload is not None
    assert rows[0].payload["user_data"]["ph"] == [PHONE_HASH]
    assert PHONE_DIGITS not in str(rows[0].payload)
    # A dry run claims nothing: the real send afterwards goes out.
    real = await send(stubs, setup, res.LEVEL_INTEREST)
    assert real.events[0].outcome == res.SEND_OUTCOME_SENT


async def test_bad_input(stubs: Stubs, graph: FakeGraph) -> None:
    setup = await whatsapp_direction(stubs)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await send(stubs, setup, res.LEVEL_UNSPECIFIED)
    assert bad_fields(info.value) == ["level"]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await send(stubs, setup, 7)
    assert bad_fields(info.value) == ["level"]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await send(stubs, setup, res.LEVEL_INTEREST, phone="not a phone")
    assert bad_fields(info.value) == ["contact_phone"]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stubs.sender.SendConversion(
            pb.SendConversionRequest(dialog_id="987654321", level=res.LEVEL_INTEREST)
        )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stubs.sender.SendConversion(
            pb.SendConversionRequest(
                instance_name="no-such-instance", contact_phone=PHONE, level=res.LEVEL_INTEREST
            )
        )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    old = datetime.now(UTC) - timedelta(days=8)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await send(stubs, setup, res.LEVEL_INTEREST, event_time=at(old))
    assert bad_fields(info.value) == ["event_time"]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stubs.sender.GetDialogStatus(
            pb.GetDialogStatusRequest(
                instance_name=setup.instance_name, contact_phone="+1 206 207 2008"
            )
        )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert graph.posts() == []


@pytest.mark.parametrize(
    "response",
    [
        FakeResponse(status=502, body="<html>Bad Gateway</html>"),
        FakeResponse(status=200, body=b""),
        FakeResponse(status=200, body='{"events_received": 1, "fbtr'),
        FakeResponse(status=500, body=b"\x00\xff garbage"),
    ],
)
async def test_malformed_graph_answers_are_transient(
    stubs: Stubs, graph: FakeGraph, response: FakeResponse
) -> None:
    setup = await whatsapp_direction(stubs)
    graph.script([response])
    resp = await send(stubs, setup, res.LEVEL_INTEREST)
    assert resp.events[0].outcome == res.SEND_OUTCOME_QUEUED
    rows = await log_rows(stubs, resp.dialog_id)
    assert rows[0].status == "pending"
    assert await stubs.app.sender.process_due() == 1
    assert (await log_rows(stubs, resp.dialog_id))[0].status == "success"


async def test_list_events_pages_newest_first(stubs: Stubs, graph: FakeGraph) -> None:
    setup = await whatsapp_direction(stubs)
    for i in range(5):
        await send(stubs, setup, res.LEVEL_INTEREST, phone=f"+7701000000{i}")
    seen: list[str] = []
    token = ""
    while True:
        page = await stubs.sender.ListEvents(
            pb.ListEventsRequest(direction_id=setup.direction_id, page_size=2, page_token=token)
        )
        seen += [e.id for e in page.events]
        assert all(e.status == res.EVENT_STATUS_SUCCESS for e in page.events)
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == 5
    assert seen == sorted(seen, key=int, reverse=True)
    only_level_2 = await stubs.sender.ListEvents(
        pb.ListEventsRequest(direction_id=setup.direction_id, level=res.LEVEL_QUALIFIED)
    )
    assert list(only_level_2.events) == []


async def test_pending_events_are_delivered_after_restart(
    database_url: str, graph: FakeGraph
) -> None:
    first = await start_stubs(sender_settings(database_url, graph))
    try:
        setup = await whatsapp_direction(first)
        graph.fail_next(503)
        resp = await send(first, setup, res.LEVEL_INTEREST)
        assert resp.events[0].outcome == res.SEND_OUTCOME_QUEUED
    finally:
        await stop_stubs(first)
    second = await start_stubs(
        sender_settings(database_url, graph, retry_worker_enabled=True, retry_poll_seconds=0.05)
    )
    try:
        for _ in range(100):
            if len(graph.posts()) >= 2:
                break
            await asyncio.sleep(0.05)
        ids = [e["event_id"] for e in graph.events()]
        assert ids == [resp.events[0].event_id] * 2
        for _ in range(50):
            rows = await log_rows(second, resp.dialog_id)
            if rows[0].status == "success":
                break
            await asyncio.sleep(0.05)
        assert [r.status for r in rows] == ["success"]
    finally:
        await stop_stubs(second)


async def test_queue_batches_and_isolates_a_bad_event(stubs: Stubs, graph: FakeGraph) -> None:
    setup = await whatsapp_direction(stubs)
    graph.set_handler(lambda request: FakeResponse(503, {"error": {"message": "down", "code": 2}}))
    dialogs = []
    for i in range(6):
        resp = await send(stubs, setup, res.LEVEL_INTEREST, phone=f"+7702000000{i}")
        dialogs.append(resp)
    bad_event_id = dialogs[3].events[0].event_id

    def handler(request: RecordedRequest) -> FakeResponse:
        data = request.json()["data"]
        if any(e["event_id"] == bad_event_id for e in data):
            return FakeResponse(400, error_fixture("event_time_too_old"))
        return FakeResponse(200, {"events_received": len(data), "fbtrace_id": "x"})

    graph.set_handler(handler)
    graph.clear()
    await stubs.app.sender.process_due()
    sizes = [len(p.json()["data"]) for p in graph.posts()]
    assert sizes[0] == 6  # one request for the whole queue of this pixel and token
    async with stubs.app.db.session() as session:
        rows = (
            await session.execute(
                select(CapiEventLogRow.event_id, CapiEventLogRow.status).where(
                    CapiEventLogRow.direction_id == int(setup.direction_id)
                )
            )
        ).all()
    statuses = {event_id: status for event_id, status in rows}
    assert statuses.pop(bad_event_id) == "error"
    assert set(statuses.values()) == {"success"}


async def test_events_too_old_for_meta_expire_instead_of_sending(
    stubs: Stubs, graph: FakeGraph
) -> None:
    setup = await whatsapp_direction(stubs)
    graph.fail_next(503)
    resp = await send(stubs, setup, res.LEVEL_INTEREST)
    async with stubs.app.db.session() as session:
        await session.execute(
            update(CapiEventLogRow)
            .where(CapiEventLogRow.dialog_id == int(resp.dialog_id))
            .values(event_time=datetime.now(UTC) - timedelta(days=6, hours=23, minutes=30))
        )
        await session.commit()
    graph.clear()
    assert await stubs.app.sender.process_due() == 1
    assert graph.posts() == []
    rows = await log_rows(stubs, resp.dialog_id)
    assert rows[0].status == "error"
    assert (rows[0].error_message or "").startswith("expired")


async def test_lead_without_phone_needs_click_id(stubs: Stubs, graph: FakeGraph) -> None:
    setup = await whatsapp_direction(stubs)
    resp = await send(stubs, setup, res.LEVEL_INTEREST)
    async with stubs.app.db.session() as session:
        await session.execute(
            update(LeadRow)
            .where(
                LeadRow.contact_key == PHONE_DIGITS, LeadRow.direction_id == int(setup.direction_id)
            )
            .values(contact_phone=None)
        )
        await session.commit()
    again = await send(stubs, setup, res.LEVEL_QUALIFIED)
    assert again.events[1].outcome == res.SEND_OUTCOME_SKIPPED
    assert "ctwa_clid" in again.events[1].reason
    assert resp.events[0].outcome == res.SEND_OUTCOME_SENT


async def test_concurrent_sends_for_one_pixel_share_graph_requests(
    stubs: Stubs, graph: FakeGraph
) -> None:
    """While one Graph request is in flight, other calls' events queue and go out
    together: fewer requests than events, every event sent once and recorded."""
    setup = await whatsapp_direction(stubs)
    graph.set_delay(0.2)
    responses = await asyncio.gather(
        *(send(stubs, setup, res.LEVEL_INTEREST, phone=f"+7703000{i:04d}") for i in range(20))
    )
    assert [r.events[0].outcome for r in responses] == [res.SEND_OUTCOME_SENT] * 20
    events = graph.events()
    assert len(events) == 20
    assert len({e["event_id"] for e in events}) == 20
    assert len(graph.posts()) < 20
    for response in responses:
        rows = await log_rows(stubs, response.dialog_id)
        assert [r.status for r in rows] == ["success"]


async def test_request_wide_errors_are_not_split(stubs: Stubs, graph: FakeGraph) -> None:
    """A pixel Meta cannot find fails every event alike: one request, not a bisection."""
    setup = await whatsapp_direction(stubs)
    graph.set_handler(lambda request: FakeResponse(503, {"error": {"message": "down", "code": 2}}))
    for i in range(6):
        await send(stubs, setup, res.LEVEL_INTEREST, phone=f"+7704000000{i}")
    graph.set_handler(
        lambda request: FakeResponse(400, error_fixture("object_does_not_exist_or_no_permission"))
    )
    graph.clear()
    await stubs.app.sender.process_due()
    assert len(graph.posts()) == 1
    listed = await stubs.sender.ListEvents(
        pb.ListEventsRequest(direction_id=setup.direction_id, status=res.EVENT_STATUS_ERROR)
    )
    assert len(listed.events) == 6
    assert all(e.error_code == 100 for e in listed.events)


async def test_dry_run_worker_sends_nothing(stubs: Stubs, graph: FakeGraph) -> None:
    """CAPI_DRY_RUN never calls Meta, queued rows included."""
    setup = await whatsapp_direction(stubs)
    graph.fail_next(503)
    queued = await send(stubs, setup, res.LEVEL_INTEREST)
    assert queued.events[0].outcome == res.SEND_OUTCOME_QUEUED
    graph.clear()
    stubs.app.sender.config.dry_run = True
    try:
        assert await stubs.app.sender.process_due() == 0
    finally:
        stubs.app.sender.config.dry_run = False
    assert graph.posts() == []
    assert await stubs.app.sender.process_due() == 1
    assert len(graph.posts()) == 1


async def test_fewer_events_received_than_sent_is_retried(stubs: Stubs, graph: FakeGraph) -> None:
    """A 200 that counts fewer events than were sent records none as sent."""
    setup = await whatsapp_direction(stubs)
    graph.script([FakeResponse(200, {"events_received": 0, "fbtrace_id": "x"})])
    resp = await send(stubs, setup, res.LEVEL_INTEREST)
    assert resp.events[0].outcome == res.SEND_OUTCOME_QUEUED
    assert "received 0 of 1" in resp.events[0].reason
    assert await stubs.app.sender.process_due() == 1
    ids = [e["event_id"] for e in graph.events()]
    assert ids == [resp.events[0].event_id] * 2
    assert [r.status for r in await log_rows(stubs, resp.dialog_id)] == ["success"]
