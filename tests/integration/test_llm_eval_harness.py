"""The evaluation harness runs end to end against the local fake LLM."""

from __future__ import annotations

from capi_server.adapters.llm import OpenAiQualificationLlm
from tests.fakes.openai_server import FakeOpenAi, ScriptedReply, keyword_judge
from tests.llm_eval.run import evaluate, load_dialogs


async def test_harness_scores_every_dialog_against_the_fake() -> None:
    _, dialogs = load_dialogs()
    with FakeOpenAi(reply=keyword_judge) as fake:
        llm = OpenAiQualificationLlm(api_key="sk-x", base_url=fake.sdk_base_url)
        report = await evaluate(llm)
        await llm.aclose()
        assert len(fake.chat_bodies()) == len(dialogs) >= 30
    assert report.dialogs == len(dialogs) and report.failures == 0
    assert report.prompt_tokens > 0
    table = report.table("fake")
    assert "precision" in table and "tokens per dialog" in table
    # The keyword judge is imperfect: the harness must notice its mistakes.
    assert report.mistakes


async def test_harness_counts_llm_failures() -> None:
    with FakeOpenAi(reply=ScriptedReply.error(500)) as fake:
        llm = OpenAiQualificationLlm(api_key="sk-x", base_url=fake.sdk_base_url, max_retries=0)
        report = await evaluate(llm)
        await llm.aclose()
    assert report.failures == report.dialogs
