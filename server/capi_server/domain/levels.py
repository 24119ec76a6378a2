"""The three conversion levels of a dialog and the Meta event names they map to."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass


class Level(enum.IntEnum):
    """Funnel level of a dialog. Values equal the proto enum `capi.v1.Level`."""

    INTEREST = 1
    QUALIFIED = 2
    SCHEDULED = 3

    @property
    def column(self) -> str:
        """Infix of the seed's dialog_analysis columns: capi_<column>_sent, ..."""
        return self.name.lower()

    def with_lower(self) -> list[Level]:
        """This level and every level below it, lowest first (levels are cumulative)."""
        return [lvl for lvl in Level if lvl <= self]


# The seed's CAPI_EVENTS: the default event names.
SEED_EVENT_NAMES: Mapping[Level, str] = {
    Level.INTEREST: "Lead",
    Level.QUALIFIED: "CompleteRegistration",
    Level.SCHEDULED: "Schedule",
}

# Meta reportedly accepts only a fixed list of event names for
# action_source=business_messaging and rejects the rest with subcode 2804066
# (see shared/design/research/meta-capi.md section 0). This preset maps the levels
# onto that list.
BUSINESS_MESSAGING_EVENT_NAMES: Mapping[Level, str] = {
    Level.INTEREST: "LeadSubmitted",
    Level.QUALIFIED: "QualifiedLead",
    Level.SCHEDULED: "QualifiedLead",
}

BUSINESS_MESSAGING_ACCEPTED_NAMES: frozenset[str] = frozenset(
    {
        "Purchase",
        "LeadSubmitted",
        "InitiateCheckout",
        "AddToCart",
        "ViewContent",
        "OrderCreated",
        "OrderShipped",
        "OrderDelivered",
        "OrderCanceled",
        "OrderReturned",
        "CartAbandoned",
        "QualifiedLead",
        "RatingProvided",
        "ReviewProvided",
    }
)

EVENT_NAME_PRESETS: Mapping[str, Mapping[Level, str]] = {
    "seed": SEED_EVENT_NAMES,
    "business_messaging": BUSINESS_MESSAGING_EVENT_NAMES,
}


def event_name_warning(level: Level, event_name: str) -> str | None:
    """A warning when Meta is likely to reject `event_name` for business_messaging."""
    if event_name in BUSINESS_MESSAGING_ACCEPTED_NAMES:
        return None
    suggested = BUSINESS_MESSAGING_EVENT_NAMES[level]
    return (
        f"event name {event_name!r} for level {level.name} is reportedly rejected by Meta for "
        f"action_source=business_messaging (error subcode 2804066); consider {suggested!r} "
        "(preset 'business_messaging')"
    )


@dataclass(frozen=True, slots=True)
class LevelDecision:
    """Whether a dialog reached a level, and why (shown to operators)."""

    level: Level
    reached: bool
    reason: str
