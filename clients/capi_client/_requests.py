"""Request building shared by the sync and the async client: plain Python in, messages out.

Bad client-side input (an unknown level name, a naive datetime) raises ValueError before
any RPC is made.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from google.protobuf.descriptor import EnumDescriptor
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp

from capi.v1 import capi_sender_service_pb2 as sender_pb
from capi.v1 import qualification_service_pb2 as qual_pb
from capi.v1 import resources_pb2 as res
from capi.v1 import settings_service_pb2 as settings_pb
from capi_client._errors import wire_fields

EnumInput = int | str

_HEALTH_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def enum_value(descriptor: EnumDescriptor, value: EnumInput) -> int:
    """An enum number from 2, "2", "qualified", "LEVEL_QUALIFIED" (case-insensitive)."""
    if isinstance(value, bool):
        raise ValueError(f"bad {descriptor.name}: {value!r}")
    if isinstance(value, int):
        number = value
    elif value.strip().lstrip("-").isdigit():
        number = int(value.strip())
    else:
        wanted = value.strip().upper().replace("-", "_")
        for candidate in descriptor.values:
            if candidate.name == wanted or candidate.name.endswith("_" + wanted):
                if candidate.number == 0:
                    break
                return int(candidate.number)
        raise ValueError(
            f"bad {descriptor.name}: {value!r} (expected one of {short_names(descriptor)})"
        )
    if number not in descriptor.values_by_number or number == 0:
        raise ValueError(f"bad {descriptor.name}: {value!r}")
    return number


def short_names(descriptor: EnumDescriptor) -> list[str]:
    """["interest", "qualified", "scheduled"] for Level: names without the enum prefix."""
    return [short_name(descriptor, v.number) for v in descriptor.values if v.number != 0]


def short_name(descriptor: EnumDescriptor, number: int) -> str:
    """LEVEL_QUALIFIED -> "qualified"; the number for unknown values; "" for unspecified."""
    if number == 0:
        return ""
    value = descriptor.values_by_number.get(number)
    if value is None:
        return str(number)
    prefix = _enum_prefix(descriptor)
    return value.name.removeprefix(prefix).lower()


def _enum_prefix(descriptor: EnumDescriptor) -> str:
    zero = descriptor.values_by_number.get(0)
    if zero is not None and zero.name.endswith("UNSPECIFIED"):
        return zero.name.removesuffix("UNSPECIFIED")
    return ""


def level(value: EnumInput) -> res.Level.ValueType:
    return res.Level.ValueType(enum_value(res.Level.DESCRIPTOR, value))


def event_status(value: EnumInput) -> res.EventStatus.ValueType:
    return res.EventStatus.ValueType(enum_value(res.EventStatus.DESCRIPTOR, value))


def crm_type(value: EnumInput) -> res.CrmType.ValueType:
    return res.CrmType.ValueType(enum_value(res.CrmType.DESCRIPTOR, value))


def timestamp(value: datetime) -> Timestamp:
    """A Timestamp from an aware datetime; naive ones are refused (which zone?)."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("datetime must be timezone-aware (for example datetime.now(UTC))")
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def _set_time(message: Any, name: str, value: datetime | None) -> None:
    if value is not None:
        getattr(message, name).CopyFrom(timestamp(value))


def _dialog_fields(
    dialog_id: str | None, instance_name: str | None, contact_phone: str | None
) -> dict[str, str]:
    # Which combinations name a dialog is the server's rule (it answers InvalidArgument).
    return {
        "dialog_id": dialog_id or "",
        "instance_name": instance_name or "",
        "contact_phone": contact_phone or "",
    }


# QualificationService


def ingest_message(
    *,
    instance_name: str | None = None,
    contact_phone: str | None = None,
    message_id: str | None = None,
    text: str | None = None,
    from_me: bool = False,
    sent_at: datetime | None = None,
    ctwa_clid: str | None = None,
    direction_id: str | None = None,
) -> qual_pb.IngestMessageRequest:
    request = qual_pb.IngestMessageRequest(
        direction_id=direction_id or "",
        instance_name=instance_name or "",
        contact_phone=contact_phone or "",
        message_id=message_id or "",
        from_me=from_me,
        text=text or "",
        ctwa_clid=ctwa_clid or "",
    )
    _set_time(request, "sent_at", sent_at)
    return request


def ingest_evolution_webhook(
    raw_json: str | bytes | Mapping[str, Any],
    *,
    instance_name: str | None = None,
    direction_id: str | None = None,
) -> qual_pb.IngestMessageRequest:
    """The webhook body as received; a dict is serialised, bytes must be UTF-8 JSON."""
    if isinstance(raw_json, bytes):
        body = raw_json.decode("utf-8")
    elif isinstance(raw_json, str):
        body = raw_json
    else:
        body = json.dumps(raw_json, ensure_ascii=False, separators=(",", ":"))
    return qual_pb.IngestMessageRequest(
        raw_evolution_event=body,
        instance_name=instance_name or "",
        direction_id=direction_id or "",
    )


def analyze_dialog(
    dialog_id: str | None = None,
    *,
    instance_name: str | None = None,
    contact_phone: str | None = None,
    dry_run: bool = False,
    force: bool = False,
) -> qual_pb.AnalyzeDialogRequest:
    return qual_pb.AnalyzeDialogRequest(
        **_dialog_fields(dialog_id, instance_name, contact_phone), dry_run=dry_run, force=force
    )


def review_dialog_level(
    dialog_id: str, level_: EnumInput, approve: bool
) -> qual_pb.ReviewDialogLevelRequest:
    return qual_pb.ReviewDialogLevelRequest(
        dialog_id=dialog_id, level=level(level_), approve=approve
    )


def check_crm_fields(
    direction_id: str,
    entity_type: str,
    entity_id: str | None = None,
    *,
    contact_phone: str | None = None,
    dry_run: bool = False,
) -> qual_pb.CheckCrmFieldsRequest:
    return qual_pb.CheckCrmFieldsRequest(
        direction_id=direction_id,
        entity_type=entity_type,
        entity_id=entity_id or "",
        contact_phone=contact_phone or "",
        dry_run=dry_run,
    )


def handle_crm_webhook(
    body: bytes | str,
    content_type: str,
    crm_connection_id: str | None = None,
    dry_run: bool = False,
) -> qual_pb.HandleCrmWebhookRequest:
    return qual_pb.HandleCrmWebhookRequest(
        body=body.encode("utf-8") if isinstance(body, str) else body,
        content_type=content_type,
        crm_connection_id=crm_connection_id or "",
        dry_run=dry_run,
    )


def reconcile_crm(
    crm_connection_id: str, *, since: datetime | None = None, dry_run: bool = False
) -> qual_pb.ReconcileCrmRequest:
    request = qual_pb.ReconcileCrmRequest(crm_connection_id=crm_connection_id, dry_run=dry_run)
    _set_time(request, "since", since)
    return request


def generate_qualification_prompt(
    direction_id: str, business_description: str, *, language: str | None = None
) -> qual_pb.GenerateQualificationPromptRequest:
    return qual_pb.GenerateQualificationPromptRequest(
        direction_id=direction_id,
        business_description=business_description,
        language=language or "",
    )


# CapiSenderService


def send_conversion(
    level_: EnumInput,
    dialog_id: str | None = None,
    *,
    instance_name: str | None = None,
    contact_phone: str | None = None,
    event_time: datetime | None = None,
    value: float | None = None,
    currency: str | None = None,
    test_event_code: str | None = None,
    dry_run: bool = False,
    direction_id: str | None = None,
    email: str | None = None,
) -> sender_pb.SendConversionRequest:
    dialog = _dialog_fields(dialog_id, instance_name, contact_phone)
    request = sender_pb.SendConversionRequest(
        dialog_id=dialog["dialog_id"],
        instance_name=dialog["instance_name"],
        contact_phone=dialog["contact_phone"],
        level=level(level_),
        currency=currency or "",
        test_event_code=test_event_code or "",
        dry_run=dry_run,
        direction_id=direction_id or "",
        email=email or "",
    )
    if value is not None:
        request.value = value
    _set_time(request, "event_time", event_time)
    return request


def get_dialog_status(
    dialog_id: str | None = None,
    *,
    instance_name: str | None = None,
    contact_phone: str | None = None,
) -> sender_pb.GetDialogStatusRequest:
    return sender_pb.GetDialogStatusRequest(
        **_dialog_fields(dialog_id, instance_name, contact_phone)
    )


def list_events(
    *,
    direction_id: str | None = None,
    status: EnumInput | None = None,
    level_: EnumInput | None = None,
    dialog_id: str | None = None,
    start_time: datetime | None = None,
    end_time: datetime | None = None,
    page_size: int = 0,
    page_token: str = "",
) -> sender_pb.ListEventsRequest:
    request = sender_pb.ListEventsRequest(
        direction_id=direction_id or "",
        status=event_status(status) if status is not None else res.EVENT_STATUS_UNSPECIFIED,
        level=level(level_) if level_ is not None else res.LEVEL_UNSPECIFIED,
        dialog_id=dialog_id or "",
        page_size=page_size,
        page_token=page_token,
    )
    _set_time(request, "start_time", start_time)
    _set_time(request, "end_time", end_time)
    return request


def retry_events(
    event_ids: Sequence[str] = (),
    *,
    direction_id: str | None = None,
    status: EnumInput | None = None,
) -> sender_pb.RetryEventsRequest:
    if isinstance(event_ids, str):
        raise ValueError("event_ids must be a sequence of ids, not one string")
    return sender_pb.RetryEventsRequest(
        event_ids=list(event_ids),
        direction_id=direction_id or "",
        status=event_status(status) if status is not None else res.EVENT_STATUS_UNSPECIFIED,
    )


def diagnose(direction_id: str) -> sender_pb.DiagnoseRequest:
    return sender_pb.DiagnoseRequest(direction_id=direction_id)


def get_optimization_advice(direction_id: str) -> sender_pb.GetOptimizationAdviceRequest:
    return sender_pb.GetOptimizationAdviceRequest(direction_id=direction_id)


# SettingsService


def _mask(values: Mapping[str, object]) -> tuple[dict[str, Any], FieldMask]:
    """Fields given (not None) and the update mask naming exactly them."""
    given = {name: value for name, value in values.items() if value is not None}
    if not given:
        raise ValueError("nothing to update: pass at least one field")
    return given, FieldMask(paths=sorted(given))


def create_user_account(
    name: str, *, access_token: str | None = None, default_region: str | None = None
) -> settings_pb.CreateUserAccountRequest:
    return settings_pb.CreateUserAccountRequest(
        user_account=res.UserAccount(
            name=name, access_token=access_token or "", default_region=default_region or ""
        )
    )


def update_user_account(
    user_account_id: str,
    *,
    name: str | None = None,
    access_token: str | None = None,
    default_region: str | None = None,
) -> settings_pb.UpdateUserAccountRequest:
    given, mask = _mask(
        {"name": name, "access_token": access_token, "default_region": default_region}
    )
    return settings_pb.UpdateUserAccountRequest(
        user_account=res.UserAccount(id=user_account_id, **given), update_mask=mask
    )


def create_ad_account(
    user_account_id: str, name: str, *, access_token: str | None = None
) -> settings_pb.CreateAdAccountRequest:
    return settings_pb.CreateAdAccountRequest(
        ad_account=res.AdAccount(
            user_account_id=user_account_id, name=name, access_token=access_token or ""
        )
    )


def update_ad_account(
    ad_account_id: str, *, name: str | None = None, access_token: str | None = None
) -> settings_pb.UpdateAdAccountRequest:
    given, mask = _mask({"name": name, "access_token": access_token})
    return settings_pb.UpdateAdAccountRequest(
        ad_account=res.AdAccount(id=ad_account_id, **given), update_mask=mask
    )


def create_crm_connection(
    user_account_id: str,
    crm_type_: EnumInput,
    base_url: str,
    *,
    access_token: str | None = None,
    application_token: str | None = None,
    reconcile_interval_seconds: int | None = None,
) -> settings_pb.CreateCrmConnectionRequest:
    return settings_pb.CreateCrmConnectionRequest(
        crm_connection=res.CrmConnection(
            user_account_id=user_account_id,
            crm_type=crm_type(crm_type_),
            base_url=base_url,
            access_token=access_token or "",
            application_token=application_token or "",
            reconcile_interval_seconds=reconcile_interval_seconds or 0,
        )
    )


def update_crm_connection(
    crm_connection_id: str,
    *,
    base_url: str | None = None,
    access_token: str | None = None,
    application_token: str | None = None,
    reconcile_interval_seconds: int | None = None,
) -> settings_pb.UpdateCrmConnectionRequest:
    given, mask = _mask(
        {
            "base_url": base_url,
            "access_token": access_token,
            "application_token": application_token,
            "reconcile_interval_seconds": reconcile_interval_seconds,
        }
    )
    return settings_pb.UpdateCrmConnectionRequest(
        crm_connection=res.CrmConnection(id=crm_connection_id, **given), update_mask=mask
    )


def create_direction(direction: res.Direction) -> settings_pb.CreateDirectionRequest:
    return settings_pb.CreateDirectionRequest(direction=direction)


def get_direction(direction_id: str) -> settings_pb.GetDirectionRequest:
    return settings_pb.GetDirectionRequest(id=direction_id)


def update_direction(
    direction: res.Direction, update_mask: Sequence[str]
) -> settings_pb.UpdateDirectionRequest:
    if isinstance(update_mask, str):
        raise ValueError("update_mask must be a list of field paths, not one string")
    if not direction.id:
        raise ValueError("direction.id is required")
    return settings_pb.UpdateDirectionRequest(
        direction=direction, update_mask=FieldMask(paths=list(update_mask))
    )


def list_directions(
    *, user_account_id: str | None = None, page_size: int = 0, page_token: str = ""
) -> settings_pb.ListDirectionsRequest:
    return settings_pb.ListDirectionsRequest(
        user_account_id=user_account_id or "", page_size=page_size, page_token=page_token
    )


def list_pixel_choices(user_account_id: str) -> settings_pb.ListPixelChoicesRequest:
    return settings_pb.ListPixelChoicesRequest(user_account_id=user_account_id)


def list_crm_fields(crm_connection_id: str, entity_type: str) -> settings_pb.ListCrmFieldsRequest:
    return settings_pb.ListCrmFieldsRequest(
        crm_connection_id=crm_connection_id, entity_type=entity_type
    )


# grpc.health.v1, without grpcio-health-checking: HealthCheckRequest{string service = 1},
# HealthCheckResponse{ServingStatus status = 1}.

HEALTH_CHECK_PATH = "/grpc.health.v1.Health/Check"


def health_request(service: str = "") -> bytes:
    encoded = service.encode("utf-8")
    if not encoded:
        return b""  # every field at its default: the empty message
    return b"\x0a" + _encode_varint(len(encoded)) + encoded


def health_status(response: bytes) -> str:

    status = 0
    for number, value in wire_fields(response):
        if number == 1 and isinstance(value, int):
            status = value
    return _HEALTH_STATUS.get(status, str(status))


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
