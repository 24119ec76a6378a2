"""The CRM port, its error type and the pieces both REST adapters share.

Error hierarchy: every failure of a CRM call is a `CrmError` with a `kind`:
- "auth": token/webhook rejected, subscription ended, access denied (needs a human);
- "rate_limited": the CRM throttled us and bounded retries did not help (transient);
- "not_found": the entity does not exist (or was deleted);
- "bad_response": the CRM answered something we cannot read (HTML, truncated JSON);
- "unavailable": network error, timeout or 5xx after bounded retries (transient).
Messages never contain tokens, webhook codes, phones or emails; `response_excerpt` is the
first 500 characters of the body and may contain customer data, so do not log it raw.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

from capi_server.domain.crm import CrmEntity, CrmFieldInfo, EntityType

CrmErrorKind = Literal["auth", "rate_limited", "not_found", "bad_response", "unavailable"]

_T = TypeVar("_T")
_TRANSIENT_KINDS: frozenset[str] = frozenset({"rate_limited", "unavailable"})
EXCERPT_CHARS = 500
DEFAULT_TIMEOUT_SECONDS = 10.0


class CrmError(Exception):
    """A failed CRM call; see the module docstring for the kinds."""

    def __init__(
        self,
        message: str,
        kind: CrmErrorKind,
        http_status: int | None = None,
        response_excerpt: str = "",
        *,
        retry_after_seconds: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.kind: CrmErrorKind = kind
        self.http_status = http_status
        self.response_excerpt = response_excerpt[:EXCERPT_CHARS]
        # The CRM's own hint (Retry-After / retry_after) for rate_limited errors.
        self.retry_after_seconds = retry_after_seconds

    @property
    def is_transient(self) -> bool:
        """Worth retrying later (rate limits, outages); the rest needs a fix first."""
        return self.kind in _TRANSIENT_KINDS

    def __repr__(self) -> str:
        return f"CrmError({self.message!r}, kind={self.kind!r}, http_status={self.http_status})"


def excerpt(body: bytes | str) -> str:
    """The first EXCERPT_CHARS characters of a response body, decoded leniently."""
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    return text[:EXCERPT_CHARS]


class CrmClient(Protocol):
    """Read access to one CRM account (amoCRM account or Bitrix24 portal)."""

    async def get_entity(self, entity_type: EntityType, entity_id: str) -> CrmEntity:
        """The entity with its fields; for a deal/lead also its main contact's phones/emails."""
        ...

    async def list_fields(self, entity_type: EntityType) -> list[CrmFieldInfo]:
        """Every field of an entity type, with the options of list fields."""
        ...

    async def list_changed_since(
        self, entity_type: EntityType, since_unix: int, limit: int
    ) -> list[str]:
        """Ids of entities modified after `since_unix`, oldest first, at most `limit`."""
        ...

    async def aclose(self) -> None:
        """Close the HTTP client."""
        ...


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded retries for throttling and outages.

    `max_attempts` counts the first try. The wait is Retry-After when the CRM sends one,
    else exponential backoff from `backoff_seconds` with jitter. A Retry-After longer than
    `max_wait_seconds` is not waited for: the call fails as rate_limited at once so the
    caller (outbox, sweep) can come back later instead of holding an RPC for minutes.
    """

    max_attempts: int = 4
    backoff_seconds: float = 0.5
    max_wait_seconds: float = 10.0

    def backoff(self, attempt: int) -> float:
        """Wait before retry number `attempt` (1-based) when the CRM gave no hint."""
        base = self.backoff_seconds * 2.0 ** (attempt - 1)
        return min(base * (1 + random.random() * 0.25), self.max_wait_seconds)


def parse_retry_after(raw: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds only; HTTP dates are ignored)."""
    if raw is None:
        return None
    try:
        seconds = float(raw.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


class AsyncRateLimiter:
    """A token bucket: at most `rate_per_second` acquisitions per second on average,
    up to `burst` at once. Share one instance per CRM account when several clients exist,
    because the CRM's limit is per account/portal, not per connection.
    """

    def __init__(
        self,
        rate_per_second: float,
        burst: int = 1,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if rate_per_second <= 0:
            raise ValueError("rate_per_second must be positive")
        if burst < 1:
            raise ValueError("burst must be at least 1")
        self._rate = rate_per_second
        self._capacity = float(burst)
        self._tokens = float(burst)
        self._clock = clock
        self._sleep = sleep
        self._updated = clock()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        """Wait until a request may be sent."""
        # The lock makes waiters queue in order, so spacing holds under concurrency.
        async with self._lock:
            while True:
                now = self._clock()
                self._tokens = min(
                    self._capacity, self._tokens + (now - self._updated) * self._rate
                )
                self._updated = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                await self._sleep((1 - self._tokens) / self._rate)


async def call_with_retries(
    attempt: Callable[[], Awaitable[_T]],
    policy: RetryPolicy,
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> _T:
    """Run `attempt` until it succeeds, retrying transient CrmErrors within `policy`."""
    for number in range(1, policy.max_attempts + 1):
        try:
            return await attempt()
        except CrmError as exc:
            if not exc.is_transient or number >= policy.max_attempts:
                raise
            hint = exc.retry_after_seconds
            wait = hint if hint is not None else policy.backoff(number)
            if wait > policy.max_wait_seconds:
                raise
            await sleep(wait)
    raise AssertionError("unreachable: max_attempts must be at least 1")
