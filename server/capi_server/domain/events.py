"""Send outcomes, audit-log statuses and the retry schedule of CAPI events."""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from datetime import datetime

from capi_server.domain.levels import Level

_RNG = random.Random()


class SendOutcome(enum.StrEnum):
    SENT = "sent"
    ALREADY_SENT = "already_sent"
    QUEUED = "queued"
    SKIPPED = "skipped"
    FAILED = "failed"


class EventStatus(enum.StrEnum):
    """capi_events_log.status: the seed's success | error | skipped, plus pending."""

    PENDING = "pending"
    SUCCESS = "success"
    ERROR = "error"
    SKIPPED = "skipped"


# Reasons for not sending: results, not errors (a decision not to send).
REASON_CAPI_DISABLED = "CAPI disabled for the direction"
REASON_NO_PIXEL = "no pixel"
REASON_NO_TOKEN = "no access token"
REASON_DRY_RUN = "dry run"
REASON_NO_CTWA_CLID = "no ctwa_clid"
REASON_NO_IDENTIFIER = "no phone, email or ctwa_clid to match the person"
REASON_EXPIRED = "expired: event_time is too close to Meta's 7-day limit to be sent"

HINT_NO_TOKEN = (
    "set an access token on the direction's ad account (UpdateAdAccount) or on the user "
    "account (UpdateUserAccount), then send again"
)
HINT_NO_PIXEL = "choose a pixel for the direction (UpdateDirection pixel_id)"
HINT_CAPI_DISABLED = "enable CAPI for the direction (UpdateDirection capi.enabled)"
HINT_NO_CTWA_CLID = (
    "the lead did not come from a Click-to-WhatsApp ad click id; the direction requires one "
    "(capi.require_ctwa_clid)"
)


@dataclass(frozen=True, slots=True)
class EventOutcome:
    """What happened to one (dialog, level) in a call."""

    level: Level
    event_name: str
    outcome: SendOutcome
    event_id: str = ""
    reason: str = ""
    error_code: int | None = None
    error_subcode: int | None = None
    hint: str = ""
    sent_at: datetime | None = None
    log_id: int | None = None


def retry_delay(
    attempts: int,
    *,
    base_seconds: float,
    max_seconds: float,
    jitter: float = 0.2,
    rng: random.Random | None = None,
) -> float:
    """Seconds before attempt `attempts + 1`: exponential from `base`, capped, +-jitter.

    Jitter spreads the retries of events that failed together (one outage) so they do not
    all hit Graph again in the same second.
    """
    attempts = max(attempts, 1)
    delay = min(max_seconds, base_seconds * float(2 ** min(attempts - 1, 30)))
    spread = (rng or _RNG).uniform(-jitter, jitter)
    return max(0.0, delay * (1 + spread))
