"""Evaluation harness for the qualification prompt: `make eval-llm`.

Runs AnalyzeDialog's exact LLM request (the adapter used in production) over the labelled
dialogs in dialogs.json against any OpenAI-compatible endpoint (OPENAI_BASE_URL,
OPENAI_API_KEY, CAPI_LLM_MODEL) and prints precision and recall per level and the tokens
used per dialog. Without OPENAI_API_KEY it runs against the local fake LLM (a keyword
judge), which only proves that the harness works.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capi_server.adapters.llm import LlmUnavailable, OpenAiQualificationLlm
from capi_server.domain.qualification import DialogMessage

DIALOGS = Path(__file__).with_name("dialogs.json")
LEVELS = ("interested", "qualified", "scheduled")


@dataclass
class LevelScore:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def add(self, expected: bool, got: bool) -> None:
        if expected and got:
            self.tp += 1
        elif got:
            self.fp += 1
        elif expected:
            self.fn += 1
        else:
            self.tn += 1

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0


@dataclass
class EvalReport:
    scores: dict[str, LevelScore] = field(default_factory=lambda: {k: LevelScore() for k in LEVELS})
    dialogs: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    mistakes: list[str] = field(default_factory=list)

    def table(self, model: str) -> str:
        lines = [
            f"model: {model}   dialogs: {self.dialogs}   LLM failures: {self.failures}",
            f"{'level':<12}{'precision':>10}{'recall':>8}{'tp':>5}{'fp':>5}{'fn':>5}",
        ]
        for name, score in self.scores.items():
            lines.append(
                f"{name:<12}{score.precision:>10.2f}{score.recall:>8.2f}"
                f"{score.tp:>5}{score.fp:>5}{score.fn:>5}"
            )
        per_dialog = (self.prompt_tokens + self.completion_tokens) / max(self.dialogs, 1)
        lines.append(
            f"tokens per dialog: {per_dialog:.0f} "
            f"(prompt {self.prompt_tokens / max(self.dialogs, 1):.0f}, "
            f"completion {self.completion_tokens / max(self.dialogs, 1):.0f})"
        )
        return "\n".join(lines)


def load_dialogs(path: Path = DIALOGS) -> tuple[dict[str, str], list[dict[str, Any]]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return data["prompts"], data["dialogs"]


async def evaluate(llm: OpenAiQualificationLlm, path: Path = DIALOGS) -> EvalReport:
    prompts, dialogs = load_dialogs(path)
    report = EvalReport()
    for dialog in dialogs:
        prompt = dialog.get("qualification_prompt") or prompts[dialog["prompt_id"]]
        messages = [
            DialogMessage(f"m{i}", bool(m["from_me"]), m["text"], 1_700_000_000 + i)
            for i, m in enumerate(dialog["messages"])
        ]
        report.dialogs += 1
        try:
            analysis = await llm.analyze(prompt, messages)
        except LlmUnavailable as exc:
            report.failures += 1
            report.mistakes.append(f"{dialog['id']}: LLM failed: {exc.reason}")
            continue
        report.prompt_tokens += analysis.prompt_tokens
        report.completion_tokens += analysis.completion_tokens
        verdict = analysis.verdict
        got = {
            "interested": verdict.is_interested,
            "qualified": verdict.is_qualified,
            "scheduled": verdict.is_scheduled,
        }
        for level in LEVELS:
            report.scores[level].add(bool(dialog["expected"][level]), got[level])
            if bool(dialog["expected"][level]) != got[level]:
                report.mistakes.append(
                    f"{dialog['id']}: {level} expected {dialog['expected'][level]}"
                )
    return report


async def main() -> int:
    model = os.environ.get("CAPI_LLM_MODEL", "gpt-4o-mini")
    key = os.environ.get("OPENAI_API_KEY")
    fake = None
    if key:
        base_url = os.environ.get("OPENAI_BASE_URL")
    else:
        from tests.fakes.openai_server import FakeOpenAi, keyword_judge

        fake = FakeOpenAi(reply=keyword_judge).__enter__()
        key, base_url = "sk-local-fake", fake.sdk_base_url
        print("OPENAI_API_KEY is not set: running against the local fake LLM (keyword judge)")
    llm = OpenAiQualificationLlm(api_key=key, base_url=base_url, model=model, timeout=60)
    try:
        report = await evaluate(llm)
    finally:
        await llm.aclose()
        if fake is not None:
            fake.__exit__(None, None, None)
    print(report.table(model))
    for mistake in report.mistakes:
        print(f"  miss: {mistake}")
    return 0 if report.dialogs else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
