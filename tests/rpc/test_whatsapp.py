"""The WhatsApp source through gRPC: IngestMessage, AnalyzeDialog, review, prompt generation.

Real openai SDK against a local fake OpenAI server; events checked at the fake Graph server.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from sqlalchemy import func, select

from capi.v1 import capi_sender_service_pb2 as spb
from capi.v1 import qualification_service_pb2 as pb
from capi.v1 import resources_pb2 as res
from capi.v1 import settings_service_pb2 as setpb
from capi_server.adapters.db.orm import DialogMessageRow
from tests.builders import DirectionSetup, whatsapp_direction
from tests.conftest import Stubs, make_settings, start_stubs, stop_stubs
from tests.fakes.graph import FakeGraph, shared_fixtures_dir
from tests.fakes.openai_server import FakeOpenAi, ScriptedReply
from tests.helpers import bad_fields

PROMPT = "Dental clinic. Questions: 1) which tooth hurts 2) since when. Booking: a visit time."
PHONE = "5511987654321"


def fixture(name: str) -> str:
    return (shared_fixtures_dir() / "evolution" / f"{name}.json").read_text()


@pytest.fixture
def graph() -> Iterator[FakeGraph]:
    with FakeGraph() as fake:
        yield fake


@pytest.fixture
def llm() -> Iterator[FakeOpenAi]:
    with FakeOpenAi(reply=ScriptedReply.verdict(interested=True)) as fake:
        yield fake


def settings_for(database_url: str, graph: FakeGraph, llm: FakeOpenAi | None, **kw: Any) -> Any:
    values: dict[str, Any] = {"meta_graph_url": graph.base_url, "retry_base_seconds": 0.0}
    if llm is not None:
        values |= {"openai_api_key": "sk-test", "openai_base_url": llm.sdk_base_url}
    return make_settings(database_url, **values | kw)


@pytest.fixture
async def stubs(database_url: str, graph: FakeGraph, llm: FakeOpenAi) -> AsyncIterator[Stubs]:
    s = await start_stubs(settings_for(database_url, graph, llm))
    try:
        yield s
    finally:
        await stop_stubs(s)


async def ingest(
    stubs: Stubs,
    setup: DirectionSetup,
    message_id: str,
    text: str,
    *,
    from_me: bool = False,
    phone: str = PHONE,
    clid: str = "",
) -> pb.IngestMessageResponse:
    return await stubs.qualification.IngestMessage(
        pb.IngestMessageRequest(
            instance_name=setup.instance_name,
            contact_phone=phone,
            message_id=message_id,
            from_me=from_me,
            text=text,
            ctwa_clid=clid,
        )
    )


async def analyze(stubs: Stubs, dialog_id: str, **kw: Any) -> pb.AnalyzeDialogResponse:
    return await stubs.qualification.AnalyzeDialog(
        pb.AnalyzeDialogRequest(dialog_id=dialog_id, **kw)
    )


async def message_count(stubs: Stubs, dialog_id: str) -> int:
    async with stubs.app.db.session() as session:
        return int(
            (
                await session.execute(
                    select(func.count()).where(DialogMessageRow.dialog_id == int(dialog_id))
                )
            ).scalar_one()
        )


async def test_webhook_ingestion_with_click_id_and_redelivery(stubs: Stubs) -> None:
    setup = await whatsapp_direction(stubs, prompt=PROMPT)
    raw = fixture("messages_upsert_ctwa_referral")
    first = await stubs.qualification.IngestMessage(
        pb.IngestMessageRequest(direction_id=setup.direction_id, raw_evolution_event=raw)
    )
    assert first.stored and first.has_ctwa_clid and first.dialog_id
    again = await stubs.qualification.IngestMessage(
        pb.IngestMessageRequest(direction_id=setup.direction_id, raw_evolution_event=raw)
    )
    assert not again.stored and again.dialog_id == first.dialog_id
    assert await message_count(stubs, first.dialog_id) == 1
    # A later message without a click id never erases the first one.
    later = await ingest(stubs, setup, "later-1", "ещё вопрос", phone="5521998765432")
    assert later.dialog_id == first.dialog_id and later.has_ctwa_clid


async def test_groups_are_skipped_and_from_me_is_stored(stubs: Stubs) -> None:
    setup = await whatsapp_direction(stubs, prompt=PROMPT)
    group = await stubs.qualification.IngestMessage(
        pb.IngestMessageRequest(
            direction_id=setup.direction_id, raw_evolution_event=fixture("messages_upsert_group")
        )
    )
    assert not group.stored and "group" in group.skipped_reason and not group.dialog_id
    mine = await stubs.qualification.IngestMessage(
        pb.IngestMessageRequest(
            direction_id=setup.direction_id, raw_evolution_event=fixture("messages_upsert_from_me")
        )
    )
    assert mine.stored
    # Business messages never count toward level 1.
    result = await analyze(stubs, mine.dialog_id)
    assert result.levels[0].reached is False


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ("not json at all", "raw_evolution_event"),
        ('{"event": "messages.upsert", "instance": "x", "data": {"message": {}}}', "key"),
        (
            '{"event":"messages.upsert","instance":"x","data":{"key":{"remoteJid":'
            '"12ab@s.whatsapp.net","fromMe":false,"id":"1"},"message":{"conversation":"hi"}}}',
            "remoteJid",
        ),
    ],
)
async def test_bad_webhooks_are_invalid_argument(stubs: Stubs, raw: str, field: str) -> None:
    setup = await whatsapp_direction(stubs)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stubs.qualification.IngestMessage(
            pb.IngestMessageRequest(direction_id=setup.direction_id, raw_evolution_event=raw)
        )
    assert any(field in f for f in bad_fields(info.value))
    status = await stubs.sender.ListEvents(spb.ListEventsRequest(direction_id=setup.direction_id))
    assert list(status.events) == []


async def test_unknown_instance_is_not_found(stubs: Stubs) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stubs.qualification.IngestMessage(
            pb.IngestMessageRequest(
                raw_evolution_event=fixture("messages_upsert_text"), instance_name="nobody"
            )
        )
    # The webhook names its own instance (loja-centro), which no direction has.
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_full_flow_sends_expected_events_with_click_id(
    stubs: Stubs, graph: FakeGraph, llm: FakeOpenAi
) -> None:
    setup = await whatsapp_direction(stubs, prompt=PROMPT, waba="555")
    raw = json.loads(fixture("messages_upsert_ctwa_referral"))
    first = await stubs.qualification.IngestMessage(
        pb.IngestMessageRequest(
            direction_id=setup.direction_id, raw_evolution_event=json.dumps(raw)
        )
    )
    phone = "5521998765432"
    await ingest(
        stubs, setup, "b1", "Здравствуйте! Какой зуб беспокоит?", from_me=True, phone=phone
    )
    await ingest(stubs, setup, "c2", "Нижний слева, болит с понедельника", phone=phone)
    llm.reply_with(
        ScriptedReply.verdict(interested=True, qualified=True, evidence_message_ids=["c2"])
    )
    result = await analyze(stubs, first.dialog_id)
    assert result.llm_called
    assert [(d.level, d.reached) for d in result.levels] == [
        (res.LEVEL_INTEREST, True),
        (res.LEVEL_QUALIFIED, True),
        (res.LEVEL_SCHEDULED, False),
    ]
    assert list(result.levels[1].evidence_message_ids) == ["c2"]
    assert [(e.event_name, e.outcome) for e in result.events] == [
        ("Lead", res.SEND_OUTCOME_SENT),
        ("CompleteRegistration", res.SEND_OUTCOME_SENT),
    ]
    events = graph.events()
    clid = raw["data"]["contextInfo"]["externalAdReply"]["ctwaClid"]
    assert [e["event_name"] for e in events] == ["Lead", "CompleteRegistration"]
    for event in events:
        assert event["user_data"]["ctwa_clid"] == clid
        assert event["user_data"]["ph"] == [hashlib.sha256(phone.encode()).hexdigest()]
        assert event["user_data"]["whatsapp_business_account_id"] == "555"
    # Golden request to the LLM: model, schema, roles, the direction's prompt.
    (body,) = llm.chat_bodies()
    assert body["model"] == "gpt-4o-mini"
    assert body["response_format"]["type"] == "json_schema"
    system, user = body["messages"]
    assert system["role"] == "system" and PROMPT in system["content"]
    assert user["role"] == "user"
    lines = user["content"].splitlines()
    assert any(line.endswith("business: Здравствуйте! Какой зуб беспокоит?") for line in lines)
    assert any(line.endswith("client: Нижний слева, болит с понедельника") for line in lines)
    # Nothing new: no second LLM call, nothing sent twice.
    again = await analyze(stubs, first.dialog_id)
    assert not again.llm_called and "no new client message" in again.llm_skipped_reason
    assert [e.outcome for e in again.events] == [res.SEND_OUTCOME_ALREADY_SENT] * 2
    assert len(llm.chat_bodies()) == 1 and len(graph.posts()) == 1


async def test_concurrent_analysis_makes_one_llm_call(
    stubs: Stubs, graph: FakeGraph, llm: FakeOpenAi
) -> None:
    setup = await whatsapp_direction(stubs, prompt=PROMPT)
    await ingest(stubs, setup, "m1", "Hello")
    resp = await ingest(stubs, setup, "m2", "Do you do implants?")
    llm.reply_with(ScriptedReply.verdict(interested=True, delay=0.3))
    results = await asyncio.gather(*(analyze(stubs, resp.dialog_id) for _ in range(5)))
    assert len(llm.chat_bodies()) == 1
    assert {r.levels[0].reached for r in results} == {True}
    assert len(graph.events()) == 1


async def test_llm_down_still_sends_level_one_and_retries_later(
    stubs: Stubs, graph: FakeGraph, llm: FakeOpenAi
) -> None:
    setup = await whatsapp_direction(stubs, prompt=PROMPT)
    await ingest(stubs, setup, "m1", "Hi")
    resp = await ingest(stubs, setup, "m2", "I want to book for Friday 10:00")
    llm.reply_with(ScriptedReply.error(500))
    down = await analyze(stubs, resp.dialog_id)
    assert down.llm_called and down.llm_skipped_reason.startswith("LLM failed")
    assert [(e.event_name, e.outcome) for e in down.events] == [("Lead", res.SEND_OUTCOME_SENT)]
    llm.reply_with(ScriptedReply.verdict(interested=True, qualified=True, scheduled=True))
    back = await analyze(stubs, resp.dialog_id)
    assert back.llm_called
    assert [e.outcome for e in back.events] == [
        res.SEND_OUTCOME_ALREADY_SENT,
        res.SEND_OUTCOME_SENT,
        res.SEND_OUTCOME_SENT,
    ]
    assert [e["event_name"] for e in graph.events()] == ["Lead", "CompleteRegistration", "Schedule"]


async def test_invalid_model_output_is_reported_not_fatal(stubs: Stubs, llm: FakeOpenAi) -> None:
    setup = await whatsapp_direction(stubs, prompt=PROMPT)
    await ingest(stubs, setup, "m1", "a")
    resp = await ingest(stubs, setup, "m2", "b")
    llm.reply_with(ScriptedReply.text("{not json"))
    result = await analyze(stubs, resp.dialog_id)
    assert result.llm_skipped_reason.startswith("LLM failed")
    assert result.levels[0].reached


async def test_without_llm_key_levels_two_three_are_skipped(
    database_url: str, graph: FakeGraph
) -> None:
    stubs = await start_stubs(settings_for(database_url, graph, None))
    try:
        setup = await whatsapp_direction(stubs, prompt=PROMPT)
        await ingest(stubs, setup, "m1", "a")
        resp = await ingest(stubs, setup, "m2", "b")
        result = await analyze(stubs, resp.dialog_id)
        assert not result.llm_called
        assert result.llm_skipped_reason == "LLM not configured"
        assert [(e.event_name, e.outcome) for e in result.events] == [
            ("Lead", res.SEND_OUTCOME_SENT)
        ]
    finally:
        await stop_stubs(stubs)


async def test_direction_without_prompt(stubs: Stubs, llm: FakeOpenAi) -> None:
    setup = await whatsapp_direction(stubs)
    await ingest(stubs, setup, "m1", "a")
    resp = await ingest(stubs, setup, "m2", "b")
    result = await analyze(stubs, resp.dialog_id)
    assert result.llm_skipped_reason == "no qualification prompt"
    assert llm.chat_bodies() == []


async def test_disabled_direction_returns_reason(stubs: Stubs, graph: FakeGraph) -> None:
    setup = await whatsapp_direction(stubs, enabled=False, prompt=PROMPT)
    await ingest(stubs, setup, "m1", "a")
    resp = await ingest(stubs, setup, "m2", "b")
    result = await analyze(stubs, resp.dialog_id)
    assert result.skipped_reason == "CAPI disabled for the direction"
    assert graph.posts() == []


async def test_low_confidence_is_held_for_review(
    stubs: Stubs, graph: FakeGraph, llm: FakeOpenAi
) -> None:
    setup = await whatsapp_direction(stubs, prompt=PROMPT, review_confidence_threshold=0.7)
    await ingest(stubs, setup, "m1", "a")
    resp = await ingest(stubs, setup, "m2", "b")
    llm.reply_with(ScriptedReply.verdict(interested=True, qualified=True, confidence=0.4))
    result = await analyze(stubs, resp.dialog_id)
    assert result.levels[1].reached and result.levels[1].held_for_review
    assert [e["event_name"] for e in graph.events()] == ["Lead"]
    reviewed = await stubs.qualification.ReviewDialogLevel(
        pb.ReviewDialogLevelRequest(
            dialog_id=resp.dialog_id, level=res.LEVEL_QUALIFIED, approve=True
        )
    )
    assert [e.outcome for e in reviewed.events] == [
        res.SEND_OUTCOME_ALREADY_SENT,
        res.SEND_OUTCOME_SENT,
    ]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stubs.qualification.ReviewDialogLevel(
            pb.ReviewDialogLevelRequest(
                dialog_id=resp.dialog_id, level=res.LEVEL_QUALIFIED, approve=True
            )
        )
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_generate_qualification_prompt_is_stored(stubs: Stubs, llm: FakeOpenAi) -> None:
    setup = await whatsapp_direction(stubs)
    llm.reply_with(ScriptedReply.text("Контекст: стоматология. Вопросы: 1) ... 2) ... 3) ..."))
    resp = await stubs.qualification.GenerateQualificationPrompt(
        pb.GenerateQualificationPromptRequest(
            direction_id=setup.direction_id,
            business_description="Стоматология в Алматы, имплантация, запись на консультацию",
            language="ru",
        )
    )
    assert resp.prompt.startswith("Контекст")
    got = await stubs.settings.GetDirection(setpb.GetDirectionRequest(id=setup.direction_id))
    assert got.direction.qualification_prompt == resp.prompt
    # Editable through SettingsService.
    edited = res.Direction(id=setup.direction_id, qualification_prompt="edited")
    await stubs.settings.UpdateDirection(
        setpb.UpdateDirectionRequest(
            direction=edited, update_mask=FieldMask(paths=["qualification_prompt"])
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stubs.qualification.GenerateQualificationPrompt(
            pb.GenerateQualificationPromptRequest(direction_id=setup.direction_id)
        )
    assert bad_fields(info.value) == ["business_description"]


def test_fixture_dir_exists() -> None:
    assert Path(shared_fixtures_dir(), "evolution").is_dir()


async def test_dry_run_analysis_does_not_swallow_a_real_one(
    stubs: Stubs, graph: FakeGraph, llm: FakeOpenAi
) -> None:
    """Concurrent calls share an analysis only when their options match."""
    setup = await whatsapp_direction(stubs, prompt=PROMPT)
    await ingest(stubs, setup, "m1", "a")
    resp = await ingest(stubs, setup, "m2", "b")
    llm.reply_with(ScriptedReply.verdict(interested=True, delay=0.2))
    dry, real = await asyncio.gather(
        analyze(stubs, resp.dialog_id, dry_run=True), analyze(stubs, resp.dialog_id)
    )
    # The dry run never sends itself (it may see the real call's claim as queued).
    assert dry.events[0].outcome != res.SEND_OUTCOME_SENT
    assert real.events[0].outcome == res.SEND_OUTCOME_SENT
    assert [e["event_name"] for e in graph.events()] == ["Lead"]
