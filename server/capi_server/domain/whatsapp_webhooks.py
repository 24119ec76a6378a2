"""Turn a raw WhatsApp webhook body into typed inbound messages.

Two senders are understood:

* Evolution API (Baileys channel), event ``messages.upsert``: one message per webhook.
  Its shape drifted between versions (see shared/design/research/payloads.md section 1):
  the text moved from ``extendedTextMessage.text`` to ``conversation`` (2.1+), the ad data
  moved from ``message.<type>.contextInfo`` to ``data.contextInfo``, enums and Longs
  changed from strings to numbers (2.3.6), and the phone of a ``@lid`` chat moved from
  ``key.senderPn`` (Baileys 6.7.19) to ``key.remoteJidAlt`` (Baileys 7).
* The official WhatsApp Cloud API, ``field: "messages"``: several messages per webhook.
  Its ``instance_name`` is the receiving ``phone_number_id``; a caller that names its
  directions differently maps it (or passes an explicit instance name) itself.

The parser is pure and total: it returns messages and skip reasons, or raises
`InvalidWebhook` for malformed input; no other exception escapes for any input.
Errors and skip reasons never quote phones, names or message text.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final, Literal

MAX_WEBHOOK_BYTES: Final = 1024 * 1024
"""Bodies above this size are rejected before JSON parsing (a message webhook is a few KiB;
media arrive as URLs or, with webhookBase64 on, inline base64 that we do not need)."""

# Skip reasons: stable strings callers may compare against and show to operators.
SKIP_GROUP: Final = "group message"
SKIP_STATUS_BROADCAST: Final = "status broadcast"
SKIP_BROADCAST_LIST: Final = "broadcast list"
SKIP_NEWSLETTER: Final = "newsletter"
SKIP_CLOUD_NO_MESSAGES: Final = "cloud api change carries no messages"

WebhookSource = Literal["evolution", "cloud_api"]


class InvalidWebhook(ValueError):
    """The body is not a webhook we can read: bad encoding, not JSON, wrong shape or types.

    `field` is a dotted path into the body ("data.key.remoteJid",
    "entry[0].changes[0].value.messages[1].from") or "body" for the body as a whole.
    """

    def __init__(self, reason: str, field: str) -> None:
        super().__init__(f"{reason} (field {field})")
        self.reason = reason
        self.field = field


@dataclass(frozen=True, slots=True)
class AdReferral:
    """What the webhook says about the Click-to-WhatsApp ad that opened the chat."""

    source_id: str | None
    """The ad id (Evolution externalAdReply.sourceId, Cloud API referral.source_id)."""
    source_url: str | None
    source_type: str | None
    """"ad" for ads; "post" is mentioned by older Cloud API docs."""
    source_app: str | None
    """"facebook" / "instagram" (Evolution only)."""
    media_type: str | None
    """Normalised to "none" / "image" / "video": Evolution sends 0/1/2 since 2.3.6 and
    "NONE"/"IMAGE"/"VIDEO" before; the Cloud API sends "image"/"video"."""


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """One WhatsApp message of a 1:1 chat, sent by the contact or by the business (from_me).

    At least one of `contact_phone` and `contact_lid` is set; see `contact_key`.
    Personal data (phone, LID, text, push name) is kept out of repr() so that logging the
    object does not leak it.
    """

    source: WebhookSource
    instance_name: str | None
    """Evolution `instance`; Cloud API `metadata.phone_number_id`."""
    message_id: str
    contact_phone: str | None = field(repr=False)
    """Digits with country code, as in the JID (Brazilian JIDs may lack the mobile 9)."""
    contact_lid: str | None = field(repr=False)
    """Digits of the contact's WhatsApp "linked id" (`NNN@lid`), when the webhook has one."""
    from_me: bool
    text: str = field(repr=False)
    """Text or media caption; empty for stickers, audio, reactions and the like."""
    message_type: str
    """Evolution `messageType` ("conversation", "imageMessage", ...) or Cloud API `type`."""
    sent_at: int | None
    """Unix seconds; None when the webhook carries no timestamp."""
    ctwa_clid: str | None
    from_ad_without_click_id: bool
    """The payload marks the chat as opened from an ad but carries no click id."""
    push_name: str | None = field(repr=False)
    """The contact's WhatsApp display name; None for from_me messages (there it is the
    business's own name or Evolution's literal "Você"). Never log it."""
    ad: AdReferral | None = None

    @property
    def contact_key(self) -> str:
        """The dialog key: the phone digits, else "lid:<digits>" for a phone-less LID chat."""
        if self.contact_phone is not None:
            return self.contact_phone
        return f"lid:{self.contact_lid}"


@dataclass(frozen=True, slots=True)
class SkippedWebhook:
    """A well-formed webhook that carries no 1:1 message for us (group, status, other event)."""

    reason: str


ParsedWebhook = InboundMessage | SkippedWebhook


def parse_whatsapp_webhook(raw: str | bytes) -> list[ParsedWebhook]:
    """Parse an Evolution `messages.upsert` or a Cloud API `messages` webhook body.

    Returns one item per message (Evolution: always one; Cloud API: one per message, or a
    single skip for a status-only change); never an empty list. Raises `InvalidWebhook`.
    """
    body = _as_object(_decode_json(raw), "body")
    if "object" in body:
        return _parse_cloud_api(body)
    if "event" in body:
        return [_parse_evolution(body)]
    raise InvalidWebhook("neither an Evolution event nor a Cloud API webhook", "event")


# --- decoding -----------------------------------------------------------------------------


def _decode_json(raw: str | bytes) -> object:
    if isinstance(raw, str):
        # A str has at most as many characters as its UTF-8 encoding has bytes, so this
        # check avoids encoding a huge body just to reject it.
        if len(raw) > MAX_WEBHOOK_BYTES:
            raise InvalidWebhook("webhook body too large", "body")
        try:
            raw = raw.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates
            raise InvalidWebhook("webhook body is not valid UTF-8", "body") from None
    elif not isinstance(raw, bytes):
        raise InvalidWebhook("webhook body must be str or bytes", "body")
    if len(raw) > MAX_WEBHOOK_BYTES:
        raise InvalidWebhook("webhook body too large", "body")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidWebhook("webhook body is not valid UTF-8", "body") from None
    try:
        return json.loads(text, parse_constant=_reject_json_constant)
    # ValueError covers JSONDecodeError and Python's int-digit limit; RecursionError comes
    # from deeply nested arrays.
    except (ValueError, RecursionError):
        raise InvalidWebhook("webhook body is not valid JSON", "body") from None


def _reject_json_constant(name: str) -> object:
    raise ValueError(f"JSON constant {name} is not allowed")


# --- typed access to untrusted JSON -------------------------------------------------------


def _as_object(value: object, path: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise InvalidWebhook("expected a JSON object", path)
    return value


def _required_object(parent: dict[str, object], key: str, path: str) -> dict[str, object]:
    value = parent.get(key)
    if value is None:
        raise InvalidWebhook("required object is missing", path)
    return _as_object(value, path)


def _optional_object(parent: dict[str, object], key: str, path: str) -> dict[str, object] | None:
    value = parent.get(key)
    return None if value is None else _as_object(value, path)


def _optional_list(parent: dict[str, object], key: str, path: str) -> list[object]:
    value = parent.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidWebhook("expected a JSON array", path)
    return value


def _optional_str(parent: dict[str, object], key: str, path: str) -> str | None:
    """The string at `key`; None when absent, null or empty (protobuf's "unset")."""
    value = parent.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidWebhook("expected a string", path)
    return value or None


def _required_str(parent: dict[str, object], key: str, path: str) -> str:
    value = _optional_str(parent, key, path)
    if value is None:
        raise InvalidWebhook("required string is missing or empty", path)
    return value


def _optional_id(parent: dict[str, object], key: str, path: str) -> str | None:
    """An identifier that is a string in the schema but could be emitted as a JSON number."""
    value = parent.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _optional_str(parent, key, path)


def _optional_bool(parent: dict[str, object], key: str, path: str) -> bool:
    """A flag; absent or null means False (protobufjs omits default values)."""
    value = parent.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidWebhook("expected a boolean", path)
    return value


def _safe_label(value: str) -> str:
    """An untrusted enum-like value made safe to put into a skip reason."""
    return re.sub(r"[^A-Za-z0-9._-]", "?", value[:64])


# --- shared value parsing -----------------------------------------------------------------

_DIGITS = re.compile(r"[0-9]+")
_PHONE_DIGITS = re.compile(r"[0-9]{5,15}")  # E.164 allows at most 15 digits
# Unix seconds up to 9999-12-31; larger values up to that date in milliseconds are
# treated as milliseconds (Evolution documents seconds, but a millisecond value would
# otherwise put the message in the year 57000).
_MAX_UNIX_SECONDS: Final = 253_402_300_799
_MAX_UNIX_MILLIS: Final = _MAX_UNIX_SECONDS * 1000 + 999


def _unix_seconds(value: object, path: str) -> int | None:
    """A timestamp given as a number, a numeric string or a protobufjs Long {low, high}."""
    if value is None:
        return None
    seconds: int
    if isinstance(value, bool):
        raise InvalidWebhook("timestamp must be a number", path)
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidWebhook("timestamp must be a finite number", path)
        seconds = int(value)
    elif isinstance(value, str):
        stripped = value.strip()
        if not stripped:
            return None
        # The length cap keeps int() away from Python's 4300-digit limit.
        if len(stripped) > 20 or not _DIGITS.fullmatch(stripped):
            raise InvalidWebhook("timestamp string is not a number", path)
        seconds = int(stripped)
    elif isinstance(value, dict):
        low, high = value.get("low"), value.get("high")
        if (
            not isinstance(low, int)
            or not isinstance(high, int)
            or isinstance(low, bool)
            or isinstance(high, bool)
        ):
            raise InvalidWebhook("Long timestamp needs integer low and high", path)
        seconds = (high << 32) + (low & 0xFFFF_FFFF)
    else:
        raise InvalidWebhook("timestamp must be a number", path)
    if seconds < 0 or seconds > _MAX_UNIX_MILLIS:
        raise InvalidWebhook("timestamp out of range", path)
    if seconds > _MAX_UNIX_SECONDS:
        seconds //= 1000
    return seconds or None  # 0 is protobuf's "unset"


_MEDIA_TYPE_BY_NUMBER: Final = {0: "none", 1: "image", 2: "video"}


def _media_type(value: object, path: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return _MEDIA_TYPE_BY_NUMBER.get(value)  # a future enum value: unknown, not an error
    if isinstance(value, str):
        return value.lower() or None
    raise InvalidWebhook("mediaType must be a number or a string", path)


# --- JIDs ---------------------------------------------------------------------------------

_PHONE_SERVERS: Final = frozenset({"s.whatsapp.net", "c.us"})  # c.us: legacy phone server
_LID_SERVER: Final = "lid"

ChatKind = Literal["phone", "lid", "skip"]


@dataclass(frozen=True, slots=True)
class _Jid:
    kind: ChatKind
    user: str
    """Digits for phone and LID JIDs (agent and device suffixes removed)."""
    skip_reason: str = ""


def _parse_jid(value: str, path: str) -> _Jid:
    """Split `user[_agent][:device]@server` the way Baileys' jidDecode does."""
    user_part, at, server = value.partition("@")
    if not at or not user_part or not server:
        raise InvalidWebhook("not a WhatsApp JID", path)
    user = user_part.split(":", 1)[0].split("_", 1)[0]
    if server == "g.us":
        return _Jid("skip", "", SKIP_GROUP)
    if server == "broadcast":
        return _Jid("skip", "", SKIP_STATUS_BROADCAST if user == "status" else SKIP_BROADCAST_LIST)
    if server == "newsletter":
        return _Jid("skip", "", SKIP_NEWSLETTER)
    if server in _PHONE_SERVERS:
        if not _PHONE_DIGITS.fullmatch(user):
            raise InvalidWebhook("phone JID does not hold a phone number", path)
        return _Jid("phone", user)
    if server == _LID_SERVER:
        if len(user) > 32 or not _DIGITS.fullmatch(user):
            raise InvalidWebhook("LID JID does not hold a numeric id", path)
        return _Jid("lid", user)
    # Servers such as "bot", "call" or "hosted" are not customer chats we track.
    return _Jid("skip", "", f"unsupported chat server {_safe_label(server)}")


# --- Evolution API ------------------------------------------------------------------------

_EVOLUTION_UPSERT_EVENT: Final = "messages.upsert"
# Keys of data.message that are Evolution additions or metadata, not message content.
_NON_CONTENT_KEYS: Final = frozenset({"messageContextInfo", "base64", "mediaUrl"})
_CAPTIONED_MEDIA: Final = ("imageMessage", "videoMessage", "documentMessage")


def _normalise_event_name(event: str) -> str:
    """ "messages.upsert", "MESSAGES_UPSERT" (env-style, as in Evolution's settings and
    some forks) and "messages-upsert" (the webhookByEvents URL suffix) are one event."""
    return event.strip().lower().replace("_", ".").replace("-", ".")


def _parse_evolution(body: dict[str, object]) -> ParsedWebhook:
    event = body.get("event")
    if not isinstance(event, str):
        raise InvalidWebhook("event must be a string", "event")
    if _normalise_event_name(event) != _EVOLUTION_UPSERT_EVENT:
        return SkippedWebhook(f"event {_safe_label(event)} is not a message")
    instance_name = _optional_str(body, "instance", "instance")
    # Research found no Evolution version that sends `data` as a list; a list is rejected.
    data = _required_object(body, "data", "data")
    key = _required_object(data, "key", "data.key")
    chat = _parse_jid(_required_str(key, "remoteJid", "data.key.remoteJid"), "data.key.remoteJid")
    if chat.kind == "skip":
        return SkippedWebhook(chat.skip_reason)
    from_me = _optional_bool(key, "fromMe", "data.key.fromMe")
    message_id = _required_str(key, "id", "data.key.id")

    # The chat JID plus the alternates: remoteJidAlt (Baileys 7), senderPn / senderLid
    # (Baileys 6.7.19). participantAlt / participantPn exist only for groups (skipped).
    jids = [chat]
    for alt_key in ("remoteJidAlt", "senderPn", "senderLid"):
        alt = _optional_str(key, alt_key, f"data.key.{alt_key}")
        if alt is not None:
            jids.append(_parse_jid(alt, f"data.key.{alt_key}"))
    phone = next((jid.user for jid in jids if jid.kind == "phone"), None)
    lid = next((jid.user for jid in jids if jid.kind == "lid"), None)

    message = _optional_object(data, "message", "data.message") or {}
    message_type = (
        _optional_str(data, "messageType", "data.messageType") or _content_key(message) or "unknown"
    )
    ctwa_clid, from_ad, ad = _evolution_ad_attribution(data, message, message_type)
    push_name = _optional_str(data, "pushName", "data.pushName")
    return InboundMessage(
        source="evolution",
        instance_name=instance_name,
        message_id=message_id,
        contact_phone=phone,
        contact_lid=lid,
        from_me=from_me,
        text=_evolution_text(message),
        message_type=message_type,
        sent_at=_unix_seconds(data.get("messageTimestamp"), "data.messageTimestamp"),
        ctwa_clid=ctwa_clid,
        from_ad_without_click_id=from_ad and ctwa_clid is None,
        push_name=None if from_me else push_name,
        ad=ad,
    )


def _content_key(message: dict[str, object]) -> str | None:
    """The proto content type when `messageType` is absent (Baileys getContentType)."""
    return next(
        (k for k, v in message.items() if k not in _NON_CONTENT_KEYS and v is not None), None
    )


def _evolution_text(message: dict[str, object]) -> str:
    path = "data.message"
    conversation = _optional_str(message, "conversation", f"{path}.conversation")
    if conversation:
        return conversation
    # Before Evolution 2.1 the extendedTextMessage was not folded into `conversation`.
    extended = _optional_object(message, "extendedTextMessage", f"{path}.extendedTextMessage")
    if extended is not None:
        text = _optional_str(extended, "text", f"{path}.extendedTextMessage.text")
        if text:
            return text
    for media_key in _CAPTIONED_MEDIA:
        media = _optional_object(message, media_key, f"{path}.{media_key}")
        if media is not None:
            caption = _optional_str(media, "caption", f"{path}.{media_key}.caption")
            if caption:
                return caption
    return ""


def _evolution_context_infos(
    data: dict[str, object], message: dict[str, object], message_type: str
) -> Iterator[tuple[dict[str, object], str]]:
    """Every contextInfo, most authoritative first: the one Evolution lifts to
    `data.contextInfo`, then `message.<messageType>.contextInfo`, then any other content's."""
    top = _optional_object(data, "contextInfo", "data.contextInfo")
    if top is not None:
        yield top, "data.contextInfo"
    ordered = sorted(message, key=lambda content_key: content_key != message_type)
    for content_key in ordered:
        content = message[content_key]
        if isinstance(content, dict):
            path = f"data.message.{content_key}.contextInfo"
            context = _optional_object(content, "contextInfo", path)
            if context is not None:
                yield context, path


def _evolution_ad_attribution(
    data: dict[str, object], message: dict[str, object], message_type: str
) -> tuple[str | None, bool, AdReferral | None]:
    """(ctwa_clid, the payload says "from an ad", ad metadata)."""
    contexts = list(_evolution_context_infos(data, message, message_type))
    from_ad = False
    clid_from_ad_reply: tuple[str, AdReferral] | None = None
    clid_from_referral: tuple[str, AdReferral] | None = None
    first_ad: AdReferral | None = None
    for context, path in contexts:
        conversion_source = _optional_str(context, "conversionSource", f"{path}.conversionSource")
        entry_point = _optional_str(
            context, "entryPointConversionSource", f"{path}.entryPointConversionSource"
        )
        if conversion_source == "FB_Ads" or entry_point == "ctwa_ad":
            from_ad = True
        reply = _optional_object(context, "externalAdReply", f"{path}.externalAdReply")
        if reply is not None:
            reply_path = f"{path}.externalAdReply"
            ad = _evolution_ad(reply, reply_path)
            clid = _optional_str(reply, "ctwaClid", f"{reply_path}.ctwaClid")
            # An externalAdReply also decorates non-ad link shares; only sourceType "ad"
            # or a click id make it an ad.
            if ad.source_type == "ad" or clid is not None:
                from_ad = True
                first_ad = first_ad or ad
            if clid is not None and clid_from_ad_reply is None:
                clid_from_ad_reply = (clid, ad)
        # The seed reads contextInfo.referral.ctwaClid; Baileys has no such field (the
        # research calls it a Cloud API concept), but it is cheap to honour.
        referral = _optional_object(context, "referral", f"{path}.referral")
        if referral is not None:
            referral_path = f"{path}.referral"
            from_ad = True
            ad = _seed_referral_ad(referral, referral_path)
            first_ad = first_ad or ad
            clid = _camel_or_snake_str(referral, "ctwaClid", "ctwa_clid", referral_path)
            if clid is not None and clid_from_referral is None:
                clid_from_referral = (clid, ad)
    found = clid_from_ad_reply or clid_from_referral
    if found is not None:
        return found[0], True, found[1]
    return None, from_ad, first_ad


def _evolution_ad(reply: dict[str, object], path: str) -> AdReferral:
    return AdReferral(
        source_id=_optional_id(reply, "sourceId", f"{path}.sourceId"),
        source_url=_optional_str(reply, "sourceUrl", f"{path}.sourceUrl"),
        source_type=_optional_str(reply, "sourceType", f"{path}.sourceType"),
        source_app=_optional_str(reply, "sourceApp", f"{path}.sourceApp"),
        media_type=_media_type(reply.get("mediaType"), f"{path}.mediaType"),
    )


def _camel_or_snake_str(obj: dict[str, object], camel: str, snake: str, path: str) -> str | None:
    return _optional_id(obj, camel, f"{path}.{camel}") or _optional_id(
        obj, snake, f"{path}.{snake}"
    )


def _seed_referral_ad(referral: dict[str, object], path: str) -> AdReferral:
    """The seed's `contextInfo.referral`: its key style is unknown, so accept both."""
    media_type = referral.get("mediaType", referral.get("media_type"))
    return AdReferral(
        source_id=_camel_or_snake_str(referral, "sourceId", "source_id", path),
        source_url=_camel_or_snake_str(referral, "sourceUrl", "source_url", path),
        source_type=_camel_or_snake_str(referral, "sourceType", "source_type", path),
        source_app=_camel_or_snake_str(referral, "sourceApp", "source_app", path),
        media_type=_media_type(media_type, f"{path}.mediaType"),
    )


# --- WhatsApp Cloud API -------------------------------------------------------------------

_CLOUD_OBJECT: Final = "whatsapp_business_account"
_CLOUD_CAPTIONED_MEDIA: Final = ("image", "video", "document")


def _parse_cloud_api(body: dict[str, object]) -> list[ParsedWebhook]:
    webhook_object = body.get("object")
    if not isinstance(webhook_object, str):
        raise InvalidWebhook("object must be a string", "object")
    if webhook_object != _CLOUD_OBJECT:
        return [SkippedWebhook(f"cloud api object {_safe_label(webhook_object)} is not whatsapp")]
    results: list[ParsedWebhook] = []
    for entry_index, entry_value in enumerate(_optional_list(body, "entry", "entry")):
        entry_path = f"entry[{entry_index}]"
        entry = _as_object(entry_value, entry_path)
        changes = _optional_list(entry, "changes", f"{entry_path}.changes")
        for change_index, change_value in enumerate(changes):
            change_path = f"{entry_path}.changes[{change_index}]"
            change = _as_object(change_value, change_path)
            field_name = _required_str(change, "field", f"{change_path}.field")
            if field_name != "messages":
                results.append(
                    SkippedWebhook(f"cloud api field {_safe_label(field_name)} is not messages")
                )
                continue
            results.extend(_parse_cloud_change(change, change_path))
    return results or [SkippedWebhook(SKIP_CLOUD_NO_MESSAGES)]


def _parse_cloud_change(change: dict[str, object], change_path: str) -> list[ParsedWebhook]:
    value_path = f"{change_path}.value"
    value = _required_object(change, "value", value_path)
    metadata = _optional_object(value, "metadata", f"{value_path}.metadata") or {}
    phone_number_id = _optional_id(
        metadata, "phone_number_id", f"{value_path}.metadata.phone_number_id"
    )
    names_by_wa_id: dict[str, str] = {}
    for contact_index, contact_value in enumerate(
        _optional_list(value, "contacts", f"{value_path}.contacts")
    ):
        contact_path = f"{value_path}.contacts[{contact_index}]"
        contact = _as_object(contact_value, contact_path)
        wa_id = _optional_str(contact, "wa_id", f"{contact_path}.wa_id")
        profile = _optional_object(contact, "profile", f"{contact_path}.profile") or {}
        name = _optional_str(profile, "name", f"{contact_path}.profile.name")
        if wa_id is not None and name is not None:
            names_by_wa_id[wa_id] = name
    messages = _optional_list(value, "messages", f"{value_path}.messages")
    if not messages:  # e.g. a `statuses` (delivery receipt) change
        return [SkippedWebhook(SKIP_CLOUD_NO_MESSAGES)]
    return [
        _parse_cloud_message(
            _as_object(message_value, f"{value_path}.messages[{index}]"),
            f"{value_path}.messages[{index}]",
            phone_number_id,
            names_by_wa_id,
        )
        for index, message_value in enumerate(messages)
    ]


def _parse_cloud_message(
    message: dict[str, object],
    path: str,
    phone_number_id: str | None,
    names_by_wa_id: dict[str, str],
) -> InboundMessage:
    phone = _required_str(message, "from", f"{path}.from")
    if not _PHONE_DIGITS.fullmatch(phone):
        raise InvalidWebhook("sender is not a phone number", f"{path}.from")
    message_type = _optional_str(message, "type", f"{path}.type") or "unknown"
    ctwa_clid: str | None = None
    ad: AdReferral | None = None
    referral = _optional_object(message, "referral", f"{path}.referral")
    if referral is not None:
        ad = _cloud_ad(referral, f"{path}.referral")
        # Meta omits ctwa_clid for ads placed in WhatsApp Status.
        ctwa_clid = _optional_str(referral, "ctwa_clid", f"{path}.referral.ctwa_clid")
    return InboundMessage(
        source="cloud_api",
        instance_name=phone_number_id,
        message_id=_required_str(message, "id", f"{path}.id"),
        contact_phone=phone,
        contact_lid=None,
        from_me=False,  # the `messages` field carries only what customers send
        text=_cloud_text(message, path),
        message_type=message_type,
        sent_at=_unix_seconds(message.get("timestamp"), f"{path}.timestamp"),
        ctwa_clid=ctwa_clid,
        from_ad_without_click_id=referral is not None and ctwa_clid is None,
        push_name=names_by_wa_id.get(phone),
        ad=ad,
    )


def _cloud_text(message: dict[str, object], path: str) -> str:
    text = _optional_object(message, "text", f"{path}.text")
    if text is not None:
        body = _optional_str(text, "body", f"{path}.text.body")
        if body:
            return body
    for media_key in _CLOUD_CAPTIONED_MEDIA:
        media = _optional_object(message, media_key, f"{path}.{media_key}")
        if media is not None:
            caption = _optional_str(media, "caption", f"{path}.{media_key}.caption")
            if caption:
                return caption
    return ""


def _cloud_ad(referral: dict[str, object], path: str) -> AdReferral:
    return AdReferral(
        source_id=_optional_id(referral, "source_id", f"{path}.source_id"),
        source_url=_optional_str(referral, "source_url", f"{path}.source_url"),
        source_type=_optional_str(referral, "source_type", f"{path}.source_type"),
        source_app=None,
        media_type=_media_type(referral.get("media_type"), f"{path}.media_type"),
    )
