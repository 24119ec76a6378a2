"""Pure proto <-> domain converters, id parsing and page tokens."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp

from capi.v1 import resources_pb2 as res
from capi_server.domain.crm import CrmFieldRule, CrmType
from capi_server.domain.directions import (
    AdAccount,
    CapiSettings,
    CapiSource,
    CrmConnection,
    Direction,
    UserAccount,
)
from capi_server.domain.errors import FieldViolation, InvalidArgument
from capi_server.domain.levels import Level

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500

_CAPI_SOURCES: dict[int, CapiSource] = {
    res.CAPI_SOURCE_WHATSAPP: CapiSource.WHATSAPP,
    res.CAPI_SOURCE_CRM: CapiSource.CRM,
}
_CRM_TYPES: dict[int, CrmType] = {
    res.CRM_TYPE_AMOCRM: CrmType.AMOCRM,
    res.CRM_TYPE_BITRIX24: CrmType.BITRIX24,
}


def parse_id(value: str, field: str, *, required: bool = True) -> int | None:
    """Ids are decimal strings on the wire and integers in the database."""
    value = value.strip()
    if not value:
        if required:
            raise InvalidArgument.field(field, "is required")
        return None
    if not (value.isascii() and value.isdigit()) or len(value) > 18 or int(value) <= 0:
        raise InvalidArgument.field(field, "must be a positive decimal id")
    return int(value)


def require_id(value: str, field: str) -> int:
    parsed = parse_id(value, field)
    assert parsed is not None
    return parsed


def optional_id(value: str, field: str) -> int | None:
    return parse_id(value, field, required=False)


def parse_level(value: int, field: str = "level") -> Level:
    try:
        return Level(value)
    except ValueError:
        raise InvalidArgument.field(
            field, "must be LEVEL_INTEREST, LEVEL_QUALIFIED or LEVEL_SCHEDULED"
        ) from None


def level_out(level: Level) -> res.Level.ValueType:
    return res.Level.ValueType(int(level))


def parse_page(page_size: int, page_token: str) -> tuple[int, int]:
    """(limit, after_id) from page_size and an opaque page token."""
    if page_size < 0:
        raise InvalidArgument.field("page_size", "must not be negative")
    limit = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    if not page_token:
        return limit, 0
    try:
        cursor = json.loads(base64.urlsafe_b64decode(page_token.encode()))
        after = int(cursor["after"])
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        raise InvalidArgument.field("page_token", "is not a token from this API") from None
    return limit, after


def page_token(after_id: int | None) -> str:
    if after_id is None:
        return ""
    return base64.urlsafe_b64encode(json.dumps({"after": after_id}).encode()).decode()


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def timestamp(value: datetime | None) -> Timestamp | None:
    # What Timestamp.FromDatetime computes, in integer arithmetic: that method is pure
    # Python and showed in the profile of every SendConversion answer.
    if value is None:
        return None
    seconds, micros = divmod((value.astimezone(UTC) - _EPOCH) // _MICROSECOND, 1_000_000)
    return Timestamp(seconds=seconds, nanos=micros * 1000)


def from_timestamp(value: Timestamp, present: bool) -> datetime | None:
    if not present:
        return None
    return value.ToDatetime(tzinfo=UTC)


def _opt(value: str) -> str | None:
    value = value.strip()
    return value or None


# -- accounts ----------------------------------------------------------------------------


def user_account_in(msg: res.UserAccount) -> tuple[UserAccount, str | None]:
    account = UserAccount(
        id=optional_id(msg.id, "user_account.id"),
        name=msg.name,
        default_region=_opt(msg.default_region.upper()),
    )
    return account, _opt(msg.access_token)


def user_account_out(account: UserAccount) -> res.UserAccount:
    return res.UserAccount(
        id=str(account.id),
        name=account.name,
        default_region=account.default_region or "",
        has_access_token=account.has_access_token,
    )


def ad_account_in(msg: res.AdAccount, *, creating: bool) -> tuple[AdAccount, str | None]:
    account = AdAccount(
        id=optional_id(msg.id, "ad_account.id"),
        user_account_id=(
            require_id(msg.user_account_id, "ad_account.user_account_id") if creating else 0
        ),
        name=msg.name,
    )
    return account, _opt(msg.access_token)


def ad_account_out(account: AdAccount) -> res.AdAccount:
    return res.AdAccount(
        id=str(account.id),
        user_account_id=str(account.user_account_id),
        name=account.name,
        has_access_token=account.has_access_token,
    )


def crm_type_in(value: int, field: str) -> CrmType:
    if value not in _CRM_TYPES:
        raise InvalidArgument.field(field, "must be CRM_TYPE_AMOCRM or CRM_TYPE_BITRIX24")
    return _CRM_TYPES[value]


def crm_type_out(value: CrmType | None) -> res.CrmType.ValueType:
    code = next((k for k, v in _CRM_TYPES.items() if v is value), res.CRM_TYPE_UNSPECIFIED)
    return res.CrmType.ValueType(code)


def crm_connection_in(
    msg: res.CrmConnection, *, creating: bool
) -> tuple[CrmConnection, str | None, str | None]:
    connection = CrmConnection(
        id=optional_id(msg.id, "crm_connection.id"),
        user_account_id=(
            require_id(msg.user_account_id, "crm_connection.user_account_id") if creating else 0
        ),
        crm_type=(
            crm_type_in(msg.crm_type, "crm_connection.crm_type") if creating else CrmType.AMOCRM
        ),
        base_url=msg.base_url,
        portal="",
        reconcile_interval_seconds=msg.reconcile_interval_seconds,
    )
    return connection, _opt(msg.access_token), _opt(msg.application_token)


def crm_connection_out(connection: CrmConnection) -> res.CrmConnection:
    # A Bitrix24 base URL embeds the webhook secret: show only the portal.
    base_url = connection.base_url
    if connection.crm_type is CrmType.BITRIX24:
        base_url = f"https://{connection.portal}/rest/..."
    return res.CrmConnection(
        id=str(connection.id),
        user_account_id=str(connection.user_account_id),
        crm_type=crm_type_out(connection.crm_type),
        base_url=base_url,
        portal=connection.portal,
        has_access_token=connection.has_access_token,
        has_application_token=connection.has_application_token,
        reconcile_interval_seconds=connection.reconcile_interval_seconds,
    )


# -- directions --------------------------------------------------------------------------


def crm_field_in(msg: res.CrmField) -> CrmFieldRule:
    return CrmFieldRule(
        field_id=msg.field_id.strip(),
        field_name=_opt(msg.field_name),
        field_type=_opt(msg.field_type),
        enum_id=_opt(msg.enum_id),
        enum_value=_opt(msg.enum_value),
        entity_type=_opt(msg.entity_type),
    )


def crm_field_out(rule: CrmFieldRule) -> res.CrmField:
    return res.CrmField(
        field_id=rule.field_id,
        field_name=rule.field_name or "",
        field_type=rule.field_type or "",
        enum_id=rule.enum_id or "",
        enum_value=rule.enum_value or "",
        entity_type=rule.entity_type or "",
    )


def _crm_fields(items: Iterable[res.CrmField]) -> tuple[CrmFieldRule, ...]:
    return tuple(crm_field_in(item) for item in items)


def direction_in(msg: res.Direction, *, creating: bool) -> Direction:
    capi = msg.capi
    if capi.source not in (res.CAPI_SOURCE_UNSPECIFIED, *_CAPI_SOURCES):
        raise InvalidArgument.field("direction.capi.source", "must be whatsapp or crm")
    if capi.crm_type not in (res.CRM_TYPE_UNSPECIFIED, *_CRM_TYPES):
        raise InvalidArgument.field("direction.capi.crm_type", "must be amocrm or bitrix24")
    names = {
        Level.INTEREST: capi.event_names.interest.strip(),
        Level.QUALIFIED: capi.event_names.qualified.strip(),
        Level.SCHEDULED: capi.event_names.scheduled.strip(),
    }
    return Direction(
        id=None if creating else require_id(msg.id, "direction.id"),
        user_account_id=(
            require_id(msg.user_account_id, "direction.user_account_id") if creating else 0
        ),
        name=msg.name,
        ad_account_id=optional_id(msg.ad_account_id, "direction.ad_account_id"),
        instance_name=_opt(msg.instance_name),
        pixel_id=_opt(msg.pixel_id),
        whatsapp_business_account_id=_opt(msg.whatsapp_business_account_id),
        qualification_prompt=_opt(msg.qualification_prompt),
        capi=CapiSettings(
            enabled=capi.enabled,
            source=_CAPI_SOURCES.get(capi.source),
            crm_type=_CRM_TYPES.get(capi.crm_type),
            crm_connection_id=optional_id(
                capi.crm_connection_id, "direction.capi.crm_connection_id"
            ),
            fields={
                Level.INTEREST: _crm_fields(capi.interest_fields),
                Level.QUALIFIED: _crm_fields(capi.qualified_fields),
                Level.SCHEDULED: _crm_fields(capi.scheduled_fields),
            },
            test_event_code=_opt(capi.test_event_code),
            event_names={level: name for level, name in names.items() if name},
            require_ctwa_clid=capi.require_ctwa_clid,
            limited_data_use=capi.limited_data_use,
            review_confidence_threshold=capi.review_confidence_threshold,
        ),
    )


def direction_out(direction: Direction) -> res.Direction:
    capi = direction.capi
    return res.Direction(
        id=str(direction.id),
        user_account_id=str(direction.user_account_id),
        ad_account_id=str(direction.ad_account_id or ""),
        name=direction.name,
        instance_name=direction.instance_name or "",
        pixel_id=direction.pixel_id or "",
        whatsapp_business_account_id=direction.whatsapp_business_account_id or "",
        qualification_prompt=direction.qualification_prompt or "",
        capi=res.CapiSettings(
            enabled=capi.enabled,
            source=res.CapiSource.ValueType(
                next(
                    (k for k, v in _CAPI_SOURCES.items() if v is capi.source),
                    res.CAPI_SOURCE_UNSPECIFIED,
                )
            ),
            crm_type=crm_type_out(capi.crm_type),
            crm_connection_id=str(capi.crm_connection_id or ""),
            interest_fields=[crm_field_out(r) for r in capi.fields_for(Level.INTEREST)],
            qualified_fields=[crm_field_out(r) for r in capi.fields_for(Level.QUALIFIED)],
            scheduled_fields=[crm_field_out(r) for r in capi.fields_for(Level.SCHEDULED)],
            test_event_code=capi.test_event_code or "",
            event_names=res.EventNames(
                interest=capi.event_name(Level.INTEREST),
                qualified=capi.event_name(Level.QUALIFIED),
                scheduled=capi.event_name(Level.SCHEDULED),
            ),
            require_ctwa_clid=capi.require_ctwa_clid,
            limited_data_use=capi.limited_data_use,
            review_confidence_threshold=capi.review_confidence_threshold,
        ),
        create_time=timestamp(direction.created_at),
        update_time=timestamp(direction.updated_at),
    )


def mask_paths(paths: Iterable[str]) -> list[str]:
    result = [p.strip() for p in paths if p.strip()]
    if not result:
        raise InvalidArgument(
            "update_mask is required",
            [FieldViolation("update_mask.paths", "name at least one field to update")],
        )
    return result
