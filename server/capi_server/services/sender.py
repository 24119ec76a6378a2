"""CapiSender use cases: send a level exactly once, retry the queue, answer about the log.

Exactly once per (dialog, level) works in three steps (ARCHITECTURE.md section 5):
1. claim: one transaction sets dialog_analysis.capi_<level>_event_id where it is NULL and
   inserts the capi_events_log row as `pending`; commit;
2. send outside any transaction;
3. record: success, pending with a backoff (transient), or error (permanent).
A crash between 1 and 3 leaves a pending row whose lease expires; the retry worker then
resends it with the same event_id, which Meta deduplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import re
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from capi_server.adapters import metrics
from capi_server.adapters.db import dialogs_repo, events_repo
from capi_server.adapters.db.database import (
    Database,
    is_lock_conflict,
    is_transient_db_error,
    on_commit,
)
from capi_server.adapters.db.dialogs_repo import DialogKeys
from capi_server.adapters.db.orm import (
    CapiEventLogRow,
    DirectionRow,
    utcnow,
)
from capi_server.adapters.db.secrets import TokenCipher
from capi_server.adapters.meta_graph import GraphFailureKind, GraphSuccess, MetaGraphError
from capi_server.domain import events as ev
from capi_server.domain.directions import TEST_EVENT_CODE, Direction
from capi_server.domain.errors import DomainError, InvalidArgument, NotFound
from capi_server.domain.events import EventOutcome, EventStatus, SendOutcome
from capi_server.domain.levels import Level
from capi_server.domain.normalization import (
    InvalidUserData,
    is_already_hashed,
    normalize_email,
    normalize_phone,
    sha256_hex,
)
from capi_server.domain.payloads import (
    MAX_EVENT_AGE_SECONDS,
    MAX_EVENTS_PER_REQUEST,
    EventInput,
    build_event,
    build_request_body,
    event_id_for,
    is_too_old,
)
from capi_server.services.batching import Batcher, wait_all
from capi_server.services.hot_cache import DirectionSnapshot, HotCache, SentLevel

log = logging.getLogger("capi_server.sender")

FUTURE_TOLERANCE = timedelta(minutes=10)
# SendConversion calls claimed per transaction at most when many run at once.
MAX_PLAN_BATCH = 256
# A record that loses a deadlock race is run again, up to this many times in all.
RECORD_ATTEMPTS = 3
CURRENCY = re.compile(r"^[A-Za-z]{3}$")


class GraphPort(Protocol):
    """What the sender needs of the Graph client (MetaGraphClient satisfies it)."""

    async def send_events(
        self, pixel_id: str, access_token: str, body: dict[str, object]
    ) -> GraphSuccess | MetaGraphError: ...


@dataclass(frozen=True, slots=True)
class DialogRef:
    """A dialog named by id, or by (instance_name | direction_id, contact_phone)."""

    dialog_id: int | None = None
    instance_name: str | None = None
    contact_phone: str | None = None
    direction_id: int | None = None


@dataclass(frozen=True, slots=True)
class SendOptions:
    event_time: datetime | None = None
    value: float | None = None
    currency: str | None = None
    test_event_code: str | None = None
    dry_run: bool = False
    email: str | None = None
    source: str = "api"


@dataclass(frozen=True, slots=True)
class DialogContext:
    direction_id: int
    direction: Direction
    dialog: dialogs_repo.DialogSends
    lead: dialogs_repo.LeadIdentity
    access_token: str | None
    token_source: str
    token_error: DomainError | None = None


@dataclass(frozen=True, slots=True)
class ClaimedEvent:
    log_id: int
    dialog_id: int
    level: Level
    event_name: str
    event_id: str
    event_time: datetime
    payload: dict[str, Any]
    attempts: int = 0
    direction_id: int | None = None


@dataclass(frozen=True, slots=True)
class SendItem:
    ref: DialogRef
    level: Level
    options: SendOptions


@dataclass(frozen=True, slots=True)
class PlannedSend:
    """An item after its claim transaction: the report so far and what to deliver."""

    report: SendReport
    key: tuple[str, str, str | None] | None = None  # (pixel, token, test code) to send with
    claimed: list[ClaimedEvent] = field(default_factory=list)
    # One per claimed event, handed to the drainer as soon as the claim committed.
    deliveries: list[asyncio.Future[EventOutcome]] = field(default_factory=list)


@dataclass(slots=True)
class _PendingClaim:
    """A level to claim in the batch's UPDATE, with the pending log row it gets."""

    dialog: dialogs_repo.DialogSends
    level: Level
    name: str
    event_id: str
    event_time: datetime
    payload: dict[str, Any]
    direction_id: int
    row: dict[str, Any]
    won: bool = False
    log_id: int | None = None
    lost: EventOutcome | None = None  # what another call's earlier claim says instead


@dataclass(slots=True)
class _LevelStep:
    """One level of one item: an outcome as it stands, plus a skipped row to write or the
    claim it made (`owner`) or shares (the same level twice in one batch)."""

    outcome: EventOutcome
    row: dict[str, Any] | None = None
    claim: _PendingClaim | None = None
    owner: bool = False
    log_id: int | None = None

    def log_row(self) -> dict[str, Any]:
        row = self.row if self.row is not None else self.claim.row if self.claim else None
        assert row is not None
        return row


def _sent_report(
    dialog_id: int, level: Level, sent: dict[Level, SentLevel], snapshot: DirectionSnapshot
) -> SendReport:
    """ALREADY_SENT for `level` and every lower level, from what is known sent."""
    names = snapshot.direction.capi
    return SendReport(
        dialog_id=dialog_id,
        outcomes=[
            EventOutcome(
                lvl,
                names.event_name(lvl),
                SendOutcome.ALREADY_SENT,
                event_id=sent[lvl].event_id,
                reason="already sent",
                sent_at=sent[lvl].sent_at,
            )
            for lvl in level.with_lower()
        ],
    )


def _report(steps: Sequence[_LevelStep]) -> tuple[SendReport, list[ClaimedEvent]]:
    """An item's report and the events it claimed, once `_apply` has run."""
    report = SendReport(dialog_id=0)
    claimed: list[ClaimedEvent] = []
    for step in steps:
        claim = step.claim
        if claim is not None and claim.lost is not None:
            report.outcomes.append(claim.lost)
            continue
        log_id = step.log_id if claim is None or step.owner else claim.log_id
        report.outcomes.append(replace(step.outcome, log_id=log_id or step.outcome.log_id))
        if step.owner and claim is not None:
            assert claim.log_id is not None
            claimed.append(
                ClaimedEvent(
                    claim.log_id,
                    claim.dialog.id,
                    claim.level,
                    claim.name,
                    claim.event_id,
                    claim.event_time,
                    claim.payload,
                    direction_id=claim.direction_id,
                )
            )
    return report, claimed


@dataclass
class SenderConfig:
    dry_run: bool = False
    partner_agent: str | None = None
    retry_base_seconds: float = 5.0
    retry_max_seconds: float = 3600.0
    expiry_margin_seconds: int = 3600
    lease_seconds: float = 60.0
    retry_batch_size: int = 500
    batch_linger_seconds: float = 0.0
    # The next claim batch waits for the previous one's deliveries at most this long.
    pacing_seconds: float = 0.0


@dataclass
class SendReport:
    dialog_id: int
    outcomes: list[EventOutcome] = field(default_factory=list)


class SenderService:
    def __init__(
        self,
        db: Database,
        cipher: TokenCipher,
        graph: GraphPort,
        config: SenderConfig,
        *,
        cache: HotCache | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.db = db
        self.cipher = cipher
        self.graph = graph
        self.config = config
        self.cache = cache or HotCache(cipher, 0.0)
        self.clock = clock
        self._outbox: dict[
            tuple[str, str, str | None], list[tuple[ClaimedEvent, asyncio.Future[EventOutcome]]]
        ] = {}
        self._drainers: dict[tuple[str, str, str | None], asyncio.Task[None]] = {}
        # Concurrent send() calls are claimed in one transaction.
        self._planner: Batcher[SendItem, PlannedSend] = Batcher(
            self._plan_many,
            max_batch=MAX_PLAN_BATCH,
            retry_alone=lambda error: not is_transient_db_error(error),
            run_again=is_lock_conflict,
            linger_seconds=config.batch_linger_seconds,
            pace=self._paced,
            name="plan_sends",
        )

    # -- resolving a dialog -------------------------------------------------------------

    async def direction(self, direction_id: int) -> DirectionSnapshot:
        """A direction's snapshot; a session (a connection) only when it is not cached."""
        cached = self.cache.cached_direction(direction_id)
        if cached is not None:
            return cached
        async with self.db.session() as session:
            return await self.cache.direction(session, direction_id=direction_id)

    async def resolve_dialog(
        self, session: Any, ref: DialogRef, *, create: bool
    ) -> tuple[DirectionSnapshot, DialogKeys | None]:
        """The direction and the dialog's keys; with `create`, the dialog is created."""
        snapshot, phone = await self._contact_of(session, ref)
        keys = await self.dialog_keys(session, snapshot, phone, phone, create=create)
        return snapshot, keys

    async def _contact_of(self, session: Any, ref: DialogRef) -> tuple[DirectionSnapshot, str]:
        """The direction and normalised phone of a dialog named by its contact."""
        if ref.direction_id is None and not ref.instance_name:
            raise InvalidArgument.field(
                "dialog_id", "name the dialog by dialog_id or by instance_name and contact_phone"
            )
        snapshot = await self.cache.direction(
            session, direction_id=ref.direction_id, instance_name=ref.instance_name
        )
        if not ref.contact_phone:
            raise InvalidArgument.field("contact_phone", "is required with instance_name")
        return snapshot, normalize_contact(ref.contact_phone, snapshot.default_region)

    async def dialog_keys(
        self,
        session: Any,
        snapshot: DirectionSnapshot,
        contact_key: str,
        contact_phone: str | None,
        *,
        create: bool,
    ) -> DialogKeys | None:
        """A contact's lead and dialog ids: cached, else read, else (with `create`) made."""
        (keys,) = await self.dialog_keys_many(
            session, [(snapshot, contact_key, contact_phone)], create=create
        )
        return keys

    async def dialog_keys_many(
        self,
        session: Any,
        contacts: Sequence[tuple[DirectionSnapshot, str, str | None]],
        *,
        create: bool,
        rows: dict[int, tuple[dialogs_repo.DialogSends, dialogs_repo.LeadIdentity]] | None = None,
    ) -> list[DialogKeys | None]:
        """dialog_keys for (snapshot, contact_key, contact_phone) each; those not cached
        are read, or with `create` read and created together (ensure_dialogs). `rows`: the
        rows of the dialogs read or created are put there too, by the same statement."""
        cache = self.cache
        found: dict[dialogs_repo.ContactKey, DialogKeys] = {}
        missing: dict[dialogs_repo.ContactKey, dialogs_repo.NewContact] = {}
        for snapshot, contact_key, contact_phone in contacts:
            key = (snapshot.direction_id, contact_key)
            cached = cache.dialog_keys(*key)
            if cached is not None:
                found[key] = cached
            elif key not in missing:
                missing[key] = dialogs_repo.NewContact(
                    snapshot.direction_id,
                    snapshot.direction.instance_name,
                    contact_key,
                    contact_phone,
                )
        if missing:
            if not create:
                looked_up = await dialogs_repo.find_dialogs(session, list(missing))
            elif rows is None:
                looked_up = await dialogs_repo.ensure_dialogs(session, list(missing.values()))
            else:
                made = await dialogs_repo.ensure_dialogs_with_leads(session, list(missing.values()))
                looked_up = {}
                for key, (dialog, lead) in made.items():
                    looked_up[key] = DialogKeys(dialog.id, lead.id, dialog.direction_id)
                    rows[dialog.id] = (dialog, lead)
            found.update(looked_up)

            def remember() -> None:
                for (_, contact_key), keys in looked_up.items():
                    cache.remember_dialog(contact_key, keys)

            # Remembered once committed: this transaction may have created the rows, and a
            # rollback (or another transaction not seeing them yet) must not meet cached ids.
            on_commit(session, remember)
        return [found.get((snapshot.direction_id, key)) for snapshot, key, _ in contacts]

    async def load_context(self, session: Any, ref: DialogRef, *, create: bool) -> DialogContext:
        if ref.dialog_id is not None:
            dialog_id = ref.dialog_id
        else:
            _, keys = await self.resolve_dialog(session, ref, create=create)
            if keys is None:
                raise NotFound(
                    "no dialog for this instance and phone",
                    reason="DIALOG_NOT_FOUND",
                    metadata={"instance_name": ref.instance_name or ""},
                )
            dialog_id = keys.dialog_id
        found = await dialogs_repo.dialogs_with_leads(session, [dialog_id])
        if dialog_id not in found:
            raise NotFound(
                f"dialog {dialog_id} not found",
                reason="DIALOG_NOT_FOUND",
                metadata={"dialog_id": str(dialog_id)},
            )
        dialog, lead = found[dialog_id]
        snapshot = await self.cache.direction(session, direction_id=dialog.direction_id)
        return self._context(snapshot, dialog, lead)

    @staticmethod
    def _context(
        snapshot: DirectionSnapshot,
        dialog: dialogs_repo.DialogSends,
        lead: dialogs_repo.LeadIdentity,
    ) -> DialogContext:
        return DialogContext(
            direction_id=snapshot.direction_id,
            direction=snapshot.direction,
            dialog=dialog,
            lead=lead,
            access_token=snapshot.access_token,
            token_source=snapshot.token_source,
            token_error=snapshot.token_error,
        )

    async def _loaded_context(
        self,
        session: Any,
        loaded: dict[int, tuple[dialogs_repo.DialogSends, dialogs_repo.LeadIdentity]],
        dialog_id: int,
    ) -> DialogContext:
        """The context of a dialog `dialogs_with_leads` read for the batch, else read now
        (NOT_FOUND when it does not exist)."""
        pair = loaded.get(dialog_id)
        if pair is None:
            return await self.load_context(session, DialogRef(dialog_id), create=True)
        dialog, lead = pair
        snapshot = await self.cache.direction(session, direction_id=dialog.direction_id)
        return self._context(snapshot, dialog, lead)

    async def _already_sent(self, session: Any, dialog_id: int, level: Level) -> SendReport | None:
        """Every requested level is known to be sent: answer without reading the dialog."""
        known = self._known_sent(dialog_id, level)
        if known is None:
            return None
        snapshot = await self.cache.direction(session, direction_id=known[0])
        return _sent_report(dialog_id, level, known[1], snapshot)

    def _known_sent(
        self, dialog_id: int, level: Level
    ) -> tuple[int, dict[Level, SentLevel]] | None:
        """(direction_id, sent levels) when `level` and every lower level are known sent."""
        known = self.cache.sent_levels(dialog_id)
        if known is None or any(lvl not in known[1] for lvl in level.with_lower()):
            return None
        return known

    def _answer_from_cache(self, item: SendItem, now: datetime) -> SendReport | None:
        """The answer for an item whose levels are all known sent, from the caches alone
        (no session, no batch); None when anything it needs is not cached."""
        options = item.options
        if options.dry_run or options.email:
            return None
        self._check_event_time(options.event_time or now, now)
        self._check_options(options)
        ref = item.ref
        dialog_id = ref.dialog_id
        if dialog_id is None:
            named = self.cache.cached_direction(ref.direction_id, ref.instance_name)
            if named is None or not ref.contact_phone:
                return None
            phone = normalize_contact(ref.contact_phone, named.default_region)
            keys = self.cache.dialog_keys(named.direction_id, phone)
            if keys is None:
                return None
            dialog_id = keys.dialog_id
        known = self._known_sent(dialog_id, item.level)
        snapshot = self.cache.cached_direction(known[0]) if known else None
        if known is None or snapshot is None:
            return None
        return _sent_report(dialog_id, item.level, known[1], snapshot)

    # -- SendConversion -----------------------------------------------------------------

    def _check_event_time(self, event_time: datetime, now: datetime) -> None:
        age = (now - event_time).total_seconds()
        if age > MAX_EVENT_AGE_SECONDS - self.config.expiry_margin_seconds:
            raise InvalidArgument.field(
                "event_time", "is older than Meta accepts (7 days, minus a safety margin)"
            )
        if event_time - now > FUTURE_TOLERANCE:
            raise InvalidArgument.field("event_time", "is in the future")

    async def send(self, ref: DialogRef, level: Level, options: SendOptions) -> SendReport:
        """Send `level` and every unsent lower level, lowest first; idempotent.

        Concurrent calls are claimed in one transaction (group commit); their events then
        share Graph requests per pixel.
        """
        item = SendItem(ref, level, options)
        answered = self._answer_from_cache(item, self.clock())
        if answered is not None:
            metrics.observe_planned(answered.outcomes)
            return answered
        planned = await self._planner.submit(item)
        (result,) = await self._deliver_planned([planned])
        if isinstance(result, DomainError):
            raise result
        return result

    async def send_many(self, items: Sequence[SendItem]) -> list[SendReport | DomainError]:
        """Send several (dialog, level) items with one claim transaction and batched requests.

        Events for the same pixel, token and test code share Graph requests of up to 1,000
        events (a CRM webhook naming many deals). An item whose input is bad gets its error
        in its place; the other items go on.
        """
        return await self._deliver_planned(await self._plan_many(items))

    async def _plan_many(self, items: Sequence[SendItem]) -> list[PlannedSend | DomainError]:
        """Claims the items' events in one transaction; nothing is sent yet.

        Dialogs named by phone are resolved together and the dialog and lead rows are
        loaded together, so a batch costs a few statements plus two per claimed event.
        """
        now = self.clock()
        results: list[PlannedSend | DomainError | None] = [None] * len(items)
        dialog_ids: list[int | None] = [item.ref.dialog_id for item in items]
        checked: list[tuple[datetime, str | None] | None] = [None] * len(items)
        for i, item in enumerate(items):
            # Bad input is refused before anything is created for it.
            try:
                event_time = item.options.event_time or now
                self._check_event_time(event_time, now)
                checked[i] = (event_time, self._check_options(item.options))
            except DomainError as exc:
                results[i] = exc
        async with self.db.session() as session:
            named: list[tuple[int, tuple[DirectionSnapshot, str, str | None]]] = []
            for i, item in enumerate(items):
                if item.ref.dialog_id is None and results[i] is None:
                    try:
                        snapshot, phone = await self._contact_of(session, item.ref)
                    except DomainError as exc:
                        results[i] = exc
                        continue
                    named.append((i, (snapshot, phone, phone)))
            loaded: dict[int, tuple[dialogs_repo.DialogSends, dialogs_repo.LeadIdentity]] = {}
            found = await self.dialog_keys_many(
                session, [c for _, c in named], create=True, rows=loaded
            )
            for (i, _), keys in zip(named, found, strict=True):
                assert keys is not None
                dialog_ids[i] = keys.dialog_id
            to_plan: list[tuple[int, int, datetime, str | None]] = []
            for i, item in enumerate(items):
                dialog_id, check = dialog_ids[i], checked[i]
                if results[i] is not None or dialog_id is None or check is None:
                    continue
                event_time, email = check
                if not email and not item.options.dry_run:
                    done = await self._already_sent(session, dialog_id, item.level)
                    if done is not None:
                        results[i] = PlannedSend(done)
                        continue
                to_plan.append((dialog_id, i, event_time, email))
            loaded.update(
                await dialogs_repo.dialogs_with_leads(
                    session, {p[0] for p in to_plan} - loaded.keys()
                )
            )
            emails: dict[int, str] = {}
            claims: dict[tuple[int, Level], _PendingClaim] = {}
            planned: list[tuple[int, DialogContext, SendItem, list[_LevelStep]]] = []
            for dialog_id, i, event_time, email in sorted(to_plan, key=lambda p: p[:2]):
                item = items[i]
                try:
                    ctx = await self._loaded_context(session, loaded, dialog_id)
                    if ctx.token_error is not None and ctx.direction.capi.enabled:
                        raise ctx.token_error
                except DomainError as exc:
                    results[i] = exc
                    continue
                # The caller's email goes into this item's payload, and is stored with its
                # claims (`_apply`); an item refused leaves the lead as it was.
                previous_email = ctx.lead.email
                ctx.lead.email = email or previous_email
                try:
                    steps = await self._plan(
                        session, ctx, item.level, event_time, item.options, now, claims
                    )
                except DomainError as exc:
                    ctx.lead.email = previous_email
                    results[i] = exc
                    continue
                if email and email != previous_email:
                    emails[ctx.lead.id] = email
                for step in steps:
                    if step.owner and step.claim is not None:
                        claims[(dialog_id, step.claim.level)] = step.claim
                planned.append((i, ctx, item, steps))
            reports = (
                await self._apply(session, [p[3] for p in planned], claims, emails, now)
                if planned
                else []
            )
            for (i, ctx, item, _), (report, claimed) in zip(planned, reports, strict=True):
                report.dialog_id = ctx.dialog.id
                key = None
                if claimed:
                    assert ctx.direction.pixel_id and ctx.access_token
                    test_code = item.options.test_event_code or ctx.direction.capi.test_event_code
                    key = (ctx.direction.pixel_id, ctx.access_token, test_code)
                results[i] = PlannedSend(report, key, claimed)
            await session.commit()
        # Handed over here, in the batch, not by the callers: a caller that gives up
        # (deadline) must not leave its committed claim waiting for the retry worker.
        for result in results:
            if isinstance(result, PlannedSend) and result.key is not None:
                result.deliveries.extend(self._hand_over(result.key, result.claimed))
        done_results = [r for r in results if r is not None]
        assert len(done_results) == len(items)
        metrics.observe_planned(
            o for r in done_results if isinstance(r, PlannedSend) for o in r.report.outcomes
        )
        return done_results

    async def _paced(self, planned: Sequence[PlannedSend | Exception]) -> None:
        """The next claim batch starts once this one's events are delivered and recorded,
        or after `pacing_seconds`, whichever is first.

        Calls that arrive meanwhile then share one claim transaction, one Graph request
        and one record, instead of a claim batch each racing the delivery in progress for
        the process's one core (make bench: batches of ~16 calls instead of ~9, 14-18% less
        CPU per SendConversion). The bound keeps a slow Graph request (another pixel's)
        from holding the claims back longer; the events of a pixel whose request is slow
        wait for that pixel's drainer anyway.
        """
        handed = [f for p in planned if isinstance(p, PlannedSend) for f in p.deliveries]
        if not handed or self.config.pacing_seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.pacing_seconds):
                await wait_all(handed)

    async def _deliver_planned(
        self, planned: Sequence[PlannedSend | DomainError]
    ) -> list[SendReport | DomainError]:
        """Waits for the deliveries `_plan_many` handed over and fills in the outcomes."""
        results = [p if isinstance(p, DomainError) else p.report for p in planned]
        outcomes: dict[int | None, EventOutcome] = {}
        for p in planned:
            if not isinstance(p, PlannedSend) or not p.deliveries:
                continue
            # wait_all, not gather: a caller cancelled here (deadline) leaves the futures
            # to the drainer, which needs no shield per event.
            await wait_all(p.deliveries)
            for event, future in zip(p.claimed, p.deliveries, strict=True):
                outcome: EventOutcome | BaseException = (
                    future.exception() or future.result()
                    if not future.cancelled()
                    else asyncio.CancelledError()
                )
                if isinstance(outcome, BaseException):
                    if not isinstance(outcome, Exception):
                        raise outcome
                    # Claimed and committed: the row stays pending; the worker resends it.
                    outcome = EventOutcome(
                        event.level,
                        event.event_name,
                        SendOutcome.QUEUED,
                        event_id=event.event_id,
                        reason="delivery not confirmed; the retry worker resends it",
                        log_id=event.log_id,
                    )
                outcomes[event.log_id] = outcome
        for result in results:
            if isinstance(result, SendReport):
                result.outcomes = [outcomes.get(o.log_id, o) for o in result.outcomes]
        return results

    def _hand_over(
        self, key: tuple[str, str, str | None], events: Sequence[ClaimedEvent]
    ) -> list[asyncio.Future[EventOutcome]]:
        """Queues claimed events for the drainer of (pixel, token, test code).

        Concurrent calls for the same pixel share Graph requests (up to 1,000 events) and
        record transactions: while one request is in flight, the next calls' events queue
        and go out together. The drainer is a task of its own, so a caller that gives up
        (deadline) leaves its claimed events to be delivered and recorded all the same.
        """
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[EventOutcome]] = []
        queue = self._outbox.setdefault(key, [])
        for event in events:
            future: asyncio.Future[EventOutcome] = loop.create_future()
            future.add_done_callback(_retrieve)
            queue.append((event, future))
            futures.append(future)
        if key not in self._drainers:
            self._drainers[key] = asyncio.create_task(self._drain(key))
        return futures

    async def _drain(self, key: tuple[str, str, str | None]) -> None:
        pixel_id, token, test_code = key
        try:
            while queue := self._outbox.get(key):
                batch = queue[:MAX_EVENTS_PER_REQUEST]
                del queue[: len(batch)]
                try:
                    delivered = await self.deliver(
                        [e for e, _ in batch], pixel_id, token, test_code
                    )
                    by_log = {o.log_id: o for o in await self.record(delivered)}
                    for event, future in batch:
                        if not future.done():
                            future.set_result(by_log[event.log_id])
                except Exception as exc:
                    # The rows stay pending under their lease: the retry worker resends.
                    log.exception("delivery failed", extra={"pixelId": pixel_id})
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                except BaseException:
                    # Cancelled (the loop shutting down): the callers must not wait forever;
                    # the rows stay pending under their lease, as above.
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(asyncio.CancelledError())
                    raise
        finally:
            # No await between the empty check and here: nothing can be queued unseen.
            self._outbox.pop(key, None)
            self._drainers.pop(key, None)

    async def aclose(self) -> None:
        """Wait for deliveries in progress (called at shutdown, before the HTTP client)."""
        await self._planner.aclose()
        if self._drainers:
            await asyncio.gather(*self._drainers.values(), return_exceptions=True)

    @staticmethod
    def _check_options(options: SendOptions) -> str | None:
        """Validates the caller's options; returns the normalised email, if any."""
        if options.test_event_code and not TEST_EVENT_CODE.match(options.test_event_code):
            raise InvalidArgument.field("test_event_code", "must be 1-64 of [A-Za-z0-9_-]")
        if options.currency and not CURRENCY.match(options.currency):
            raise InvalidArgument.field("currency", "must be a three-letter ISO 4217 code")
        if options.value is not None:
            if not math.isfinite(options.value) or options.value < 0:
                raise InvalidArgument.field("value", "must be a finite number >= 0")
            if not options.currency:
                raise InvalidArgument.field("currency", "is required with value")
        if not options.email:
            return None
        if len(options.email) > 320:
            raise InvalidArgument.field("email", "must be at most 320 characters")
        try:
            return normalize_email(options.email)
        except InvalidUserData as exc:
            raise InvalidArgument.field("email", str(exc)) from None

    def _skip_reason(self, ctx: DialogContext) -> tuple[str, str] | None:
        direction = ctx.direction
        if not direction.capi.enabled:
            return ev.REASON_CAPI_DISABLED, ev.HINT_CAPI_DISABLED
        if not direction.pixel_id:
            return ev.REASON_NO_PIXEL, ev.HINT_NO_PIXEL
        if not ctx.access_token:
            return ev.REASON_NO_TOKEN, ev.HINT_NO_TOKEN
        if direction.capi.require_ctwa_clid and not ctx.lead.ctwa_clid:
            return ev.REASON_NO_CTWA_CLID, ev.HINT_NO_CTWA_CLID
        if not (ctx.lead.contact_phone or ctx.lead.email or ctx.lead.ctwa_clid):
            return ev.REASON_NO_IDENTIFIER, ""
        return None

    def build_payload(
        self,
        ctx: DialogContext,
        level: Level,
        event_id: str,
        event_time: datetime,
        options: SendOptions,
    ) -> dict[str, Any]:
        lead = ctx.lead
        return build_event(
            EventInput(
                level=level,
                event_name=ctx.direction.capi.event_name(level),
                event_time=int(event_time.timestamp()),
                event_id=event_id,
                phone_hash=sha256_hex(lead.contact_phone) if lead.contact_phone else None,
                email_hash=sha256_hex(lead.email) if lead.email else None,
                ctwa_clid=lead.ctwa_clid,
                whatsapp_business_account_id=ctx.direction.whatsapp_business_account_id,
                value=options.value,
                currency=options.currency,
                limited_data_use=ctx.direction.capi.limited_data_use,
            )
        )

    async def _plan(
        self,
        session: Any,
        ctx: DialogContext,
        level: Level,
        event_time: datetime,
        options: SendOptions,
        now: datetime,
        batch_claims: dict[tuple[int, Level], _PendingClaim],
    ) -> list[_LevelStep]:
        """What to do for `level` and every lower level; claims are made by `_apply`."""
        steps: list[_LevelStep] = []
        skip = self._skip_reason(ctx)
        dry_run = options.dry_run or self.config.dry_run
        test_code = options.test_event_code or ctx.direction.capi.test_event_code
        common: dict[str, Any] = {
            "direction_id": ctx.direction_id,
            "dialog_id": ctx.dialog.id,
            "lead_id": ctx.lead.id,
            "pixel_id": ctx.direction.pixel_id,
            "source": options.source,
            "test_event_code": test_code,
            "now": now,
        }
        for lvl in level.with_lower():
            name = ctx.direction.capi.event_name(lvl)
            if getattr(ctx.dialog, f"capi_{lvl.column}_event_id"):
                steps.append(
                    _LevelStep(await self.existing_outcome(session, ctx.dialog, lvl, name))
                )
                continue
            if skip is not None:
                reason, hint = skip
                row: dict[str, Any] = {
                    "level": int(lvl),
                    "event_name": name,
                    "status": EventStatus.SKIPPED.value,
                    "error_message": reason,
                    "hint": hint or None,
                    "event_time": event_time,
                    **common,
                }
                outcome = EventOutcome(lvl, name, SendOutcome.SKIPPED, reason=reason, hint=hint)
                steps.append(_LevelStep(outcome, row=row))
                continue
            event_id = event_id_for(str(ctx.dialog.id), lvl)
            try:
                payload = self.build_payload(ctx, lvl, event_id, event_time, options)
            except ValueError as exc:
                raise InvalidArgument.field(
                    "value" if options.value else "dialog_id", str(exc)
                ) from None
            if dry_run:
                row = {
                    "level": int(lvl),
                    "event_name": name,
                    "event_id": event_id,
                    "status": EventStatus.SKIPPED.value,
                    "error_message": ev.REASON_DRY_RUN,
                    "payload": payload,
                    "event_time": event_time,
                    **common,
                }
                outcome = EventOutcome(
                    lvl, name, SendOutcome.SKIPPED, event_id=event_id, reason=ev.REASON_DRY_RUN
                )
                steps.append(_LevelStep(outcome, row=row))
                continue
            pending = batch_claims.get((ctx.dialog.id, lvl))
            if pending is not None:
                # The same level asked for twice in one batch: the first call claims it.
                outcome = EventOutcome(
                    lvl,
                    name,
                    SendOutcome.QUEUED,
                    event_id=event_id,
                    reason="already queued for sending",
                )
                steps.append(_LevelStep(outcome, claim=pending))
                continue
            claim = _PendingClaim(
                ctx.dialog,
                lvl,
                name,
                event_id,
                event_time,
                payload,
                ctx.direction_id,
                row={
                    "level": int(lvl),
                    "event_name": name,
                    "event_id": event_id,
                    "status": EventStatus.PENDING.value,
                    "payload": payload,
                    "event_time": event_time,
                    "next_attempt_at": now,
                    "locked_until": now + timedelta(seconds=self.config.lease_seconds),
                    **common,
                },
            )
            outcome = EventOutcome(
                lvl, name, SendOutcome.QUEUED, event_id=event_id, reason="claimed"
            )
            steps.append(_LevelStep(outcome, claim=claim, owner=True))
        return steps

    async def _apply(
        self,
        session: Any,
        plans: Sequence[list[_LevelStep]],
        claims: dict[tuple[int, Level], _PendingClaim],
        emails: dict[int, str],
        now: datetime,
    ) -> list[tuple[SendReport, list[ClaimedEvent]]]:
        """Makes the batch's claims and writes its log rows (one statement on PostgreSQL),
        then turns each item's steps into its report."""
        # Leads first (a new email), then dialogs, as ensure_dialogs and the CRM's linking
        # of a contact do: claiming first deadlocked with concurrent CRM webhooks.
        if emails:
            await dialogs_repo.set_lead_emails(session, emails, now)
        # A claim's pending row is written only if the claim is won, with the claim.
        writes: list[tuple[_LevelStep, events_repo.ClaimKey | None]] = []
        for steps in plans:
            for step in steps:
                if step.row is not None:
                    writes.append((step, None))
                elif step.owner and step.claim is not None:
                    writes.append((step, (step.claim.dialog.id, step.claim.level)))
        won, log_ids = await events_repo.claim_and_log(
            session,
            {key: claim.event_id for key, claim in claims.items()},
            [(step.log_row(), key) for step, key in writes],
            now,
        )
        for (step, _), log_id in zip(writes, log_ids, strict=True):
            step.log_id = log_id
            if step.owner and step.claim is not None:
                step.claim.log_id = log_id
        for key, claim in claims.items():
            claim.won = key in won
        lost = [claim for claim in claims.values() if not claim.won]
        if lost:
            # Other calls claimed these between our read and our update: read them again.
            fresh = await dialogs_repo.dialogs_with_leads(session, {c.dialog.id for c in lost})
            for claim in lost:
                claim.dialog = fresh[claim.dialog.id][0]
                claim.lost = await self.existing_outcome(
                    session, claim.dialog, claim.level, claim.name
                )
        return [_report(steps) for steps in plans]

    async def existing_outcome(
        self, session: Any, dialog: dialogs_repo.DialogSends, level: Level, name: str
    ) -> EventOutcome:
        event_id = getattr(dialog, f"capi_{level.column}_event_id") or ""
        sent_at = getattr(dialog, f"capi_{level.column}_sent_at")
        if getattr(dialog, f"capi_{level.column}_sent"):
            self.cache.remember_sent(dialog.id, dialog.direction_id, level, event_id, sent_at)
            return EventOutcome(
                level,
                name,
                SendOutcome.ALREADY_SENT,
                event_id=event_id,
                reason="already sent",
                sent_at=sent_at,
            )
        row = await events_repo.latest_log_row(session, dialog.id, level)
        if row is not None and row.status == EventStatus.SUCCESS.value:
            return EventOutcome(
                level,
                name,
                SendOutcome.ALREADY_SENT,
                event_id=event_id,
                reason="already sent",
                sent_at=sent_at,
                log_id=row.id,
            )
        if row is not None and row.status == EventStatus.ERROR.value:
            return EventOutcome(
                level,
                row.event_name,
                SendOutcome.FAILED,
                event_id=event_id,
                reason=row.error_message or "failed",
                error_code=row.error_code,
                error_subcode=row.error_subcode,
                hint=row.hint or "",
                log_id=row.id,
            )
        return EventOutcome(
            level,
            name,
            SendOutcome.QUEUED,
            event_id=event_id,
            reason="already queued for sending",
            log_id=row.id if row else None,
        )

    # -- delivery -----------------------------------------------------------------------

    async def deliver(
        self,
        events: Sequence[ClaimedEvent],
        pixel_id: str,
        token: str,
        test_event_code: str | None,
    ) -> list[tuple[ClaimedEvent, GraphSuccess | MetaGraphError]]:
        """Send in requests of up to 1,000 events; isolate events Meta rejects permanently.

        Meta rejects a whole request when one event is bad, so a permanent failure of a
        batch is split in halves until the bad events stand alone and the rest go through.
        """
        results: list[tuple[ClaimedEvent, GraphSuccess | MetaGraphError]] = []
        for start in range(0, len(events), MAX_EVENTS_PER_REQUEST):
            budget = [SPLIT_REQUEST_BUDGET]
            results += await self._deliver_batch(
                list(events[start : start + MAX_EVENTS_PER_REQUEST]),
                pixel_id,
                token,
                test_event_code,
                budget,
            )
        return results

    async def _deliver_batch(
        self,
        batch: list[ClaimedEvent],
        pixel_id: str,
        token: str,
        test_event_code: str | None,
        budget: list[int],
    ) -> list[tuple[ClaimedEvent, GraphSuccess | MetaGraphError]]:
        body = build_request_body(
            [e.payload for e in batch],
            test_event_code=test_event_code,
            partner_agent=self.config.partner_agent,
        )
        budget[0] -= 1
        result = await self.graph.send_events(pixel_id, token, body)
        if isinstance(result, GraphSuccess) and result.events_received < len(batch):
            # Meta took fewer events than sent: none is recorded as sent; the retry worker
            # resends them all with their event_ids, which Meta deduplicates.
            result = MetaGraphError(
                message=f"Meta received {result.events_received} of {len(batch)} events",
                type=None,
                code=None,
                error_subcode=None,
                error_user_msg=None,
                error_user_title=None,
                fbtrace_id=result.fbtrace_id,
                is_transient=True,
                http_status=200,
                hint=None,
                raw_excerpt="",
                elapsed_seconds=result.elapsed_seconds,
                kind=GraphFailureKind.MALFORMED_BODY,
            )
        if (
            isinstance(result, GraphSuccess)
            or result.is_transient
            or len(batch) == 1
            or not is_per_event_error(result)
            or budget[0] <= 0
        ):
            # Request-wide errors (token, permissions, pixel, event name) fail every event
            # alike, and the request budget bounds the search: no further splitting.
            return [(e, result) for e in batch]
        middle = len(batch) // 2
        left = await self._deliver_batch(batch[:middle], pixel_id, token, test_event_code, budget)
        right = await self._deliver_batch(batch[middle:], pixel_id, token, test_event_code, budget)
        return left + right

    async def record(
        self, results: Sequence[tuple[ClaimedEvent, GraphSuccess | MetaGraphError]]
    ) -> list[EventOutcome]:
        """Records what Graph answered for each event: sent, to retry, or failed.

        A record that loses a deadlock race is run again: the events were delivered, and
        a record given up would leave them pending until their lease ends and the retry
        worker sends them once more. (The record locks its dialogs in id order; a claim
        transaction of another process may hold one of them already, locked out of that
        order by its find-or-create of a contact created at the same moment.)
        """
        attempt = 1
        while True:
            try:
                return await self._record_once(results)
            except Exception as exc:
                if attempt == RECORD_ATTEMPTS or not is_lock_conflict(exc):
                    raise
                log.warning(
                    "recording a delivery lost a lock race; recording it again",
                    extra={"events": len(results), "attempt": attempt},
                )
                attempt += 1

    async def _record_once(
        self, results: Sequence[tuple[ClaimedEvent, GraphSuccess | MetaGraphError]]
    ) -> list[EventOutcome]:
        now = self.clock()
        # One Graph request's accepted events are recorded together.
        accepted: dict[int, tuple[GraphSuccess, list[tuple[int, int, Level]]]] = {}
        for event, result in results:
            if isinstance(result, GraphSuccess):
                accepted.setdefault(id(result), (result, []))[1].append(
                    (event.log_id, event.dialog_id, event.level)
                )
        if (
            self.db.autocommit_pool is not None  # PostgreSQL
            and len(accepted) == 1
            and all(isinstance(result, GraphSuccess) for _, result in results)
        ):
            # All accepted by one Graph request (the usual case): one statement, atomic on
            # its own, with no transaction around it.
            ((success, items),) = accepted.values()
            await events_repo.mark_success(self.db.autocommit_pool, items, dict(success.raw), now)
            return self._recorded(results, [], now)
        outcomes: list[EventOutcome] = []
        async with self.db.session() as session:
            for success, items in accepted.values():
                await events_repo.mark_success(session, items, dict(success.raw), now)
            for event, result in results:
                if isinstance(result, GraphSuccess):
                    continue
                response = {"error_excerpt": result.raw_excerpt} if result.raw_excerpt else None
                attempts = event.attempts + 1
                expired = is_too_old(
                    int(event.event_time.timestamp()),
                    int(now.timestamp()),
                    self.config.expiry_margin_seconds,
                )
                if result.is_transient and not expired:
                    delay = ev.retry_delay(
                        attempts,
                        base_seconds=self.config.retry_base_seconds,
                        max_seconds=self.config.retry_max_seconds,
                    )
                    await events_repo.mark_failure(
                        session,
                        event.log_id,
                        status=EventStatus.PENDING,
                        now=now,
                        next_attempt_at=now + timedelta(seconds=delay),
                        error_code=result.code,
                        error_subcode=result.error_subcode,
                        error_message=result.message,
                        hint=result.hint,
                        response=response,
                    )
                    outcomes.append(
                        EventOutcome(
                            event.level,
                            event.event_name,
                            SendOutcome.QUEUED,
                            event_id=event.event_id,
                            reason=f"transient error, will retry: {result.message}",
                            error_code=result.code,
                            error_subcode=result.error_subcode,
                            log_id=event.log_id,
                        )
                    )
                    continue
                message = ev.REASON_EXPIRED if result.is_transient else result.message
                await events_repo.mark_failure(
                    session,
                    event.log_id,
                    status=EventStatus.ERROR,
                    now=now,
                    next_attempt_at=None,
                    error_code=result.code,
                    error_subcode=result.error_subcode,
                    error_message=message,
                    hint=result.hint,
                    response=response,
                )
                outcomes.append(
                    EventOutcome(
                        event.level,
                        event.event_name,
                        SendOutcome.FAILED,
                        event_id=event.event_id,
                        reason=message,
                        error_code=result.code,
                        error_subcode=result.error_subcode,
                        hint=result.hint or "",
                        log_id=event.log_id,
                    )
                )
            await session.commit()
        return self._recorded(results, outcomes, now)

    def _recorded(
        self,
        results: Sequence[tuple[ClaimedEvent, GraphSuccess | MetaGraphError]],
        failures: list[EventOutcome],
        now: datetime,
    ) -> list[EventOutcome]:
        """The outcomes of committed results: SENT for the accepted ones (now cached as
        sent), `failures` as recorded, in the order of `results`."""
        outcomes: list[EventOutcome] = []
        failed = iter(failures)
        for event, result in results:
            if not isinstance(result, GraphSuccess):
                outcomes.append(next(failed))
                continue
            outcomes.append(
                EventOutcome(
                    event.level,
                    event.event_name,
                    SendOutcome.SENT,
                    event_id=event.event_id,
                    sent_at=now,
                    log_id=event.log_id,
                )
            )
            if event.direction_id is not None:
                self.cache.remember_sent(
                    event.dialog_id, event.direction_id, event.level, event.event_id, now
                )
        metrics.observe_delivered(outcomes)
        return outcomes

    # -- the retry queue ----------------------------------------------------------------

    async def process_due(self) -> int:
        """One pass of the retry worker; returns how many events it handled."""
        if self.config.dry_run:
            # Dry run never calls Meta, queued rows included (a copy of production data).
            return 0
        now = self.clock()
        lease = timedelta(seconds=self.config.lease_seconds)
        async with self.db.session() as session:
            due = await events_repo.take_due_events(
                session, now, self.config.retry_batch_size, lease
            )
            await session.commit()
        if not due:
            return 0
        groups: dict[tuple[int | None, str | None], list[events_repo.DueEvent]] = defaultdict(list)
        expired: list[events_repo.DueEvent] = []
        for item in due:
            event_time = item.event_time or now
            if is_too_old(
                int(event_time.timestamp()), int(now.timestamp()), self.config.expiry_margin_seconds
            ):
                expired.append(item)
            else:
                groups[(item.direction_id, item.test_event_code)].append(item)
        async with self.db.session() as session:
            for item in expired:
                await events_repo.mark_failure(
                    session,
                    item.log_id,
                    status=EventStatus.ERROR,
                    now=now,
                    next_attempt_at=None,
                    error_code=None,
                    error_subcode=None,
                    error_message=ev.REASON_EXPIRED,
                    hint=None,
                    response=None,
                    count_attempt=False,
                )
            targets: dict[int, tuple[str | None, str | None]] = {}
            unusable: dict[int, DomainError] = {}
            for direction_id, _ in groups:
                if direction_id is None or direction_id in targets:
                    continue
                row = await session.get(DirectionRow, direction_id)
                token = None
                if row is not None:
                    # One direction's broken token must not hold up the others' events.
                    try:
                        token, _ = await dialogs_repo.access_token_for(session, row, self.cipher)
                    except DomainError as exc:
                        unusable[direction_id] = exc
                targets[direction_id] = (row.pixel_id if row else None, token)
            unsendable = [
                item
                for (direction_id, _), items in groups.items()
                for item in items
                if direction_id is None or not all(targets.get(direction_id, (None, None)))
            ]
            for item in unsendable:
                problem = unusable.get(item.direction_id or 0)
                await events_repo.mark_failure(
                    session,
                    item.log_id,
                    status=EventStatus.ERROR,
                    now=now,
                    next_attempt_at=None,
                    error_code=None,
                    error_subcode=None,
                    error_message=(
                        problem.message
                        if problem
                        else f"{ev.REASON_NO_PIXEL} or {ev.REASON_NO_TOKEN}"
                    ),
                    hint=ev.HINT_NO_TOKEN,
                    response=None,
                    count_attempt=False,
                )
            await session.commit()
        handled = len(expired) + len(unsendable)
        for (direction_id, test_code), items in groups.items():
            if direction_id is None or not all(targets.get(direction_id, (None, None))):
                continue
            pixel, token = targets[direction_id]
            assert pixel and token
            claimed = [
                ClaimedEvent(
                    log_id=i.log_id,
                    dialog_id=i.dialog_id or 0,
                    level=i.level,
                    event_name=i.event_name,
                    event_id=i.event_id or "",
                    event_time=i.event_time or now,
                    payload=i.payload or {},
                    attempts=i.attempts,
                    direction_id=i.direction_id,
                )
                for i in items
            ]
            results = await self.deliver(claimed, pixel, token, test_code)
            await self.record(results)
            handled += len(items)
        return handled

    # -- questions about the log --------------------------------------------------------

    async def dialog_status(
        self, ref: DialogRef
    ) -> tuple[DialogContext, list[tuple[Level, bool, datetime | None, str, EventStatus | None]]]:
        async with self.db.session() as session:
            ctx = await self.load_context(session, ref, create=False)
            levels = []
            for lvl in Level:
                row = await events_repo.latest_log_row(session, ctx.dialog.id, lvl)
                levels.append(
                    (
                        lvl,
                        bool(getattr(ctx.dialog, f"capi_{lvl.column}_sent")),
                        getattr(ctx.dialog, f"capi_{lvl.column}_sent_at"),
                        getattr(ctx.dialog, f"capi_{lvl.column}_event_id") or "",
                        EventStatus(row.status) if row else None,
                    )
                )
        return ctx, levels

    async def list_events(self, **filters: Any) -> list[CapiEventLogRow]:
        async with self.db.session() as session:
            return await events_repo.list_log_rows(session, **filters)

    async def retry_events(
        self, log_ids: Sequence[int], direction_id: int | None, status: EventStatus
    ) -> int:
        if not log_ids and direction_id is None:
            raise InvalidArgument.field("event_ids", "name event ids, or a direction_id")
        async with self.db.session() as session:
            if direction_id is not None:
                await dialogs_repo.direction_by_id(session, direction_id)
            count = await events_repo.requeue(
                session,
                log_ids=log_ids,
                direction_id=direction_id,
                status=status,
                now=self.clock(),
            )
            await session.commit()
        return count


# Requests one delivery may make while isolating rejected events (about 2 log2(n) for a
# single bad event among 1,000).
SPLIT_REQUEST_BUDGET = 64
# Subcodes that reject the whole request whatever its events: splitting cannot help.
_REQUEST_WIDE_SUBCODES = frozenset({33, 2804066})


def is_per_event_error(error: MetaGraphError) -> bool:
    """A permanent error caused by some event's data (Meta's 2804xxx subcodes), which
    splitting the batch can isolate; token, permission and pixel errors are not."""
    subcode = error.error_subcode or 0
    return (
        error.code == 100
        and 2_804_000 <= subcode < 2_805_000
        and subcode not in _REQUEST_WIDE_SUBCODES
    )


def _retrieve(future: asyncio.Future[EventOutcome]) -> None:
    """Mark a failed delivery's exception as seen even when its caller has gone."""
    if not future.cancelled():
        future.exception()


# Parsing a phone number (phonenumbers) costs more than the rest of a cached call; the same
# contacts come back (every message of a dialog, every call about it), and a SendConversion
# that misses the caches normalises its phone twice. Errors are not cached.
@functools.lru_cache(maxsize=16384)
def normalize_contact(raw: str, region: str | None) -> str:
    """International digits of a contact's phone; INVALID_ARGUMENT naming contact_phone."""
    if is_already_hashed(raw.strip().lower()):
        # The phone is also the dialog's key and is hashed when sent: a hash won't do.
        raise InvalidArgument.field("contact_phone", "must be a phone number, not a hash")
    try:
        return normalize_phone(raw, region)
    except InvalidUserData as exc:
        raise InvalidArgument.field("contact_phone", str(exc)) from None


class RetryWorker:
    """Background task: sends due pending events until stopped."""

    def __init__(
        self,
        sender: SenderService,
        poll_seconds: float,
        on_error: Callable[[BaseException], Awaitable[None]] | None = None,
    ) -> None:
        self.sender = sender
        self.poll_seconds = poll_seconds
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="capi-retry-worker")

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                handled = await self.sender.process_due()
            except Exception:
                log.exception("retry worker pass failed")
                handled = 0
            if handled:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.poll_seconds)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task


def as_utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)
