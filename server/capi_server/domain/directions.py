"""Accounts, CRM connections and directions with their CAPI settings, and their rules."""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from urllib.parse import urlsplit

from capi_server.domain.crm import CrmFieldRule, CrmType, validate_field_rule
from capi_server.domain.errors import FieldViolation, InvalidArgument
from capi_server.domain.levels import SEED_EVENT_NAMES, Level, event_name_warning


class CapiSource(enum.StrEnum):
    WHATSAPP = "whatsapp"
    CRM = "crm"


PIXEL_WARNING = (
    "Audiences of the directions that share a pixel are aggregated "
    "(Аудитории разных направлений будут агрегированы)"
)

_PIXEL_ID = re.compile(r"^\d{1,32}$")
_EVENT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,49}$")
_REGION = re.compile(r"^[A-Z]{2}$")
TEST_EVENT_CODE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_NAME = 200
MAX_PROMPT = 32_000
MAX_FIELDS_PER_LEVEL = 50


@dataclass(frozen=True, slots=True)
class UserAccount:
    id: int | None
    name: str
    default_region: str | None = None
    has_access_token: bool = False


@dataclass(frozen=True, slots=True)
class AdAccount:
    id: int | None
    user_account_id: int
    name: str
    has_access_token: bool = False


@dataclass(frozen=True, slots=True)
class CrmConnection:
    id: int | None
    user_account_id: int
    crm_type: CrmType
    base_url: str
    portal: str
    has_access_token: bool = False
    has_application_token: bool = False
    reconcile_interval_seconds: int = 0


@dataclass(frozen=True, slots=True)
class CapiSettings:
    enabled: bool = False
    source: CapiSource | None = None
    crm_type: CrmType | None = None
    crm_connection_id: int | None = None
    fields: Mapping[Level, tuple[CrmFieldRule, ...]] = field(default_factory=dict)
    test_event_code: str | None = None
    event_names: Mapping[Level, str] = field(default_factory=dict)
    require_ctwa_clid: bool = False
    limited_data_use: bool = False
    review_confidence_threshold: float = 0.0

    def event_name(self, level: Level) -> str:
        return self.event_names.get(level) or SEED_EVENT_NAMES[level]

    def fields_for(self, level: Level) -> tuple[CrmFieldRule, ...]:
        return tuple(self.fields.get(level, ()))


@dataclass(frozen=True, slots=True)
class Direction:
    id: int | None
    user_account_id: int
    name: str
    ad_account_id: int | None = None
    instance_name: str | None = None
    pixel_id: str | None = None
    whatsapp_business_account_id: str | None = None
    qualification_prompt: str | None = None
    capi: CapiSettings = field(default_factory=CapiSettings)
    created_at: datetime | None = field(default=None, compare=False)
    updated_at: datetime | None = field(default=None, compare=False)


def portal_of(crm_type: CrmType, base_url: str) -> str:
    """The host a webhook names: amoCRM subdomain, or the Bitrix24 portal host."""
    host = (urlsplit(base_url).hostname or "").lower()
    if crm_type is CrmType.AMOCRM:
        for suffix in (".amocrm.ru", ".amocrm.com", ".kommo.com"):
            if host.endswith(suffix):
                return host[: -len(suffix)]
    return host


def validate_base_url(base_url: str, path: str) -> list[FieldViolation]:
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return [FieldViolation(path, "must be an http(s) URL")]
    return []


def validate_user_account(account: UserAccount, path: str) -> list[FieldViolation]:
    problems = validate_name(account.name, f"{path}.name")
    if account.default_region and not _REGION.match(account.default_region):
        problems.append(
            FieldViolation(f"{path}.default_region", "must be an ISO 3166 alpha-2 code like KZ")
        )
    return problems


def validate_name(name: str, path: str) -> list[FieldViolation]:
    if not name.strip():
        return [FieldViolation(path, "is required")]
    if len(name) > MAX_NAME:
        return [FieldViolation(path, f"must be at most {MAX_NAME} characters")]
    return []


def validate_direction(direction: Direction, path: str = "direction") -> list[FieldViolation]:
    """Every rule a stored direction must satisfy; empty when valid."""
    problems = validate_name(direction.name, f"{path}.name")
    if direction.instance_name is not None and len(direction.instance_name) > MAX_NAME:
        problems.append(FieldViolation(f"{path}.instance_name", "must be at most 200 characters"))
    if direction.pixel_id and not _PIXEL_ID.match(direction.pixel_id):
        problems.append(FieldViolation(f"{path}.pixel_id", "must be the numeric pixel id"))
    if direction.qualification_prompt and len(direction.qualification_prompt) > MAX_PROMPT:
        problems.append(
            FieldViolation(
                f"{path}.qualification_prompt", f"must be at most {MAX_PROMPT} characters"
            )
        )
    capi = direction.capi
    cpath = f"{path}.capi"
    if capi.enabled and not direction.pixel_id:
        problems.append(FieldViolation(f"{path}.pixel_id", "is required when capi.enabled"))
    if capi.enabled and capi.source is None:
        problems.append(FieldViolation(f"{cpath}.source", "must be whatsapp or crm"))
    if capi.test_event_code and not TEST_EVENT_CODE.match(capi.test_event_code):
        problems.append(FieldViolation(f"{cpath}.test_event_code", "must be 1-64 of [A-Za-z0-9_-]"))
    if not 0.0 <= capi.review_confidence_threshold <= 1.0:
        problems.append(
            FieldViolation(f"{cpath}.review_confidence_threshold", "must be between 0 and 1")
        )
    for level, name in capi.event_names.items():
        if name and not _EVENT_NAME.match(name):
            problems.append(
                FieldViolation(
                    f"{cpath}.event_names.{level.column}", "must be letters, digits or _"
                )
            )
    any_fields = any(capi.fields_for(level) for level in Level)
    if capi.source is CapiSource.CRM:
        if capi.crm_type is None:
            problems.append(FieldViolation(f"{cpath}.crm_type", "is required: amocrm or bitrix24"))
        if capi.crm_connection_id is None:
            problems.append(
                FieldViolation(f"{cpath}.crm_connection_id", "is required when source is crm")
            )
        if not any_fields:
            problems.append(
                FieldViolation(
                    f"{cpath}.interest_fields",
                    "a crm source needs at least one field on some level",
                )
            )
    elif any_fields:
        problems.append(
            FieldViolation(f"{cpath}.interest_fields", "CRM fields are only used with source crm")
        )
    if capi.crm_type is not None:
        for level in Level:
            rules = capi.fields_for(level)
            lpath = f"{cpath}.{level.column}_fields"
            if len(rules) > MAX_FIELDS_PER_LEVEL:
                problems.append(FieldViolation(lpath, f"at most {MAX_FIELDS_PER_LEVEL} fields"))
            for i, rule in enumerate(rules):
                for sub, problem in validate_field_rule(rule, capi.crm_type):
                    problems.append(FieldViolation(f"{lpath}[{i}].{sub}", problem))
    return problems


def direction_warnings(direction: Direction, other_directions_on_pixel: int) -> list[str]:
    """Things worth saying when settings are saved that do not block saving."""
    warnings: list[str] = []
    if direction.capi.enabled:
        for level in Level:
            warning = event_name_warning(level, direction.capi.event_name(level))
            if warning:
                warnings.append(warning)
    if direction.pixel_id and other_directions_on_pixel:
        warnings.append(
            f"pixel {direction.pixel_id} is used by {other_directions_on_pixel} other "
            f"direction(s): {PIXEL_WARNING}"
        )
    return warnings


_CAPI_MASK_FIELDS = {
    "enabled",
    "source",
    "crm_type",
    "crm_connection_id",
    "test_event_code",
    "event_names",
    "require_ctwa_clid",
    "limited_data_use",
    "review_confidence_threshold",
}
_CAPI_LEVEL_FIELDS = {
    "interest_fields": Level.INTEREST,
    "qualified_fields": Level.QUALIFIED,
    "scheduled_fields": Level.SCHEDULED,
}
_DIRECTION_MASK_FIELDS = {
    "name",
    "ad_account_id",
    "instance_name",
    "pixel_id",
    "whatsapp_business_account_id",
    "qualification_prompt",
}


def apply_direction_mask(
    stored: Direction, incoming: Direction, paths: list[str], path: str = "update_mask"
) -> Direction:
    """`stored` with the fields named by the field mask `paths` taken from `incoming`."""
    if not paths:
        raise InvalidArgument(
            "update_mask is empty",
            [FieldViolation(f"{path}.paths", "name at least one field to update")],
        )
    result = stored
    capi = stored.capi
    for raw in paths:
        name = raw.strip()
        if name in _DIRECTION_MASK_FIELDS:
            result = replace(result, **{name: getattr(incoming, name)})
        elif name == "capi":
            capi = incoming.capi
        elif name.startswith("capi.") and name[5:] in _CAPI_MASK_FIELDS:
            capi = replace(capi, **{name[5:]: getattr(incoming.capi, name[5:])})
        elif name.startswith("capi.") and name[5:] in _CAPI_LEVEL_FIELDS:
            level = _CAPI_LEVEL_FIELDS[name[5:]]
            fields = dict(capi.fields)
            fields[level] = incoming.capi.fields_for(level)
            capi = replace(capi, fields=fields)
        else:
            raise InvalidArgument(
                f"update_mask names an unknown or immutable field {name!r}",
                [FieldViolation(f"{path}.paths", f"unknown or immutable field {name!r}")],
            )
    return replace(result, capi=capi)
