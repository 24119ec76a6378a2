"""Pure parts of CrmService: input parsing, skip reasons, merging, reconciliation marks."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from capi_server.adapters.crm import CrmError
from capi_server.domain.crm import CrmEntity, CrmFieldRule, CrmFieldValue, CrmType, EntityType
from capi_server.domain.directions import CapiSettings, CapiSource, Direction
from capi_server.domain.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from capi_server.domain.events import EventOutcome, SendOutcome
from capi_server.domain.levels import Level
from capi_server.services import crm
from capi_server.services.crm import (
    EntityCheck,
    crm_domain_error,
    direction_skip_reason,
    evaluate_entity,
    merge_checks,
    parse_entity_id,
    parse_entity_type,
)

RULE = CrmFieldRule(field_id="100", field_type="select", enum_id="7")


def direction(**capi: object) -> Direction:
    settings = dict(enabled=True, source=CapiSource.CRM, fields={Level.INTEREST: (RULE,)})
    settings.update(capi)
    return Direction(id=1, user_account_id=1, name="d", capi=CapiSettings(**settings))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("deal", EntityType.DEAL), (" Lead ", EntityType.LEAD), ("CONTACT", EntityType.CONTACT)],
)
def test_entity_types(raw: str, expected: EntityType) -> None:
    assert parse_entity_type(raw) is expected


@pytest.mark.parametrize("raw", ["", "company", "deals", "1"])
def test_unknown_entity_types_name_the_field(raw: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_entity_type(raw)
    assert [v.field for v in err.value.violations] == ["entity_type"]


@pytest.mark.parametrize(("raw", "expected"), [("", None), (" 0042 ", "42"), ("7", "7")])
def test_entity_ids(raw: str, expected: str | None) -> None:
    assert parse_entity_id(raw) == expected


@pytest.mark.parametrize("raw", ["12a", "-1", "0", "1" * 21, "1.5"])
def test_bad_entity_ids(raw: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_entity_id(raw)


@pytest.mark.parametrize(
    ("capi", "reason"),
    [
        ({"enabled": False}, "CAPI disabled for the direction"),
        ({"source": CapiSource.WHATSAPP}, "direction source is whatsapp"),
        ({"source": None}, "direction source is not crm"),
        ({}, ""),
    ],
)
def test_direction_skip_reasons(capi: dict[str, object], reason: str) -> None:
    assert direction_skip_reason(direction(**capi)) == reason


def entity(enum_id: str, phones: tuple[str, ...] = ("+5511987654321",)) -> CrmEntity:
    return CrmEntity(
        crm_type=CrmType.AMOCRM,
        entity_type=EntityType.DEAL,
        entity_id="5",
        fields={"100": CrmFieldValue("100", ("x",), (enum_id,))},
        contact_phones=phones,
        updated_at=1_700_000_000,
    )


def test_evaluate_sets_matches_phones_and_reasons() -> None:
    matched = evaluate_entity(direction(), entity("7"), EntityCheck("deal", "5"))
    assert matched.matches == {Level.INTEREST: [RULE]} and matched.sendable
    assert matched.updated_at_unix == 1_700_000_000
    unmatched = evaluate_entity(direction(), entity("8"), EntityCheck("deal", "5"))
    assert unmatched.skipped_reason == crm.SKIP_NO_MATCH and not unmatched.sendable
    no_phone = evaluate_entity(direction(), entity("7", ()), EntityCheck("deal", "5"))
    assert no_phone.skipped_reason == crm.SKIP_NO_PHONE and no_phone.matches


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("auth", FailedPrecondition),
        ("not_found", NotFound),
        ("rate_limited", Unavailable),
        ("bad_response", Unavailable),
        ("unavailable", Unavailable),
    ],
)
def test_crm_errors_map_to_statuses(kind: str, expected: type[Exception]) -> None:
    error = crm_domain_error(CrmError("m", kind, 401), CrmType.AMOCRM)  # type: ignore[arg-type]
    assert isinstance(error, expected)


def test_merge_reports_one_result_per_named_entity_across_directions() -> None:
    lead = EventOutcome(Level.INTEREST, "Lead", SendOutcome.SENT, event_id="e1")
    other = EventOutcome(Level.INTEREST, "Lead", SendOutcome.SENT, event_id="e2")
    checks = [
        EntityCheck("deal", "1", matches={Level.INTEREST: [RULE]}, events=[lead], dialog_id=1),
        EntityCheck("deal", "1", matches={Level.INTEREST: [RULE]}, events=[other], dialog_id=2),
        EntityCheck("deal", "2", skipped_reason=crm.SKIP_NO_MATCH),
        EntityCheck("deal", "2", skipped_reason=crm.SKIP_CAPI_DISABLED),
        EntityCheck("deal", "3", error="amoCRM entity not found"),
    ]
    named = [(EntityType.DEAL, "1"), (EntityType.DEAL, "2"), (EntityType.DEAL, "3")]
    first, second, third = merge_checks(named, checks)
    assert first.matches == {Level.INTEREST: (RULE,)}
    assert [e.event_id for e in first.events] == ["e1", "e2"] and first.skipped_reason == ""
    assert second.skipped_reason == f"{crm.SKIP_NO_MATCH}; {crm.SKIP_CAPI_DISABLED}"
    assert third.error == "amoCRM entity not found" and third.events == ()


def test_reconciled_mark() -> None:
    service = object.__new__(crm.CrmService)
    started = datetime(2026, 1, 10, tzinfo=UTC)
    ok = EntityCheck("deal", "1", updated_at_unix=int(started.timestamp()) - 100)
    gone = EntityCheck("deal", "2", error="not found", error_kind="not_found")
    assert service._reconciled_mark(started, [ok, gone], set()) == started
    throttled = EntityCheck("deal", "3", error="rate", error_kind="rate_limited")
    assert service._reconciled_mark(started, [ok, throttled], set()) is None
    # A listing cut at the limit covers only up to its newest entity.
    mark = service._reconciled_mark(started, [ok], {EntityType.DEAL})
    assert mark == datetime.fromtimestamp(int(started.timestamp()) - 101, UTC)
    # An entity edited during the run (live time after `started`) must not move the mark
    # past entities the listing cut off.
    edited = EntityCheck("deal", "4", updated_at_unix=int(started.timestamp()) + 30)
    mark = service._reconciled_mark(started, [ok, edited], {EntityType.DEAL})
    assert mark == datetime.fromtimestamp(int(started.timestamp()) - 101, UTC)


def test_reconcile_kinds() -> None:
    plain = direction()
    assert crm._reconcile_kinds(CrmType.AMOCRM, [plain]) == [EntityType.DEAL, EntityType.CONTACT]
    assert crm._reconcile_kinds(CrmType.BITRIX24, [plain]) == [EntityType.DEAL, EntityType.LEAD]
    contact_rule = CrmFieldRule(field_id="UF_CRM_1", entity_type="contact")
    with_contact = direction(fields={Level.QUALIFIED: (contact_rule,)})
    assert EntityType.CONTACT in crm._reconcile_kinds(CrmType.BITRIX24, [with_contact])


def test_secrets_of_a_connection_cover_tokens_and_the_webhook_code() -> None:
    connection = crm.CrmConnectionInfo(
        id=1,
        user_account_id=1,
        crm_type=CrmType.BITRIX24,
        base_url="https://x.bitrix24.ru/rest/1/abcdef123456/",
        portal="x.bitrix24.ru",
        access_token=None,
        application_token="apptoken99",
        reconcile_interval_seconds=0,
        last_reconciled_at=None,
    )
    text = "error for /rest/1/abcdef123456/crm.deal.get with apptoken99"
    assert crm._scrub(text, connection.secrets()) == "error for /rest/1/***/crm.deal.get with ***"
