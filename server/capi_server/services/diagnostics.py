"""Diagnose, GetOptimizationAdvice and the match-quality report.

Diagnose runs the seed's troubleshooting list ("events are not sent": is a pixel chosen, is
there an access token, what do the metaCapiClient logs and capi_events_log say, what do
#100 and "Invalid OAuth access token" mean) as checks and returns one finding per check, in
the checklist's order, each with what was found and what to do. Every check reads; the
only calls out are one cheap Graph GET (skipped in dry run) and, for a CRM source, the
CRM's field lists.
"""

from __future__ import annotations

import enum
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from capi_server.adapters.crm import AmoCrmClient, Bitrix24Client, CrmClient, CrmError, RetryPolicy
from capi_server.adapters.db import dialogs_repo
from capi_server.adapters.db.database import Database
from capi_server.adapters.db.orm import (
    CapiEventLogRow,
    CrmConnectionRow,
    DirectionRow,
    LeadRow,
    utcnow,
)
from capi_server.adapters.db.secrets import TokenCipher
from capi_server.adapters.db.settings_repo import SettingsRepository, direction_from_row
from capi_server.adapters.meta_graph import MetaGraphError, TokenCheckResult, hint_for
from capi_server.adapters.metrics import QueueSnapshot
from capi_server.domain import events as ev
from capi_server.domain.advice import OptimizationAdvice, WeeklyCounts, recommend
from capi_server.domain.crm import (
    CrmFieldInfo,
    CrmFieldRule,
    CrmType,
    EntityType,
    normalise_field_id,
    normalise_id,
    normalise_text,
)
from capi_server.domain.directions import PIXEL_WARNING, CapiSource, Direction
from capi_server.domain.errors import DomainError
from capi_server.domain.events import EventStatus
from capi_server.domain.levels import BUSINESS_MESSAGING_EVENT_NAMES, Level, event_name_warning

log = logging.getLogger("capi_server.diagnostics")

WINDOW = timedelta(days=7)
# A pending event older than this means the retry worker is not keeping up (or not running).
STALE_PENDING = timedelta(hours=1)
# Enough rows for a share; the newest ones describe the current setup best.
MATCH_QUALITY_SAMPLE = 5000
RATE_LIMIT_CODES = frozenset({4, 17, 341, 613, 80003, 80004})


class FindingStatus(enum.StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Finding:
    """One check of the troubleshooting list: what was found and what to do (empty if OK)."""

    check: str
    status: FindingStatus
    detail: str
    fix: str = ""


@dataclass(frozen=True, slots=True)
class MatchQuality:
    """Of the events Meta accepted: how many carried each identifier."""

    sent: int
    with_ctwa_clid: int
    with_phone: int
    with_email: int

    @staticmethod
    def share(part: int, whole: int) -> float:
        return part / whole if whole else 0.0

    @property
    def ctwa_clid_share(self) -> float:
        return self.share(self.with_ctwa_clid, self.sent)


@dataclass(frozen=True, slots=True)
class DiagnosticsConfig:
    dry_run: bool = False
    llm_model: str | None = None  # None: no LLM configured
    match_quality_ctwa_warn_share: float = 0.5


class TokenChecker(Protocol):
    async def check_token(self, pixel_id: str, access_token: str) -> TokenCheckResult: ...


CrmClientFactory = Callable[[CrmConnectionRow, TokenCipher], CrmClient]


# -- pure helpers --------------------------------------------------------------------------


def error_meaning(code: int | None, subcode: int | None) -> str:
    """What a Graph error code recorded in capi_events_log means, in the seed's terms."""
    if code is None:
        return "no Graph error code: a network failure, a timeout or a local decision"
    if code == 100:
        if subcode == 2804066:
            return "Meta does not accept this event name for action_source=business_messaging"
        if subcode == 2804003:
            return "event_time was more than 7 days old"
        if subcode == 33:
            return "the pixel does not exist or the token's user has no access to it"
        return (
            "(#100) Invalid parameter: the pixel does not exist or the token has no access "
            "to it, or an event field is malformed"
        )
    if code == 190:
        return "Invalid OAuth access token: the token expired or was invalidated"
    if code in RATE_LIMIT_CODES:
        return "Meta rate limit: too many calls for the app, the account or the pixel"
    if code == 10 or 200 <= code <= 299:
        return "the token lacks a permission for this pixel"
    return f"Graph error code {code}"


def _percent(share: float) -> str:
    return f"{round(share * 100)}%"


def _age(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} days"


def payload_identifiers(payload: Mapping[str, Any] | None) -> set[str]:
    """The user_data keys of a logged event payload that carry a value."""
    user_data = (payload or {}).get("user_data")
    if not isinstance(user_data, dict):
        return set()
    return {key for key, value in user_data.items() if value}


def build_crm_client(row: CrmConnectionRow, cipher: TokenCipher) -> CrmClient:
    """A short-lived client for one connection; few retries: a diagnosis should answer fast."""
    retry = RetryPolicy(max_attempts=2, backoff_seconds=0.2, max_wait_seconds=2.0)
    if CrmType(row.crm_type) is CrmType.AMOCRM:
        token = cipher.decrypt(row.access_token) if row.access_token else ""
        if not token:
            raise CrmError("the amoCRM connection has no access token", "auth")
        return AmoCrmClient(
            base_url=cipher.decrypt(row.base_url),
            access_token=token,
            retry=retry,
            timeout_seconds=5.0,
        )
    return Bitrix24Client(
        webhook_url=cipher.decrypt(row.base_url), retry=retry, timeout_seconds=5.0
    )


def _rule_entity_types(crm_type: CrmType, rule: CrmFieldRule) -> tuple[EntityType, ...]:
    """Where a configured field may live: amoCRM leads (DEAL) or contacts; Bitrix24 any
    entity unless the rule names one."""
    if crm_type is CrmType.AMOCRM:
        return (EntityType.DEAL, EntityType.CONTACT)
    if rule.entity_type:
        return (EntityType(rule.entity_type.strip().casefold()),)
    return (EntityType.DEAL, EntityType.LEAD, EntityType.CONTACT)


def field_problems(
    crm_type: CrmType,
    rules: Mapping[Level, Sequence[CrmFieldRule]],
    fields: Mapping[EntityType, Sequence[CrmFieldInfo]],
) -> list[str]:
    """Configured fields (and enum options) the CRM no longer has; empty when all exist."""
    by_type = {
        entity: {normalise_field_id(f.field_id): f for f in infos}
        for entity, infos in fields.items()
    }
    problems: list[str] = []
    for level, level_rules in rules.items():
        for rule in level_rules:
            key = normalise_field_id(rule.field_id)
            label = f"{level.column} field {rule.field_id}"
            if rule.field_name:
                label += f" ({rule.field_name})"
            found = next(
                (
                    by_type[entity][key]
                    for entity in _rule_entity_types(crm_type, rule)
                    if key in by_type.get(entity, {})
                ),
                None,
            )
            if found is None:
                problems.append(f"{label} no longer exists in the CRM")
                continue
            enum_ids = {normalise_id(enum_id) for enum_id, _ in found.enums}
            enum_values = {normalise_text(value) for _, value in found.enums}
            if rule.enum_id and normalise_id(rule.enum_id) not in enum_ids:
                problems.append(f"{label}: option id {rule.enum_id} no longer exists")
            elif (
                not rule.enum_id
                and rule.enum_value
                and found.enums
                and normalise_text(rule.enum_value) not in enum_values
            ):
                problems.append(f"{label}: option {rule.enum_value!r} no longer exists")
    return problems


# -- the service ---------------------------------------------------------------------------


class DiagnosticsService:
    def __init__(
        self,
        db: Database,
        cipher: TokenCipher,
        graph: TokenChecker,
        config: DiagnosticsConfig,
        *,
        crm_client_factory: CrmClientFactory = build_crm_client,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.db = db
        self.cipher = cipher
        self.graph = graph
        self.config = config
        self.crm_client_factory = crm_client_factory
        self.clock = clock

    # -- Diagnose ---------------------------------------------------------------------------

    async def diagnose(self, direction_id: int) -> list[Finding]:
        now = self.clock()
        async with self.db.session() as session:
            row = await dialogs_repo.direction_by_id(session, direction_id)
            direction = direction_from_row(row)
            findings = [self._capi_enabled(direction)]
            findings.append(await self._pixel(session, direction))
            token_finding, token = await self._access_token(session, row)
            findings.append(token_finding)
            session_findings = await self._log_findings(session, direction, now)
            source_findings: list[Finding] = []
            if direction.capi.source is CapiSource.WHATSAPP:
                source_findings += self._whatsapp_config(direction)
                source_findings.append(await self._lead_click_ids(session, direction))
            crm_row = None
            if direction.capi.source is CapiSource.CRM and direction.capi.crm_connection_id:
                crm_row = await session.get(CrmConnectionRow, direction.capi.crm_connection_id)
        # Calls out happen after the session is closed: never hold a connection on them.
        findings.append(await self._token_accepted(direction, token))
        findings += self._event_names(direction)
        findings += source_findings
        if direction.capi.source is CapiSource.CRM:
            findings += await self._crm(direction, crm_row)
        findings += session_findings
        return findings

    @staticmethod
    def _capi_enabled(direction: Direction) -> Finding:
        if not direction.capi.enabled:
            return Finding(
                "capi_enabled",
                FindingStatus.FAIL,
                "CAPI is disabled for the direction: no event is sent",
                ev.HINT_CAPI_DISABLED,
            )
        if direction.capi.source is None:
            return Finding(
                "capi_enabled",
                FindingStatus.FAIL,
                "CAPI is enabled but no source (whatsapp or crm) is chosen",
                "set capi.source to whatsapp or crm (UpdateDirection)",
            )
        return Finding(
            "capi_enabled",
            FindingStatus.OK,
            f"CAPI is enabled with source {direction.capi.source.value}",
        )

    async def _pixel(self, session: AsyncSession, direction: Direction) -> Finding:
        if not direction.pixel_id:
            return Finding(
                "pixel",
                FindingStatus.FAIL,
                "no pixel is chosen for the direction: events are skipped with 'no pixel'",
                ev.HINT_NO_PIXEL,
            )
        others = await SettingsRepository(session, self.cipher).directions_on_pixel(
            direction.user_account_id, direction.pixel_id, direction.id
        )
        if others:
            return Finding(
                "pixel",
                FindingStatus.WARN,
                f"pixel {direction.pixel_id} is also used by {others} other direction(s): "
                f"{PIXEL_WARNING}",
                "give the direction its own pixel if its audience must stay separate "
                "(ListPixelChoices shows which directions use which pixel)",
            )
        return Finding("pixel", FindingStatus.OK, f"pixel {direction.pixel_id}")

    async def _access_token(
        self, session: AsyncSession, row: DirectionRow
    ) -> tuple[Finding, str | None]:
        try:
            token, source = await dialogs_repo.access_token_for(session, row, self.cipher)
        except (ValueError, DomainError) as exc:
            return (
                Finding(
                    "access_token",
                    FindingStatus.FAIL,
                    f"the stored access token cannot be read: {exc}",
                    "put the key that encrypted it back into CAPI_ENCRYPTION_KEYS, or set "
                    "the token again",
                ),
                None,
            )
        if not token:
            return (
                Finding(
                    "access_token",
                    FindingStatus.FAIL,
                    "no access token on the direction's ad account or its user account: "
                    "events are skipped with 'no access token'",
                    ev.HINT_NO_TOKEN,
                ),
                None,
            )
        if source == "ad_account":
            detail = f"the access token of ad account {row.ad_account_id} is used"
        elif row.ad_account_id is not None:
            detail = (
                f"the user account's access token is used (fallback: ad account "
                f"{row.ad_account_id} has no token)"
            )
        else:
            detail = "the user account's access token is used (the direction has no ad account)"
        return Finding("access_token", FindingStatus.OK, detail), token

    async def _token_accepted(self, direction: Direction, token: str | None) -> Finding:
        check = "token_accepted"
        if self.config.dry_run:
            return Finding(
                check,
                FindingStatus.WARN,
                "skipped in dry run (CAPI_DRY_RUN=true): nothing is sent to Meta",
                "unset CAPI_DRY_RUN to send events and check the token",
            )
        if not direction.pixel_id or not token:
            return Finding(
                check,
                FindingStatus.WARN,
                "not checked: the pixel or the access token is missing (see above)",
                "fix the pixel and the access token first",
            )
        result = await self.graph.check_token(direction.pixel_id, token)
        if not isinstance(result, MetaGraphError):
            return Finding(
                check, FindingStatus.OK, f"Graph accepts the token for pixel {direction.pixel_id}"
            )
        code, subcode, message = result.code, result.error_subcode, result.message
        label = f"{code}/{subcode}" if subcode else str(code)
        if result.is_transient:
            return Finding(
                check,
                FindingStatus.WARN,
                f"could not check the token: {message}",
                "Graph did not answer in time or throttled the check; run Diagnose again later",
            )
        return Finding(
            check,
            FindingStatus.FAIL,
            f"Graph rejected the check (code {label}): {error_meaning(code, subcode)}. "
            f"Graph said: {message}",
            hint_for(code, subcode) or result.hint or "",
        )

    @staticmethod
    def _event_names(direction: Direction) -> list[Finding]:
        findings = []
        for level in Level:
            name = direction.capi.event_name(level)
            warning = event_name_warning(level, name)
            check = f"event_name_{level.column}"
            if warning:
                findings.append(
                    Finding(
                        check,
                        FindingStatus.WARN,
                        warning,
                        f"set capi.event_names.{level.column} to "
                        f"{BUSINESS_MESSAGING_EVENT_NAMES[level]!r} (preset business_messaging)",
                    )
                )
            else:
                findings.append(
                    Finding(check, FindingStatus.OK, f"level {level.name} is sent as {name!r}")
                )
        return findings

    # -- source: whatsapp -------------------------------------------------------------------

    def _whatsapp_config(self, direction: Direction) -> list[Finding]:
        if self.config.llm_model:
            llm = Finding(
                "llm", FindingStatus.OK, f"LLM {self.config.llm_model} judges levels 2 and 3"
            )
        else:
            llm = Finding(
                "llm",
                FindingStatus.WARN,
                "no LLM is configured: only level 1 (interest) is sent for WhatsApp dialogs",
                "set OPENAI_API_KEY (and OPENAI_BASE_URL for a compatible server)",
            )
        if (direction.qualification_prompt or "").strip():
            prompt = Finding(
                "qualification_prompt", FindingStatus.OK, "a qualification prompt is set"
            )
        else:
            prompt = Finding(
                "qualification_prompt",
                FindingStatus.WARN,
                "the direction has no qualification prompt: levels 2 and 3 are not judged",
                "set qualification_prompt (UpdateDirection); GenerateQualificationPrompt can "
                "write one from a business description",
            )
        return [llm, prompt]

    async def _lead_click_ids(self, session: AsyncSession, direction: Direction) -> Finding:
        total, with_clid, ad_without_clid = (
            await session.execute(
                select(
                    func.count(LeadRow.id),
                    func.count(LeadRow.ctwa_clid),
                    func.count(LeadRow.id).filter(LeadRow.from_ad_without_click_id.is_(True)),
                ).where(LeadRow.direction_id == direction.id)
            )
        ).one()
        if not total:
            return Finding("ctwa_clid_leads", FindingStatus.OK, "no leads yet")
        detail = (
            f"{with_clid} of {total} leads ({_percent(with_clid / total)}) came with a "
            "Click-to-WhatsApp click id (ctwa_clid)"
        )
        if ad_without_clid:
            return Finding(
                "ctwa_clid_leads",
                FindingStatus.WARN,
                f"{detail}; {ad_without_clid} lead(s) came from an ad without a click id, so "
                "their events cannot be attributed to the ad",
                "make sure the WhatsApp webhook forwards the ad referral (Evolution API: "
                "contextInfo.externalAdReply / referral; Cloud API: messages[].referral)",
            )
        return Finding("ctwa_clid_leads", FindingStatus.OK, detail)

    # -- source: crm ------------------------------------------------------------------------

    async def _crm(self, direction: Direction, row: CrmConnectionRow | None) -> list[Finding]:
        if row is None:
            return [
                Finding(
                    "crm_connection",
                    FindingStatus.FAIL,
                    "the direction has no CRM connection",
                    "create one (CreateCrmConnection) and set capi.crm_connection_id",
                )
            ]
        crm_type = CrmType(row.crm_type)
        findings = [
            Finding(
                "crm_connection",
                FindingStatus.OK,
                f"{crm_type.value} connection {row.id} ({row.portal})",
            )
        ]
        rules = {level: direction.capi.fields_for(level) for level in Level}
        entity_types: set[EntityType] = {
            entity
            for level_rules in rules.values()
            for rule in level_rules
            for entity in _rule_entity_types(crm_type, rule)
        }
        try:
            fields = await self._list_fields(row, sorted(entity_types))
        except (CrmError, ValueError) as exc:
            kind = getattr(exc, "kind", "auth")
            fix = (
                "reconnect the CRM: set a valid access token or webhook URL (UpdateCrmConnection)"
                if kind == "auth"
                else "check that the CRM is up and reachable from the server, then run "
                "Diagnose again"
            )
            findings.append(
                Finding(
                    "crm_reachable",
                    FindingStatus.FAIL,
                    f"CRM unreachable / token rejected ({kind}): {exc}",
                    fix,
                )
            )
            return findings
        findings.append(Finding("crm_reachable", FindingStatus.OK, "the CRM answers"))
        problems = field_problems(crm_type, rules, fields)
        if problems:
            findings.append(
                Finding(
                    "crm_fields",
                    FindingStatus.FAIL,
                    "; ".join(problems),
                    "choose the fields again from ListCrmFields and update the direction's "
                    "capi.<level>_fields: a rule on a missing field never matches",
                )
            )
        else:
            count = sum(len(r) for r in rules.values())
            findings.append(
                Finding(
                    "crm_fields",
                    FindingStatus.OK,
                    f"all {count} configured field(s) and options exist in the CRM",
                )
            )
        return findings

    async def _list_fields(
        self, row: CrmConnectionRow, entity_types: Iterable[EntityType]
    ) -> dict[EntityType, list[CrmFieldInfo]]:
        client = self.crm_client_factory(row, self.cipher)
        try:
            return {entity: await client.list_fields(entity) for entity in entity_types}
        finally:
            await client.aclose()

    # -- the log ----------------------------------------------------------------------------

    async def _log_findings(
        self, session: AsyncSession, direction: Direction, now: datetime
    ) -> list[Finding]:
        assert direction.id is not None
        since = now - WINDOW
        groups = (
            await session.execute(
                select(
                    CapiEventLogRow.status,
                    CapiEventLogRow.level,
                    CapiEventLogRow.error_code,
                    CapiEventLogRow.error_subcode,
                    CapiEventLogRow.error_message,
                    func.count(CapiEventLogRow.id),
                )
                .where(
                    CapiEventLogRow.direction_id == direction.id,
                    CapiEventLogRow.created_at >= since,
                )
                .group_by(
                    CapiEventLogRow.status,
                    CapiEventLogRow.level,
                    CapiEventLogRow.error_code,
                    CapiEventLogRow.error_subcode,
                    CapiEventLogRow.error_message,
                )
            )
        ).all()
        findings = [self._summary(groups)]
        findings += self._errors(groups)
        findings.append(await self._pending(session, direction.id, now))
        quality = await self.match_quality(session, direction.id, since)
        findings.append(self._match_quality(direction, quality))
        return findings

    @staticmethod
    def _summary(groups: Sequence[Any]) -> Finding:
        by_status: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        skipped_reasons: dict[str, int] = defaultdict(int)
        for status, level, _code, _subcode, message, count in groups:
            by_status[status][level] += count
            if status == EventStatus.SKIPPED.value:
                skipped_reasons[message or "unknown"] += count
        if not by_status:
            return Finding(
                "events_7d",
                FindingStatus.WARN,
                "no event in capi_events_log in the last 7 days",
                "check that the source triggers sends: WhatsApp messages reach IngestMessage "
                "or CRM webhooks reach HandleCrmWebhook, and that CAPI is enabled",
            )
        parts = []
        for status in EventStatus:
            levels = by_status.get(status.value)
            if not levels:
                continue
            per_level = ", ".join(f"L{lvl} {n}" for lvl, n in sorted(levels.items()))
            part = f"{status.value} {sum(levels.values())} ({per_level})"
            if status is EventStatus.SKIPPED:
                reasons = ", ".join(f"{r}: {n}" for r, n in sorted(skipped_reasons.items()))
                part += f" [{reasons}]"
            parts.append(part)
        detail = "last 7 days: " + "; ".join(parts)
        if by_status.get(EventStatus.ERROR.value):
            return Finding(
                "events_7d",
                FindingStatus.WARN,
                detail,
                "see the error findings below; RetryEvents resends failed events once fixed",
            )
        return Finding("events_7d", FindingStatus.OK, detail)

    @staticmethod
    def _errors(groups: Sequence[Any]) -> list[Finding]:
        """One finding per Graph error code (and subcode) among failed and retried events."""
        by_code: dict[tuple[int | None, int | None], dict[str, Any]] = {}
        for status, level, code, subcode, message, count in groups:
            if status not in (EventStatus.ERROR.value, EventStatus.PENDING.value):
                continue
            if status == EventStatus.PENDING.value and code is None and not message:
                continue  # queued for a first send, not a failure
            entry = by_code.setdefault(
                (code, subcode), {"count": 0, "levels": set(), "message": "", "final": 0}
            )
            entry["count"] += count
            entry["levels"].add(level)
            entry["message"] = entry["message"] or (message or "")
            if status == EventStatus.ERROR.value:
                entry["final"] += count
        findings = []
        for (code, subcode), entry in sorted(
            by_code.items(), key=lambda item: (-item[1]["count"], str(item[0]))
        ):
            label = "none" if code is None else (f"{code}_{subcode}" if subcode else str(code))
            levels = ", ".join(str(lvl) for lvl in sorted(entry["levels"]))
            code_text = "without a Graph code" if code is None else f"with code {label}"
            detail = (
                f"{entry['count']} event(s) of level(s) {levels} failed in the last 7 days "
                f"{code_text.replace('_', '/')}: {error_meaning(code, subcode)}"
            )
            if entry["message"]:
                detail += f". Last message: {entry['message']}"
            # Still being retried (rate limits, outages): a warning; given up on: a failure.
            transient = entry["final"] == 0
            fix = hint_for(code, subcode) or (
                "see error_message in ListEvents; fix the cause, then RetryEvents"
            )
            findings.append(
                Finding(
                    f"error_{label}",
                    FindingStatus.WARN if transient else FindingStatus.FAIL,
                    detail,
                    fix,
                )
            )
        return findings

    async def _pending(self, session: AsyncSession, direction_id: int, now: datetime) -> Finding:
        snapshot = await self._queue(session, now, direction_id)
        if not snapshot.depth:
            return Finding("pending", FindingStatus.OK, "no event is waiting to be sent")
        age = timedelta(seconds=snapshot.oldest_pending_age_seconds)
        detail = f"{snapshot.depth} event(s) waiting to be sent; the oldest for {_age(age)}"
        if age >= STALE_PENDING:
            return Finding(
                "pending",
                FindingStatus.WARN,
                detail,
                "check that the retry worker runs (CAPI_RETRY_WORKER_ENABLED) and the errors "
                "above; Meta refuses events older than 7 days",
            )
        return Finding("pending", FindingStatus.OK, detail)

    async def _queue(
        self, session: AsyncSession, now: datetime, direction_id: int | None = None
    ) -> QueueSnapshot:
        stmt = select(func.count(CapiEventLogRow.id), func.min(CapiEventLogRow.created_at)).where(
            CapiEventLogRow.status == EventStatus.PENDING.value
        )
        if direction_id is not None:
            stmt = stmt.where(CapiEventLogRow.direction_id == direction_id)
        depth, oldest = (await session.execute(stmt)).one()
        age = max((now - _as_utc(oldest)).total_seconds(), 0.0) if oldest else 0.0
        return QueueSnapshot(depth=int(depth), oldest_pending_age_seconds=age)

    async def queue_snapshot(self) -> QueueSnapshot:
        """The whole retry queue, for the metrics endpoint."""
        async with self.db.session() as session:
            return await self._queue(session, self.clock())

    # -- match quality ----------------------------------------------------------------------

    async def match_quality(
        self, session: AsyncSession, direction_id: int, since: datetime
    ) -> MatchQuality:
        payloads = (
            await session.execute(
                select(CapiEventLogRow.payload)
                .where(
                    CapiEventLogRow.direction_id == direction_id,
                    CapiEventLogRow.status == EventStatus.SUCCESS.value,
                    CapiEventLogRow.created_at >= since,
                )
                .order_by(CapiEventLogRow.id.desc())
                .limit(MATCH_QUALITY_SAMPLE)
            )
        ).scalars()
        sent = clid = phone = email = 0
        for payload in payloads:
            keys = payload_identifiers(payload)
            sent += 1
            clid += "ctwa_clid" in keys
            phone += "ph" in keys
            email += "em" in keys
        return MatchQuality(sent, clid, phone, email)

    def _match_quality(self, direction: Direction, quality: MatchQuality) -> Finding:
        if not quality.sent:
            return Finding(
                "match_quality", FindingStatus.OK, "no event was sent in the last 7 days"
            )
        detail = (
            f"of {quality.sent} event(s) Meta accepted in the last 7 days: "
            f"{_percent(quality.ctwa_clid_share)} with ctwa_clid, "
            f"{_percent(quality.share(quality.with_phone, quality.sent))} with phone (ph), "
            f"{_percent(quality.share(quality.with_email, quality.sent))} with email (em)"
        )
        threshold = self.config.match_quality_ctwa_warn_share
        # Only WhatsApp leads come from Click-to-WhatsApp ads; CRM leads are matched by phone
        # and email, and a low click-id share there says nothing about the setup.
        if direction.capi.source is CapiSource.WHATSAPP and quality.ctwa_clid_share < threshold:
            return Finding(
                "match_quality",
                FindingStatus.WARN,
                f"{detail}; below the {_percent(threshold)} click-id threshold: Meta can "
                "attribute fewer conversions to the ad",
                "events without ctwa_clid are matched by phone only; check that leads come "
                "from Click-to-WhatsApp ads and that the webhook forwards the ad referral "
                "(see ctwa_clid_leads)",
            )
        return Finding("match_quality", FindingStatus.OK, detail)

    # -- GetOptimizationAdvice --------------------------------------------------------------

    async def advice(self, direction_id: int) -> tuple[OptimizationAdvice, list[WeeklyCounts]]:
        now = self.clock()
        last_start, previous_start = now - WINDOW, now - 2 * WINDOW
        async with self.db.session() as session:
            row = await dialogs_repo.direction_by_id(session, direction_id)
            direction = direction_from_row(row)
            rows = (
                await session.execute(
                    select(
                        CapiEventLogRow.level,
                        func.count(CapiEventLogRow.id).filter(
                            CapiEventLogRow.created_at >= last_start
                        ),
                        func.count(CapiEventLogRow.id).filter(
                            CapiEventLogRow.created_at < last_start
                        ),
                    )
                    .where(
                        CapiEventLogRow.direction_id == direction_id,
                        CapiEventLogRow.status == EventStatus.SUCCESS.value,
                        CapiEventLogRow.created_at >= previous_start,
                        CapiEventLogRow.created_at <= now,
                    )
                    .group_by(CapiEventLogRow.level)
                )
            ).all()
        found = {int(level): (int(last), int(previous)) for level, last, previous in rows}
        counts = [
            WeeklyCounts(
                level,
                direction.capi.event_name(level),
                *found.get(int(level), (0, 0)),
            )
            for level in Level
        ]
        return recommend({c.level: c for c in counts}), counts


def _as_utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)
