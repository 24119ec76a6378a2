"""The CAPI event and request body builders."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest

from capi_server.domain.levels import Level
from capi_server.domain.normalization import hash_country, hash_email, hash_phone
from capi_server.domain.payloads import (
    MAX_EVENT_AGE_SECONDS,
    MAX_EVENTS_PER_REQUEST,
    EventInput,
    build_event,
    build_request_body,
    event_id_for,
    is_too_old,
    new_event_id,
)

FIXTURE_PATH = Path("/work/shared/fixtures/meta_capi/example_request_business_messaging.json")
if not FIXTURE_PATH.exists():  # the repo copy, when the shared tree is not mounted
    FIXTURE_PATH = Path(__file__).parents[1] / "fixtures" / "meta_capi" / FIXTURE_PATH.name

PHONE_HASH = hash_phone("+7 701 123 45 67")
EMAIL_HASH = hash_email("Joe@EG.com")
CTWA_CLID = "click-id-from-ad"
WABA_ID = "102290129340398"


def _input(**changes: Any) -> EventInput:
    base = EventInput(
        level=Level.INTEREST,
        event_name="Lead",
        event_time=1703520000,
        event_id="abc123",
        phone_hash=PHONE_HASH,
        email_hash=None,
        ctwa_clid=CTWA_CLID,
        whatsapp_business_account_id=None,
    )
    return dataclasses.replace(base, **changes)


def test_golden_level_one_event_matches_the_seed_example() -> None:
    # The seed's "Пример CAPI запроса", with a real hash in place of "a1b2c3...".
    assert build_event(_input()) == {
        "event_name": "Lead",
        "event_time": 1703520000,
        "event_id": "abc123",
        "event_source_url": "https://wa.me/",
        "action_source": "business_messaging",
        "messaging_channel": "whatsapp",
        "user_data": {"ph": [PHONE_HASH], "ctwa_clid": CTWA_CLID},
        "custom_data": {"event_level": 1},
    }


def test_event_matches_the_business_messaging_fixture() -> None:
    fixture = json.loads(FIXTURE_PATH.read_text(encoding="utf-8"))
    expected_event = fixture["data"][0]
    user_data = expected_event["user_data"]
    event = build_event(
        EventInput(
            level=Level.INTEREST,
            event_name=expected_event["event_name"],
            event_time=expected_event["event_time"],
            event_id=expected_event["event_id"],
            phone_hash=hash_phone("+55 11 98765-4321"),
            email_hash=None,
            ctwa_clid=user_data["ctwa_clid"],
            whatsapp_business_account_id=user_data["whatsapp_business_account_id"],
            value=0,
            currency="brl",
            country_hash=hash_country("BR"),
        )
    )
    # The fixture omits the seed's event_source_url and our event_level; all else is equal.
    expected = copy.deepcopy(expected_event)
    expected["event_source_url"] = "https://wa.me/"
    expected["custom_data"]["event_level"] = 1
    assert event == expected

    body = build_request_body(
        [event], test_event_code="TEST12345", partner_agent="my-grpc-capi-service"
    )
    expected_body = {k: v for k, v in fixture.items() if k != "_meta"}
    expected_body["data"] = [expected]
    assert body == expected_body
    assert json.loads(json.dumps(body)) == body  # plain JSON, no custom types


def test_optional_fields_are_omitted_not_null() -> None:
    event = build_event(_input(phone_hash=None, email_hash="", ctwa_clid=CTWA_CLID))
    assert event["user_data"] == {"ctwa_clid": CTWA_CLID}
    assert event["custom_data"] == {"event_level": 1}
    assert "data_processing_options" not in event
    assert None not in event.values()


def test_all_identifiers_and_value() -> None:
    event = build_event(
        _input(
            level=Level.SCHEDULED,
            event_name="Schedule",
            email_hash=EMAIL_HASH,
            whatsapp_business_account_id=WABA_ID,
            value=1500.5,
            currency="kzt",
        )
    )
    assert event["user_data"] == {
        "ph": [PHONE_HASH],
        "em": [EMAIL_HASH],
        "ctwa_clid": CTWA_CLID,
        "whatsapp_business_account_id": WABA_ID,
    }
    assert event["custom_data"] == {"event_level": 3, "value": 1500.5, "currency": "KZT"}


def test_limited_data_use() -> None:
    event = build_event(_input(limited_data_use=True))
    assert event["data_processing_options"] == ["LDU"]
    assert event["data_processing_options_country"] == 0
    assert event["data_processing_options_state"] == 0


@pytest.mark.parametrize("currency", ["US", "USDT", "U$D", "12a", "₸₸₸"])
def test_invalid_currency_is_rejected(currency: str) -> None:
    with pytest.raises(ValueError, match="currency"):
        build_event(_input(value=10.0, currency=currency))


def test_currency_alone_is_sent_upper_case() -> None:
    assert build_event(_input(currency="usd"))["custom_data"] == {
        "event_level": 1,
        "currency": "USD",
    }


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_invalid_value_is_rejected(value: float) -> None:
    with pytest.raises(ValueError, match="value"):
        build_event(_input(value=value, currency="USD"))


def test_value_without_currency_is_rejected() -> None:
    with pytest.raises(ValueError, match="currency"):
        build_event(_input(value=10.0))


def test_empty_user_data_is_rejected() -> None:
    # The WABA id identifies the business, not the person: it does not count.
    with pytest.raises(ValueError, match="user_data"):
        build_event(
            _input(
                phone_hash=None, email_hash=None, ctwa_clid="", whatsapp_business_account_id=WABA_ID
            )
        )


@pytest.mark.parametrize("field", ["phone_hash", "email_hash", "country_hash"])
def test_raw_values_in_hash_fields_are_rejected(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        build_event(_input(**{field: "+77011234567"}))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"event_name": ""}, "event_name"),
        ({"event_id": ""}, "event_id"),
        ({"event_time": 0}, "event_time"),
    ],
)
def test_required_fields(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_event(_input(**changes))


def test_request_body_omits_absent_options() -> None:
    event = build_event(_input())
    assert build_request_body([event], test_event_code=None, partner_agent="") == {"data": [event]}


def test_request_body_never_contains_an_access_token() -> None:
    body = build_request_body([build_event(_input())], test_event_code="T1", partner_agent="capi")
    assert set(body) == {"data", "test_event_code", "partner_agent"}
    assert "access_token" not in json.dumps(body)


def test_request_body_batch_limits() -> None:
    event = build_event(_input())
    with pytest.raises(ValueError, match="at least one"):
        build_request_body([], test_event_code=None, partner_agent=None)
    with pytest.raises(ValueError, match="at most"):
        build_request_body(
            [event] * (MAX_EVENTS_PER_REQUEST + 1), test_event_code=None, partner_agent=None
        )
    full = build_request_body(
        [event] * MAX_EVENTS_PER_REQUEST, test_event_code=None, partner_agent=None
    )
    data = full["data"]
    assert isinstance(data, list)
    assert len(data) == MAX_EVENTS_PER_REQUEST


def test_event_id_for_is_deterministic_and_distinct() -> None:
    first = event_id_for("dialog-1", Level.INTEREST)
    assert first == event_id_for("dialog-1", Level.INTEREST, "")
    assert re.fullmatch(r"interest-[0-9a-f]{32}", first)
    others = {
        event_id_for("dialog-1", Level.QUALIFIED),
        event_id_for("dialog-2", Level.INTEREST),
        event_id_for("dialog-1", Level.INTEREST, "resend-1"),
        # The parts are kept apart: moving characters between them changes the id.
        event_id_for("dialog-", Level.INTEREST, "1"),
    }
    assert first not in others
    assert len(others) == 4
    assert "dialog" not in first


def test_event_id_for_a_dialog_id_is_the_id_earlier_versions_derived() -> None:
    # Ids already claimed were derived from this text: a resend after lost state must
    # derive the same one, so the spelled-out fast path may not change it.
    # str.isdigit also takes non-ASCII digits; JSON needs no escape for those either.
    for dialog_id in ("1", "42", "9007199254740993", "٤٢", "²"):
        for level in Level:
            material = json.dumps([dialog_id, int(level), ""], ensure_ascii=False)
            digest = hashlib.sha256(material.encode()).hexdigest()[:32]
            assert event_id_for(dialog_id, level) == f"{level.column}-{digest}"
    assert (
        event_id_for("42", Level.SCHEDULED)
        == "scheduled-" + (hashlib.sha256(b'["42", 3, ""]').hexdigest()[:32])
    )


def test_new_event_id_is_random_hex() -> None:
    first, second = new_event_id(), new_event_id()
    assert re.fullmatch(r"[0-9a-f]{32}", first)
    assert first != second


NOW = 1_800_000_000


@pytest.mark.parametrize(
    ("age_seconds", "margin", "expected"),
    [
        (0, 3600, False),
        (-600, 3600, False),  # slightly in the future (clock skew)
        (MAX_EVENT_AGE_SECONDS - 3600 - 1, 3600, False),
        (MAX_EVENT_AGE_SECONDS - 3600, 3600, True),
        (MAX_EVENT_AGE_SECONDS, 3600, True),
        (MAX_EVENT_AGE_SECONDS + 1, 3600, True),
        (MAX_EVENT_AGE_SECONDS - 1, 0, False),
        (MAX_EVENT_AGE_SECONDS, 0, True),
    ],
)
def test_is_too_old_boundaries(age_seconds: int, margin: int, expected: bool) -> None:
    assert is_too_old(NOW - age_seconds, NOW, margin) is expected


def test_is_too_old_default_margin_is_one_hour() -> None:
    assert MAX_EVENT_AGE_SECONDS == 7 * 24 * 3600
    assert is_too_old(NOW - (MAX_EVENT_AGE_SECONDS - 3600), NOW)
    assert not is_too_old(NOW - (MAX_EVENT_AGE_SECONDS - 3601), NOW)


def test_is_too_old_rejects_negative_margin() -> None:
    with pytest.raises(ValueError):
        is_too_old(NOW, NOW, -1)
