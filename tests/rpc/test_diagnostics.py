"""Diagnose and GetOptimizationAdvice through gRPC, against fake Graph and CRM servers.

Each direction is set up wrong in one way; the finding for that check must name the problem
and the fix. Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from sqlalchemy import text, update

from capi.v1 import capi_sender_service_pb2 as pb
from capi.v1 import resources_pb2 as res
from capi.v1 import settings_service_pb2 as spb
from capi_server.adapters.db.orm import CapiEventLogRow, DirectionRow
from capi_server.domain import events as ev
from tests.builders import (
    AD_TOKEN,
    USER_TOKEN,
    DirectionSetup,
    close_pending,
    pending_event,
    set_ctwa_clid,
    whatsapp_direction,
)
from tests.conftest import Stubs, make_settings, start_stubs, stop_stubs, unique
from tests.fakes.crm import FakeAmoCrm
from tests.fakes.graph import FakeGraph
from tests.helpers import error_reason

PHONE = "+7 701 123 45 67"
OK, WARN, FAIL = pb.FINDING_STATUS_OK, pb.FINDING_STATUS_WARN, pb.FINDING_STATUS_FAIL
BM_NAMES = res.EventNames(
    interest="LeadSubmitted", qualified="QualifiedLead", scheduled="QualifiedLead"
)


@pytest.fixture(scope="module")
def graph() -> Iterator[FakeGraph]:
    with FakeGraph() as fake:
        yield fake


@pytest.fixture(autouse=True)
def _fresh_graph(graph: FakeGraph) -> None:
    graph.reset()


def diag_settings(database_url: str, graph: FakeGraph, **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "meta_graph_url": graph.base_url,
        # An LLM "is configured": never called by Diagnose.
        "openai_api_key": "sk-test",
        "openai_base_url": "http://127.0.0.1:9/v1",
    }
    return make_settings(database_url, **values | overrides)


@pytest.fixture
async def stubs(database_url: str, graph: FakeGraph) -> AsyncIterator[Stubs]:
    s = await start_stubs(diag_settings(database_url, graph))
    try:
        yield s
    finally:
        await stop_stubs(s)


async def diagnose(stubs: Stubs, direction_id: str) -> dict[str, pb.Finding]:
    response = await stubs.sender.Diagnose(pb.DiagnoseRequest(direction_id=direction_id))
    checks = [f.check for f in response.findings]
    assert len(checks) == len(set(checks)), checks
    return {f.check: f for f in response.findings}


async def send(stubs: Stubs, setup: DirectionSetup, phone: str = PHONE, **kw: Any) -> Any:
    return await stubs.sender.SendConversion(
        pb.SendConversionRequest(
            instance_name=setup.instance_name,
            contact_phone=phone,
            level=res.LEVEL_INTEREST,
            **kw,
        )
    )


async def healthy_direction(stubs: Stubs, **kw: Any) -> DirectionSetup:
    return await whatsapp_direction(
        stubs,
        ad_token=AD_TOKEN,
        prompt="Qualified: the client named a budget. Scheduled: a visit time is agreed.",
        event_names=BM_NAMES,
        **kw,
    )


async def sent_with_click_id(stubs: Stubs, setup: DirectionSetup, phone: str) -> None:
    """A dialog whose lead came with a ctwa_clid, and its level 1 sent."""
    first = await send(stubs, setup, phone, dry_run=True)  # creates the dialog only
    await set_ctwa_clid(stubs, first.dialog_id, unique("clid"))
    sent = await send(stubs, setup, phone)
    assert sent.events[0].outcome == res.SEND_OUTCOME_SENT


async def test_healthy_direction_has_only_ok_findings_in_checklist_order(
    stubs: Stubs, graph: FakeGraph
) -> None:
    setup = await healthy_direction(stubs)
    await sent_with_click_id(stubs, setup, PHONE)
    response = await stubs.sender.Diagnose(pb.DiagnoseRequest(direction_id=setup.direction_id))
    assert [f.check for f in response.findings] == [
        "capi_enabled",
        "pixel",
        "access_token",
        "token_accepted",
        "event_name_interest",
        "event_name_qualified",
        "event_name_scheduled",
        "llm",
        "qualification_prompt",
        "ctwa_clid_leads",
        "events_7d",
        "pending",
        "match_quality",
    ]
    assert {f.check: f.status for f in response.findings if f.status != OK} == {}
    findings = {f.check: f for f in response.findings}
    assert "ad account" in findings["access_token"].detail
    assert "100% with ctwa_clid" in findings["match_quality"].detail
    assert "success 1 (L1 1)" in findings["events_7d"].detail
    # The token check is one GET of the pixel with the ad account's token.
    gets = [r for r in graph.requests if r.method == "GET"]
    assert [g.path for g in gets] == [f"/v25.0/{setup.pixel_id}"]
    assert graph.tokens()[-1] == AD_TOKEN


async def test_seed_event_names_warn_per_level_with_the_preset(stubs: Stubs) -> None:
    setup = await whatsapp_direction(stubs, ad_token=AD_TOKEN)  # Lead, CompleteRegistration...
    findings = await diagnose(stubs, setup.direction_id)
    for level, suggested in (
        ("interest", "LeadSubmitted"),
        ("qualified", "QualifiedLead"),
        ("scheduled", "QualifiedLead"),
    ):
        finding = findings[f"event_name_{level}"]
        assert finding.status == WARN
        assert "2804066" in finding.detail
        assert f"capi.event_names.{level} to {suggested!r}" in finding.fix
        assert "business_messaging" in finding.fix


async def test_no_pixel_is_a_failure_with_the_fix(stubs: Stubs) -> None:
    setup = await healthy_direction(stubs)
    async with stubs.app.db.session() as session:
        await session.execute(
            update(DirectionRow)
            .where(DirectionRow.id == int(setup.direction_id))
            .values(pixel_id=None)
        )
        await session.commit()
    findings = await diagnose(stubs, setup.direction_id)
    assert findings["pixel"].status == FAIL
    assert "no pixel is chosen" in findings["pixel"].detail
    assert findings["pixel"].fix == ev.HINT_NO_PIXEL
    assert findings["token_accepted"].status == WARN
    assert "not checked" in findings["token_accepted"].detail


async def test_shared_pixel_warns_that_audiences_are_aggregated(stubs: Stubs) -> None:
    setup = await healthy_direction(stubs)
    await stubs.settings.CreateDirection(
        spb.CreateDirectionRequest(
            direction=res.Direction(
                user_account_id=setup.account_id,
                name="Second",
                instance_name=unique("inst"),
                pixel_id=setup.pixel_id,
            )
        )
    )
    findings = await diagnose(stubs, setup.direction_id)
    assert findings["pixel"].status == WARN
    assert "1 other direction(s)" in findings["pixel"].detail
    assert "aggregated" in findings["pixel"].detail


async def test_no_access_token_names_both_places_to_set_one(stubs: Stubs) -> None:
    setup = await whatsapp_direction(stubs, user_token=None, event_names=BM_NAMES)
    findings = await diagnose(stubs, setup.direction_id)
    assert findings["access_token"].status == FAIL
    assert "no access token" in findings["access_token"].detail
    assert "UpdateAdAccount" in findings["access_token"].fix
    assert "UpdateUserAccount" in findings["access_token"].fix


async def test_user_account_token_is_reported_as_the_fallback(stubs: Stubs) -> None:
    setup = await whatsapp_direction(stubs, ad_token="", event_names=BM_NAMES)
    findings = await diagnose(stubs, setup.direction_id)
    assert findings["access_token"].status == OK
    assert "user account's access token" in findings["access_token"].detail
    assert "fallback" in findings["access_token"].detail


async def test_token_rejected_by_graph_is_a_failure_with_the_refresh_hint(
    stubs: Stubs, graph: FakeGraph
) -> None:
    setup = await healthy_direction(stubs)
    graph.invalidate_token(AD_TOKEN)
    findings = await diagnose(stubs, setup.direction_id)
    finding = findings["token_accepted"]
    assert finding.status == FAIL
    assert "code 190/463" in finding.detail
    assert "Invalid OAuth access token" in finding.detail
    assert "refresh the access token" in finding.fix


async def test_recent_100_errors_are_grouped_with_meaning_and_fix(
    stubs: Stubs, graph: FakeGraph
) -> None:
    setup = await healthy_direction(stubs)
    for phone in ("+7 701 000 00 01", "+7 701 000 00 02"):
        graph.fail_next_with_fixture("object_does_not_exist_or_no_permission")
        failed = await send(stubs, setup, phone)
        assert failed.events[0].outcome == res.SEND_OUTCOME_FAILED
    findings = await diagnose(stubs, setup.direction_id)
    error = findings["error_100_33"]
    assert error.status == FAIL
    assert "2 event(s) of level(s) 1 failed" in error.detail
    assert "the pixel does not exist or the token's user has no access to it" in error.detail
    assert "check that the pixel (dataset) id exists" in error.fix
    assert findings["events_7d"].status == WARN
    assert "error 2 (L1 2)" in findings["events_7d"].detail


async def test_rate_limited_retries_are_a_warning(stubs: Stubs, graph: FakeGraph) -> None:
    setup = await healthy_direction(stubs)
    graph.fail_next_with_fixture("user_request_limit_reached")
    queued = await send(stubs, setup)
    assert queued.events[0].outcome == res.SEND_OUTCOME_QUEUED
    try:
        findings = await diagnose(stubs, setup.direction_id)
    finally:
        await close_pending(stubs, setup.direction_id)
    assert findings["error_17"].status == WARN
    assert "rate limit" in findings["error_17"].detail
    assert findings["pending"].status == OK
    assert "1 event(s) waiting" in findings["pending"].detail


async def test_low_ctwa_clid_share_warns(stubs: Stubs) -> None:
    setup = await healthy_direction(stubs)
    await sent_with_click_id(stubs, setup, "+7 701 000 00 10")
    for phone in ("+7 701 000 00 11", "+7 701 000 00 12", "+7 701 000 00 13"):
        await send(stubs, setup, phone)
    findings = await diagnose(stubs, setup.direction_id)
    quality = findings["match_quality"]
    assert quality.status == WARN
    assert "of 4 event(s)" in quality.detail
    assert "25% with ctwa_clid" in quality.detail and "100% with phone (ph)" in quality.detail
    assert "0% with email (em)" in quality.detail
    assert "below the 50% click-id threshold" in quality.detail
    assert "referral" in quality.fix
    assert "1 of 4 leads (25%)" in findings["ctwa_clid_leads"].detail


async def test_leads_from_ads_without_click_id_are_counted(stubs: Stubs) -> None:
    setup = await healthy_direction(stubs)
    sent = await send(stubs, setup)
    async with stubs.app.db.session() as session:
        await session.execute(
            text(
                "UPDATE leads SET from_ad_without_click_id = :yes WHERE id = "
                "(SELECT lead_id FROM dialog_analysis WHERE id = :d)"
            ),
            {"yes": True, "d": int(sent.dialog_id)},
        )
        await session.commit()
    finding = (await diagnose(stubs, setup.direction_id))["ctwa_clid_leads"]
    assert finding.status == WARN
    assert "1 lead(s) came from an ad without a click id" in finding.detail


async def test_old_pending_event_warns_with_its_age(stubs: Stubs) -> None:
    setup = await healthy_direction(stubs)
    async with pending_event(
        stubs, setup.direction_id, event_name="LeadSubmitted", attempts=3, hours_ago=3
    ):
        finding = (await diagnose(stubs, setup.direction_id))["pending"]
    assert finding.status == WARN
    assert "oldest for 3 h" in finding.detail
    assert "retry worker" in finding.fix


async def test_whatsapp_without_prompt_or_llm_warns(database_url: str, graph: FakeGraph) -> None:
    s = await start_stubs(diag_settings(database_url, graph, openai_api_key=None))
    try:
        setup = await whatsapp_direction(s, event_names=BM_NAMES)
        findings = await diagnose(s, setup.direction_id)
    finally:
        await stop_stubs(s)
    assert findings["llm"].status == WARN and "OPENAI_API_KEY" in findings["llm"].fix
    assert findings["qualification_prompt"].status == WARN
    assert "GenerateQualificationPrompt" in findings["qualification_prompt"].fix


async def test_dry_run_skips_the_token_check(database_url: str, graph: FakeGraph) -> None:
    s = await start_stubs(diag_settings(database_url, graph, dry_run=True))
    try:
        setup = await healthy_direction(s)
        findings = await diagnose(s, setup.direction_id)
    finally:
        await stop_stubs(s)
    assert findings["token_accepted"].status == WARN
    assert "skipped in dry run" in findings["token_accepted"].detail
    assert graph.requests == []


async def test_disabled_capi_fails_first(stubs: Stubs) -> None:
    setup = await whatsapp_direction(stubs, enabled=False, event_names=BM_NAMES)
    findings = await diagnose(stubs, setup.direction_id)
    assert findings["capi_enabled"].status == FAIL
    assert findings["capi_enabled"].fix == ev.HINT_CAPI_DISABLED


async def test_unknown_direction_is_not_found(stubs: Stubs) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.sender.Diagnose(pb.DiagnoseRequest(direction_id="987654321"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(err.value) == "DIRECTION_NOT_FOUND"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.sender.GetOptimizationAdvice(
            pb.GetOptimizationAdviceRequest(direction_id="987654321")
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.sender.Diagnose(pb.DiagnoseRequest(direction_id="abc"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- CRM source ------------------------------------------------------------------------------

SELECT_FIELD = 1271495  # "Canal de entrada", options 919465...
SELECT_OPTION = 919465


@pytest.fixture
def amo() -> Iterator[FakeAmoCrm]:
    with FakeAmoCrm() as fake:
        yield fake


async def amo_direction(stubs: Stubs, amo: FakeAmoCrm) -> str:
    account = await stubs.settings.CreateUserAccount(
        spb.CreateUserAccountRequest(
            user_account=res.UserAccount(name="Loja", access_token=USER_TOKEN)
        )
    )
    connection = await stubs.settings.CreateCrmConnection(
        spb.CreateCrmConnectionRequest(
            crm_connection=res.CrmConnection(
                user_account_id=account.user_account.id,
                crm_type=res.CRM_TYPE_AMOCRM,
                base_url=amo.base_url,
                access_token=amo.token,
            )
        )
    )
    direction = await stubs.settings.CreateDirection(
        spb.CreateDirectionRequest(
            direction=res.Direction(
                user_account_id=account.user_account.id,
                name="Loja CRM",
                pixel_id="5550001112",
                capi=res.CapiSettings(
                    enabled=True,
                    source=res.CAPI_SOURCE_CRM,
                    crm_type=res.CRM_TYPE_AMOCRM,
                    crm_connection_id=connection.crm_connection.id,
                    event_names=BM_NAMES,
                    interest_fields=[
                        res.CrmField(field_id=str(SELECT_FIELD), enum_id=str(SELECT_OPTION))
                    ],
                    qualified_fields=[res.CrmField(field_id="1276648", field_type="checkbox")],
                ),
            )
        )
    )
    return direction.direction.id


async def test_crm_fields_present_are_ok(stubs: Stubs, amo: FakeAmoCrm) -> None:
    direction_id = await amo_direction(stubs, amo)
    findings = await diagnose(stubs, direction_id)
    assert findings["crm_connection"].status == OK
    assert findings["crm_reachable"].status == OK
    assert findings["crm_fields"].status == OK
    assert "all 2 configured field(s)" in findings["crm_fields"].detail
    assert "llm" not in findings and "ctwa_clid_leads" not in findings


async def test_crm_field_removed_from_the_crm_is_named(stubs: Stubs, amo: FakeAmoCrm) -> None:
    direction_id = await amo_direction(stubs, amo)
    amo.lead_fields = [f for f in amo.lead_fields if f["id"] != SELECT_FIELD]
    finding = (await diagnose(stubs, direction_id))["crm_fields"]
    assert finding.status == FAIL
    assert f"interest field {SELECT_FIELD} no longer exists in the CRM" in finding.detail
    assert "1276648" not in finding.detail
    assert "ListCrmFields" in finding.fix


async def test_crm_option_removed_from_the_crm_is_named(stubs: Stubs, amo: FakeAmoCrm) -> None:
    direction_id = await amo_direction(stubs, amo)
    for field in amo.lead_fields:
        if field["id"] == SELECT_FIELD:
            field["enums"] = [e for e in field["enums"] if e["id"] != SELECT_OPTION]
    finding = (await diagnose(stubs, direction_id))["crm_fields"]
    assert finding.status == FAIL
    assert f"option id {SELECT_OPTION} no longer exists" in finding.detail


async def test_crm_token_rejected_is_a_failure(stubs: Stubs, amo: FakeAmoCrm) -> None:
    direction_id = await amo_direction(stubs, amo)
    amo.token = "rotated-token"
    findings = await diagnose(stubs, direction_id)
    finding = findings["crm_reachable"]
    assert finding.status == FAIL
    assert "CRM unreachable / token rejected (auth)" in finding.detail
    assert "UpdateCrmConnection" in finding.fix
    assert "crm_fields" not in findings


# -- GetOptimizationAdvice -------------------------------------------------------------------


async def seed_successes(
    stubs: Stubs, direction_id: str, level: int, count: int, days_ago: float
) -> None:
    created = datetime.now(UTC) - timedelta(days=days_ago)
    async with stubs.app.db.session() as session:
        session.add_all(
            CapiEventLogRow(
                direction_id=int(direction_id),
                level=level,
                event_name="x",
                status="success",
                attempts=1,
                created_at=created,
            )
            for _ in range(count)
        )
        await session.commit()


async def test_advice_over_seeded_history(stubs: Stubs) -> None:
    setup = await whatsapp_direction(stubs)  # seed names: Lead, CompleteRegistration, Schedule
    await seed_successes(stubs, setup.direction_id, 1, 120, days_ago=2)
    await seed_successes(stubs, setup.direction_id, 1, 110, days_ago=9)
    await seed_successes(stubs, setup.direction_id, 2, 60, days_ago=3)
    await seed_successes(stubs, setup.direction_id, 2, 55, days_ago=10)
    await seed_successes(stubs, setup.direction_id, 3, 12, days_ago=1)
    # Older than two weeks and failed events do not count.
    await seed_successes(stubs, setup.direction_id, 3, 500, days_ago=20)
    response = await stubs.sender.GetOptimizationAdvice(
        pb.GetOptimizationAdviceRequest(direction_id=setup.direction_id)
    )
    assert response.recommended_level == res.LEVEL_QUALIFIED
    assert response.event_name == "CompleteRegistration"
    assert [(c.level, c.event_name, c.last_7_days, c.previous_7_days) for c in response.counts] == [
        (res.LEVEL_INTEREST, "Lead", 120, 110),
        (res.LEVEL_QUALIFIED, "CompleteRegistration", 60, 55),
        (res.LEVEL_SCHEDULED, "Schedule", 12, 0),
    ]
    assert "Schedule (level 3) had 12 events" in response.reason


async def test_advice_for_a_new_direction_is_lead(stubs: Stubs) -> None:
    setup = await whatsapp_direction(stubs, event_names=BM_NAMES)
    response = await stubs.sender.GetOptimizationAdvice(
        pb.GetOptimizationAdviceRequest(direction_id=setup.direction_id)
    )
    assert response.recommended_level == res.LEVEL_INTEREST
    assert response.event_name == "LeadSubmitted"
    assert [c.last_7_days for c in response.counts] == [0, 0, 0]
    assert "learning phase" in response.reason
