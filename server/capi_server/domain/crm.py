"""CRM values, webhook parsing and field matching for amoCRM (Kommo) and Bitrix24.

Pure: no I/O. The REST adapters (capi_server.adapters.crm) build `CrmEntity` values,
this module decides which configured level fields an entity matches and what a
webhook body names.

Entity model: amoCRM has no separate "deal"; its leads are the deals of the funnel,
so every amoCRM lead is reported as `EntityType.DEAL` (webhooks and REST alike).
Bitrix24 has leads, deals and contacts as three distinct entities.

Shapes are documented in shared/design/research/payloads.md sections 2 and 3.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import NamedTuple
from urllib.parse import parse_qsl

from capi_server.domain.levels import Level

# A webhook is a few KiB; anything much larger is a mistake or abuse.
MAX_CRM_WEBHOOK_BYTES = 256 * 1024


class CrmType(enum.StrEnum):
    AMOCRM = "amocrm"
    BITRIX24 = "bitrix24"


class EntityType(enum.StrEnum):
    LEAD = "lead"
    DEAL = "deal"
    CONTACT = "contact"


# ---------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CrmFieldRule:
    """One configured field of a level: an entry of capi_<level>_fields (the seed's JSONB).

    For select-like fields `enum_id` (or, when only it is set, `enum_value`) is the
    expected option. For text/number/checkbox fields `enum_value` holds the expected
    value; a rule without any expected value matches a non-empty (checkbox: checked) field.
    `entity_type` (contact | deal | lead) is Bitrix24 only: which entity holds the field.
    """

    field_id: str
    field_name: str | None = None
    field_type: str | None = None
    enum_id: str | None = None
    enum_value: str | None = None
    entity_type: str | None = None

    @classmethod
    def from_json(cls, entry: Mapping[str, object]) -> CrmFieldRule:
        """Build from a JSONB entry; ids may be numbers there, they become strings."""

        def text(key: str) -> str | None:
            value = entry.get(key)
            if value is None or isinstance(value, dict | list):
                return None
            if isinstance(value, bool):
                return "true" if value else "false"
            rendered = str(value).strip()
            return rendered or None

        return cls(
            field_id=text("field_id") or "",
            field_name=text("field_name"),
            field_type=text("field_type"),
            enum_id=text("enum_id"),
            enum_value=text("enum_value"),
            entity_type=text("entity_type"),
        )

    def to_json(self) -> dict[str, str]:
        """The JSONB entry, omitting empty keys."""
        entry = {
            "field_id": self.field_id,
            "field_name": self.field_name,
            "field_type": self.field_type,
            "enum_id": self.enum_id,
            "enum_value": self.enum_value,
            "entity_type": self.entity_type,
        }
        return {key: value for key, value in entry.items() if value is not None}


@dataclass(frozen=True, slots=True)
class CrmFieldValue:
    """The current value(s) of one field on an entity, all as strings.

    `values` holds display values (amoCRM `value`, Bitrix24 raw value or the resolved
    list item text); `enum_ids` holds selected option ids where the field has options.
    """

    field_id: str
    values: tuple[str, ...] = ()
    enum_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CrmEntity:
    """A lead, deal or contact as read from the CRM.

    `fields` is keyed by `normalise_field_id`. Phones and emails are the raw strings the
    CRM holds (of the entity itself and of its main contact); normalise before hashing.
    `main_contact` is the linked main contact of a deal/lead when it was read, so rules on
    contact fields can be evaluated without another request.
    """

    crm_type: CrmType
    entity_type: EntityType
    entity_id: str
    fields: Mapping[str, CrmFieldValue] = field(default_factory=dict)
    contact_phones: tuple[str, ...] = ()
    contact_emails: tuple[str, ...] = ()
    linked_contact_ids: tuple[str, ...] = ()
    updated_at: int | None = None
    main_contact: CrmEntity | None = None


@dataclass(frozen=True, slots=True)
class CrmFieldInfo:
    """A field as listed by the CRM, for the settings UI (ListCrmFields)."""

    field_id: str
    field_name: str
    field_type: str
    enums: tuple[tuple[str, str], ...] = ()  # (enum_id, enum_value)


# ---------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------

_DIGITS = re.compile(r"[0-9]{1,20}")
_WHITESPACE = re.compile(r"\s+")


def normalise_id(raw: object) -> str:
    """An id as a canonical string: amoCRM REST gives ints, webhooks and Bitrix24 strings.

    Numeric ids lose leading zeros and a float's ".0"; other ids are stripped and
    upper-cased (Bitrix24 field codes such as UF_CRM_1724077760 are upper-case).
    """
    if isinstance(raw, bool):
        return str(raw).upper()
    if isinstance(raw, int):
        return str(raw)
    if isinstance(raw, float) and raw.is_integer():
        return str(int(raw))
    text = str(raw).strip()
    if _DIGITS.fullmatch(text):
        return str(int(text))
    return text.upper()


normalise_field_id = normalise_id


def normalise_text(raw: str) -> str:
    """Case- and whitespace-insensitive form of an option or text value."""
    return _WHITESPACE.sub(" ", raw).strip().casefold()


_TRUE_WORDS = frozenset({"1", "y", "yes", "true", "on", "да", "sim", "checked"})
_FALSE_WORDS = frozenset({"0", "n", "no", "false", "off", "нет", "não", "nao", ""})


def parse_bool(raw: str) -> bool | None:
    """A checkbox value: amoCRM sends true/"1", Bitrix24 "Y"/"N" or "1"/"0"."""
    word = normalise_text(raw)
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    return None


def parse_number(raw: str) -> Decimal | None:
    """A numeric value; Bitrix24 money fields look like "1200.00|BRL", commas allowed."""
    text = raw.split("|", 1)[0].strip().replace(" ", "").replace(",", ".")
    try:
        number = Decimal(text)
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


# ---------------------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------------------

# Fields whose value is one or more options of a list.
ENUM_FIELD_TYPES = frozenset(
    {"select", "multiselect", "enumeration", "list", "radiobutton", "crm_status", "category"}
)
BOOLEAN_FIELD_TYPES = frozenset({"checkbox", "boolean", "bool"})
NUMBER_FIELD_TYPES = frozenset(
    {"number", "numeric", "integer", "int", "double", "float", "money", "price"}
)
BITRIX_RULE_ENTITY_TYPES = frozenset({"contact", "deal", "lead"})


def _field_type(rule: CrmFieldRule) -> str:
    return (rule.field_type or "").strip().casefold()


def match_field_rule(rule: CrmFieldRule, value: CrmFieldValue, crm_type: CrmType) -> bool:
    """Whether the current `value` of the rule's field satisfies `rule`."""
    kind = _field_type(rule)
    if rule.enum_id and (kind in ENUM_FIELD_TYPES or kind == ""):
        wanted_id = normalise_id(rule.enum_id)
        candidates = {normalise_id(enum_id) for enum_id in value.enum_ids}
        if crm_type is CrmType.BITRIX24:
            # A Bitrix24 list field's raw value is the item ID itself.
            candidates.update(normalise_id(raw) for raw in value.values)
        return wanted_id in candidates
    expected = rule.enum_value if rule.enum_value is not None else rule.enum_id
    if kind in BOOLEAN_FIELD_TYPES:
        wanted_bool = True if expected is None else parse_bool(expected)
        return wanted_bool is not None and any(
            parse_bool(raw) is wanted_bool for raw in value.values
        )
    if expected is None:
        # Nothing to compare with: "the field is filled in".
        return any(raw.strip() for raw in value.values) or bool(value.enum_ids)
    if kind in NUMBER_FIELD_TYPES:
        wanted_number = parse_number(expected)
        if wanted_number is None:
            return False
        return any(parse_number(raw) == wanted_number for raw in value.values)
    wanted_text = normalise_text(expected)
    return any(normalise_text(raw) == wanted_text for raw in value.values)


def _entities_for_rule(
    rule: CrmFieldRule, entity: CrmEntity, related: Sequence[CrmEntity], crm_type: CrmType
) -> list[CrmEntity]:
    """Which entities a rule is evaluated against, in order of preference."""
    if crm_type is CrmType.BITRIX24:
        if rule.entity_type:
            wanted = rule.entity_type.strip().casefold()
            return [e for e in (entity, *related) if e.entity_type.value == wanted][:1]
        return [entity]
    # amoCRM field ids are unique within an account, so a rule names one field wherever it
    # lives: look on the lead first, then on its contact(s).
    return [entity, *related]


def match_crm_fields(
    rules_by_level: Mapping[Level, Sequence[CrmFieldRule]],
    entity: CrmEntity,
    crm_type: CrmType | str,
    *,
    related: Sequence[CrmEntity] | None = None,
) -> dict[Level, list[CrmFieldRule]]:
    """The rules each level matches on `entity`; only levels with a match are returned.

    OR logic within a level: one matching rule is enough, every matching rule is listed
    (for the audit trail). `related` are other entities of the same record (the main
    contact of a deal); by default `entity.main_contact`. Bitrix24 rules with
    `entity_type` are evaluated against the entity of that type only, so a "contact" rule
    never matches a deal field with the same code. A field that is absent never matches.
    """
    crm = CrmType(crm_type)
    if related is None:
        related = [entity.main_contact] if entity.main_contact is not None else []
    matched: dict[Level, list[CrmFieldRule]] = {}
    for level in sorted(rules_by_level):
        hits: list[CrmFieldRule] = []
        for rule in rules_by_level[level]:
            if not rule.field_id:
                continue
            field_key = normalise_field_id(rule.field_id)
            for candidate in _entities_for_rule(rule, entity, related, crm):
                value = candidate.fields.get(field_key)
                if value is None:
                    continue
                if match_field_rule(rule, value, crm):
                    hits.append(rule)
                break  # the first entity holding the field decides
        if hits:
            matched[level] = hits
    return matched


def validate_field_rule(rule: CrmFieldRule, crm_type: CrmType | str) -> list[tuple[str, str]]:
    """Problems of one configured rule as (field_path, problem); empty when valid."""
    crm = CrmType(crm_type)
    problems: list[tuple[str, str]] = []
    if not rule.field_id or not rule.field_id.strip():
        problems.append(("field_id", "field_id is required"))
    kind = _field_type(rule)
    if kind in ENUM_FIELD_TYPES and not (rule.enum_id or rule.enum_value):
        problems.append(("enum_id", f"a {kind} field needs enum_id or enum_value"))
    amo_enum = kind in ENUM_FIELD_TYPES and crm is CrmType.AMOCRM
    if amo_enum and rule.enum_id and not _DIGITS.fullmatch(rule.enum_id.strip()):
        problems.append(("enum_id", "amoCRM enum_id must be a number"))
    expected = rule.enum_value
    if kind in BOOLEAN_FIELD_TYPES and expected is not None and parse_bool(expected) is None:
        problems.append(("enum_value", "checkbox value must be true or false"))
    if kind in NUMBER_FIELD_TYPES and expected is not None and parse_number(expected) is None:
        problems.append(("enum_value", "numeric field value must be a number"))
    if rule.entity_type is not None:
        if crm is not CrmType.BITRIX24:
            problems.append(("entity_type", "entity_type is supported for bitrix24 only"))
        elif rule.entity_type.strip().casefold() not in BITRIX_RULE_ENTITY_TYPES:
            problems.append(("entity_type", "entity_type must be contact, deal or lead"))
    return problems


# ---------------------------------------------------------------------------------------
# Webhooks
# ---------------------------------------------------------------------------------------


class InvalidCrmWebhook(ValueError):
    """A webhook body that cannot be understood; `field` names the offending key."""

    def __init__(self, reason: str, field: str = "body") -> None:
        super().__init__(f"{reason} ({field})")
        self.reason = reason
        self.field = field


class CrmWebhookEntity(NamedTuple):
    entity_type: EntityType
    entity_id: str
    action: str  # add | update | status


@dataclass(frozen=True, slots=True)
class CrmWebhook:
    """What a CRM webhook names: the entities to re-read and the tenant it came from.

    Webhook payload values are partial or stale, so only ids are kept; the entity is
    re-read through REST before matching.
    """

    crm_type: CrmType
    entities: tuple[CrmWebhookEntity, ...]
    amo_subdomain: str | None = None
    amo_account_id: str | None = None
    bitrix_domain: str | None = None
    bitrix_member_id: str | None = None
    bitrix_application_token: str | None = None
    bitrix_event: str | None = None
    sent_at_unix: int | None = None


# PHP-style form bodies become nested dicts; lists become dicts keyed "0", "1", ...
_Nested = dict[str, object]

_AMO_SECTIONS: Mapping[str, tuple[EntityType, frozenset[str]]] = {
    "leads": (EntityType.DEAL, frozenset({"add", "update", "status"})),
    "contacts": (EntityType.CONTACT, frozenset({"add", "update"})),
}
# amoCRM webhook sections we know but do not act on; a body naming them is refused so a
# misconfigured hook shows up as an error instead of silently doing nothing.
_AMO_UNSUPPORTED_SECTIONS = frozenset(
    {"companies", "customers", "tasks", "catalogs", "unsorted", "talk", "message", "notes"}
)
_BITRIX_EVENTS: Mapping[str, tuple[EntityType, str]] = {
    "ONCRMDEALADD": (EntityType.DEAL, "add"),
    "ONCRMDEALUPDATE": (EntityType.DEAL, "update"),
    "ONCRMLEADADD": (EntityType.LEAD, "add"),
    "ONCRMLEADUPDATE": (EntityType.LEAD, "update"),
    "ONCRMCONTACTADD": (EntityType.CONTACT, "add"),
    "ONCRMCONTACTUPDATE": (EntityType.CONTACT, "update"),
}
_KEY_PART = re.compile(r"\[([^\[\]]*)\]")


def _split_php_key(key: str) -> list[str]:
    """`leads[update][0][id]` -> ["leads", "update", "0", "id"]; odd keys stay whole."""
    head, bracket, _ = key.partition("[")
    if not bracket or not head:
        return [key]
    rest = key[len(head) :]
    parts = _KEY_PART.findall(rest)
    if "".join(f"[{part}]" for part in parts) != rest:
        return [key]
    return [head, *parts]


def _parse_form(text: str) -> _Nested:
    try:
        pairs = parse_qsl(text, keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidCrmWebhook("body is not valid form encoding") from exc
    root: _Nested = {}
    for key, value in pairs:
        path = _split_php_key(key)
        node = root
        for depth, part in enumerate(path):
            last = depth == len(path) - 1
            if part == "":  # PHP "[]": append
                part = str(len(node))
            if last:
                if isinstance(node.get(part), dict):
                    raise InvalidCrmWebhook("key is both a value and a group", key)
                node[part] = value
            else:
                child = node.setdefault(part, {})
                if not isinstance(child, dict):
                    raise InvalidCrmWebhook("key is both a value and a group", key)
                node = child
    return root


def _from_json(value: object) -> object:
    """JSON lists become index-keyed dicts so JSON and form bodies read alike."""
    if isinstance(value, list):
        return {str(index): _from_json(item) for index, item in enumerate(value)}
    if isinstance(value, dict):
        return {str(key): _from_json(item) for key, item in value.items()}
    return value


def _parse_json(text: str) -> _Nested:
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise InvalidCrmWebhook("body is not valid JSON") from exc
    if not isinstance(document, dict):
        raise InvalidCrmWebhook("JSON body must be an object")
    converted = _from_json(document)
    assert isinstance(converted, dict)
    return converted


def _scalar(value: object) -> str | None:
    if value is None or isinstance(value, dict | bool):
        return None
    text = str(value).strip()
    return text or None


def _entity_id(raw: object, field_path: str) -> str:
    if isinstance(raw, bool):
        raise InvalidCrmWebhook("id must be a number", field_path)
    text = _scalar(raw)
    if text is None:
        raise InvalidCrmWebhook("id is missing", field_path)
    if not _DIGITS.fullmatch(text):
        raise InvalidCrmWebhook("id must be a number", field_path)
    return str(int(text))


def _dedupe(entities: Iterable[CrmWebhookEntity]) -> tuple[CrmWebhookEntity, ...]:
    seen: set[tuple[EntityType, str]] = set()
    unique: list[CrmWebhookEntity] = []
    for item in entities:
        key = (item.entity_type, item.entity_id)
        if key not in seen:
            seen.add(key)
            unique.append(item)
    return tuple(unique)


def _parse_amo(document: _Nested) -> CrmWebhook:
    entities: list[CrmWebhookEntity] = []
    account = document.get("account")
    for section, content in document.items():
        if section in _AMO_UNSUPPORTED_SECTIONS:
            raise InvalidCrmWebhook("unsupported amoCRM entity", section)
        if section not in _AMO_SECTIONS:
            continue  # "account" and keys amoCRM may add later
        entity_type, actions = _AMO_SECTIONS[section]
        if not isinstance(content, dict):
            raise InvalidCrmWebhook("entity section must hold actions", section)
        for action, items in content.items():
            path = f"{section}[{action}]"
            if action not in actions:
                raise InvalidCrmWebhook("unsupported amoCRM action", path)
            if not isinstance(items, dict) or not items:
                raise InvalidCrmWebhook("action holds no entities", path)
            for index, item in items.items():
                item_path = f"{path}[{index}][id]"
                if not isinstance(item, dict):
                    raise InvalidCrmWebhook("id is missing", item_path)
                entities.append(
                    CrmWebhookEntity(entity_type, _entity_id(item.get("id"), item_path), action)
                )
    if not entities:
        raise InvalidCrmWebhook("webhook names no lead or contact", "body")
    subdomain = account_id = None
    if isinstance(account, dict):
        subdomain = _scalar(account.get("subdomain"))
        if account.get("id") is not None:
            account_id = _entity_id(account.get("id"), "account[id]")
    return CrmWebhook(
        crm_type=CrmType.AMOCRM,
        entities=_dedupe(entities),
        amo_subdomain=subdomain.lower() if subdomain else None,
        amo_account_id=account_id,
    )


def _parse_bitrix(document: _Nested) -> CrmWebhook:
    event = (_scalar(document.get("event")) or "").upper()
    if event not in _BITRIX_EVENTS:
        raise InvalidCrmWebhook("unsupported Bitrix24 event", "event")
    entity_type, action = _BITRIX_EVENTS[event]
    data = document.get("data")
    fields = data.get("FIELDS") if isinstance(data, dict) else None
    raw_id = fields.get("ID") if isinstance(fields, dict) else None
    entity_id = _entity_id(raw_id, "data[FIELDS][ID]")
    auth = document.get("auth")
    auth = auth if isinstance(auth, dict) else {}
    ts_text = _scalar(document.get("ts"))
    sent_at = int(ts_text) if ts_text and _DIGITS.fullmatch(ts_text) else None
    domain = _scalar(auth.get("domain"))
    return CrmWebhook(
        crm_type=CrmType.BITRIX24,
        entities=(CrmWebhookEntity(entity_type, entity_id, action),),
        bitrix_domain=domain.lower() if domain else None,
        bitrix_member_id=_scalar(auth.get("member_id")),
        bitrix_application_token=_scalar(auth.get("application_token")),
        bitrix_event=event,
        sent_at_unix=sent_at,
    )


def parse_crm_webhook(body: bytes, content_type: str = "") -> CrmWebhook:
    """Parse an amoCRM or Bitrix24 webhook body as received (form-encoded or JSON).

    Raises InvalidCrmWebhook for oversized bodies, invalid UTF-8, unknown events or
    entity types, and missing or non-numeric ids. An entity named twice is listed once.
    """
    if len(body) > MAX_CRM_WEBHOOK_BYTES:
        raise InvalidCrmWebhook(f"body exceeds {MAX_CRM_WEBHOOK_BYTES} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidCrmWebhook("body is not valid UTF-8") from exc
    stripped = text.strip()
    if not stripped:
        raise InvalidCrmWebhook("body is empty")
    if "json" in content_type.lower() or stripped.startswith("{"):
        document = _parse_json(stripped)
    else:
        document = _parse_form(stripped)
    if "event" in document:
        return _parse_bitrix(document)
    if any(key in document for key in ("account", *_AMO_SECTIONS, *_AMO_UNSUPPORTED_SECTIONS)):
        return _parse_amo(document)
    raise InvalidCrmWebhook("body is neither an amoCRM nor a Bitrix24 webhook")
