"""IngestMessage under concurrency: calls share transactions (group commit), and every
caller still gets its own answer, on both databases."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from capi.v1 import qualification_service_pb2 as pb
from capi_server.adapters.db import dialogs_repo
from capi_server.adapters.db.orm import DialogAnalysisRow, DialogMessageRow, LeadRow
from capi_server.services.whatsapp import IncomingMessage
from tests.builders import whatsapp_direction
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
    requests.append({"contact_phone": phone(99), "message_id": "clid-1", "ctwa_clid": "CLID99"})
    before = stubs.app.whatsapp._ingest.batches
    results = await asyncio.gather(*(call(**r) for r in requests))

    *good, bad_phone, with_clid = results
    assert isinstance(bad_phone, grpc.aio.AioRpcError)
    assert bad_phone.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert isinstance(with_clid, pb.IngestMessageResponse)
    assert with_clid.stored and with_clid.has_ctwa_clid
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
    # 20 dialogs of 3 messages (2 from the client) + the click-id dialog of 1.
    assert sorted(counts) == [(1, 1)] + [(2, 3)] * 20
    assert len(leads) == 21
    assert dict(leads)["77015550099"] == "CLID99"


async def test_a_message_the_database_rejects_fails_alone(
    stubs: Stubs, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = await whatsapp_direction(stubs)
    real_insert = dialogs_repo.store_messages

    async def insert_rejecting_poison(session: Any, messages: Any, **kw: Any) -> Any:
        if any(m.message_id == "poison" for m in messages):
            raise IntegrityError("INSERT", {}, Exception("rejected"))
        return await real_insert(session, messages, **kw)

    monkeypatch.setattr(dialogs_repo, "store_messages", insert_rejecting_poison)
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
