"""CRM source use cases: CheckCrmFields, HandleCrmWebhook, ReconcileCrm, ListCrmFields.

One flow serves all three entry points (issue 5, the seed's getCrmQualificationStatus):
1. the entity is read live through REST (webhook payload values are stale or partial);
2. the direction's capi_<level>_fields are matched with OR logic (domain.crm);
3. the lead and dialog of the contact's phone are found or created, and the lead
   remembers the CRM entity (leads.crm_entity_type / crm_entity_id);
4. the HIGHEST matched level goes through the sender, which sends it together with every
   unsent lower level, exactly once per (dialog, level), in batches of up to 1,000 events.

Everything a call names (one check, a webhook naming 1,000 deals, a reconciliation run)
ends in ONE `SenderService.send_many` call, so a mass update costs one Graph request per
1,000 events. CRM reads run with bounded concurrency and share one client (and so one
rate limiter) per connection.

CRM errors become domain errors: auth -> FAILED_PRECONDITION, entity missing -> NOT_FOUND,
rate limits / outages / garbage -> UNAVAILABLE (garbage is usually a proxy or maintenance
page, which passes). Auth and garbage also leave an `error` row in capi_events_log with the
response excerpt (secrets scrubbed), so the business sees why its events stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TypeVar
from urllib.parse import urlsplit

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from capi_server.adapters.crm import (
    AmoCrmClient,
    AsyncRateLimiter,
    Bitrix24Client,
    CrmClient,
    CrmError,
    RetryPolicy,
)
from capi_server.adapters.crm.amocrm import AMOCRM_RATE_PER_SECOND
from capi_server.adapters.crm.bitrix24 import BITRIX24_BURST, BITRIX24_RATE_PER_SECOND
from capi_server.adapters.crm.observed import ObservedCrmClient
from capi_server.adapters.db import dialogs_repo, events_repo
from capi_server.adapters.db.database import Database
from capi_server.adapters.db.orm import CrmConnectionRow, DirectionRow, LeadRow, utcnow
from capi_server.adapters.db.secrets import TokenCipher, UndecryptableSecret
from capi_server.adapters.db.settings_repo import direction_from_row
from capi_server.config import Settings
from capi_server.domain import events as ev
from capi_server.domain.crm import (
    CrmEntity,
    CrmFieldInfo,
    CrmFieldRule,
    CrmType,
    CrmWebhook,
    EntityType,
    InvalidCrmWebhook,
    match_crm_fields,
    parse_crm_webhook,
)
from capi_server.domain.directions import CapiSource, Direction
from capi_server.domain.errors import (
    DomainError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from capi_server.domain.events import EventOutcome, EventStatus
from capi_server.domain.levels import Level
from capi_server.domain.normalization import InvalidUserData, normalize_email
from capi_server.domain.payloads import MAX_EVENT_AGE_SECONDS
from capi_server.services.sender import (
    DialogRef,
    SenderService,
    SendItem,
    SendOptions,
    SendReport,
    normalize_contact,
)

log = logging.getLogger("capi_server.crm")

# Why nothing was sent (results, not errors).
SKIP_CAPI_DISABLED = ev.REASON_CAPI_DISABLED
SKIP_SOURCE_WHATSAPP = "direction source is whatsapp"
SKIP_SOURCE_NOT_CRM = "direction source is not crm"
SKIP_NO_PHONE = "no phone on the CRM entity or its contact"
SKIP_NO_MATCH = "no configured CRM field matched"
SKIP_NO_DIRECTION = "no direction with capi_source crm uses this CRM connection"
SKIP_OUTSIDE_WINDOW = "changed outside Meta's 7-day event window"

CRM_SOURCE = "crm"
# How much of a CRM response goes into capi_events_log.error_message.
ERROR_EXCERPT_CHARS = 300
MAX_RECONCILE_LOOKBACK = timedelta(seconds=MAX_EVENT_AGE_SECONDS)
# Events are dated at the CRM change; keep clear of the sender's expiry check.
WINDOW_SLACK = timedelta(minutes=5)
_ENTITY_ID_MAX_DIGITS = 20

_T = TypeVar("_T")


# ---------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CrmConnectionInfo:
    """A crm_connections row with its secrets decrypted (never logged or returned)."""

    id: int
    user_account_id: int
    crm_type: CrmType
    base_url: str
    portal: str
    access_token: str | None
    application_token: str | None
    reconcile_interval_seconds: int
    last_reconciled_at: datetime | None

    def secrets(self) -> list[str]:
        """Strings that must never reach a log row: tokens and the Bitrix24 webhook code."""
        found = [s for s in (self.access_token, self.application_token) if s]
        # https://{portal}/rest/{user_id}/{code}/: the code is a password.
        found += [part for part in urlsplit(self.base_url).path.split("/") if len(part) >= 6]
        return found


@dataclass(slots=True)
class EntityCheck:
    """Checking one CRM entity for one direction; filled in step by step, then reported."""

    entity_type: str
    entity_id: str
    direction: Direction | None = None
    matches: dict[Level, list[CrmFieldRule]] = field(default_factory=dict)
    events: list[EventOutcome] = field(default_factory=list)
    skipped_reason: str = ""
    error: str = ""
    error_kind: str = ""
    # The sender's refusal of this check's item (bad event_time, bad email ...).
    send_error: DomainError | None = None
    dialog_id: int | None = None
    # What the send needs; raw CRM strings, normalised just before use.
    phones: tuple[str, ...] = ()
    emails: tuple[str, ...] = ()
    read_entity_type: str = ""
    updated_at_unix: int | None = None
    event_time: datetime | None = None

    @property
    def sendable(self) -> bool:
        return bool(self.matches) and not self.skipped_reason and not self.error


@dataclass(frozen=True, slots=True)
class EntityReport:
    """The result for one entity a webhook or a reconciliation named (all directions)."""

    entity_type: str
    entity_id: str
    matches: Mapping[Level, tuple[CrmFieldRule, ...]]
    events: tuple[EventOutcome, ...]
    error: str = ""
    skipped_reason: str = ""


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    entities_checked: int
    results: tuple[EntityReport, ...]
    since: datetime
    advanced_to: datetime | None


def parse_entity_type(raw: str, field_name: str = "entity_type") -> EntityType:
    try:
        return EntityType(raw.strip().lower())
    except ValueError:
        raise InvalidArgument.field(field_name, "must be lead, deal or contact") from None


def parse_entity_id(raw: str, field_name: str = "entity_id") -> str | None:
    """A CRM id as canonical digits, None when empty; CRM ids are numbers in both CRMs."""
    text = raw.strip()
    if not text:
        return None
    if (
        not (text.isascii() and text.isdigit())
        or len(text) > _ENTITY_ID_MAX_DIGITS
        or int(text) <= 0
    ):
        raise InvalidArgument.field(field_name, "must be a positive numeric CRM id")
    return str(int(text))


def direction_skip_reason(direction: Direction) -> str:
    """Why a direction is not checked at all; empty when it is."""
    if not direction.capi.enabled:
        return SKIP_CAPI_DISABLED
    if direction.capi.source is CapiSource.WHATSAPP:
        return SKIP_SOURCE_WHATSAPP
    if direction.capi.source is not CapiSource.CRM:
        return SKIP_SOURCE_NOT_CRM
    return ""


def evaluate_entity(direction: Direction, entity: CrmEntity, check: EntityCheck) -> EntityCheck:
    """Match the direction's level fields on a live entity; records phones for the send."""
    rules = {level: direction.capi.fields_for(level) for level in Level}
    check.matches = match_crm_fields(rules, entity, entity.crm_type)
    check.phones = entity.contact_phones
    check.emails = entity.contact_emails
    check.read_entity_type = entity.entity_type.value
    check.updated_at_unix = entity.updated_at
    if not check.matches:
        check.skipped_reason = SKIP_NO_MATCH
    elif not check.phones:
        check.skipped_reason = SKIP_NO_PHONE
    return check


def crm_domain_error(exc: CrmError, crm_type: CrmType) -> DomainError:
    """The status a CRM failure maps to; messages come from the adapters (secret-free)."""
    metadata = {"crm_type": crm_type.value, "http_status": str(exc.http_status or "")}
    if exc.kind == "auth":
        return FailedPrecondition(exc.message, reason="CRM_AUTH_FAILED", metadata=metadata)
    if exc.kind == "not_found":
        return NotFound(exc.message, reason="CRM_ENTITY_NOT_FOUND", metadata=metadata)
    if exc.kind == "rate_limited":
        return Unavailable(
            f"{exc.message}; retry later", reason="CRM_RATE_LIMITED", metadata=metadata
        )
    if exc.kind == "bad_response":
        return Unavailable(exc.message, reason="CRM_BAD_RESPONSE", metadata=metadata)
    return Unavailable(exc.message, reason="CRM_UNAVAILABLE", metadata=metadata)


def merge_checks(
    named: Sequence[tuple[EntityType, str]], checks: Iterable[EntityCheck]
) -> list[EntityReport]:
    """One report per named entity, merging the checks of every direction."""
    by_entity: dict[tuple[str, str], list[EntityCheck]] = defaultdict(list)
    for check in checks:
        by_entity[(check.entity_type, check.entity_id)].append(check)
    reports: list[EntityReport] = []
    for entity_type, entity_id in named:
        group = by_entity.get((entity_type.value, entity_id), [])
        matches: dict[Level, list[CrmFieldRule]] = {}
        events: list[EventOutcome] = []
        seen_events: set[tuple[int | None, Level, str]] = set()
        for check in group:
            for level, rules in check.matches.items():
                bucket = matches.setdefault(level, [])
                bucket.extend(r for r in rules if r not in bucket)
            for outcome in check.events:
                key = (check.dialog_id, outcome.level, outcome.event_id)
                if key not in seen_events:
                    seen_events.add(key)
                    events.append(outcome)
        errors = list(dict.fromkeys(c.error for c in group if c.error))
        reasons = list(dict.fromkeys(c.skipped_reason for c in group if c.skipped_reason))
        reports.append(
            EntityReport(
                entity_type=entity_type.value,
                entity_id=entity_id,
                matches={level: tuple(rules) for level, rules in sorted(matches.items())},
                events=tuple(events),
                error="; ".join(errors),
                skipped_reason="" if events else "; ".join(reasons),
            )
        )
    return reports


def _scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def _setting(settings: Settings, name: str, default: _T) -> _T:
    """An optional Settings knob (absent on older Settings): the default then."""
    value = getattr(settings, name, None)
    return default if value is None else type(default)(value)  # type: ignore[call-arg]


# ---------------------------------------------------------------------------------------
# The service
# ---------------------------------------------------------------------------------------


class CrmService:
    def __init__(
        self, settings: Settings, db: Database, cipher: TokenCipher, sender: SenderService
    ) -> None:
        self.settings = settings
        self.db = db
        self.cipher = cipher
        self.sender = sender
        self.clock: Callable[[], datetime] = utcnow
        # Knobs; tests and operators may change them before the first CRM call.
        self.amocrm_rate_per_second = _setting(
            settings, "crm_amocrm_rate_per_second", AMOCRM_RATE_PER_SECOND
        )
        self.bitrix24_rate_per_second = _setting(
            settings, "crm_bitrix24_rate_per_second", BITRIX24_RATE_PER_SECOND
        )
        self.retry_policy = RetryPolicy()
        self.concurrency = _setting(settings, "crm_concurrency", 8)
        self.reconcile_max_entities = _setting(settings, "crm_reconcile_max_entities", 500)
        self.reconcile_poll_seconds = _setting(settings, "crm_reconcile_poll_seconds", 30.0)
        self.expiry_margin = timedelta(seconds=settings.expiry_margin_seconds)
        # One client per connection; the limiter is per CRM account (amoCRM limits per
        # account, Bitrix24 per portal), shared if two connections name the same one.
        self._clients: dict[int, tuple[tuple[str, str, str], CrmClient]] = {}
        self._retired: list[CrmClient] = []
        self._limiters: dict[tuple[str, str], AsyncRateLimiter] = {}
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    # -- clients --------------------------------------------------------------------------

    def _connection_info(self, row: CrmConnectionRow) -> CrmConnectionInfo:
        try:
            return self._open_connection(row)
        except UndecryptableSecret:
            raise FailedPrecondition(
                f"the secrets of CRM connection {row.id} cannot be decrypted with "
                "CAPI_ENCRYPTION_KEYS: put the key back, or set them again",
                reason="CRM_SECRET_UNDECRYPTABLE",
                metadata={"crm_connection_id": str(row.id)},
            ) from None

    def _open_connection(self, row: CrmConnectionRow) -> CrmConnectionInfo:
        return CrmConnectionInfo(
            id=row.id,
            user_account_id=row.user_account_id,
            crm_type=CrmType(row.crm_type),
            base_url=self.cipher.decrypt(row.base_url),
            portal=row.portal,
            access_token=self.cipher.decrypt(row.access_token) if row.access_token else None,
            application_token=(
                self.cipher.decrypt(row.application_token) if row.application_token else None
            ),
            reconcile_interval_seconds=row.reconcile_interval_seconds,
            last_reconciled_at=row.last_reconciled_at,
        )

    def _limiter(self, connection: CrmConnectionInfo) -> AsyncRateLimiter:
        key = (connection.crm_type.value, connection.portal)
        limiter = self._limiters.get(key)
        if limiter is None:
            if connection.crm_type is CrmType.AMOCRM:
                limiter = AsyncRateLimiter(self.amocrm_rate_per_second)
            else:
                limiter = AsyncRateLimiter(self.bitrix24_rate_per_second, BITRIX24_BURST)
            self._limiters[key] = limiter
        return limiter

    def client_for(self, connection: CrmConnectionInfo) -> CrmClient:
        """The cached client of a connection, rebuilt when its URL or token changed."""
        key = (connection.crm_type.value, connection.base_url, connection.access_token or "")
        cached = self._clients.get(connection.id)
        if cached is not None and cached[0] == key:
            return cached[1]
        client: CrmClient
        if connection.crm_type is CrmType.AMOCRM:
            if not connection.access_token:
                raise FailedPrecondition(
                    "the amoCRM connection has no access token",
                    reason="CRM_NO_TOKEN",
                    metadata={"crm_connection_id": str(connection.id)},
                )
            client = AmoCrmClient(
                base_url=connection.base_url,
                access_token=connection.access_token,
                rate_limiter=self._limiter(connection),
                retry=self.retry_policy,
            )
        else:
            client = Bitrix24Client(
                webhook_url=connection.base_url,
                rate_limiter=self._limiter(connection),
                retry=self.retry_policy,
            )
        client = ObservedCrmClient(client, connection.crm_type.value)
        if cached is not None:
            # A call in flight may still use the old client: close it at shutdown.
            self._retired.append(cached[1])
        self._clients[connection.id] = (key, client)
        return client

    # -- loading --------------------------------------------------------------------------

    async def _connection(self, session: AsyncSession, connection_id: int) -> CrmConnectionInfo:
        row = await session.get(CrmConnectionRow, connection_id)
        if row is None:
            raise NotFound(
                f"CRM connection {connection_id} not found",
                reason="CRM_CONNECTION_NOT_FOUND",
                metadata={"crm_connection_id": str(connection_id)},
            )
        return self._connection_info(row)

    async def _crm_directions(
        self, session: AsyncSession, connection_ids: Sequence[int]
    ) -> dict[int, list[Direction]]:
        rows = await session.execute(
            select(DirectionRow)
            .where(
                DirectionRow.capi_crm_connection_id.in_(connection_ids),
                DirectionRow.capi_source == CapiSource.CRM.value,
            )
            .order_by(DirectionRow.id)
        )
        found: dict[int, list[Direction]] = {cid: [] for cid in connection_ids}
        for row in rows.scalars():
            assert row.capi_crm_connection_id is not None
            found[row.capi_crm_connection_id].append(direction_from_row(row))
        return found

    # -- error rows -----------------------------------------------------------------------

    async def _record_crm_error(
        self,
        connection: CrmConnectionInfo,
        directions: Sequence[Direction],
        exc: CrmError,
        what: str,
    ) -> None:
        """An `error` row per direction: the audit log shows why nothing was sent."""
        if not directions:
            return
        now = self.clock()
        message = f"{connection.crm_type.value} {what}: {exc.message}"
        if exc.http_status:
            message += f" (HTTP {exc.http_status})"
        excerpt = _scrub(exc.response_excerpt, connection.secrets())[:ERROR_EXCERPT_CHARS]
        if excerpt.strip():
            message += f"; response: {excerpt}"
        if exc.kind == "auth":
            hint = (
                "renew the amoCRM long-lived token (UpdateCrmConnection access_token)"
                if connection.crm_type is CrmType.AMOCRM
                else "check the Bitrix24 incoming webhook URL and its CRM rights "
                "(UpdateCrmConnection base_url)"
            )
        else:
            hint = "the CRM answered something that is not its API; check the connection's base_url"
        async with self.db.session() as session:
            await events_repo.insert_log_rows(
                session,
                [
                    {
                        "direction_id": direction.id,
                        "dialog_id": None,
                        "lead_id": None,
                        "level": int(Level.INTEREST),
                        "event_name": direction.capi.event_name(Level.INTEREST),
                        "status": EventStatus.ERROR.value,
                        "source": CRM_SOURCE,
                        "pixel_id": direction.pixel_id,
                        "error_message": events_repo.db_text(message),
                        "hint": hint,
                        "event_time": now,
                        "now": now,
                    }
                    for direction in directions
                ],
            )
            await session.commit()
        log.warning(
            "CRM call failed",
            extra={
                "crm_connection_id": connection.id,
                "kind": exc.kind,
                "http_status": exc.http_status,
            },
        )

    # -- ListCrmFields --------------------------------------------------------------------

    async def list_fields(self, connection_id: int, entity_type: str) -> list[CrmFieldInfo]:
        kind = parse_entity_type(entity_type)
        async with self.db.session() as session:
            connection = await self._connection(session, connection_id)
        try:
            return await self.client_for(connection).list_fields(kind)
        except CrmError as exc:
            raise crm_domain_error(exc, connection.crm_type) from None

    # -- CheckCrmFields -------------------------------------------------------------------

    async def check_fields(
        self,
        direction_id: int,
        entity_type: str,
        entity_id: str,
        contact_phone: str,
        *,
        dry_run: bool,
    ) -> EntityCheck:
        """Read one entity, match the direction's fields, send the highest matched level."""
        kind = parse_entity_type(entity_type)
        parsed_id = parse_entity_id(entity_id)
        phone = contact_phone.strip() or None
        if parsed_id is None and phone is None:
            raise InvalidArgument.field(
                "entity_id", "name the CRM entity by entity_id, or give contact_phone"
            )
        async with self.db.session() as session:
            row = await dialogs_repo.direction_by_id(session, direction_id)
            direction = direction_from_row(row)
            check = EntityCheck(kind.value, parsed_id or "", direction)
            check.skipped_reason = direction_skip_reason(direction)
            if check.skipped_reason:
                return check
            if direction.capi.crm_connection_id is None:
                raise FailedPrecondition(
                    f"direction {direction_id} has no CRM connection",
                    reason="CRM_CONNECTION_MISSING",
                    metadata={"direction_id": str(direction_id)},
                )
            connection = await self._connection(session, direction.capi.crm_connection_id)
            if parsed_id is None:
                assert phone is not None
                kind, parsed_id = await self._entity_of_phone(session, row, kind, phone)
                check.entity_type, check.entity_id = kind.value, parsed_id
        client = self.client_for(connection)
        try:
            entity = await client.get_entity(kind, parsed_id)
        except CrmError as exc:
            if exc.kind in ("auth", "bad_response"):
                await self._record_crm_error(
                    connection, [direction], exc, f"{kind.value} {parsed_id}"
                )
            raise crm_domain_error(exc, connection.crm_type) from None
        evaluate_entity(direction, entity, check)
        if not check.phones and phone is not None:
            # The CRM holds no phone, but the caller knows the client's.
            check.phones = (phone,)
            if check.skipped_reason == SKIP_NO_PHONE:
                check.skipped_reason = ""
        await self._send([check], dry_run=dry_run)
        if check.send_error is not None:
            raise check.send_error
        return check

    async def _entity_of_phone(
        self, session: AsyncSession, direction: DirectionRow, kind: EntityType, raw_phone: str
    ) -> tuple[EntityType, str]:
        """The CRM entity an earlier check linked to this phone's lead."""
        region = await dialogs_repo.default_region(session, direction.user_account_id)
        phone = normalize_contact(raw_phone, region)
        lead = (
            await session.execute(
                select(LeadRow).where(
                    LeadRow.direction_id == direction.id, LeadRow.contact_key == phone
                )
            )
        ).scalar_one_or_none()
        if lead is None or not lead.crm_entity_id:
            raise NotFound(
                "no CRM entity is known for this phone; name it by entity_id",
                reason="CRM_ENTITY_UNKNOWN",
                metadata={"direction_id": str(direction.id)},
            )
        with contextlib.suppress(ValueError):
            kind = EntityType(lead.crm_entity_type or kind.value)
        return kind, lead.crm_entity_id

    # -- sending --------------------------------------------------------------------------

    async def _send(self, checks: Sequence[EntityCheck], *, dry_run: bool) -> None:
        """Create the leads of every sendable check, then ONE send_many for all of them."""
        sendable = [c for c in checks if c.sendable]
        if not sendable:
            return
        # A consistent row order keeps concurrent calls from deadlocking on PostgreSQL.
        sendable.sort(key=lambda c: (c.direction.id if c.direction else 0, c.phones))
        async with self.db.session() as session:
            regions: dict[int, str | None] = {}
            rows: dict[int, DirectionRow] = {}
            for check in sendable:
                direction = check.direction
                assert direction is not None and direction.id is not None
                if direction.user_account_id not in regions:
                    regions[direction.user_account_id] = await dialogs_repo.default_region(
                        session, direction.user_account_id
                    )
                phone = _first_phone(check.phones, regions[direction.user_account_id])
                if phone is None:
                    check.skipped_reason = SKIP_NO_PHONE
                    continue
                if direction.id not in rows:
                    rows[direction.id] = await dialogs_repo.direction_by_id(session, direction.id)
                row = rows[direction.id]
                keys = await dialogs_repo.ensure_dialog(
                    session, row.id, row.instance_name, phone, phone
                )
                check.dialog_id = keys.dialog_id
                await self._link_lead(session, keys.lead_id, check)
            await session.commit()
        by_dialog: dict[int, list[EntityCheck]] = defaultdict(list)
        for check in sendable:
            if check.dialog_id is not None and not check.skipped_reason:
                by_dialog[check.dialog_id].append(check)
        if not by_dialog:
            return
        dialog_ids = sorted(by_dialog)
        items: list[SendItem] = []
        for dialog_id in dialog_ids:
            group = by_dialog[dialog_id]
            top = max(group, key=lambda c: max(c.matches))
            email = next(
                (e for c in group if (e := _first_email(c.emails)) is not None),
                None,
            )
            items.append(
                SendItem(
                    DialogRef(dialog_id=dialog_id),
                    max(top.matches),
                    SendOptions(
                        event_time=top.event_time,
                        dry_run=dry_run,
                        email=email,
                        source=CRM_SOURCE,
                    ),
                )
            )
        results = await self.sender.send_many(items)
        for dialog_id, result in zip(dialog_ids, results, strict=True):
            for check in by_dialog[dialog_id]:
                if isinstance(result, SendReport):
                    check.events = list(result.outcomes)
                else:
                    check.error, check.error_kind = result.message, "send"
                    check.send_error = result

    @staticmethod
    async def _link_lead(session: AsyncSession, lead_id: int, check: EntityCheck) -> None:
        """Remember the CRM entity on the lead; a deal/lead wins over a bare contact."""
        stmt = (
            update(LeadRow)
            .where(LeadRow.id == lead_id)
            .values(
                crm_entity_type=check.read_entity_type or check.entity_type,
                crm_entity_id=check.entity_id,
                updated_at=utcnow(),
            )
            .execution_options(synchronize_session=False)
        )
        if (check.read_entity_type or check.entity_type) == EntityType.CONTACT.value:
            stmt = stmt.where(LeadRow.crm_entity_id.is_(None))
        await session.execute(stmt)

    # -- checking many entities -----------------------------------------------------------

    async def _check_entities(
        self,
        targets: Sequence[tuple[CrmConnectionInfo, Sequence[Direction]]],
        named: Sequence[tuple[EntityType, str]],
        *,
        dry_run: bool,
        date_by_change: bool,
    ) -> list[EntityCheck]:
        """Read each named entity once per connection and check it for every direction.

        Reads run at most `concurrency` at a time. After the first auth failure of a
        connection its remaining entities fail the same way without calling the CRM, and
        each (connection, kind of failure) leaves one error row, not one per entity.
        """
        semaphore = asyncio.Semaphore(max(1, self.concurrency))
        auth_failures: dict[int, CrmError] = {}
        recorded: set[tuple[int, str]] = set()

        async def check_one(
            connection: CrmConnectionInfo,
            directions: Sequence[Direction],
            kind: EntityType,
            entity_id: str,
        ) -> list[EntityCheck]:
            checks = [EntityCheck(kind.value, entity_id, d) for d in directions]
            if not checks:
                return [EntityCheck(kind.value, entity_id, skipped_reason=SKIP_NO_DIRECTION)]
            active: list[EntityCheck] = []
            for check in checks:
                assert check.direction is not None
                check.skipped_reason = direction_skip_reason(check.direction)
                if not check.skipped_reason:
                    active.append(check)
            if not active:
                return checks
            failure = auth_failures.get(connection.id)
            if failure is None:
                async with semaphore:
                    failure = auth_failures.get(connection.id)
                    if failure is None:
                        try:
                            entity = await self.client_for(connection).get_entity(kind, entity_id)
                        except DomainError as exc:
                            # A connection that cannot be used (no token) fails its own
                            # entities only, as an auth error would.
                            failure = CrmError(exc.message, "auth")
                            auth_failures[connection.id] = failure
                        except CrmError as exc:
                            failure = exc
                            if exc.kind == "auth":
                                auth_failures[connection.id] = exc
                            if exc.kind in ("auth", "bad_response") and (
                                (connection.id, exc.kind) not in recorded
                            ):
                                recorded.add((connection.id, exc.kind))
                                await self._record_crm_error(
                                    connection,
                                    [c.direction for c in active if c.direction],
                                    exc,
                                    f"{kind.value} {entity_id}",
                                )
            if failure is not None:
                for check in active:
                    check.error, check.error_kind = failure.message, failure.kind
                return checks
            for check in active:
                assert check.direction is not None
                evaluate_entity(check.direction, entity, check)
                if date_by_change:
                    self._date_by_change(check)
            return checks

        jobs = [
            check_one(connection, directions, kind, entity_id)
            for connection, directions in targets
            for kind, entity_id in named
        ]
        checks = [check for group in await asyncio.gather(*jobs) for check in group]
        await self._send(checks, dry_run=dry_run)
        return checks

    def _date_by_change(self, check: EntityCheck) -> None:
        """Reconciliation dates an event at the CRM change, if Meta still accepts it."""
        now = self.clock()
        if check.updated_at_unix is None:
            return
        changed = datetime.fromtimestamp(check.updated_at_unix, now.tzinfo)
        oldest = now - MAX_RECONCILE_LOOKBACK + self.expiry_margin + WINDOW_SLACK
        if changed < oldest:
            if check.sendable:
                check.skipped_reason = SKIP_OUTSIDE_WINDOW
            return
        check.event_time = min(changed, now)

    # -- HandleCrmWebhook -----------------------------------------------------------------

    async def handle_webhook(
        self, body: bytes, content_type: str, connection_id: int | None, *, dry_run: bool
    ) -> list[EntityReport]:
        try:
            hook = parse_crm_webhook(body, content_type)
        except InvalidCrmWebhook as exc:
            description = exc.reason if exc.field == "body" else f"{exc.reason}: {exc.field}"
            raise InvalidArgument(
                f"not a usable CRM webhook: {description}",
                [FieldViolation("body", description)],
                reason="INVALID_CRM_WEBHOOK",
            ) from None
        async with self.db.session() as session:
            connections = await self._webhook_connections(session, hook, connection_id)
            directions = await self._crm_directions(session, [c.id for c in connections])
        named = [(e.entity_type, e.entity_id) for e in hook.entities]
        checks = await self._check_entities(
            [(c, directions[c.id]) for c in connections],
            named,
            dry_run=dry_run,
            date_by_change=False,
        )
        reports = merge_checks(named, checks)
        log.info(
            "CRM webhook handled",
            extra={
                "crm_type": hook.crm_type.value,
                "entities": len(named),
                "events": sum(len(r.events) for r in reports),
                "errors": sum(1 for r in reports if r.error),
            },
        )
        return reports

    async def _webhook_connections(
        self, session: AsyncSession, hook: CrmWebhook, connection_id: int | None
    ) -> list[CrmConnectionInfo]:
        """The connection(s) a webhook belongs to; Bitrix24 ones must share its token."""
        crm_type = hook.crm_type
        if connection_id is not None:
            connection = await self._connection(session, connection_id)
            if connection.crm_type is not crm_type:
                raise InvalidArgument.field(
                    "body",
                    f"is a {crm_type.value} webhook but connection {connection_id} is "
                    f"{connection.crm_type.value}",
                )
            connections = [connection]
        else:
            portal = hook.amo_subdomain if crm_type is CrmType.AMOCRM else hook.bitrix_domain
            if not portal:
                key = "account[subdomain]" if crm_type is CrmType.AMOCRM else "auth[domain]"
                raise InvalidArgument.field(
                    "body", f"{key} is missing; name the connection by crm_connection_id"
                )
            rows = await session.execute(
                select(CrmConnectionRow)
                .where(
                    CrmConnectionRow.crm_type == crm_type.value,
                    CrmConnectionRow.portal == portal,
                )
                .order_by(CrmConnectionRow.id)
            )
            connections = [self._connection_info(row) for row in rows.scalars()]
            if not connections:
                raise NotFound(
                    f"no {crm_type.value} connection for portal {portal!r}",
                    reason="CRM_CONNECTION_NOT_FOUND",
                    metadata={"portal": portal, "crm_type": crm_type.value},
                )
        if crm_type is CrmType.BITRIX24:
            # Bitrix24 outgoing webhooks are unsigned; application_token is the only proof.
            offered = (hook.bitrix_application_token or "").encode()
            connections = [
                c
                for c in connections
                if c.application_token
                and offered
                and hmac.compare_digest(c.application_token.encode(), offered)
            ]
            if not connections:
                raise PermissionDenied(
                    "the webhook's application_token does not match the connection's",
                    reason="CRM_WEBHOOK_TOKEN_MISMATCH",
                )
        return connections

    # -- ReconcileCrm ---------------------------------------------------------------------

    async def reconcile(
        self, connection_id: int, since: datetime | None, *, dry_run: bool
    ) -> ReconcileReport:
        """Check every entity changed since `since` (default: the last run, <= 7 days)."""
        started = self.clock()
        async with self.db.session() as session:
            connection = await self._connection(session, connection_id)
            directions = (await self._crm_directions(session, [connection.id]))[connection.id]
        floor = started - MAX_RECONCILE_LOOKBACK
        since = max(since or connection.last_reconciled_at or floor, floor)
        if since > started:
            raise InvalidArgument.field("since", "is in the future")
        if not any(not direction_skip_reason(d) for d in directions):
            # Nothing would be sent: do not spend the CRM's rate limit on listing.
            return ReconcileReport(0, (), since, None)
        client = self.client_for(connection)
        limit = max(1, self.reconcile_max_entities)
        named: list[tuple[EntityType, str]] = []
        truncated: set[EntityType] = set()
        for kind in _reconcile_kinds(connection.crm_type, directions):
            try:
                ids = await client.list_changed_since(kind, int(since.timestamp()), limit)
            except CrmError as exc:
                if exc.kind in ("auth", "bad_response"):
                    await self._record_crm_error(
                        connection, directions, exc, f"listing changed {kind.value}s"
                    )
                raise crm_domain_error(exc, connection.crm_type) from None
            if len(ids) >= limit:
                truncated.add(kind)
            named += [(kind, entity_id) for entity_id in dict.fromkeys(ids)]
        checks = await self._check_entities(
            [(connection, directions)], named, dry_run=dry_run, date_by_change=True
        )
        advanced_to = self._reconciled_mark(started, checks, truncated)
        if advanced_to is not None and not dry_run:
            async with self.db.session() as session:
                await session.execute(
                    update(CrmConnectionRow)
                    .where(CrmConnectionRow.id == connection.id)
                    .values(last_reconciled_at=advanced_to, updated_at=self.clock())
                )
                await session.commit()
        log.info(
            "CRM reconciliation done",
            extra={"crm_connection_id": connection.id, "entities": len(named)},
        )
        return ReconcileReport(
            entities_checked=len(named),
            results=tuple(merge_checks(named, checks)),
            since=since,
            advanced_to=None if dry_run else advanced_to,
        )

    def _reconciled_mark(
        self, started: datetime, checks: Sequence[EntityCheck], truncated: set[EntityType]
    ) -> datetime | None:
        """How far the run covered; None when it must be repeated (transient failures).

        Entities deleted in the meantime (not_found) do not hold the mark back. A listing
        cut at the limit covers up to its newest entity read, so the next run continues.
        """
        if any(c.error and c.error_kind not in ("not_found",) for c in checks):
            return None
        mark = started
        started_unix = int(started.timestamp())
        for kind in truncated:
            # Values read live: an entity edited during this run carries a time after
            # `started` and would jump the mark past entities the listing cut off; it is
            # left out (the next run sees it anyway, it changed after the mark).
            newest = max(
                (
                    c.updated_at_unix
                    for c in checks
                    if c.entity_type == kind.value
                    and c.updated_at_unix is not None
                    and c.updated_at_unix < started_unix
                ),
                default=None,
            )
            if newest is None:
                return None
            mark = min(mark, datetime.fromtimestamp(newest - 1, started.tzinfo))
        return mark

    async def reconcile_due(self) -> int:
        """One pass of the periodic job: reconcile every connection whose interval passed."""
        now = self.clock()
        async with self.db.session() as session:
            rows = await session.execute(
                select(
                    CrmConnectionRow.id,
                    CrmConnectionRow.reconcile_interval_seconds,
                    CrmConnectionRow.last_reconciled_at,
                ).where(CrmConnectionRow.reconcile_interval_seconds > 0)
            )
            due = [
                connection_id
                for connection_id, interval, last in rows.all()
                if last is None or last + timedelta(seconds=interval) <= now
            ]
        for connection_id in due:
            try:
                await self.reconcile(connection_id, None, dry_run=False)
            except DomainError as exc:
                log.warning(
                    "CRM reconciliation failed",
                    extra={"crm_connection_id": connection_id, "reason": exc.reason},
                )
        return len(due)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the periodic reconciliation (connections with an interval > 0)."""
        if self._task is None:
            self._stop.clear()
            self._task = asyncio.create_task(self._run(), name="capi-crm-reconcile")

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await self.reconcile_due()
            except Exception:
                log.exception("CRM reconciliation pass failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.reconcile_poll_seconds)

    async def aclose(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None
        clients = [client for _, client in self._clients.values()] + self._retired
        self._clients.clear()
        self._retired.clear()
        for client in clients:
            with contextlib.suppress(Exception):
                await client.aclose()


def _reconcile_kinds(crm_type: CrmType, directions: Sequence[Direction]) -> list[EntityType]:
    """Which entity lists a reconciliation reads.

    amoCRM: leads (its deals) and contacts (a field id may live on either). Bitrix24: deals
    and leads, plus contacts when some rule names entity_type contact; a deal check already
    reads its main contact, so contacts are listed only for contact-only changes.
    """
    if crm_type is CrmType.AMOCRM:
        return [EntityType.DEAL, EntityType.CONTACT]
    kinds = [EntityType.DEAL, EntityType.LEAD]
    contact_rules = any(
        (rule.entity_type or "").strip().lower() == EntityType.CONTACT.value
        for direction in directions
        for level in Level
        for rule in direction.capi.fields_for(level)
    )
    if contact_rules:
        kinds.append(EntityType.CONTACT)
    return kinds


def _first_phone(raw_phones: Iterable[str], region: str | None) -> str | None:
    """The first CRM phone that normalises (CRMs hold free text: '(11) 3333-4444')."""
    for raw in raw_phones:
        try:
            return normalize_contact(raw, region)
        except InvalidArgument:
            continue
    return None


def _first_email(raw_emails: Iterable[str]) -> str | None:
    for raw in raw_emails:
        try:
            normalize_email(raw)
        except InvalidUserData:
            continue
        return raw
    return None
