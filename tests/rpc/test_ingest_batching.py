"""IngestMessage under concurrency: calls share transactions (group commit), and every
caller still gets its own answer, on both databases."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from capi.v1 import qualification_service_pb2 as pb
from capi_server.adapters.db import dialogs_repo
from capi_server.adapters.db.orm import DialogAnalysisRow, DialogMessageRow, LeadRow
from capi_server.services.whatsapp import IncomingMessage
from tests.builders import losing_one_deadlock, whatsapp_direction
from tests.conftest import Stubs


def phone(n: int) -> str:
    return f"+7701555{n:04d}"


async def test_concurrent_calls_share_transactions_and_each_gets_its_answer(
    stubs: Stubs,
) -> None:
    setup = await whatsapp_direction(stubs)

    async def call(**fields: Any) -> pb.IngestMessageResponse | grpc.aio.AioRpcError:
        try:
            return await stubs.qualification.IngestMessage(
                pb.IngestMessageRequest(instance_name=setup.instance_name, text="hi", **fields)
            )
        except grpc.aio.AioRpcError as exc:
            return exc

    requests: list[dict[str, Any]] = []
    for contact in range(20):
        requests.append({"contact_phone": phone(contact), "message_id": f"c{contact}-1"})
        requests.append({"contact_phone": phone(contact), "message_id": f"c{contact}-2"})
        requests.append(
            {"contact_phone": phone(contact), "message_id": f"c{contact}-3", "from_me": True}
        )
    # Contact 0's messages arrive twice (a redelivered webhook) in the same burst.
    requests += [r for r in requests if r["contact_phone"] == phone(0)]
    requests.append({"contact_phone": "12", "message_id": "bad-phone"})
    before = stubs.app.whatsapp._ingest.batches
    results = await asyncio.gather(*(call(**r) for r in requests))

    *good, bad_phone = results
    assert isinstance(bad_phone, grpc.aio.AioRpcError)
    assert bad_phone.code() == grpc.StatusCode.INVALID_ARGUMENT
    stored: dict[tuple[str, str], int] = {}
    dialogs: dict[str, set[str]] = {}
    for request, result in zip(requests, good, strict=False):
        assert isinstance(result, pb.IngestMessageResponse), result
        key = (request["contact_phone"], request["message_id"])
        stored[key] = stored.get(key, 0) + int(result.stored)
        dialogs.setdefault(request["contact_phone"], set()).add(result.dialog_id)
        assert not result.has_ctwa_clid
    # Every message stored exactly once, the repeats answered "already stored".
    assert set(stored.values()) == {1} and len(stored) == 60
    assert all(len(ids) == 1 for ids in dialogs.values())
    assert len({next(iter(ids)) for ids in dialogs.values()}) == 20
    # Fewer transactions than calls: the calls were grouped.
    assert stubs.app.whatsapp._ingest.batches - before < len(requests)

    async with stubs.app.db.session() as session:
        counts = (
            await session.execute(
                select(DialogAnalysisRow.client_message_count, func.count(DialogMessageRow.id))
                .join(DialogMessageRow, DialogMessageRow.dialog_id == DialogAnalysisRow.id)
                .where(DialogAnalysisRow.direction_id == int(setup.direction_id))
                .group_by(DialogAnalysisRow.id, DialogAnalysisRow.client_message_count)
            )
        ).all()
        leads = (
            await session.execute(
                select(LeadRow.contact_key, LeadRow.ctwa_clid).where(
                    LeadRow.direction_id == int(setup.direction_id)
                )
            )
        ).all()
    # 20 dialogs of 3 messages (2 from the client).
    assert sorted(counts) == [(2, 3)] * 20
    assert len(leads) == 20


async def test_a_click_id_in_a_burst_reaches_its_lead(stubs: Stubs) -> None:
    """A batch with a click id takes the transaction path (the lead's ctwa_clid is set)."""
    setup = await whatsapp_direction(stubs)
    requests = [
        pb.IngestMessageRequest(
            instance_name=setup.instance_name,
            contact_phone=phone(n),
            message_id=f"b{n}",
            text="hi",
            ctwa_clid="CLID99" if n == 99 else "",
        )
        for n in (97, 98, 99)
    ]
    results = await asyncio.gather(*(stubs.qualification.IngestMessage(r) for r in requests))
    assert [(r.stored, r.has_ctwa_clid) for r in results] == [
        (True, False),
        (True, False),
        (True, True),
    ]
    async with stubs.app.db.session() as session:
        leads = dict(
            (
                await session.execute(
                    select(LeadRow.contact_key, LeadRow.ctwa_clid).where(
                        LeadRow.direction_id == int(setup.direction_id)
                    )
                )
            ).all()
        )
    assert leads == {"77015550097": None, "77015550098": None, "77015550099": "CLID99"}


async def test_a_message_the_database_rejects_fails_alone(
    stubs: Stubs, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = await whatsapp_direction(stubs)
    # Both ways a batch is stored: one statement (PostgreSQL) and the transaction.
    real_insert = dialogs_repo.store_messages
    real_batch = dialogs_repo.ingest_batch

    def reject_poison(messages: Any) -> None:
        if any(m.message_id == "poison" for m in messages):
            raise IntegrityError("INSERT", {}, Exception("rejected"))

    async def insert_rejecting_poison(session: Any, messages: Any, **kw: Any) -> Any:
        reject_poison(messages)
        return await real_insert(session, messages, **kw)

    async def batch_rejecting_poison(
        connection: Any, contacts: Any, messages: Any, **kw: Any
    ) -> Any:
        reject_poison(messages)
        return await real_batch(connection, contacts, messages, **kw)

    monkeypatch.setattr(dialogs_repo, "store_messages", insert_rejecting_poison)
    monkeypatch.setattr(dialogs_repo, "ingest_batch", batch_rejecting_poison)
    service = stubs.app.whatsapp
    before = service._ingest.batches
    ids = [f"m{i}" for i in range(9)] + ["poison"]
    results = await asyncio.gather(
        *(
            service.ingest(
                IncomingMessage(
                    direction_id=int(setup.direction_id),
                    instance_name=None,
                    contact_phone=phone(i),
                    message_id=message_id,
                    from_me=False,
                    text="hello",
                    sent_at=None,
                    ctwa_clid=None,
                )
            )
            for i, message_id in enumerate(ids)
        ),
        return_exceptions=True,
    )
    assert service._ingest.batches - before == 1  # they did share one batch
    assert isinstance(results[-1], IntegrityError)
    assert all(not isinstance(r, BaseException) and r.stored for r in results[:-1])
    async with stubs.app.db.session() as session:
        stored = (
            await session.execute(
                select(DialogMessageRow.message_id)
                .join(DialogAnalysisRow, DialogAnalysisRow.id == DialogMessageRow.dialog_id)
                .where(DialogAnalysisRow.direction_id == int(setup.direction_id))
            )
        ).scalars()
        assert sorted(stored) == sorted(ids[:-1])


async def _dialog_counts(stubs: Stubs, direction_id: int) -> dict[str, tuple[int, Any, int]]:
    """{contact_key: (client_message_count, last_message_at, stored messages)}."""
    async with stubs.app.db.session() as session:
        rows = (
            await session.execute(
                select(
                    LeadRow.contact_key,
                    DialogAnalysisRow.client_message_count,
                    DialogAnalysisRow.last_message_at,
                    func.count(DialogMessageRow.id),
                )
                .join(DialogAnalysisRow, DialogAnalysisRow.lead_id == LeadRow.id)
                .outerjoin(DialogMessageRow, DialogMessageRow.dialog_id == DialogAnalysisRow.id)
                .where(LeadRow.direction_id == direction_id)
                .group_by(
                    LeadRow.contact_key,
                    DialogAnalysisRow.client_message_count,
                    DialogAnalysisRow.last_message_at,
                )
            )
        ).all()
    return {key: (count, last_at, stored) for key, count, last_at, stored in rows}


def _message(direction_id: int, contact: int, message_id: str, **kw: Any) -> IncomingMessage:
    fields: dict[str, Any] = {
        "direction_id": direction_id,
        "instance_name": None,
        "contact_phone": phone(contact),
        "message_id": message_id,
        "from_me": False,
        "text": "hello",
        "sent_at": None,
        "ctwa_clid": None,
    }
    fields.update(kw)
    return IncomingMessage(**fields)


async def test_one_batch_counts_client_messages_of_new_and_existing_dialogs(
    stubs: Stubs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """New dialogs get their counters when created (PostgreSQL: in the same statement as
    their messages); existing ones are counted up; from_me and repeats do not count."""
    setup = await whatsapp_direction(stubs)
    direction_id = int(setup.direction_id)
    service = stubs.app.whatsapp
    t1 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
    t2 = datetime(2026, 12, 1, 10, 5, tzinfo=UTC)
    t3 = datetime(2026, 12, 1, 10, 9, tzinfo=UTC)
    first = await service.ingest(_message(direction_id, 1, "old-1", sent_at=t1))
    assert first.stored
    before = service._ingest.batches
    transactions = _count_calls(monkeypatch, dialogs_repo, "store_messages")
    batch = [
        _message(direction_id, 1, "old-1", sent_at=t1),  # already stored
        _message(direction_id, 1, "old-2", sent_at=t3),
        _message(direction_id, 1, "old-3", sent_at=t3, from_me=True),
        _message(direction_id, 2, "new-1", sent_at=t1),
        _message(direction_id, 2, "new-2", sent_at=t2),
        _message(direction_id, 2, "new-2", sent_at=t2),  # the same message twice
        _message(direction_id, 2, "new-3", sent_at=t3, from_me=True),
        _message(direction_id, 3, "mine-1", sent_at=t1, from_me=True),
    ]
    results = await asyncio.gather(*(service.ingest(m) for m in batch))
    assert service._ingest.batches - before == 1
    # PostgreSQL: the batch was one statement, not the transaction path.
    assert transactions == ([] if stubs.app.db.dialect == "postgresql" else [1])
    assert [r.stored for r in results] == [False, True, True, True, True, False, True, True]
    assert results[0].skipped_reason == results[5].skipped_reason == "message already stored"
    assert results[0].dialog_id == first.dialog_id == results[1].dialog_id
    assert len({r.dialog_id for r in results}) == 3
    counts = await _dialog_counts(stubs, direction_id)
    assert counts == {
        "77015550001": (2, t3, 3),
        "77015550002": (2, t2, 3),
        "77015550003": (0, None, 1),
    }


def _count_calls(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[int]:
    """Counts the calls of module.name (one entry per call)."""
    calls: list[int] = []
    real = getattr(module, name)

    async def counted(*args: Any, **kw: Any) -> Any:
        calls.append(1)
        return await real(*args, **kw)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("deadlock_once", [False, True])
async def test_a_lead_without_a_dialog_gets_one_with_its_message(
    stubs: Stubs, monkeypatch: pytest.MonkeyPatch, deadlock_once: bool
) -> None:
    """A lead that exists without a dialog (as when another transaction is creating the
    contact) is left out of the one-statement batch and stored by the transaction path:
    the message is not lost and the dialog is made. When that transaction loses a lock
    race it runs again by itself: the batch's messages committed before are still
    answered as stored by this call."""
    setup = await whatsapp_direction(stubs)
    direction_id = int(setup.direction_id)
    async with stubs.app.db.session() as session:
        await dialogs_repo.ensure_dialogs(
            session,
            [dialogs_repo.NewContact(direction_id, None, "77015550007", "77015550007")],
        )
        await session.flush()
        await session.execute(
            DialogAnalysisRow.__table__.delete().where(  # type: ignore[attr-defined]
                DialogAnalysisRow.direction_id == direction_id
            )
        )
        await session.commit()
    lost: list[int] = []
    if deadlock_once:
        ensure_losing_once, lost = losing_one_deadlock(dialogs_repo.ensure_dialogs, "INSERT")
        monkeypatch.setattr(dialogs_repo, "ensure_dialogs", ensure_losing_once)
    service = stubs.app.whatsapp
    before = service._ingest.batches
    results = await asyncio.gather(
        service.ingest(_message(direction_id, 7, "lone-1")),
        service.ingest(_message(direction_id, 8, "other-1")),
    )
    assert service._ingest.batches - before == 1
    assert lost == ([1] if deadlock_once else [])
    assert all(r.stored and r.dialog_id for r in results)
    counts = await _dialog_counts(stubs, direction_id)
    assert {k: (n, stored) for k, (n, _, stored) in counts.items()} == {
        "77015550007": (1, 1),
        "77015550008": (1, 1),
    }
