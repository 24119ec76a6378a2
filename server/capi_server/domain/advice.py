"""Which event to optimise the ads for: the seed's weekly strategy as a pure decision.

The seed's table: optimise for Lead first; move on to CompleteRegistration once it has 50+
events a week, then to Schedule. "Stable" is not defined there; here a level is ready when
it had at least `MIN_WEEKLY_EVENTS` successful events in each of the last two 7-day windows
and the last week is within +-`STABLE_TOLERANCE` of the week before. Two weeks at 50+ keep
one lucky week from moving the optimisation, and the tolerance keeps a collapsing (or
exploding, e.g. a test burst) count from being taken as the new normal.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from capi_server.domain.levels import SEED_EVENT_NAMES, Level

# Meta's rule of thumb for leaving the learning phase: about 50 optimisation events a week.
MIN_WEEKLY_EVENTS = 50
STABLE_TOLERANCE = 0.3


@dataclass(frozen=True, slots=True)
class WeeklyCounts:
    """Successful events of one level in the last 7 days and in the 7 days before."""

    level: Level
    event_name: str
    last_7_days: int
    previous_7_days: int


@dataclass(frozen=True, slots=True)
class OptimizationAdvice:
    recommended_level: Level
    event_name: str
    reason: str


def is_stable(counts: WeeklyCounts) -> bool:
    """Both weeks reach MIN_WEEKLY_EVENTS and the last is within the tolerance of the first."""
    last, previous = counts.last_7_days, counts.previous_7_days
    if last < MIN_WEEKLY_EVENTS or previous < MIN_WEEKLY_EVENTS:
        return False
    return abs(last - previous) <= STABLE_TOLERANCE * previous


def _describe(counts: WeeklyCounts) -> str:
    return (
        f"{counts.event_name} (level {int(counts.level)}) had {counts.last_7_days} events in "
        f"the last 7 days and {counts.previous_7_days} in the 7 days before"
    )


def _not_ready_because(counts: WeeklyCounts) -> str:
    if counts.last_7_days < MIN_WEEKLY_EVENTS or counts.previous_7_days < MIN_WEEKLY_EVENTS:
        return f"{MIN_WEEKLY_EVENTS}+ events are needed in each of the two weeks"
    return (
        f"the count moved by more than {round(STABLE_TOLERANCE * 100)}% between the weeks, "
        "so it is not stable yet"
    )


def _learning_note(first: WeeklyCounts) -> str:
    if first.last_7_days >= MIN_WEEKLY_EVENTS:
        return ""
    return (
        f". {first.event_name} itself had only {first.last_7_days} events in the last 7 days; "
        f"Meta needs about {MIN_WEEKLY_EVENTS} a week to leave the learning phase, so expect "
        "unstable delivery until then"
    )


def recommend(counts: Mapping[Level, WeeklyCounts]) -> OptimizationAdvice:
    """The level to optimise for: the highest level reached step by step with stable counts.

    Levels are climbed in order (a Schedule is also a CompleteRegistration and a Lead), so a
    level is only considered once every level below it was ready. A level whose event name
    equals the current one's is not a step: Meta sees both as one event.
    """

    def of(level: Level) -> WeeklyCounts:
        return counts.get(level) or WeeklyCounts(level, SEED_EVENT_NAMES[level], 0, 0)

    first = of(Level.INTEREST)
    current = first
    for level in (Level.QUALIFIED, Level.SCHEDULED):
        candidate = of(level)
        if candidate.event_name == current.event_name:
            reason = (
                f"optimise for {current.event_name}: level {int(level)} is sent under the "
                f"same event name as level {int(current.level)}, so Meta cannot optimise for "
                f"it separately; give level {int(level)} its own event name to move on"
            )
            if current is first:
                reason += _learning_note(first)
            return OptimizationAdvice(current.level, current.event_name, reason)
        if not is_stable(candidate):
            reason = (
                f"optimise for {current.event_name}: {_describe(candidate)}; "
                f"{_not_ready_because(candidate)} before switching to {candidate.event_name}"
            )
            if current is first:
                reason += _learning_note(first)
            return OptimizationAdvice(current.level, current.event_name, reason)
        current = candidate
    reason = (
        f"optimise for {current.event_name}: {_describe(current)}, stable and above "
        f"{MIN_WEEKLY_EVENTS} a week; it is the deepest level, the closest to a sale"
    )
    return OptimizationAdvice(current.level, current.event_name, reason)
