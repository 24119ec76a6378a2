"""The weekly optimisation strategy as a table: counts per level -> recommended level."""

from __future__ import annotations

import pytest

from capi_server.domain.advice import (
    MIN_WEEKLY_EVENTS,
    WeeklyCounts,
    is_stable,
    recommend,
)
from capi_server.domain.levels import BUSINESS_MESSAGING_EVENT_NAMES, SEED_EVENT_NAMES, Level

Weeks = tuple[int, int]  # (last 7 days, previous 7 days)


def counts(
    interest: Weeks, qualified: Weeks, scheduled: Weeks, names: dict[Level, str] | None = None
) -> dict[Level, WeeklyCounts]:
    names = names or dict(SEED_EVENT_NAMES)
    weeks = {Level.INTEREST: interest, Level.QUALIFIED: qualified, Level.SCHEDULED: scheduled}
    return {
        level: WeeklyCounts(level, names[level], last, previous)
        for level, (last, previous) in weeks.items()
    }


@pytest.mark.parametrize(
    ("last", "previous", "stable"),
    [
        (50, 50, True),
        (65, 50, True),  # +30%: the edge is stable
        (66, 50, False),  # +32%
        (35, 50, False),  # -30% but under 50
        (70, 100, True),  # -30%
        (69, 100, False),
        (49, 60, False),  # last week under 50
        (60, 49, False),  # previous week under 50
        (0, 0, False),
    ],
)
def test_is_stable(last: int, previous: int, stable: bool) -> None:
    assert is_stable(WeeklyCounts(Level.QUALIFIED, "CompleteRegistration", last, previous)) is (
        stable
    )


@pytest.mark.parametrize(
    ("interest", "qualified", "scheduled", "expected", "reason_part"),
    [
        # Week 1: little data at all: Lead, and the reason says Lead itself is thin.
        ((12, 0), (3, 0), (0, 0), Level.INTEREST, "Lead itself had only 12 events"),
        # Plenty of leads, few registrations: stay on Lead.
        ((400, 380), (30, 20), (5, 2), Level.INTEREST, "50+ events are needed"),
        # Registrations reached 50+ only last week: not yet.
        ((400, 380), (60, 30), (5, 2), Level.INTEREST, "50+ events are needed"),
        # 50+ in both weeks but jumped by 60%: not stable.
        ((400, 380), (160, 100), (5, 2), Level.INTEREST, "not stable"),
        # Registrations stable, schedules few: CompleteRegistration.
        ((400, 380), (90, 80), (20, 10), Level.QUALIFIED, "Schedule (level 3) had 20"),
        # Both stable: Schedule, the deepest level.
        ((400, 380), (120, 110), (60, 55), Level.SCHEDULED, "deepest level"),
        # Schedules stable but registrations not: the levels are climbed in order.
        ((400, 380), (40, 120), (60, 55), Level.INTEREST, "CompleteRegistration (level 2)"),
    ],
)
def test_recommendation_follows_the_weekly_strategy(
    interest: Weeks, qualified: Weeks, scheduled: Weeks, expected: Level, reason_part: str
) -> None:
    advice = recommend(counts(interest, qualified, scheduled))
    assert advice.recommended_level is expected
    assert advice.event_name == SEED_EVENT_NAMES[expected]
    assert reason_part in advice.reason


def test_a_level_sharing_the_event_name_is_not_a_step() -> None:
    """With the business_messaging preset levels 2 and 3 are both QualifiedLead."""
    names = dict(BUSINESS_MESSAGING_EVENT_NAMES)
    advice = recommend(counts((400, 380), (120, 110), (60, 55), names))
    assert advice.recommended_level is Level.QUALIFIED
    assert advice.event_name == "QualifiedLead"
    assert "same event name" in advice.reason and "own event name" in advice.reason


def test_missing_levels_count_as_zero() -> None:
    advice = recommend({})
    assert advice.recommended_level is Level.INTEREST
    assert advice.event_name == "Lead"
    assert f"about {MIN_WEEKLY_EVENTS} a week" in advice.reason
