"""The LLM behind WhatsApp qualification, on the official openai SDK.

`OpenAiQualificationLlm` talks to OpenAI or any OpenAI-compatible server (base_url). It
raises exactly one exception type, `LlmUnavailable`, classified as transient (worth a
later retry: timeouts, 429 rate limits, 5xx, connection errors) or permanent (bad key,
unknown model, exhausted quota, a refusal, output that is not a verdict). The caller owns
the retry policy beyond the SDK's own `max_retries` quick retries.

Logs follow the seed's `[qualificationAgent] ...` lines with structured `extra` fields;
message text, phone numbers and the API key never reach a log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

import httpx2
import openai
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam
from openai.types.chat.completion_create_params import ResponseFormat

from capi_server.adapters import metrics
from capi_server.domain.qualification import (
    DEFAULT_TOKEN_BUDGET,
    DialogMessage,
    InvalidLlmOutput,
    QualificationVerdict,
    analysis_response_format,
    build_analysis_messages,
    build_prompt_generation_messages,
    parse_verdict,
    prompt_version_hash,
    render_dialog,
)

logger = logging.getLogger("capi_server.llm")

DEFAULT_MODEL: Final = "gpt-4o-mini"

# A verdict is ~150-300 tokens; the cap bounds the cost of a model that rambles.
ANALYSIS_MAX_COMPLETION_TOKENS: Final = 600
PROMPT_MAX_COMPLETION_TOKENS: Final = 1500
# Deterministic-ish classification; a little variety is fine for prompt writing.
ANALYSIS_TEMPERATURE: Final = 0.0
PROMPT_TEMPERATURE: Final = 0.3

# Statuses where a later identical request may succeed.
_TRANSIENT_STATUSES: Final = frozenset({408, 409, 425, 429})


class LlmUnavailable(Exception):
    """The LLM gave no usable answer. `is_transient`: a later retry may succeed."""

    def __init__(self, reason: str, is_transient: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.is_transient = is_transient

    def __repr__(self) -> str:
        return f"LlmUnavailable(reason={self.reason!r}, is_transient={self.is_transient})"


@dataclass(frozen=True, slots=True)
class LlmAnalysis:
    """One analysis call: the verdict plus what it cost and which instructions made it."""

    verdict: QualificationVerdict
    model: str
    prompt_tokens: int
    completion_tokens: int
    elapsed_seconds: float
    prompt_version: str


@dataclass(frozen=True, slots=True)
class GeneratedPrompt:
    """A qualification prompt ("prompt2") written by the model; `tokens` = total usage."""

    text: str
    model: str
    tokens: int


def _error_code(body: object) -> str | None:
    """OpenAI's `error.code` from an error body (the SDK passes `body["error"]` or the body)."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            code = inner.get("code") or inner.get("type")
            return str(code) if code else None
    return None


def classify_openai_error(exc: Exception) -> LlmUnavailable:
    """Map an SDK or transport exception to LlmUnavailable (never includes message text)."""
    if isinstance(exc, openai.APITimeoutError):
        return LlmUnavailable("timeout waiting for the LLM", is_transient=True)
    if isinstance(exc, openai.APIConnectionError):
        return LlmUnavailable("cannot connect to the LLM", is_transient=True)
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        code = _error_code(exc.body)
        suffix = f" ({code})" if code else ""
        # A 429 is usually a rate limit, but OpenAI also answers 429 when the account's
        # quota or billing is exhausted: no retry fixes that.
        if status == 429 and code == "insufficient_quota":
            return LlmUnavailable(f"LLM quota exhausted: HTTP 429{suffix}", is_transient=False)
        transient = status in _TRANSIENT_STATUSES or status >= 500
        kind = "rate limited" if status == 429 else "error"
        return LlmUnavailable(f"LLM {kind}: HTTP {status}{suffix}", is_transient=transient)
    if isinstance(exc, openai.APIResponseValidationError):
        return LlmUnavailable("LLM response has an unexpected shape", is_transient=False)
    if isinstance(exc, httpx2.TimeoutException):
        return LlmUnavailable("timeout waiting for the LLM", is_transient=True)
    if isinstance(exc, httpx2.TransportError):
        return LlmUnavailable("cannot connect to the LLM", is_transient=True)
    return LlmUnavailable(f"LLM call failed: {type(exc).__name__}", is_transient=False)


def _single_choice_content(completion: ChatCompletion) -> str:
    """The text of the first choice, or LlmUnavailable for refusals and truncation."""
    if not completion.choices:
        raise LlmUnavailable("LLM returned no choices", is_transient=False)
    choice = completion.choices[0]
    if choice.message.refusal:
        raise LlmUnavailable("LLM refused to answer", is_transient=False)
    if choice.finish_reason == "length":
        raise LlmUnavailable("LLM output was cut at the token limit", is_transient=False)
    if choice.finish_reason == "content_filter":
        raise LlmUnavailable("LLM output was blocked by the content filter", is_transient=False)
    content = choice.message.content
    if not content or not content.strip():
        raise LlmUnavailable("LLM returned an empty answer", is_transient=False)
    return content


class OpenAiQualificationLlm:
    """Qualification analysis and prompt generation through `openai.AsyncOpenAI`.

    `base_url=None` lets the SDK read `OPENAI_BASE_URL` (then api.openai.com). A caller
    that passes `http_client` keeps ownership of it: `aclose` closes only a client this
    object created.
    """

    def __init__(
        self,
        api_key: str,
        base_url: str | None,
        model: str = DEFAULT_MODEL,
        timeout: float = 20.0,
        max_retries: int = 1,
        http_client: httpx2.AsyncClient | None = None,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
    ) -> None:
        self.model = model
        self._token_budget = token_budget
        self._owns_http_client = http_client is None
        self._client = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=base_url,
            timeout=timeout,
            max_retries=max_retries,
            http_client=http_client,
        )

    async def aclose(self) -> None:
        if self._owns_http_client:
            await self._client.close()

    async def __aenter__(self) -> OpenAiQualificationLlm:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _complete(
        self,
        messages: list[dict[str, str]],
        *,
        max_completion_tokens: int,
        temperature: float,
        response_format: dict[str, Any] | None = None,
    ) -> ChatCompletion:
        # The domain builds plain {"role", "content"} dicts; these are exactly the SDK's
        # system/user message TypedDicts.
        sdk_messages = cast(list[ChatCompletionMessageParam], messages)
        try:
            if response_format is None:
                return await self._client.chat.completions.create(
                    model=self.model,
                    messages=sdk_messages,
                    temperature=temperature,
                    max_completion_tokens=max_completion_tokens,
                )
            return await self._client.chat.completions.create(
                model=self.model,
                messages=sdk_messages,
                temperature=temperature,
                max_completion_tokens=max_completion_tokens,
                response_format=cast(ResponseFormat, response_format),
            )
        except Exception as exc:
            # One exception type for callers: analysis runs in the background and must not
            # crash on an SDK or transport surprise. Unknown errors are logged with a trace.
            unavailable = classify_openai_error(exc)
            metrics.observe_llm_call(
                "analyze" if response_format is not None else "generate_prompt",
                "transient_error" if unavailable.is_transient else "permanent_error",
            )
            if not isinstance(exc, openai.OpenAIError | httpx2.HTTPError):
                logger.exception("[qualificationAgent] Unexpected LLM client error")
            raise unavailable from exc

    async def analyze(
        self, qualification_prompt: str, messages: Sequence[DialogMessage]
    ) -> LlmAnalysis:
        """Ask the model for the levels of one dialog; raises LlmUnavailable on any failure."""
        prompt_version = prompt_version_hash(qualification_prompt)
        client_messages = sum(1 for message in messages if not message.from_me)
        logger.info(
            "[qualificationAgent] Asking the LLM",
            extra={
                "model": self.model,
                "promptVersion": prompt_version,
                "messageCount": len(messages),
                "clientMessageCount": client_messages,
            },
        )
        chat_messages = build_analysis_messages(
            qualification_prompt, render_dialog(messages, self._token_budget)
        )
        started = time.perf_counter()
        completion = await self._complete(
            chat_messages,
            max_completion_tokens=ANALYSIS_MAX_COMPLETION_TOKENS,
            temperature=ANALYSIS_TEMPERATURE,
            response_format=analysis_response_format(),
        )
        elapsed = time.perf_counter() - started
        metrics.observe_llm_completion("analyze", elapsed, completion.usage)
        content = _single_choice_content(completion)
        try:
            verdict = parse_verdict(content)
        except InvalidLlmOutput as exc:
            # The reason names the shape problem only; the content may quote the client.
            raise LlmUnavailable(f"LLM answer is not a valid verdict: {exc}", False) from exc
        usage = completion.usage
        analysis = LlmAnalysis(
            verdict=verdict,
            model=completion.model or self.model,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            elapsed_seconds=elapsed,
            prompt_version=prompt_version,
        )
        logger.info(
            "[qualificationAgent] LLM verdict",
            extra={
                "isInterested": verdict.is_interested,
                "isQualified": verdict.is_qualified,
                "isScheduled": verdict.is_scheduled,
                "confidence": verdict.confidence,
                "model": analysis.model,
                "promptVersion": prompt_version,
                "promptTokens": analysis.prompt_tokens,
                "completionTokens": analysis.completion_tokens,
                "elapsedMs": round(elapsed * 1000),
            },
        )
        return analysis

    async def generate_prompt(
        self, business_description: str, language: str = "ru"
    ) -> GeneratedPrompt:
        """Write a qualification prompt for a business; raises LlmUnavailable on failure."""
        completion = await self._complete(
            build_prompt_generation_messages(business_description, language),
            max_completion_tokens=PROMPT_MAX_COMPLETION_TOKENS,
            temperature=PROMPT_TEMPERATURE,
        )
        metrics.observe_llm_completion("generate_prompt", None, completion.usage)
        text = _single_choice_content(completion).strip()
        usage = completion.usage
        logger.info(
            "[qualificationAgent] Qualification prompt generated",
            extra={
                "model": completion.model or self.model,
                "language": language,
                "promptChars": len(text),
                "totalTokens": usage.total_tokens if usage else 0,
            },
        )
        return GeneratedPrompt(
            text=text,
            model=completion.model or self.model,
            tokens=usage.total_tokens if usage else 0,
        )
