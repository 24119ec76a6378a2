"""SendConversion under concurrency: calls are claimed in shared transactions (group
commit); each caller still gets its own answer and every event reaches Graph once."""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from sqlalchemy import event as sa_event
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from capi.v1 import capi_sender_service_pb2 as pb
from capi.v1 import resources_pb2 as res
from capi_server.adapters.db import dialogs_repo, events_repo
from capi_server.adapters.db.orm import CapiEventLogRow, LeadRow, utcnow
from capi_server.domain.levels import Level
from tests.builders import losing_one_deadlock, whatsapp_direction
from tests.conftest import Stubs, make_settings, start_stubs, stop_stubs
from tests.fakes.graph import FakeGraph


def phone(n: int) -> str:
    return f"+7701777{n:04d}"


async def log_statuses(stubs: Stubs, direction_id: str) -> list[str]:
    """The statuses of a direction's capi_events_log rows, oldest first."""
    async with stubs.app.db.session() as session:
        rows = await session.execute(
            select(CapiEventLogRow.status)
            .where(CapiEventLogRow.direction_id == int(direction_id))
            .order_by(CapiEventLogRow.id)
        )
        return [status for (status,) in rows.all()]


@pytest.fixture
def graph() -> Iterator[FakeGraph]:
    with FakeGraph() as fake:
        yield fake


@pytest.fixture
async def stubs(database_url: str, graph: FakeGraph) -> AsyncIterator[Stubs]:
    s = await start_stubs(make_settings(database_url, meta_graph_url=graph.base_url))
    try:
        yield s
    finally:
        await stop_stubs(s)


async def test_concurrent_sends_share_claims_and_send_each_event_once(
    stubs: Stubs, graph: FakeGraph
) -> None:
    setup = await whatsapp_direction(stubs)

    async def call(contact: str, level: Any) -> pb.SendConversionResponse | grpc.aio.AioRpcError:
        try:
            return await stubs.sender.SendConversion(
                pb.SendConversionRequest(
                    instance_name=setup.instance_name, contact_phone=contact, level=level
                )
            )
        except grpc.aio.AioRpcError as exc:
            return exc

    calls = [(phone(n), res.LEVEL_INTEREST) for n in range(30)]
    calls += [(phone(0), res.LEVEL_INTEREST)] * 5  # the same dialog, in the same burst
    calls += [(phone(40), res.LEVEL_QUALIFIED)]  # levels 1 and 2 together
    calls += [("12", res.LEVEL_INTEREST)]  # a bad phone fails alone
    before = stubs.app.sender._planner.batches
    results = await asyncio.gather(*(call(c, level) for c, level in calls))

    *good, bad = results
    assert isinstance(bad, grpc.aio.AioRpcError)
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    event_ids: dict[str, set[str]] = {}
    for (contact, _), result in zip(calls, good, strict=False):
        assert isinstance(result, pb.SendConversionResponse), result
        for event in result.events:
            assert event.outcome in (
                res.SEND_OUTCOME_SENT,
                res.SEND_OUTCOME_QUEUED,
                res.SEND_OUTCOME_ALREADY_SENT,
            ), event
            event_ids.setdefault(f"{contact}/{event.level}", set()).add(event.event_id)
    # One event id per (dialog, level), however many calls named it.
    assert all(len(ids) == 1 for ids in event_ids.values())
    assert len(event_ids) == 32
    assert stubs.app.sender._planner.batches - before < len(calls)

    async def delivered() -> Counter[str]:
        return Counter(e["event_id"] for e in graph.events())

    for _ in range(100):
        if len(await delivered()) == 32:
            break
        await asyncio.sleep(0.05)
    sent = await delivered()
    assert set(sent) == {i for ids in event_ids.values() for i in ids}
    assert set(sent.values()) == {1}  # none twice


async def test_an_event_the_database_rejects_fails_alone(
    stubs: Stubs, graph: FakeGraph, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = await whatsapp_direction(stubs)
    real_claim_and_log = events_repo.claim_and_log
    poisoned: set[int] = set()

    async def insert_rejecting(session: Any, claims: Any, rows: Any, now: Any) -> Any:
        if any(values["dialog_id"] in poisoned for values, _ in rows):
            raise IntegrityError("INSERT", {}, Exception("rejected"))
        return await real_claim_and_log(session, claims, rows, now)

    # The dialog of phone(9) exists first, so its id is known.
    ninth = await stubs.sender.SendConversion(
        pb.SendConversionRequest(
            instance_name=setup.instance_name, contact_phone=phone(9), level=res.LEVEL_INTEREST
        )
    )
    poisoned.add(int(ninth.dialog_id))
    monkeypatch.setattr(events_repo, "claim_and_log", insert_rejecting)
    service = stubs.app.sender
    from capi_server.domain.levels import Level
    from capi_server.services.sender import DialogRef, SendOptions

    before = service._planner.batches
    results = await asyncio.gather(
        *(
            service.send(
                DialogRef(instance_name=setup.instance_name, contact_phone=phone(n)),
                Level.QUALIFIED,
                SendOptions(),
            )
            for n in range(10)
        ),
        return_exceptions=True,
    )
    assert service._planner.batches - before == 1  # they did share one batch
    assert isinstance(results[9], IntegrityError)
    assert all(not isinstance(r, BaseException) for r in results[:9])
    async with stubs.app.db.session() as session:
        rows = (
            await session.execute(
                select(CapiEventLogRow.dialog_id, CapiEventLogRow.level).where(
                    CapiEventLogRow.direction_id == int(setup.direction_id)
                )
            )
        ).all()
    # 9 dialogs x levels 1-2, plus the first level-1 event of phone(9); nothing half-written.
    assert len(rows) == 9 * 2 + 1


async def test_an_already_sent_level_is_answered_from_the_cache_without_the_database(
    database_url: str, graph: FakeGraph
) -> None:
    s = await start_stubs(
        make_settings(database_url, meta_graph_url=graph.base_url, settings_cache_seconds=60)
    )
    try:
        setup = await whatsapp_direction(s)
        request = pb.SendConversionRequest(
            instance_name=setup.instance_name, contact_phone=phone(1), level=res.LEVEL_INTEREST
        )
        first = await s.sender.SendConversion(request)
        assert [e.outcome for e in first.events] == [res.SEND_OUTCOME_SENT]
        statements: list[str] = []

        def count(*args: Any) -> None:
            statements.append(str(args[2]))

        sa_event.listen(s.app.db.engine.sync_engine, "before_cursor_execute", count)
        batches = s.app.sender._planner.batches
        again = await s.sender.SendConversion(request)
        by_id = await s.sender.SendConversion(
            pb.SendConversionRequest(dialog_id=first.dialog_id, level=res.LEVEL_INTEREST)
        )
        assert [e.outcome for e in again.events] == [res.SEND_OUTCOME_ALREADY_SENT]
        assert again.events[0].event_id == first.events[0].event_id
        assert by_id.events == again.events and by_id.dialog_id == first.dialog_id
        assert statements == []
        assert s.app.sender._planner.batches == batches  # answered before any batch
        # Bad input is still refused, even for a level already sent.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await s.sender.SendConversion(
                pb.SendConversionRequest(
                    dialog_id=first.dialog_id, level=res.LEVEL_INTEREST, currency="dollars"
                )
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(graph.events()) == 1
    finally:
        await stop_stubs(s)


async def test_refused_input_creates_no_lead(stubs: Stubs) -> None:
    setup = await whatsapp_direction(stubs)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stubs.sender.SendConversion(
            pb.SendConversionRequest(
                instance_name=setup.instance_name,
                contact_phone=phone(55),
                level=res.LEVEL_INTEREST,
                email="not-an-email",
            )
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    async with stubs.app.db.session() as session:
        leads = (
            await session.execute(select(LeadRow.id).where(LeadRow.contact_key == "77017770055"))
        ).all()
    assert leads == []


async def test_a_caller_that_gives_up_still_gets_its_claimed_event_sent(
    stubs: Stubs, graph: FakeGraph, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = await whatsapp_direction(stubs)
    real_claim = events_repo.claim_and_log

    async def slow_claim(*args: Any, **kwargs: Any) -> Any:
        claimed = await real_claim(*args, **kwargs)
        await asyncio.sleep(0.3)  # the caller's deadline passes while its batch runs
        return claimed

    monkeypatch.setattr(events_repo, "claim_and_log", slow_claim)
    from capi_server.domain.levels import Level
    from capi_server.services.sender import DialogRef, SendOptions

    caller = asyncio.ensure_future(
        stubs.app.sender.send(
            DialogRef(instance_name=setup.instance_name, contact_phone=phone(66)),
            Level.INTEREST,
            SendOptions(),
        )
    )
    await asyncio.sleep(0.1)
    caller.cancel()
    # Delivered by the batch's hand-over, not by the retry worker (disabled here).
    for _ in range(100):
        if graph.events():
            break
        await asyncio.sleep(0.05)
    assert [e["event_name"] for e in graph.events()] == ["Lead"]


@pytest.mark.parametrize("claimed_before", [False, True])
@pytest.mark.parametrize("nested_loop", [False, True])
async def test_the_claim_statement_locks_its_dialogs_and_logs_only_claims_won(
    postgres_url: str, claimed_before: bool, nested_loop: bool
) -> None:
    """The batch's claims and log rows in one statement: its dialogs' row locks come in id
    order before any claim (no deadlock with batches and ingest transactions that lock
    dialogs in id order), whatever join the planner picks (a nested loop reads a CTE only
    as far as it needs); a level claimed before is lost and its pending row not written;
    rows without a claim are written in any case, ids ascending in the order given."""
    # PostgreSQL only: SQLite locks the whole database.
    stubs = await start_stubs(make_settings(postgres_url))
    try:
        await _check_claim_statement(stubs, claimed_before, nested_loop)
    finally:
        await stop_stubs(stubs)


async def _check_claim_statement(stubs: Stubs, claimed_before: bool, nested_loop: bool) -> None:
    setup = await whatsapp_direction(stubs)
    db = stubs.app.db
    contacts = [
        dialogs_repo.NewContact(
            int(setup.direction_id), setup.instance_name, f"7701888{i:04d}", f"7701888{i:04d}"
        )
        for i in range(4)
    ]
    async with db.session() as session:
        found = await dialogs_repo.ensure_dialogs(session, contacts)
        await session.commit()
    keys = sorted(found.values(), key=lambda k: k.dialog_id)
    ids = [k.dialog_id for k in keys]
    first = (ids[0], Level.INTEREST)
    if claimed_before:
        async with db.session() as session:
            await events_repo.claim_and_log(session, {first: "evt-before"}, [], utcnow())
            await session.commit()

    def row(n: int, level: Level) -> dict[str, Any]:
        return {
            "direction_id": int(setup.direction_id),
            "dialog_id": keys[n].dialog_id,
            "lead_id": keys[n].lead_id,
            "level": int(level),
            "event_name": "Lead",
            "status": "pending",
            "event_time": utcnow(),
        }

    claims = {first: "evt-0", (ids[3], Level.QUALIFIED): "evt-3", (ids[1], Level.INTEREST): "evt-1"}
    rows = [
        (row(0, Level.INTEREST), first),
        (row(2, Level.INTEREST), None),
        (row(3, Level.QUALIFIED), (ids[3], Level.QUALIFIED)),
        (row(1, Level.INTEREST), (ids[1], Level.INTEREST)),
    ]
    async with db.session() as session:
        if nested_loop:
            # A nested-loop semi join that reads the CTE only up to the first match.
            for setting in ("hashjoin", "mergejoin", "hashagg", "sort"):
                await session.execute(text(f"SET LOCAL enable_{setting} = off"))
        won, log_ids = await events_repo.claim_and_log(session, claims, rows, utcnow())
        assert won == set(claims) - ({first} if claimed_before else set())
        assert [log_id is not None for log_id in log_ids] == [not claimed_before, True, True, True]
        written = [log_id for log_id in log_ids if log_id is not None]
        assert written == sorted(written)
        async with db.autocommit() as other:
            for dialog_id in (ids[0], ids[1], ids[3]):
                with pytest.raises(DBAPIError) as refused:
                    await other.execute(
                        text(
                            "SELECT id FROM dialog_analysis WHERE id = :id FOR NO KEY UPDATE NOWAIT"
                        ),
                        {"id": dialog_id},
                    )
                assert getattr(refused.value.orig, "sqlstate", "") == "55P03"  # lock_not_available
        await session.commit()
    async with db.session() as session:
        stored = (
            await session.execute(
                text(
                    "SELECT id, capi_interest_event_id, capi_qualified_event_id "
                    "FROM dialog_analysis WHERE id = ANY(:ids) ORDER BY id"
                ),
                {"ids": ids},
            )
        ).all()
        logged = (
            await session.execute(
                select(CapiEventLogRow.id, CapiEventLogRow.dialog_id)
                .where(CapiEventLogRow.dialog_id.in_(ids))
                .order_by(CapiEventLogRow.id)
            )
        ).all()
    assert [tuple(r[1:]) for r in stored] == [
        ("evt-before" if claimed_before else "evt-0", None),
        ("evt-1", None),
        (None, None),
        (None, "evt-3"),
    ]
    assert [(log_id, dialog_id) for log_id, dialog_id in logged] == [
        (log_id, values["dialog_id"])
        for (values, _), log_id in zip(rows, log_ids, strict=True)
        if log_id is not None
    ]


async def test_a_callers_email_is_hashed_into_its_event_and_stored_with_the_claim(
    stubs: Stubs, graph: FakeGraph
) -> None:
    setup = await whatsapp_direction(stubs)
    email_hash = hashlib.sha256(b"maria.souza@example.com").hexdigest()

    async def send(n: int, level: Any, email: str = "") -> pb.SendConversionResponse:
        return await stubs.sender.SendConversion(
            pb.SendConversionRequest(
                instance_name=setup.instance_name,
                contact_phone=phone(n),
                level=level,
                email=email,
            )
        )

    # One batch: the email of one caller, another contact without one.
    with_email, without = await asyncio.gather(
        send(70, res.LEVEL_INTEREST, " Maria.Souza@Example.com "),
        send(71, res.LEVEL_INTEREST),
    )
    by_contact = {tuple(e["user_data"].get("ph", [])): e for e in graph.events()}
    assert len(by_contact) == 2
    emails = sorted(tuple(e["user_data"].get("em", [])) for e in by_contact.values())
    assert emails == [(), (email_hash,)]
    async with stubs.app.db.session() as session:
        stored = dict(
            (
                await session.execute(
                    select(LeadRow.contact_key, LeadRow.email).where(
                        LeadRow.contact_key.in_([phone(70)[1:], phone(71)[1:]])
                    )
                )
            ).all()
        )
    assert stored == {phone(70)[1:]: "maria.souza@example.com", phone(71)[1:]: None}
    # A later level without an email still carries the stored one.
    await send(70, res.LEVEL_QUALIFIED)
    qualified = [e for e in graph.events() if e["event_name"] != "Lead"]
    assert [e["user_data"].get("em") for e in qualified] == [[email_hash]]
    assert with_email.dialog_id != without.dialog_id


async def test_ensure_dialogs_with_leads_reads_what_exists_and_makes_what_is_missing(
    stubs: Stubs,
) -> None:
    """The claim batch plans from these rows: an existing dialog's claims and sends and its
    lead's identifiers as stored, a new contact's defaults, and a lead that had no
    dialog yet with its identifiers kept."""
    setup = await whatsapp_direction(stubs)
    direction_id = int(setup.direction_id)
    db = stubs.app.db

    def contact(n: int) -> dialogs_repo.NewContact:
        key = f"7701666{n:04d}"
        return dialogs_repo.NewContact(direction_id, setup.instance_name, key, key)

    sent_at = utcnow()
    async with db.session() as session:
        existing = await dialogs_repo.ensure_dialog(
            session, direction_id, setup.instance_name, contact(1).contact_key, "77016660001"
        )
        await session.execute(
            text("UPDATE leads SET email = 'a@example.com', ctwa_clid = 'clid-1' WHERE id = :id"),
            {"id": existing.lead_id},
        )
        await session.execute(
            text(
                "UPDATE dialog_analysis SET capi_interest_event_id = 'evt-1', "
                "capi_interest_sent = true, capi_interest_sent_at = :at WHERE id = :id"
            ),
            {"id": existing.dialog_id, "at": sent_at},
        )
        await session.execute(
            text(
                "INSERT INTO leads (direction_id, contact_key, contact_phone, email, "
                "from_ad_without_click_id, created_at, updated_at) "
                "VALUES (:d, :k, :k, 'b@example.com', false, :at, :at)"
            ),
            {"d": direction_id, "k": contact(3).contact_key, "at": sent_at},
        )
        await session.commit()
    async with db.session() as session:
        made = await dialogs_repo.ensure_dialogs_with_leads(
            session, [contact(2), contact(1), contact(3), contact(1)]
        )
        await session.commit()
        keys = await dialogs_repo.ensure_dialogs(session, [contact(1), contact(2), contact(3)])
    assert set(made) == {contact(n).key for n in (1, 2, 3)}
    for key, (dialog, lead) in made.items():
        assert (dialog.id, dialog.lead_id, lead.id) == (
            keys[key].dialog_id,
            keys[key].lead_id,
            keys[key].lead_id,
        )
        assert dialog.direction_id == direction_id
    old_dialog, old_lead = made[contact(1).key]
    assert (old_lead.contact_phone, old_lead.email, old_lead.ctwa_clid) == (
        "77016660001",
        "a@example.com",
        "clid-1",
    )
    assert (old_dialog.capi_interest_event_id, old_dialog.capi_interest_sent) == ("evt-1", True)
    assert old_dialog.capi_interest_sent_at is not None
    assert abs((old_dialog.capi_interest_sent_at - sent_at).total_seconds()) < 0.001
    assert old_dialog.capi_interest_sent_at.utcoffset() == sent_at.utcoffset()
    new_dialog, new_lead = made[contact(2).key]
    assert (new_lead.contact_phone, new_lead.email, new_lead.ctwa_clid) == (
        contact(2).contact_key,
        None,
        None,
    )
    assert (new_dialog.capi_interest_event_id, new_dialog.capi_interest_sent) == (None, False)
    assert new_dialog.capi_interest_sent_at is None
    assert made[contact(3).key][1].email == "b@example.com"


async def test_a_caller_that_gives_up_during_the_graph_request_leaves_its_event_recorded(
    stubs: Stubs, graph: FakeGraph
) -> None:
    """The caller's deadline passes while its event is at Graph: the call ends with
    DEADLINE_EXCEEDED, and the event is still sent once and recorded as sent."""
    setup = await whatsapp_direction(stubs)
    graph.set_delay(0.5)
    request = pb.SendConversionRequest(
        instance_name=setup.instance_name, contact_phone=phone(77), level=res.LEVEL_INTEREST
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stubs.sender.SendConversion(request, timeout=0.2)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    status = pb.GetDialogStatusRequest(instance_name=setup.instance_name, contact_phone=phone(77))
    for _ in range(100):
        await asyncio.sleep(0.05)
        level = (await stubs.sender.GetDialogStatus(status)).levels[0]
        if level.sent:
            break
    assert (level.level, level.sent, level.status) == (
        res.LEVEL_INTEREST,
        True,
        res.EVENT_STATUS_SUCCESS,
    )
    assert len(graph.events()) == 1
    graph.set_delay(0.0)
    again = await stubs.sender.SendConversion(request)
    assert [(e.outcome, e.reason) for e in again.events] == [
        (res.SEND_OUTCOME_ALREADY_SENT, "already sent")
    ]
    assert len(graph.events()) == 1


async def test_an_unconfirmed_delivery_answers_queued_and_leaves_the_row_pending(
    stubs: Stubs, graph: FakeGraph, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Graph accepted the event but recording it failed: the caller is told the event is
    queued (the retry worker resends it; Meta deduplicates its event_id), not sent."""
    setup = await whatsapp_direction(stubs)
    service = stubs.app.sender

    async def record_failing(results: Any) -> Any:
        raise RuntimeError("the database went away while recording")

    monkeypatch.setattr(service, "record", record_failing)
    answer = await stubs.sender.SendConversion(
        pb.SendConversionRequest(
            instance_name=setup.instance_name, contact_phone=phone(78), level=res.LEVEL_INTEREST
        )
    )
    assert [(e.outcome, e.reason) for e in answer.events] == [
        (res.SEND_OUTCOME_QUEUED, "delivery not confirmed; the retry worker resends it")
    ]
    assert len(graph.events()) == 1
    async with stubs.app.db.session() as session:
        rows = (
            await session.execute(
                select(CapiEventLogRow.status).where(
                    CapiEventLogRow.event_id == answer.events[0].event_id
                )
            )
        ).all()
    assert [status for (status,) in rows] == ["pending"]


@pytest.mark.parametrize(("pacing_ms", "claimed_during_delivery"), [(50, True), (1000, False)])
async def test_a_claim_batch_waits_for_the_previous_deliveries_at_most_the_pacing(
    database_url: str, graph: FakeGraph, pacing_ms: int, claimed_during_delivery: bool
) -> None:
    s = await start_stubs(
        make_settings(database_url, meta_graph_url=graph.base_url, send_pacing_ms=pacing_ms)
    )
    try:
        setup = await whatsapp_direction(s)

        def send(n: int) -> Any:
            return asyncio.ensure_future(
                s.sender.SendConversion(
                    pb.SendConversionRequest(
                        instance_name=setup.instance_name,
                        contact_phone=phone(n),
                        level=res.LEVEL_INTEREST,
                    )
                )
            )

        graph.set_delay(1.0)
        first = send(1)
        for _ in range(100):  # the first call's Graph request is in flight
            if graph.posts():
                break
            await asyncio.sleep(0.01)
        assert graph.posts()
        second = send(2)
        await asyncio.sleep(0.4)
        # A short pacing lets the second call's claim go ahead of the slow delivery; a
        # long one holds it until the first call's events are delivered and recorded.
        claimed = await log_statuses(s, setup.direction_id)
        assert len(claimed) == (2 if claimed_during_delivery else 1)
        answers = await asyncio.gather(first, second)
        assert [[e.outcome for e in a.events] for a in answers] == [
            [res.SEND_OUTCOME_SENT],
            [res.SEND_OUTCOME_SENT],
        ]
        assert len(graph.events()) == 2
    finally:
        await stop_stubs(s)


async def test_a_record_that_loses_a_deadlock_race_is_recorded_again(
    stubs: Stubs, graph: FakeGraph, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record of a delivery locks its dialogs while another process's claim may hold
    one (two replicas, make test): the deadlock's loser records again, so the call answers
    SENT and the row is not left pending for the retry worker to send once more."""
    setup = await whatsapp_direction(stubs)
    mark_success_losing_once, lost = losing_one_deadlock(events_repo.mark_success, "UPDATE")
    monkeypatch.setattr(events_repo, "mark_success", mark_success_losing_once)
    answer = await stubs.sender.SendConversion(
        pb.SendConversionRequest(
            instance_name=setup.instance_name, contact_phone=phone(77), level=res.LEVEL_INTEREST
        )
    )
    assert lost == [1]
    assert [e.outcome for e in answer.events] == [res.SEND_OUTCOME_SENT]
    assert len(graph.events()) == 1  # delivered once, recorded on the second try
    assert await log_statuses(stubs, setup.direction_id) == ["success"]


async def test_a_cancelled_delivery_leaves_no_caller_waiting(
    stubs: Stubs, graph: FakeGraph
) -> None:
    """A drainer cancelled mid-request (the loop shutting down) ends its callers' waits
    with CancelledError instead of leaving them waiting for ever; the row stays pending
    for the retry worker."""
    from capi_server.services.sender import DialogRef, SendOptions

    setup = await whatsapp_direction(stubs)
    graph.set_delay(1.0)
    service = stubs.app.sender
    caller = asyncio.ensure_future(
        service.send(
            DialogRef(instance_name=setup.instance_name, contact_phone=phone(88)),
            Level.INTEREST,
            SendOptions(),
        )
    )
    for _ in range(100):  # its Graph request is in flight
        if graph.posts():
            break
        await asyncio.sleep(0.01)
    (drainer,) = service._drainers.values()
    drainer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(caller, 3)
    assert await log_statuses(stubs, setup.direction_id) == ["pending"]
