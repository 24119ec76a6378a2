"""WhatsApp source use cases: IngestMessage, AnalyzeDialog, review, prompt generation.

The seed's qualificationAgent: analyzeQualification + processDialogForCapi +
getDialogForCapi + getDirectionCapiSettings. Level 1 is a rule (2+ client messages);
levels 2-3 come from the LLM; the sender sends reached levels exactly once.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import select, update

from capi_server.adapters.db import dialogs_repo
from capi_server.adapters.db.database import Database, is_lock_conflict, is_transient_db_error
from capi_server.adapters.db.driver import AutocommitPool
from capi_server.adapters.db.events_repo import db_text
from capi_server.adapters.db.orm import (
    DialogAnalysisRow,
    DialogMessageRow,
    DirectionRow,
    utcnow,
)
from capi_server.adapters.llm import GeneratedPrompt, LlmAnalysis, LlmUnavailable
from capi_server.domain.directions import CapiSource
from capi_server.domain.errors import (
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from capi_server.domain.events import EventOutcome
from capi_server.domain.levels import Level, LevelDecision
from capi_server.domain.payloads import MAX_EVENT_AGE_SECONDS
from capi_server.domain.qualification import DialogMessage, interest_reached_by_count
from capi_server.domain.whatsapp_webhooks import (
    InboundMessage,
    InvalidWebhook,
    SkippedWebhook,
    parse_whatsapp_webhook,
)
from capi_server.services.batching import Batcher, run_isolating
from capi_server.services.hot_cache import DirectionSnapshot
from capi_server.services.sender import DialogRef, SenderService, SendOptions, normalize_contact

log = logging.getLogger("capi_server.qualification")

MAX_TEXT_BYTES = 64 * 1024
# dialog_messages.message_id is varchar(128).
MAX_MESSAGE_ID_CHARS = 128
MAX_MESSAGES_FOR_LLM = 200
MAX_DESCRIPTION_BYTES = 8 * 1024
# Messages stored per transaction at most when many IngestMessage calls run at once.
MAX_INGEST_BATCH = 256

REASON_LLM_NOT_CONFIGURED = "LLM not configured"
REASON_NO_PROMPT = "no qualification prompt"
REASON_NOTHING_NEW = "no new client message since the last analysis"
REASON_ALL_SENT = "levels 2-3 are already sent"


class QualificationLlm(Protocol):
    model: str

    async def analyze(self, qualification_prompt: str, messages: Any) -> LlmAnalysis: ...

    async def generate_prompt(
        self, business_description: str, language: str
    ) -> GeneratedPrompt: ...


@dataclass(frozen=True, slots=True)
class IncomingMessage:
    """IngestMessage's explicit fields."""

    direction_id: int | None
    instance_name: str | None
    contact_phone: str
    message_id: str
    from_me: bool
    text: str
    sent_at: datetime | None
    ctwa_clid: str | None


@dataclass(frozen=True, slots=True)
class _QueuedMessage:
    message: InboundMessage
    direction_id: int | None
    fallback_instance: str | None


@dataclass(frozen=True, slots=True)
class IngestResult:
    dialog_id: int | None = None
    lead_id: int | None = None
    stored: bool = False
    skipped_reason: str = ""
    has_ctwa_clid: bool = False


@dataclass
class AnalysisResult:
    dialog_id: int
    levels: list[LevelDecision] = field(default_factory=list)
    held: set[Level] = field(default_factory=set)
    evidence: dict[Level, list[str]] = field(default_factory=dict)
    events: list[EventOutcome] = field(default_factory=list)
    llm_called: bool = False
    llm_skipped_reason: str = ""
    model: str = ""
    confidence: float = 0.0
    skipped_reason: str = ""


def _isolates_ingest_error(error: Exception) -> bool:
    """Messages stored one by one isolate a failed batch's cause, unless the database is
    unreachable (then every message fails alike)."""
    return not is_transient_db_error(error)


def _stored_form(message: InboundMessage, now: datetime) -> tuple[str, bool, str, str, datetime]:
    """(message_id, from_me, text, message_type, sent_at) as dialog_messages stores them."""
    return (
        message.message_id,
        message.from_me,
        db_text(message.text),
        message.message_type[:32],
        datetime.fromtimestamp(message.sent_at, UTC) if message.sent_at else now,
    )


def _answer(
    keys: dialogs_repo.DialogKeys, message_id: str, inserted: set[tuple[int, str]], clid: bool
) -> IngestResult:
    """A batch's answer for one message; `inserted` is what the batch stored, less the
    messages answered already (a repeat in the same batch was not stored)."""
    key = (keys.dialog_id, message_id)
    is_new = key in inserted
    inserted.discard(key)
    return IngestResult(
        dialog_id=keys.dialog_id,
        lead_id=keys.lead_id,
        stored=is_new,
        skipped_reason="" if is_new else "message already stored",
        has_ctwa_clid=clid,
    )


def _instance_of(item: _QueuedMessage) -> str | None:
    """The instance that names a queued message's direction (when no direction_id does)."""
    instance = item.message.instance_name or item.fallback_instance
    if item.direction_id is None and not instance:
        raise InvalidArgument.field(
            "instance_name", "the webhook names no instance; pass instance_name"
        )
    return instance


def _contact_in(
    snapshot: DirectionSnapshot, message: InboundMessage
) -> tuple[DirectionSnapshot, str, str | None]:
    """(direction, contact key, normalised phone) of a message of the direction."""
    if not message.contact_phone:
        return snapshot, message.contact_key, None
    phone = normalize_contact(message.contact_phone, snapshot.default_region)
    return snapshot, phone, phone


class WhatsAppService:
    def __init__(
        self,
        db: Database,
        sender: SenderService,
        llm: QualificationLlm | None,
        *,
        dry_run: bool = False,
        batch_linger_seconds: float = 0.0,
    ) -> None:
        self.db = db
        self.sender = sender
        self.llm = llm
        self.dry_run = dry_run
        # Concurrent IngestMessage calls share a transaction (group commit).
        self._ingest: Batcher[_QueuedMessage, IngestResult] = Batcher(
            self._store,
            max_batch=MAX_INGEST_BATCH,
            retry_alone=_isolates_ingest_error,
            run_again=is_lock_conflict,
            linger_seconds=batch_linger_seconds,
            name="store_messages",
        )
        # Concurrent AnalyzeDialog calls read their dialog rows in one query.
        self._dialog_reader: Batcher[int, dialogs_repo.DialogState] = Batcher(
            self._read_dialogs,
            max_batch=MAX_INGEST_BATCH,  # also the most calls in flight
            linger_seconds=batch_linger_seconds,
            name="read_dialogs",
        )
        # One LLM analysis per dialog at a time: later callers share the running one.
        self._inflight: dict[tuple[int, bool, bool], asyncio.Task[AnalysisResult]] = {}

    async def aclose(self) -> None:
        """Waits for the batches and analyses in progress (called at shutdown)."""
        await self._ingest.aclose()
        await self._dialog_reader.aclose()
        if self._inflight:
            await asyncio.gather(*self._inflight.values(), return_exceptions=True)

    # -- IngestMessage ------------------------------------------------------------------

    async def ingest_raw(
        self, raw: str, direction_id: int | None, instance_name: str | None
    ) -> IngestResult:
        try:
            parsed = parse_whatsapp_webhook(raw)
        except InvalidWebhook as exc:
            raise InvalidArgument.field(
                f"raw_evolution_event.{exc.field}"
                if exc.field != "body"
                else "raw_evolution_event",
                exc.reason,
            ) from None
        messages = [m for m in parsed if isinstance(m, InboundMessage)]
        if not messages:
            skipped = next((m for m in parsed if isinstance(m, SkippedWebhook)), None)
            return IngestResult(
                skipped_reason=skipped.reason if skipped else "no message in the webhook"
            )
        results = await self._ingest.submit_many(
            [_QueuedMessage(m, direction_id, instance_name) for m in messages]
        )
        return results[0]

    async def ingest(self, message: IncomingMessage) -> IngestResult:
        if not message.message_id.strip():
            raise InvalidArgument.field("message_id", "is required")
        if len(message.message_id) > MAX_MESSAGE_ID_CHARS:
            raise InvalidArgument.field("message_id", "must be at most 128 characters")
        if len(message.text.encode()) > MAX_TEXT_BYTES:
            raise InvalidArgument.field("text", "must be at most 64 KiB")
        if message.direction_id is None and not message.instance_name:
            raise InvalidArgument.field("instance_name", "name the direction or its instance")
        if not message.contact_phone.strip():
            raise InvalidArgument.field("contact_phone", "is required")
        if message.ctwa_clid is not None and len(message.ctwa_clid) > 1024:
            raise InvalidArgument.field("ctwa_clid", "must be at most 1024 characters")
        inbound = InboundMessage(
            source="evolution",
            instance_name=message.instance_name,
            message_id=message.message_id.strip(),
            contact_phone=message.contact_phone.strip(),
            contact_lid=None,
            from_me=message.from_me,
            text=message.text,
            message_type="text",
            sent_at=int(message.sent_at.timestamp()) if message.sent_at else None,
            ctwa_clid=message.ctwa_clid,
            from_ad_without_click_id=False,
            push_name=None,
        )
        return await self._ingest.submit(_QueuedMessage(inbound, message.direction_id, None))

    async def _store(self, queued: list[_QueuedMessage]) -> list[IngestResult | Exception]:
        """A batch of messages: on PostgreSQL one self-committing statement when the
        batch allows it (see _store_in_one_statement), else one transaction of a few
        statements whatever the number of messages."""
        if self.db.autocommit_pool is not None:  # PostgreSQL
            stored = await self._store_in_one_statement(self.db.autocommit_pool, queued)
            if stored is not None:
                return stored
        return await self._store_in_transaction(queued)

    async def _store_in_one_statement(
        self, pool: AutocommitPool, queued: list[_QueuedMessage]
    ) -> list[IngestResult | Exception] | None:
        """dialogs_repo.ingest_batch: one round trip for the whole batch (when its
        directions are cached). None (nothing written) when a message carries a click id
        or an ad without one: those update the lead, on the transaction path. Contacts
        another transaction created meanwhile are stored by the transaction path, after
        this statement."""
        if any(
            i.message.ctwa_clid
            or i.message.from_ad_without_click_id
            # A longer id is refused by the varchar(128) column, or cut when the rest is
            # spaces: two such ids, distinct in Python, would be one row, counted twice
            # in a new dialog's counters. The transaction path counts what it stored.
            or len(i.message.message_id) > MAX_MESSAGE_ID_CHARS
            for i in queued
        ):
            return None
        now = utcnow()
        results: list[IngestResult | Exception] = []
        contacts: dict[dialogs_repo.ContactKey, dialogs_repo.NewContact] = {}
        messages: dict[tuple[dialogs_repo.ContactKey, str], dialogs_repo.ContactMessage] = {}
        keyed: list[tuple[int, dialogs_repo.ContactKey, InboundMessage]] = []
        contacts_of = await self._contacts_of(queued)
        for i, (item, found) in enumerate(zip(queued, contacts_of, strict=True)):
            if isinstance(found, DomainError):
                results.append(found)
                continue
            message = item.message
            snapshot, contact_key, phone = found
            key = (snapshot.direction_id, contact_key)
            contacts.setdefault(
                key,
                dialogs_repo.NewContact(
                    snapshot.direction_id, snapshot.direction.instance_name, contact_key, phone
                ),
            )
            # The same message twice in one batch: the first one counts.
            messages.setdefault(
                (key, message.message_id),
                dialogs_repo.ContactMessage(key, *_stored_form(message, now)),
            )
            keyed.append((i, key, message))
            results.append(IngestResult())
        if contacts:
            written = await dialogs_repo.ingest_batch(
                pool, list(contacts.values()), list(messages.values()), now=now
            )
        else:
            written = dialogs_repo.IngestedBatch({}, set(), {})
        for (_, contact_key), ensured in written.dialogs.items():
            self.sender.cache.remember_dialog(contact_key, ensured)
        inserted = written.stored
        left: list[int] = []
        for i, key, message in keyed:
            keys = written.dialogs.get(key)
            if keys is None:  # created by another transaction meanwhile
                left.append(i)
                continue
            results[i] = _answer(
                keys, message.message_id, inserted, bool(written.ctwa_clids.get(keys.lead_id))
            )
        if left:
            rest = await self._store_after_commit([queued[i] for i in left])
            for i, result in zip(left, rest, strict=True):
                results[i] = result
        return results

    async def _store_after_commit(
        self, queued: list[_QueuedMessage]
    ) -> list[IngestResult | Exception]:
        """_store_in_transaction for what the one-statement batch left, once it has
        committed: errors stay with these messages' callers (the batch must not run again,
        or its committed messages would be answered "already stored"), handled as the
        batch's own errors are."""
        return list(
            await run_isolating(
                self._store_in_transaction,
                queued,
                retry_alone=_isolates_ingest_error,
                run_again=is_lock_conflict,
                name="store_messages",
            )
        )

    async def _contacts_of(
        self, queued: list[_QueuedMessage]
    ) -> list[tuple[DirectionSnapshot, str, str | None] | DomainError]:
        """_contact_of of each message (or its error); a session only when a direction
        is not cached."""
        found: list[tuple[DirectionSnapshot, str, str | None] | DomainError | None] = []
        for item in queued:
            try:
                snapshot = self.sender.cache.cached_direction(item.direction_id, _instance_of(item))
                found.append(None if snapshot is None else _contact_in(snapshot, item.message))
            except DomainError as exc:
                found.append(exc)
        if all(f is not None for f in found):
            return [f for f in found if f is not None]
        async with self.db.session() as session:
            for i, item in enumerate(queued):
                if found[i] is None:
                    try:
                        found[i] = await self._contact_of(session, item)
                    except DomainError as exc:
                        found[i] = exc
        return [f for f in found if f is not None]

    async def _store_in_transaction(
        self, queued: list[_QueuedMessage]
    ) -> list[IngestResult | Exception]:
        """One transaction for all: a few statements whatever the number of messages."""
        now = utcnow()
        results: list[IngestResult | Exception] = []
        async with self.db.session() as session:
            # Per message: its direction and contact; a bad one fails alone.
            contacts: list[tuple[DirectionSnapshot, str, str | None]] = []
            messages: list[InboundMessage] = []
            for item in queued:
                try:
                    contacts.append(await self._contact_of(session, item))
                except DomainError as exc:
                    results.append(exc)
                    continue
                messages.append(item.message)
                results.append(IngestResult())
            found = await self.sender.dialog_keys_many(session, contacts, create=True)
            stored = [(m, k) for m, k in zip(messages, found, strict=True) if k is not None]
            await dialogs_repo.set_lead_ctwa_clids(
                session, [(k.lead_id, m.ctwa_clid) for m, k in stored if m.ctwa_clid], now=now
            )
            await dialogs_repo.mark_from_ad_without_click_id(
                session,
                {k.lead_id for m, k in stored if m.from_ad_without_click_id and not m.ctwa_clid},
                now=now,
            )
            rows: dict[tuple[int, str], dialogs_repo.NewMessage] = {}
            for message, keys in stored:
                # The same message twice in one batch: the first one counts.
                rows.setdefault(
                    (keys.dialog_id, message.message_id),
                    dialogs_repo.NewMessage(keys.dialog_id, *_stored_form(message, now)),
                )
            written = await dialogs_repo.store_messages(
                session,
                list(rows.values()),
                now=now,
                clids_of={k.lead_id for m, k in stored if not m.ctwa_clid},
            )
            await session.commit()
        inserted, clids = written.stored, written.ctwa_clids
        outcomes = iter(stored)
        for i, result in enumerate(results):
            if isinstance(result, Exception):
                continue
            message, keys = next(outcomes)
            results[i] = _answer(
                keys,
                message.message_id,
                inserted,
                bool(message.ctwa_clid or clids.get(keys.lead_id)),
            )
        return results

    async def _contact_of(
        self, session: Any, item: _QueuedMessage
    ) -> tuple[DirectionSnapshot, str, str | None]:
        """(direction, contact key, normalised phone) of a queued message."""
        snapshot = await self.sender.cache.direction(
            session, direction_id=item.direction_id, instance_name=_instance_of(item)
        )
        return _contact_in(snapshot, item.message)

    # -- AnalyzeDialog ------------------------------------------------------------------

    async def analyze(self, ref: DialogRef, *, dry_run: bool, force: bool) -> AnalysisResult:
        """Coalesces concurrent calls for one dialog into one analysis (one LLM call)."""
        if ref.dialog_id is not None:
            dialog_id = ref.dialog_id
        else:
            async with self.db.session() as session:
                _, keys = await self.sender.resolve_dialog(session, ref, create=False)
                await session.commit()
            if keys is None:
                raise NotFound(
                    "no dialog for this instance and phone",
                    reason="DIALOG_NOT_FOUND",
                    metadata={"instance_name": ref.instance_name or ""},
                )
            dialog_id = keys.dialog_id
        # Most calls need no LLM (nothing new since the last analysis): decided from the
        # dialog's row (read with the other calls' rows) and answered in this task.
        dialog = await self._dialog_reader.submit(dialog_id)
        snapshot = await self.sender.direction(dialog.direction_id)
        skip_llm = self._llm_skip_reason(dialog, snapshot, force)
        if skip_llm:
            return await self._decide(dialog, snapshot, skip_llm, dry_run=dry_run)
        key = (dialog_id, dry_run, force)
        running = self._inflight.get(key)
        if running is None:
            # Its own task: a caller that gives up (deadline) does not cancel the analysis
            # for the others that joined it.
            running = asyncio.create_task(self._analyze(dialog_id, dry_run=dry_run, force=force))
            self._inflight[key] = running
            running.add_done_callback(lambda task: self._finished(key, task))
        return await asyncio.shield(running)

    def _finished(self, key: tuple[int, bool, bool], task: asyncio.Task[AnalysisResult]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # seen, even when every caller has gone

    async def _read_dialogs(
        self, dialog_ids: list[int]
    ) -> list[dialogs_repo.DialogState | Exception]:
        """The dialog states of concurrent AnalyzeDialog calls, in one query."""
        if self.db.autocommit_pool is not None:
            states = await dialogs_repo.dialog_states(self.db.autocommit_pool, dialog_ids)
        else:
            async with self.db.autocommit() as connection:
                states = await dialogs_repo.dialog_states(connection, dialog_ids)
        return [
            states.get(dialog_id)
            or NotFound(f"dialog {dialog_id} not found", reason="DIALOG_NOT_FOUND")
            for dialog_id in dialog_ids
        ]

    def _llm_skip_reason(
        self, dialog: dialogs_repo.DialogState, snapshot: DirectionSnapshot, force: bool
    ) -> str:
        """Why this call will not ask the LLM ("" when it will)."""
        capi = snapshot.direction.capi
        if not capi.enabled:
            return "CAPI disabled for the direction"
        if capi.source is CapiSource.CRM:
            return "direction source is crm"
        nothing_new = dialog.client_message_count <= dialog.analyzed_client_message_count
        if self.llm is None:
            return REASON_LLM_NOT_CONFIGURED
        if not snapshot.direction.qualification_prompt:
            return REASON_NO_PROMPT
        if dialog.capi_qualified_event_id and dialog.capi_scheduled_event_id:
            return REASON_ALL_SENT
        if nothing_new and not force and dialog.analyzed_at is not None:
            return REASON_NOTHING_NEW
        if dialog.client_message_count == 0:
            return "no client message yet"
        return ""

    async def _analyze(self, dialog_id: int, *, dry_run: bool, force: bool) -> AnalysisResult:
        # Read again: the state may have moved while this call waited to start.
        dialog = await self._dialog_reader.submit(dialog_id)
        snapshot = await self.sender.direction(dialog.direction_id)
        skip_llm = self._llm_skip_reason(dialog, snapshot, force)
        return await self._decide(dialog, snapshot, skip_llm, dry_run=dry_run)

    async def _decide(
        self,
        dialog: dialogs_repo.DialogState,
        snapshot: DirectionSnapshot,
        skip_llm: str,
        *,
        dry_run: bool,
    ) -> AnalysisResult:
        """`skip_llm`: `_llm_skip_reason` of this dialog and direction ("" to ask the LLM).
        The dialog row and the (cached) direction are all the decision needs; the messages
        are read only when the LLM is called."""
        dialog_id = dialog.id
        result = AnalysisResult(dialog_id=dialog_id)
        capi = snapshot.direction.capi
        if not capi.enabled or capi.source is CapiSource.CRM:
            # Nothing to decide: the reason is the whole answer.
            result.skipped_reason = skip_llm
            return result
        rule = interest_reached_by_count(dialog.client_message_count)
        prompt = snapshot.direction.qualification_prompt
        analysis: LlmAnalysis | None = None
        messages: list[DialogMessage] = []
        if not skip_llm:
            # Logged when there is an analysis to start; the "complete" line below too, and
            # at DEBUG (with the reason) when the LLM was not asked: chatbot-service calls
            # after every reply, and the answer carries the reason anyway.
            log.info(
                "[qualificationAgent] Starting qualification analysis",
                extra={"dialogId": dialog.id},
            )
            async with self.db.session() as session:
                rows = (
                    await session.execute(
                        select(DialogMessageRow)
                        .where(DialogMessageRow.dialog_id == dialog.id)
                        .order_by(DialogMessageRow.sent_at.desc(), DialogMessageRow.id.desc())
                        .limit(MAX_MESSAGES_FOR_LLM)
                    )
                ).scalars()
                messages = [
                    DialogMessage(r.message_id, r.from_me, r.text, int(r.sent_at.timestamp()))
                    for r in reversed(list(rows))
                ]
        analyzed_count = dialog.client_message_count
        held_levels: dict[str, Any] = dict(dialog.held_levels or {})
        stored_flags = {
            Level.QUALIFIED: dialog.is_qualified,
            Level.SCHEDULED: dialog.is_scheduled,
        }
        stored_analysis: dict[str, Any] = dict(dialog.analysis or {})
        threshold = capi.review_confidence_threshold
        last_message_at = dialog.last_message_at
        # The LLM call runs outside any database transaction.
        if not skip_llm:
            assert self.llm is not None and prompt is not None
            result.llm_called = True
            try:
                analysis = await self.llm.analyze(prompt, messages)
            except LlmUnavailable as exc:
                result.llm_skipped_reason = f"LLM failed: {exc.reason}"
        else:
            result.llm_skipped_reason = skip_llm
        decisions: dict[Level, LevelDecision] = {Level.INTEREST: rule}
        if analysis is not None:
            verdict = analysis.verdict
            result.model = analysis.model
            result.confidence = verdict.confidence
            for level in (Level.QUALIFIED, Level.SCHEDULED):
                decisions[level] = verdict.decision(level)
                if decisions[level].reached:
                    result.evidence[level] = list(verdict.evidence_message_ids)
            for level in (Level.QUALIFIED, Level.SCHEDULED):
                if (
                    decisions[level].reached
                    and threshold > 0
                    and verdict.confidence < threshold
                    and held_levels.get(str(int(level)), {}).get("state") != "approved"
                ):
                    result.held.add(level)
                    held_levels[str(int(level))] = {
                        "state": "held",
                        "confidence": verdict.confidence,
                        "reason": decisions[level].reason,
                    }
            await self._store_analysis(dialog_id, analysis, analyzed_count, held_levels)
        else:
            for level in (Level.QUALIFIED, Level.SCHEDULED):
                reason = stored_analysis.get(f"{level.column}_reason") or (
                    result.llm_skipped_reason or "not judged"
                )
                decisions[level] = LevelDecision(level, stored_flags[level], reason)
                if held_levels.get(str(int(level)), {}).get("state") == "held":
                    result.held.add(level)
            result.model = str(stored_analysis.get("model", ""))
            result.confidence = float(stored_analysis.get("confidence", 0.0))
        result.levels = [decisions[level] for level in Level]
        target = max(
            (d.level for d in result.levels if d.reached and d.level not in result.held),
            default=None,
        )
        log_level = logging.INFO if result.llm_called else logging.DEBUG
        if log.isEnabledFor(log_level):  # most calls: DEBUG, off; not even the record's fields
            log.log(
                log_level,
                "[qualificationAgent] Qualification analysis complete",
                extra={
                    "dialogId": dialog_id,
                    "isInterested": decisions[Level.INTEREST].reached,
                    "isQualified": decisions[Level.QUALIFIED].reached,
                    "isScheduled": decisions[Level.SCHEDULED].reached,
                    "llmCalled": result.llm_called,
                    "llmSkippedReason": result.llm_skipped_reason,
                },
            )
        if target is not None:
            result.events = await self._send(dialog_id, target, last_message_at, dry_run)
        return result

    async def _send(
        self, dialog_id: int, level: Level, last_message_at: datetime | None, dry_run: bool
    ) -> list[EventOutcome]:
        now = utcnow()
        event_time = last_message_at if last_message_at and last_message_at <= now else now
        if (now - event_time).total_seconds() > MAX_EVENT_AGE_SECONDS / 2:
            event_time = now
        report = await self.sender.send(
            DialogRef(dialog_id=dialog_id),
            level,
            SendOptions(event_time=event_time, dry_run=dry_run or self.dry_run, source="whatsapp"),
        )
        return report.outcomes

    async def _store_analysis(
        self,
        dialog_id: int,
        analysis: LlmAnalysis,
        analyzed_count: int,
        held_levels: dict[str, Any],
    ) -> None:
        verdict = analysis.verdict
        async with self.db.session() as session:
            await session.execute(
                update(DialogAnalysisRow)
                .where(DialogAnalysisRow.id == dialog_id)
                .values(
                    is_interested=verdict.is_interested,
                    is_qualified=verdict.is_qualified,
                    is_scheduled=verdict.is_scheduled,
                    analysis={
                        "interest_reason": verdict.interested_reason,
                        "qualified_reason": verdict.qualified_reason,
                        "scheduled_reason": verdict.scheduled_reason,
                        "answered_questions": list(verdict.answered_questions),
                        "evidence_message_ids": list(verdict.evidence_message_ids),
                        "model": analysis.model,
                        "confidence": verdict.confidence,
                        "prompt_tokens": analysis.prompt_tokens,
                        "completion_tokens": analysis.completion_tokens,
                    },
                    analysis_model=analysis.model[:100],
                    analysis_prompt_version=analysis.prompt_version[:32],
                    analysis_confidence=verdict.confidence,
                    analyzed_at=utcnow(),
                    analyzed_client_message_count=analyzed_count,
                    held_levels=held_levels,
                    updated_at=utcnow(),
                )
            )
            await session.commit()

    # -- review -------------------------------------------------------------------------

    async def review(self, dialog_id: int, level: Level, approve: bool) -> list[EventOutcome]:
        async with self.db.session() as session:
            dialog = await session.get(DialogAnalysisRow, dialog_id)
            if dialog is None:
                raise NotFound(f"dialog {dialog_id} not found", reason="DIALOG_NOT_FOUND")
            held = dict(dialog.held_levels or {})
            entry = held.get(str(int(level)))
            if not entry or entry.get("state") != "held":
                raise FailedPrecondition(
                    f"level {level.name} of dialog {dialog_id} is not held for review",
                    reason="LEVEL_NOT_HELD",
                )
            held[str(int(level))] = {**entry, "state": "approved" if approve else "dropped"}
            dialog.held_levels = held
            last_message_at = dialog.last_message_at
            await session.commit()
        if not approve:
            return []
        return await self._send(dialog_id, level, last_message_at, dry_run=False)

    # -- GenerateQualificationPrompt ----------------------------------------------------

    async def generate_prompt(
        self, direction_id: int, business_description: str, language: str
    ) -> GeneratedPrompt:
        if not business_description.strip():
            raise InvalidArgument.field("business_description", "is required")
        if len(business_description.encode()) > MAX_DESCRIPTION_BYTES:
            raise InvalidArgument.field("business_description", "must be at most 8 KiB")
        language = (language or "ru").strip().lower()
        if not language.isalpha() or len(language) > 8:
            raise InvalidArgument.field("language", "must be a language code such as ru or en")
        async with self.db.session() as session:
            await dialogs_repo.direction_by_id(session, direction_id)
        if self.llm is None:
            raise FailedPrecondition(
                "LLM not configured: set OPENAI_API_KEY", reason="LLM_NOT_CONFIGURED"
            )
        try:
            generated = await self.llm.generate_prompt(business_description, language)
        except LlmUnavailable as exc:
            if exc.is_transient:
                raise Unavailable(
                    f"LLM unavailable: {exc.reason}", reason="LLM_UNAVAILABLE"
                ) from None
            raise FailedPrecondition(f"LLM failed: {exc.reason}", reason="LLM_FAILED") from None
        async with self.db.session() as session:
            await session.execute(
                update(DirectionRow)
                .where(DirectionRow.id == direction_id)
                .values(qualification_prompt=db_text(generated.text), updated_at=utcnow())
            )
            await session.commit()
        self.sender.cache.forget_directions()
        return generated
