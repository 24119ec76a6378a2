"""OpenAiQualificationLlm against a fake OpenAI server, through the real openai SDK."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from capi_server.adapters.llm import LlmUnavailable, OpenAiQualificationLlm
from capi_server.domain.qualification import (
    ANALYSIS_JSON_SCHEMA,
    ANALYSIS_SYSTEM_TEMPLATE,
    DialogMessage,
    prompt_version_hash,
)
from tests.fakes.openai_server import FakeOpenAi, ScriptedReply, keyword_judge

PROMPT = "Стоматология.\n1. Какая услуга нужна?\n2. Когда удобно прийти?"
DIALOG = [
    DialogMessage("m1", False, "Здравствуйте, нужна чистка", 100),
    DialogMessage("m2", True, "Когда удобно прийти?", 110),
    DialogMessage("m3", False, "В четверг в 18:00, записывайте", 120),
]
DIALOGS_PATH = Path(__file__).resolve().parents[1] / "llm_eval" / "dialogs.json"


@pytest.fixture
def fake() -> Iterator[FakeOpenAi]:
    with FakeOpenAi() as server:
        yield server


def make_llm(fake: FakeOpenAi, **kwargs: Any) -> OpenAiQualificationLlm:
    options: dict[str, Any] = {"timeout": 5.0, "max_retries": 0}
    options.update(kwargs)
    return OpenAiQualificationLlm(api_key="sk-test", base_url=fake.sdk_base_url, **options)


async def analyze_expecting_failure(llm: OpenAiQualificationLlm) -> LlmUnavailable:
    with pytest.raises(LlmUnavailable) as info:
        await llm.analyze(PROMPT, DIALOG)
    await llm.aclose()
    return info.value


async def test_golden_request_body(fake: FakeOpenAi) -> None:
    async with make_llm(fake, model="gpt-4o-mini") as llm:
        await llm.analyze(PROMPT, DIALOG)

    [request] = fake.requests
    assert (request.method, request.path) == ("POST", "/v1/chat/completions")
    assert request.headers["authorization"] == "Bearer sk-test"
    body = request.json()
    assert body == {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": ANALYSIS_SYSTEM_TEMPLATE + PROMPT},
            {
                "role": "user",
                "content": "Dialog:\n"
                "[m1] client: Здравствуйте, нужна чистка\n"
                "[m2] business: Когда удобно прийти?\n"
                "[m3] client: В четверг в 18:00, записывайте",
            },
        ],
        "temperature": 0.0,
        "max_completion_tokens": 600,
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "qualification",
                "strict": True,
                "schema": ANALYSIS_JSON_SCHEMA,
            },
        },
    }
    # Pinned on purpose: editing the system template or schema must be a deliberate change
    # (it re-versions every stored verdict), so update this value together with it.
    assert prompt_version_hash(PROMPT) == "1bbee2c9ed0bf3e9"


async def test_success_returns_verdict_usage_and_version(fake: FakeOpenAi) -> None:
    fake.reply_with(
        ScriptedReply.verdict(
            interested=True,
            qualified=True,
            scheduled=True,
            evidence_message_ids=["m3"],
            answered_questions=["Какая услуга нужна?", "Когда удобно прийти?"],
            confidence=0.93,
            prompt_tokens=812,
            completion_tokens=97,
        )
    )
    async with make_llm(fake) as llm:
        analysis = await llm.analyze(PROMPT, DIALOG)

    verdict = analysis.verdict
    assert (verdict.is_interested, verdict.is_qualified, verdict.is_scheduled) == (True,) * 3
    assert verdict.evidence_message_ids == ("m3",)
    assert verdict.answered_questions == ("Какая услуга нужна?", "Когда удобно прийти?")
    assert verdict.confidence == 0.93
    assert (analysis.prompt_tokens, analysis.completion_tokens) == (812, 97)
    assert analysis.model == "gpt-4o-mini-2024-07-18"  # as the server reports it
    assert analysis.prompt_version == prompt_version_hash(PROMPT)
    assert 0 <= analysis.elapsed_seconds < 5


async def test_base_url_without_v1_prefix_also_served(fake: FakeOpenAi) -> None:
    async with OpenAiQualificationLlm("sk-test", fake.base_url, max_retries=0) as llm:
        await llm.analyze(PROMPT, DIALOG)
    assert [r.path for r in fake.requests] == ["/chat/completions"]


async def test_logs_levels_without_message_text(
    fake: FakeOpenAi, caplog: pytest.LogCaptureFixture
) -> None:
    fake.reply_with(ScriptedReply.verdict(interested=True))
    caplog.set_level(logging.INFO, logger="capi_server.llm")
    async with make_llm(fake) as llm:
        await llm.analyze(PROMPT, DIALOG)

    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "[qualificationAgent] Asking the LLM",
        "[qualificationAgent] LLM verdict",
    ]
    complete = caplog.records[1]
    assert complete.__dict__["isInterested"] is True
    assert complete.__dict__["isQualified"] is False
    assert complete.__dict__["isScheduled"] is False
    for record in caplog.records:
        dumped = json.dumps({k: str(v) for k, v in record.__dict__.items()}, ensure_ascii=False)
        assert "чистка" not in dumped and "четверг" not in dumped


async def test_rate_limited_is_transient(fake: FakeOpenAi) -> None:
    fake.reply_with(ScriptedReply.error(429, "rate_limit_exceeded", "Rate limit reached"))

    error = await analyze_expecting_failure(make_llm(fake))

    assert error.is_transient is True
    assert "429" in error.reason
    assert len(fake.requests) == 1


async def test_insufficient_quota_429_is_permanent(fake: FakeOpenAi) -> None:
    fake.reply_with(ScriptedReply.error(429, "insufficient_quota", "You exceeded your quota"))

    error = await analyze_expecting_failure(make_llm(fake))

    assert error.is_transient is False
    assert "quota" in error.reason


async def test_sdk_retries_a_429_once_then_succeeds(fake: FakeOpenAi) -> None:
    fake.enqueue(ScriptedReply.error(429, "rate_limit_exceeded", headers={"retry-after-ms": "10"}))
    fake.reply_with(ScriptedReply.verdict(interested=True))

    async with make_llm(fake, max_retries=1) as llm:
        analysis = await llm.analyze(PROMPT, DIALOG)

    assert analysis.verdict.is_interested is True
    assert len(fake.requests) == 2


async def test_server_error_is_transient(fake: FakeOpenAi) -> None:
    fake.reply_with(ScriptedReply.error(500, "server_error", "The server had an error"))

    error = await analyze_expecting_failure(make_llm(fake))

    assert (error.is_transient, error.reason) == (True, "LLM error: HTTP 500 (server_error)")


async def test_bad_api_key_is_permanent(fake: FakeOpenAi) -> None:
    fake.reply_with(ScriptedReply.error(401, "invalid_api_key", "Incorrect API key"))

    error = await analyze_expecting_failure(make_llm(fake))

    assert error.is_transient is False
    assert "401" in error.reason


@pytest.mark.parametrize(
    ("reply", "reason_part"),
    [
        (ScriptedReply.text("Sure! The client is interested."), "not a valid verdict"),
        (ScriptedReply.text('{"is_interested": true}'), "not a valid verdict"),
        (ScriptedReply(refusal="I can't help with that."), "refused"),
        (ScriptedReply.text('{"is_interested": tr', finish_reason="length"), "token limit"),
        (ScriptedReply.text(""), "empty"),
    ],
)
async def test_unusable_model_output_is_permanent(
    fake: FakeOpenAi, reply: ScriptedReply, reason_part: str
) -> None:
    fake.reply_with(reply)

    error = await analyze_expecting_failure(make_llm(fake))

    assert error.is_transient is False
    assert reason_part in error.reason


async def test_timeout_is_transient(fake: FakeOpenAi) -> None:
    fake.reply_with(ScriptedReply.verdict(delay=1.0))

    error = await analyze_expecting_failure(make_llm(fake, timeout=0.2))

    assert error.is_transient is True
    assert "timeout" in error.reason


async def test_connection_refused_is_transient() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    llm = OpenAiQualificationLlm("sk-test", f"http://127.0.0.1:{port}/v1", max_retries=0)

    error = await analyze_expecting_failure(llm)

    assert error.is_transient is True
    assert "connect" in error.reason


async def test_caller_owned_http_client_is_used_and_left_open(fake: FakeOpenAi) -> None:
    async with httpx2.AsyncClient() as http_client:
        llm = make_llm(fake, http_client=http_client)
        await llm.analyze(PROMPT, DIALOG)
        await llm.aclose()
        assert not http_client.is_closed
    assert len(fake.requests) == 1


async def test_generate_prompt(fake: FakeOpenAi) -> None:
    generated = "Контекст бизнеса: ...\n1. Какая услуга нужна?\n"
    fake.reply_with(ScriptedReply.text(f"\n{generated}\n", prompt_tokens=120, completion_tokens=80))

    async with make_llm(fake, model="gpt-4o") as llm:
        result = await llm.generate_prompt("Стоматология в Москве, два филиала", "ru")

    assert result.text == generated.strip()
    assert (result.model, result.tokens) == ("gpt-4o-2024-07-18", 200)
    [body] = fake.chat_bodies()
    assert body["model"] == "gpt-4o"
    assert "response_format" not in body
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert "in Russian" in body["messages"][0]["content"]
    assert body["messages"][1]["content"].endswith("Стоматология в Москве, два филиала")


async def test_generate_prompt_failure_is_llm_unavailable(fake: FakeOpenAi) -> None:
    fake.reply_with(ScriptedReply.error(503, "overloaded"))
    async with make_llm(fake) as llm:
        with pytest.raises(LlmUnavailable) as info:
            await llm.generate_prompt("Автосервис", "ru")
    assert info.value.is_transient is True


def dialog_messages(dialog: dict[str, Any]) -> list[DialogMessage]:
    return [
        DialogMessage(f"{dialog['id']}-{i}", m["from_me"], m["text"], i)
        for i, m in enumerate(dialog["messages"])
    ]


async def test_eval_dialogs_run_through_the_pipeline_with_keyword_judge(fake: FakeOpenAi) -> None:
    """The eval harness path in CI: every labelled dialog yields a parsed verdict."""
    data = json.loads(DIALOGS_PATH.read_text(encoding="utf-8"))
    fake.reply_with(keyword_judge)
    results: dict[str, tuple[bool, bool, bool]] = {}

    async with make_llm(fake) as llm:
        for dialog in data["dialogs"]:
            prompt = dialog.get("qualification_prompt") or data["prompts"][dialog["prompt_id"]]
            verdict = (await llm.analyze(prompt, dialog_messages(dialog))).verdict
            results[dialog["id"]] = (
                verdict.is_interested,
                verdict.is_qualified,
                verdict.is_scheduled,
            )
            for evidence_id in verdict.evidence_message_ids:
                assert evidence_id.startswith(dialog["id"] + "-")

    assert len(results) == len(data["dialogs"])
    # Sanity of the stand-in judge on unambiguous cases.
    assert results["dental-bot-only"] == (False, False, False)
    assert results["realestate-spam"] == (False, False, False)
    assert results["dental-booked"] == (True, True, True)
    expected = {
        d["id"]: (
            d["expected"]["interested"],
            d["expected"]["qualified"],
            d["expected"]["scheduled"],
        )
        for d in data["dialogs"]
    }
    agreement = sum(results[k] == v for k, v in expected.items()) / len(expected)
    print(f"keyword_judge agreement: {agreement:.2f}")
    assert agreement >= 0.6
