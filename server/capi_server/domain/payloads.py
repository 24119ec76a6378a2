"""Build Meta Conversions API event dicts and request bodies (pure, no I/O).

One event per (dialog, level), shaped like the seed's example request and Meta's
business_messaging examples (shared/fixtures/meta_capi/example_request_business_messaging.json):

    {"event_name": "Lead", "event_time": 1703520000, "event_id": "...",
     "event_source_url": "https://wa.me/", "action_source": "business_messaging",
     "messaging_channel": "whatsapp",
     "user_data": {"ph": ["<sha256>"], "ctwa_clid": "..."},
     "custom_data": {"event_level": 1}}

Absent values are omitted, never sent as null. The access token is not part of the body:
the HTTP adapter adds it, so a body can be logged or stored in capi_events_log as is.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from capi_server.domain.levels import Level
from capi_server.domain.normalization import is_already_hashed

__all__ = [
    "ACTION_SOURCE",
    "EVENT_SOURCE_URL",
    "MAX_EVENTS_PER_REQUEST",
    "MAX_EVENT_AGE_SECONDS",
    "MESSAGING_CHANNEL",
    "EventInput",
    "build_event",
    "build_request_body",
    "event_id_for",
    "is_too_old",
    "new_event_id",
]

ACTION_SOURCE = "business_messaging"
MESSAGING_CHANNEL = "whatsapp"
# Kept from the seed's example request. Meta requires event_source_url only for
# action_source=website; no business_messaging example we read sends it, none says it is
# rejected either (shared/design/research/meta-capi.md section 1).
EVENT_SOURCE_URL = "https://wa.me/"

# Meta rejects the whole request when any event_time is more than 7 days old (code 100,
# subcode 2804003), so such events must never be batched with fresh ones.
MAX_EVENT_AGE_SECONDS = 7 * 24 * 3600
# Commonly cited limit for `data`; not found in Meta's own text (UNCONFIRMED).
MAX_EVENTS_PER_REQUEST = 1000

_CURRENCY = re.compile(r"^[A-Za-z]{3}$")


@dataclass(frozen=True, slots=True)
class EventInput:
    """Everything one CAPI event needs. Identifiers are already hashed where Meta wants it.

    Empty strings count as absent, because proto3 and form inputs deliver "" for "not set".
    """

    level: Level
    event_name: str
    event_time: int  # unix seconds (UTC)
    event_id: str  # Meta deduplicates on (event_name, event_id)
    phone_hash: str | None  # from normalization.hash_phone
    email_hash: str | None  # from normalization.hash_email
    ctwa_clid: str | None  # Click-to-WhatsApp click id, a Meta id: sent unhashed
    whatsapp_business_account_id: str | None  # a Meta id: sent unhashed
    value: float | None = None
    currency: str | None = None  # ISO 4217, any case; sent upper-case
    limited_data_use: bool = False  # Meta's LDU, with country/state geolocated by Meta
    country_hash: str | None = None  # from normalization.hash_country; helps matching


def build_event(e: EventInput) -> dict[str, object]:
    """One element of the request's `data` list.

    Raises ValueError when the event cannot be sent: no identifier to match a person (no ph,
    em or ctwa_clid), a hash field holding something that is not a hash (protects against
    sending a raw phone), a bad currency, or a value without currency.
    """
    if not e.event_name:
        raise ValueError("event_name is required")
    if not e.event_id:
        raise ValueError("event_id is required")
    if e.event_time <= 0:
        raise ValueError("event_time must be a positive unix timestamp in seconds")

    event: dict[str, object] = {
        "event_name": e.event_name,
        "event_time": e.event_time,
        "event_id": e.event_id,
        "event_source_url": EVENT_SOURCE_URL,
        "action_source": ACTION_SOURCE,
        "messaging_channel": MESSAGING_CHANNEL,
        "user_data": _user_data(e),
        "custom_data": _custom_data(e),
    }
    if e.limited_data_use:
        # Country and state 0 ask Meta to geolocate the event (Meta's LDU documentation).
        event["data_processing_options"] = ["LDU"]
        event["data_processing_options_country"] = 0
        event["data_processing_options_state"] = 0
    return event


def build_request_body(
    events: Sequence[dict[str, object]],
    *,
    test_event_code: str | None,
    partner_agent: str | None,
) -> dict[str, object]:
    """The JSON body for `POST /{api_version}/{pixel_id}/events`, without the access token.

    `test_event_code` routes events to Events Manager's Test Events tab (never in
    production); `partner_agent` names the sending platform. Empty strings are omitted.
    """
    if not events:
        raise ValueError("a CAPI request needs at least one event")
    if len(events) > MAX_EVENTS_PER_REQUEST:
        raise ValueError(f"at most {MAX_EVENTS_PER_REQUEST} events per request")
    body: dict[str, object] = {"data": list(events)}
    if test_event_code:
        body["test_event_code"] = test_event_code
    if partner_agent:
        body["partner_agent"] = partner_agent
    return body


def new_event_id() -> str:
    """A random event id (32 hex chars), for events that have no stable identity."""
    return uuid.uuid4().hex


def event_id_for(dialog_id: str, level: Level, nonce: str = "") -> str:
    """A deterministic event id for (dialog, level), e.g. "interest-3f2a...".

    The id is stored in dialog_analysis.capi_<level>_event_id when the send is claimed, and
    every retry reuses it. Deriving it instead of drawing it at random means that even a
    claim repeated after lost state (a restored backup, a second replica racing before the
    database decides) produces the same id, so Meta's own deduplication drops the duplicate.
    `nonce` is for a deliberate resend as a new event (an operator reset): a different nonce
    gives a different id. The inputs are hashed so the id is fixed-length and reveals
    nothing about the dialog; the level name stays readable for operators.
    """
    # JSON encoding keeps the parts unambiguous ("a|b" + "c" vs "a" + "b|c"). A dialog id
    # of digits and no nonce (every send) need no escaping: the same text, spelled out,
    # since json.dumps of a list is a visible share of a SendConversion batch's CPU.
    if dialog_id.isdigit() and not nonce:
        material = f'["{dialog_id}", {int(level)}, ""]'
    else:
        material = json.dumps([dialog_id, int(level), nonce], ensure_ascii=False)
    digest = hashlib.sha256(material.encode("utf-8")).hexdigest()[:32]
    return f"{level.column}-{digest}"


def is_too_old(event_time: int, now: int, margin_seconds: int = 3600) -> bool:
    """True when the event is within `margin_seconds` of Meta's 7-day limit (or past it).

    Such an event must not be sent: by the time a batch reaches Meta it may have crossed the
    limit, and then Meta rejects the whole request. Times in the future are not too old.
    """
    if margin_seconds < 0:
        raise ValueError("margin_seconds must not be negative")
    return now - event_time >= MAX_EVENT_AGE_SECONDS - margin_seconds


def _user_data(e: EventInput) -> dict[str, object]:
    user_data: dict[str, object] = {}
    if e.phone_hash:
        user_data["ph"] = [_require_hash("phone_hash", e.phone_hash)]
    if e.email_hash:
        user_data["em"] = [_require_hash("email_hash", e.email_hash)]
    if e.country_hash:
        user_data["country"] = [_require_hash("country_hash", e.country_hash)]
    if e.ctwa_clid:
        user_data["ctwa_clid"] = e.ctwa_clid
    if e.whatsapp_business_account_id:
        user_data["whatsapp_business_account_id"] = e.whatsapp_business_account_id
    # The WABA id and country identify no person; Meta needs at least one of these.
    if not (e.phone_hash or e.email_hash or e.ctwa_clid):
        raise ValueError("user_data needs at least one of phone, email or ctwa_clid")
    return user_data


def _custom_data(e: EventInput) -> dict[str, object]:
    custom_data: dict[str, object] = {"event_level": int(e.level)}
    if e.value is not None:
        if not math.isfinite(e.value) or e.value < 0:
            raise ValueError("value must be a finite, non-negative number")
        if not e.currency:
            raise ValueError("value needs a currency")
        custom_data["value"] = e.value
    if e.currency:
        if _CURRENCY.match(e.currency) is None:
            raise ValueError("currency must be a 3-letter ISO 4217 code")
        custom_data["currency"] = e.currency.upper()
    return custom_data


def _require_hash(field: str, value: str) -> str:
    if not is_already_hashed(value):
        raise ValueError(f"{field} must be a SHA-256 (or MD5) hex digest, not a raw value")
    return value
