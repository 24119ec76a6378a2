"""A fake OpenAI-compatible server for chat completions, on FakeHttpServer.

It answers `POST /v1/chat/completions` (and `/chat/completions`) in the real response
format, so the openai SDK parses it as it would parse OpenAI. Tests script the answers:

    with FakeOpenAi(reply=ScriptedReply.verdict(interested=True)) as fake:
        llm = OpenAiQualificationLlm(api_key="test", base_url=fake.sdk_base_url, ...)

A reply is a `ScriptedReply` or a function of the request body returning one (see
`keyword_judge`, a rule-based stand-in for the model used by the eval harness in CI).
`enqueue(...)` sets one-shot replies used before the default one.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.http import FakeHttpServer, FakeResponse, RecordedRequest

CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})


@dataclass
class ScriptedReply:
    """What the fake answers to one request.

    status 200: a chat.completion whose first choice has `content` (or `refusal`).
    Any other status: OpenAI's error envelope with `error_code`/`error_message`.
    `delay` holds the answer back (seconds) to provoke client timeouts.
    Token counts default to ceil(chars / 4) of the request messages and of the content.
    """

    content: str | None = None
    status: int = 200
    finish_reason: str = "stop"
    refusal: str | None = None
    error_code: str | None = None
    error_message: str = "scripted error"
    delay: float = 0.0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def verdict(
        cls,
        *,
        interested: bool = False,
        qualified: bool = False,
        scheduled: bool = False,
        answered_questions: list[str] | None = None,
        evidence_message_ids: list[str] | None = None,
        confidence: float = 0.9,
        **overrides: Any,
    ) -> ScriptedReply:
        """A well-formed verdict JSON as content; `overrides` replace reply fields."""
        return cls(
            content=json.dumps(
                verdict_json(
                    interested=interested,
                    qualified=qualified,
                    scheduled=scheduled,
                    answered_questions=answered_questions,
                    evidence_message_ids=evidence_message_ids,
                    confidence=confidence,
                ),
                ensure_ascii=False,
            ),
            **overrides,
        )

    @classmethod
    def text(cls, content: str, **overrides: Any) -> ScriptedReply:
        """Arbitrary content (a generated prompt, or deliberately invalid JSON)."""
        return cls(content=content, **overrides)

    @classmethod
    def error(
        cls, status: int, code: str | None = None, message: str = "scripted error", **kw: Any
    ) -> ScriptedReply:
        """An HTTP error; `x-should-retry: false` keeps the SDK from retrying unless the
        test sets its own headers."""
        headers = kw.pop("headers", {"x-should-retry": "false"})
        return cls(status=status, error_code=code, error_message=message, headers=headers, **kw)


Responder = ScriptedReply | Callable[[dict[str, Any]], ScriptedReply]


def verdict_json(
    *,
    interested: bool,
    qualified: bool,
    scheduled: bool,
    answered_questions: list[str] | None = None,
    evidence_message_ids: list[str] | None = None,
    confidence: float = 0.9,
) -> dict[str, Any]:
    """A verdict object with every schema field."""
    return {
        "is_interested": interested,
        "is_qualified": qualified,
        "is_scheduled": scheduled,
        "interested_reason": "client asked about the service" if interested else "no interest",
        "qualified_reason": "all questions answered" if qualified else "questions unanswered",
        "scheduled_reason": "booking confirmed" if scheduled else "no booking",
        "answered_questions": answered_questions or [],
        "evidence_message_ids": evidence_message_ids or [],
        "confidence": confidence,
    }


def _approx_tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


class FakeOpenAi:
    """Fake OpenAI chat completions server; `requests` are the recorded HTTP requests."""

    def __init__(self, reply: Responder | None = None) -> None:
        self.default_reply: Responder = reply or ScriptedReply.verdict()
        self._queue: deque[Responder] = deque()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._server = FakeHttpServer(self._handle)

    # -- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> FakeOpenAi:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()

    @property
    def base_url(self) -> str:
        """Server root, `http://127.0.0.1:<port>`."""
        return self._server.base_url

    @property
    def sdk_base_url(self) -> str:
        """What the openai SDK takes as base_url (it appends `/chat/completions`)."""
        return f"{self.base_url}/v1"

    # -- scripting and inspection ----------------------------------------------------

    def reply_with(self, reply: Responder) -> None:
        """Replace the default reply (used when the queue is empty)."""
        self.default_reply = reply

    def enqueue(self, *replies: Responder) -> None:
        """One-shot replies, used in order before the default reply."""
        with self._lock:
            self._queue.extend(replies)

    @property
    def requests(self) -> list[RecordedRequest]:
        return list(self._server.requests)

    def chat_bodies(self) -> list[dict[str, Any]]:
        """The JSON bodies of the chat completion requests received so far."""
        return [r.json() for r in self._server.requests if r.path in CHAT_PATHS]

    # -- serving ---------------------------------------------------------------------

    def _next_responder(self) -> Responder:
        with self._lock:
            return self._queue.popleft() if self._queue else self.default_reply

    def _handle(self, request: RecordedRequest) -> FakeResponse:
        if request.method != "POST" or request.path not in CHAT_PATHS:
            return FakeResponse(status=404, body=_error_body("not_found", "unknown endpoint"))
        body = request.json()
        responder = self._next_responder()
        reply = responder if isinstance(responder, ScriptedReply) else responder(body)
        if reply.status != 200:
            return FakeResponse(
                status=reply.status,
                body=_error_body(reply.error_code, reply.error_message),
                headers=reply.headers,
                delay=reply.delay,
            )
        return FakeResponse(
            body=self._completion(body, reply), headers=reply.headers, delay=reply.delay
        )

    def _completion(self, body: dict[str, Any], reply: ScriptedReply) -> dict[str, Any]:
        prompt_chars = "".join(str(m.get("content", "")) for m in body.get("messages", []))
        prompt_tokens = (
            reply.prompt_tokens if reply.prompt_tokens is not None else _approx_tokens(prompt_chars)
        )
        completion_tokens = (
            reply.completion_tokens
            if reply.completion_tokens is not None
            else _approx_tokens(reply.content or reply.refusal or "")
        )
        return {
            "id": f"chatcmpl-fake{next(self._ids)}",
            "object": "chat.completion",
            "created": 1_760_000_000,
            "model": f"{body.get('model', 'gpt-4o-mini')}-2024-07-18",
            "system_fingerprint": "fp_fake",
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": None if reply.refusal else reply.content,
                        "refusal": reply.refusal,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": reply.finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }


def _error_body(code: str | None, message: str) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": "invalid_request_error" if code != "rate_limit_exceeded" else "requests",
            "param": None,
            "code": code,
        }
    }


# ---------------------------------------------------------------------------------------
# keyword_judge: a deterministic stand-in for the model, good enough to run the labelled
# dialogs through the whole pipeline in CI. It reads the rendered dialog from the request
# (lines "[id] client: text") and the questions from the system prompt (lines ending "?").

_CLIENT_LINE = re.compile(r"^\[(?P<id>[^\]]*)\] client: (?P<text>.*)$", re.MULTILINE)

_SPAM_WORDS = (
    "казино",
    "casino",
    "крипт",
    "crypto",
    "заработ",
    "earn $",
    "ошиблись номером",
    "не туда",
    "wrong number",
    "вакансия",
    "резюме",
    "hiring",
    "resume",
    "подписывайтесь",
    "promo",
    "click the link",
    "ignore previous instructions",
    "игнорируй",
    "перейдите по ссылке",
)
_BOOKING_WORDS = (
    "записал",
    "запишите",
    "записывайте",
    "записываюсь",
    "подтверждаю",
    "договорились",
    "до встречи",
    "приеду",
    "приду",
    "booked",
    "book me",
    "i confirm",
    "confirmed",
    "see you",
    "works for me",
)
_INTEREST_WORDS = (
    "цен",
    "стоим",
    "сколько",
    "хочу",
    "интерес",
    "нужн",
    "запис",
    "подскажите",
    "можно",
    "price",
    "cost",
    "how much",
    "interested",
    "want",
    "need",
    "looking for",
    "available",
    "can i",
)


def _question_count(system_prompt: str) -> int:
    prompt = system_prompt.split("Business qualification prompt:", 1)[-1]
    return sum(1 for line in prompt.splitlines() if line.strip().endswith("?"))


def keyword_judge(body: dict[str, Any]) -> ScriptedReply:
    """A verdict from keyword rules over the client's lines of the rendered dialog.

    scheduled: a booking phrase; qualified: the client wrote as many messages after the
    first as there are questions, or ~40 characters per question; interested: a question
    mark, an interest word, or qualified. Spam, off-topic and injection phrases veto all.
    """
    messages = body.get("messages", [])
    system = next((m["content"] for m in messages if m.get("role") == "system"), "")
    dialog = next((m["content"] for m in messages if m.get("role") == "user"), "")
    client_lines = [(m["id"], m["text"].lower()) for m in _CLIENT_LINE.finditer(dialog)]
    client_text = " ".join(text for _, text in client_lines)

    if not client_lines or any(word in client_text for word in _SPAM_WORDS):
        return ScriptedReply.verdict(confidence=0.6)
    booking_ids = [i for i, text in client_lines if any(w in text for w in _BOOKING_WORDS)]
    scheduled = bool(booking_ids)
    questions = _question_count(system)
    qualified = questions > 0 and (
        len(client_lines) - 1 >= questions or len(client_text) >= 40 * questions
    )
    interested = (
        qualified
        or scheduled
        or "?" in client_text
        or any(w in client_text for w in _INTEREST_WORDS)
    )
    evidence = booking_ids or ([client_lines[-1][0]] if interested else [])
    return ScriptedReply.verdict(
        interested=interested,
        qualified=qualified,
        scheduled=scheduled,
        evidence_message_ids=evidence,
        confidence=0.6,
    )
