"""No PII in logs: every record of a full WhatsApp flow and a SendConversion with email."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from capi.v1 import capi_sender_service_pb2 as spb
from capi.v1 import qualification_service_pb2 as qpb
from capi.v1 import resources_pb2 as res
from capi_server.logs import ContextFilter, JsonFormatter, configure_logging
from tests.conftest import make_settings, start_stubs, stop_stubs
from tests.fakes.graph import FakeGraph, shared_fixtures_dir
from tests.fakes.openai_server import FakeOpenAi, ScriptedReply
from tests.reliability.support import create_direction

USER_TOKEN = "EAAB-user-token-pii-check-91c2"
AD_TOKEN = "EAAB-ad-token-pii-check-5d1e"
EMAIL = "maria.silva.pii@example.com"
SECOND_PHONE_INPUT = "+7 701 123 45 67"
SECOND_PHONE_DIGITS = "77011234567"
MESSAGES = [
    "Boa tarde, quero marcar uma consulta para amanha",
    "Meu dente do siso esta doendo muito desde segunda",
    "Pode ser sexta-feira as 10h no consultorio do centro",
]


def webhook() -> tuple[str, dict[str, Any]]:
    raw = (shared_fixtures_dir() / "evolution" / "messages_upsert_ctwa_referral.json").read_text()
    return raw, json.loads(raw)


@pytest.fixture
def logs_like_production(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """The server's own logging set-up at DEBUG (JSON), plus caplog capturing every record."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    noisy = ("httpx", "httpx2", "httpcore", "openai", "aiosqlite", "alembic.runtime")
    saved_noisy = {name: logging.getLogger(name).level for name in noisy}
    configure_logging("json", "DEBUG")
    caplog.handler.addFilter(ContextFilter())
    caplog.handler.setLevel(logging.DEBUG)
    root.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved_handlers:
            root.addHandler(handler)
        root.setLevel(saved_level)
        for name, level in saved_noisy.items():
            logging.getLogger(name).setLevel(level)


async def test_full_flow_logs_no_phone_email_token_or_text(
    database_url: str, logs_like_production: pytest.LogCaptureFixture
) -> None:
    """Proves that no log record (message, args, extra fields, exception text), at DEBUG,
    of a full WhatsApp flow (raw webhook with ctwa_clid, explicit messages, AnalyzeDialog
    with the LLM, events at Graph, a Graph failure) and of SendConversion calls with an email
    (good and bad input) contains a raw phone number in any form, the email, a token, a
    customer's name or a message text."""
    raw, parsed = webhook()
    phone_digits = parsed["data"]["key"]["remoteJidAlt"].split("@")[0]
    fixture_text = parsed["data"]["message"]["conversation"]
    push_name = parsed["data"]["pushName"]
    with (
        FakeGraph() as graph,
        FakeOpenAi(
            reply=ScriptedReply.verdict(interested=True, qualified=True, scheduled=True)
        ) as llm,
    ):
        stubs = await start_stubs(
            make_settings(
                database_url,
                meta_graph_url=graph.base_url,
                openai_api_key="sk-test-pii-check-7f3a",
                openai_base_url=llm.sdk_base_url,
                retry_base_seconds=0.0,
            )
        )
        try:
            direction = await create_direction(
                stubs.settings,
                user_token=USER_TOKEN,
                ad_token=AD_TOKEN,
                prompt="Dental clinic: which tooth, since when, booking time.",
            )
            first = await stubs.qualification.IngestMessage(
                qpb.IngestMessageRequest(
                    direction_id=direction.direction_id, raw_evolution_event=raw
                )
            )
            assert first.has_ctwa_clid
            formatted_phone = f"+{phone_digits[:2]} {phone_digits[2:4]} {phone_digits[4:]}"
            for index, text_ in enumerate(MESSAGES):
                await stubs.qualification.IngestMessage(
                    qpb.IngestMessageRequest(
                        instance_name=direction.instance_name,
                        contact_phone=formatted_phone,
                        message_id=f"m{index}",
                        text=text_,
                    )
                )
            analysis = await stubs.qualification.AnalyzeDialog(
                qpb.AnalyzeDialogRequest(dialog_id=first.dialog_id)
            )
            assert [e.outcome for e in analysis.events] == [res.SEND_OUTCOME_SENT] * 3
            graph.fail_next(400, {"error": {"message": "Invalid parameter", "code": 100}})
            await stubs.sender.SendConversion(
                spb.SendConversionRequest(
                    instance_name=direction.instance_name,
                    contact_phone=SECOND_PHONE_INPUT,
                    level=res.LEVEL_INTEREST,
                    email=EMAIL,
                )
            )
            await stubs.sender.SendConversion(
                spb.SendConversionRequest(
                    instance_name=direction.instance_name,
                    contact_phone=SECOND_PHONE_INPUT,
                    level=res.LEVEL_QUALIFIED,
                    email=EMAIL.upper(),
                )
            )
            for bad in (
                spb.SendConversionRequest(
                    instance_name=direction.instance_name,
                    contact_phone=SECOND_PHONE_INPUT,
                    level=res.LEVEL_INTEREST,
                    email=EMAIL.split("@")[0] + "@nodomain",
                ),
                spb.SendConversionRequest(
                    instance_name="no-such-instance",
                    contact_phone=SECOND_PHONE_INPUT,
                    level=res.LEVEL_INTEREST,
                ),
            ):
                with pytest.raises(grpc.aio.AioRpcError):
                    await stubs.sender.SendConversion(bad)
        finally:
            await stop_stubs(stubs)
        assert len(graph.events()) >= 4
    needles = {
        "phone digits": phone_digits,
        "phone with plus": f"+{phone_digits}",
        "phone formatted": formatted_phone,
        "national phone": phone_digits[2:],
        "second phone digits": SECOND_PHONE_DIGITS,
        "second phone input": SECOND_PHONE_INPUT,
        "email": EMAIL,
        "email local part": EMAIL.split("@")[0],
        "user token": USER_TOKEN,
        "ad token": AD_TOKEN,
        "llm key": "sk-test-pii-check-7f3a",
        "push name": push_name,
        "fixture text": fixture_text[:30],
        **{f"message {i}": text_[:30] for i, text_ in enumerate(MESSAGES)},
    }
    formatter = JsonFormatter()
    records = logs_like_production.records
    assert len(records) > 20, "the flow logged suspiciously little"
    leaks: list[str] = []
    for record in records:
        rendered = formatter.format(record) + repr(record.args) + record.getMessage()
        rendered_lower = rendered.lower()
        for what, needle in needles.items():
            if needle.lower() in rendered_lower:
                leaks.append(f"{what} in {record.name}: {rendered[:300]}")
    assert leaks == []


async def test_database_errors_do_not_log_bound_parameters(postgres_url: str) -> None:
    """Proves that when a statement fails in the database, the error text (which the
    interceptor logs for unexpected errors) holds none of the statement's bound values:
    the engine is created with hide_parameters."""
    from sqlalchemy import text as sql
    from sqlalchemy.exc import DBAPIError

    from capi_server.adapters.db.database import create_engine

    secret_text = "Minha senha do banco e 1234 e moro na rua das flores"
    engine = create_engine(postgres_url)
    try:
        async with engine.connect() as conn:
            with pytest.raises(DBAPIError) as info:
                # 201 characters into a varchar(200) column: PostgreSQL refuses it.
                await conn.execute(
                    sql(
                        "INSERT INTO user_accounts (name, created_at, updated_at) "
                        "VALUES (:name, now(), now())"
                    ),
                    {"name": secret_text * 5},
                )
    finally:
        await engine.dispose()
    assert "value too long" in str(info.value)
    assert secret_text not in str(info.value)
