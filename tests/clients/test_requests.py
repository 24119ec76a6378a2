"""Request building from plain Python values (shared by both clients)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from capi.v1 import resources_pb2 as res
from capi_client import _requests as rq
from capi_client._channel import parse_target, service_config


@pytest.mark.parametrize("value", [2, "2", "qualified", "QUALIFIED", "LEVEL_QUALIFIED"])
def test_level_spellings(value: int | str) -> None:
    assert rq.level(value) == res.LEVEL_QUALIFIED


@pytest.mark.parametrize("value", [0, 4, "unspecified", "LEVEL_UNSPECIFIED", "hot", True])
def test_bad_levels_are_refused(value: int | str) -> None:
    with pytest.raises(ValueError):
        rq.level(value)


def test_send_conversion_request() -> None:
    at = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    request = rq.send_conversion(
        "scheduled", instance_name="inst", contact_phone="77011234567", event_time=at, value=0.0
    )
    assert request.level == res.LEVEL_SCHEDULED
    assert request.event_time.ToDatetime(tzinfo=UTC) == at
    assert request.HasField("value") and request.value == 0.0  # explicit zero is kept
    assert not rq.send_conversion(1, "d1").HasField("value")
    with pytest.raises(ValueError, match="timezone"):
        rq.send_conversion(1, "d1", event_time=datetime(2025, 3, 1))


def test_evolution_webhook_body_is_forwarded_as_received() -> None:
    raw = b'{"event":"messages.upsert","data":{"key":{"id":"X"}},"t":"\xd0\xb9"}'
    assert rq.ingest_evolution_webhook(raw).raw_evolution_event == raw.decode()
    from_dict = rq.ingest_evolution_webhook(
        {"event": "messages.upsert", "t": "й"}, direction_id="7"
    )
    assert json.loads(from_dict.raw_evolution_event) == {"event": "messages.upsert", "t": "й"}
    assert from_dict.direction_id == "7"


def test_update_masks_name_exactly_the_given_fields() -> None:
    request = rq.update_crm_connection("3", access_token="t", reconcile_interval_seconds=0)
    assert list(request.update_mask.paths) == ["access_token", "reconcile_interval_seconds"]
    with pytest.raises(ValueError):
        rq.update_ad_account("1")
    with pytest.raises(ValueError):
        rq.update_direction(res.Direction(id="1"), "pixel_id")


def test_list_and_retry_filters() -> None:
    request = rq.list_events(status="error", level_="1", page_size=5)
    assert (request.status, request.level, request.page_size) == (
        res.EVENT_STATUS_ERROR,
        res.LEVEL_INTEREST,
        5,
    )
    assert rq.retry_events(direction_id="4").status == res.EVENT_STATUS_UNSPECIFIED
    with pytest.raises(ValueError):
        rq.retry_events("123")


def test_health_wire_format() -> None:
    assert rq.health_request() == b""
    assert rq.health_request("capi.v1.SettingsService") == b"\x0a\x17capi.v1.SettingsService"
    assert rq.health_status(b"\x08\x01") == "SERVING"
    assert rq.health_status(b"\x08\x02") == "NOT_SERVING"
    assert rq.health_status(b"") == "UNKNOWN"


@pytest.mark.parametrize(
    ("target", "tls", "address", "secure"),
    [
        ("127.0.0.1:50051", False, "127.0.0.1:50051", False),
        ("capi:443", True, "capi:443", True),
        ("http://capi:8080", False, "capi:8080", False),
        ("https://capi.example.com", False, "capi.example.com:443", True),
        ("https://[::1]:9000/", False, "[::1]:9000", True),
        ("dns:///capi:50051", False, "dns:///capi:50051", False),
    ],
)
def test_parse_target(target: str, tls: bool, address: str, secure: bool) -> None:
    parsed = parse_target(target, tls=tls)
    assert (parsed.address, parsed.tls) == (address, secure)


def test_plain_http_with_tls_is_refused() -> None:
    with pytest.raises(ValueError):
        parse_target("http://capi:1", tls=True)


def test_only_idempotent_rpcs_are_retried() -> None:
    config = service_config()
    (method_config,) = config["methodConfig"]
    retried = {n["method"] for n in method_config["name"]}
    assert {"GetDirection", "ListEvents", "SendConversion", "AnalyzeDialog"} <= retried
    assert not retried & {"CreateDirection", "CreateUserAccount", "GenerateQualificationPrompt"}
    assert method_config["retryPolicy"]["retryableStatusCodes"] == [
        "UNAVAILABLE",
        "RESOURCE_EXHAUSTED",
    ]
