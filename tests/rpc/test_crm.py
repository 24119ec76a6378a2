"""The CRM source through gRPC: webhooks, CheckCrmFields, ReconcileCrm, ListCrmFields.

Each test runs on SQLite and PostgreSQL against fake amoCRM / Bitrix24 / Graph servers on
127.0.0.1. The assertions are what reached the fake Graph server, what the CRM fakes were
asked, what the RPC returned and what is in the database.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import grpc
import pytest
from sqlalchemy import func, select, update

from capi.v1 import qualification_service_pb2 as qpb
from capi.v1 import resources_pb2 as res
from capi.v1 import settings_service_pb2 as spb
from capi_server.adapters.crm import RetryPolicy
from capi_server.adapters.db.orm import (
    CapiEventLogRow,
    CrmConnectionRow,
    DialogAnalysisRow,
    LeadRow,
)
from tests.builders import USER_TOKEN
from tests.conftest import Stubs, make_settings, start_stubs, stop_stubs, unique
from tests.fakes.crm import FakeAmoCrm, FakeBitrix24, load_crm_fixture
from tests.fakes.graph import FakeGraph
from tests.fakes.http import FakeResponse
from tests.helpers import bad_fields, error_reason

PIXEL = "1234567890"
# The fixture contact's first phone "+55 11 98765-4321", normalised.
PHONE_DIGITS = "5511987654321"
PHONE_HASH = hashlib.sha256(PHONE_DIGITS.encode()).hexdigest()
EMAIL_HASH = hashlib.sha256(b"maria.souza@example.com").hexdigest()
AMO_LEAD_ID = "24871305"
BITRIX_DEAL_ID = "4127"
FAST_RETRY = RetryPolicy(max_attempts=4, backoff_seconds=0.01, max_wait_seconds=1.0)
FAST_RATE = 10_000.0

# amoCRM fixture lead: select 1271495 = enum 919467 ("WhatsApp - Anúncio"), multiselect
# 1271497 = enums 919481 + 919483, numeric 1271507 = "1200", checkbox 1276648 = true.
AMO_INTEREST = res.CrmField(field_id="1271495", field_type="select", enum_id="919467")
AMO_QUALIFIED = res.CrmField(field_id="1271497", field_type="multiselect", enum_id="919481")
AMO_SCHEDULED_UNMET = res.CrmField(field_id="1271503", field_type="text", enum_value="agendado")
# Bitrix24 fixture deal: UF_CRM_1724077760 = item 3159 ("WhatsApp - Anúncio").
BITRIX_INTEREST = res.CrmField(
    field_id="UF_CRM_1724077760", field_type="enumeration", enum_id="3159", entity_type="deal"
)


@pytest.fixture
def graph() -> Iterator[FakeGraph]:
    with FakeGraph() as fake:
        yield fake


@pytest.fixture
def amo() -> Iterator[FakeAmoCrm]:
    with FakeAmoCrm() as fake:
        yield fake


@pytest.fixture
def bitrix() -> Iterator[FakeBitrix24]:
    with FakeBitrix24() as fake:
        yield fake


@pytest.fixture
async def stubs(database_url: str, graph: FakeGraph) -> AsyncIterator[Stubs]:
    s = await start_stubs(
        make_settings(
            database_url,
            meta_graph_url=graph.base_url,
            retry_base_seconds=0.0,
            retry_max_seconds=0.0,
        )
    )
    # The real limits (7 rps amoCRM, 2 rps Bitrix24) would make the mass tests slow.
    s.app.crm.retry_policy = FAST_RETRY
    s.app.crm.amocrm_rate_per_second = FAST_RATE
    s.app.crm.bitrix24_rate_per_second = FAST_RATE
    try:
        yield s
    finally:
        await stop_stubs(s)


@dataclass
class CrmSetup:
    account_id: str
    connection_id: str
    direction_id: str
    portal: str
    application_token: str


async def crm_setup(
    stubs: Stubs,
    crm_type: res.CrmType.ValueType,
    base_url: str,
    *,
    access_token: str = "",
    interest: Sequence[res.CrmField] = (),
    qualified: Sequence[res.CrmField] = (),
    scheduled: Sequence[res.CrmField] = (),
    enabled: bool = True,
    source: res.CapiSource.ValueType = res.CAPI_SOURCE_CRM,
) -> CrmSetup:
    """An account, a CRM connection on a unique portal and a crm-source direction."""
    account = await stubs.settings.CreateUserAccount(
        spb.CreateUserAccountRequest(
            user_account=res.UserAccount(name="Loja", access_token=USER_TOKEN, default_region="BR")
        )
    )
    account_id = account.user_account.id
    app_token = unique("apptoken")
    connection = await stubs.settings.CreateCrmConnection(
        spb.CreateCrmConnectionRequest(
            crm_connection=res.CrmConnection(
                user_account_id=account_id,
                crm_type=crm_type,
                base_url=base_url,
                access_token=access_token,
                application_token=app_token,
            )
        )
    )
    connection_id = connection.crm_connection.id
    # The fakes live on 127.0.0.1, so give the connection the portal webhooks will name.
    portal = unique("loja")
    async with stubs.app.db.session() as session:
        await session.execute(
            update(CrmConnectionRow)
            .where(CrmConnectionRow.id == int(connection_id))
            .values(portal=portal)
        )
        await session.commit()
    capi = res.CapiSettings(
        enabled=enabled,
        source=source,
        crm_type=crm_type,
        crm_connection_id=connection_id,
        interest_fields=list(interest),
        qualified_fields=list(qualified),
        scheduled_fields=list(scheduled),
    )
    if source == res.CAPI_SOURCE_WHATSAPP:
        capi.ClearField("crm_type")
        capi.ClearField("crm_connection_id")
        del capi.interest_fields[:], capi.qualified_fields[:], capi.scheduled_fields[:]
    direction = await stubs.settings.CreateDirection(
        spb.CreateDirectionRequest(
            direction=res.Direction(
                user_account_id=account_id, name="Loja CRM", pixel_id=PIXEL, capi=capi
            )
        )
    )
    return CrmSetup(account_id, connection_id, direction.direction.id, portal, app_token)


async def amo_setup(stubs: Stubs, amo: FakeAmoCrm, **kw: Any) -> CrmSetup:
    return await crm_setup(stubs, res.CRM_TYPE_AMOCRM, amo.base_url, access_token=amo.token, **kw)


async def bitrix_setup(stubs: Stubs, bitrix: FakeBitrix24, **kw: Any) -> CrmSetup:
    return await crm_setup(stubs, res.CRM_TYPE_BITRIX24, bitrix.webhook_url, **kw)


def amo_webhook(portal: str) -> str:
    body = str(load_crm_fixture("amocrm_webhook_lead_update.txt"))
    return body.replace("account%5Bsubdomain%5D=exemploloja", f"account%5Bsubdomain%5D={portal}")


def bitrix_webhook(portal: str, application_token: str, deal_id: str = BITRIX_DEAL_ID) -> str:
    body = str(load_crm_fixture("bitrix_webhook_deal_update.txt"))
    body = body.replace("exemplo.bitrix24.com.br", portal)
    body = body.replace("51856fefc120afa4b628cc82d3935cce", quote(application_token))
    return body.replace("data%5BFIELDS%5D%5BID%5D=4127", f"data%5BFIELDS%5D%5BID%5D={deal_id}")


async def webhook(stubs: Stubs, body: bytes | str, **kw: Any) -> qpb.HandleCrmWebhookResponse:
    raw = body.encode() if isinstance(body, str) else body
    return await stubs.qualification.HandleCrmWebhook(
        qpb.HandleCrmWebhookRequest(
            body=raw, content_type="application/x-www-form-urlencoded", **kw
        )
    )


async def check(
    stubs: Stubs, setup: CrmSetup, entity_type: str, entity_id: str = "", **kw: Any
) -> qpb.CheckCrmFieldsResponse:
    return await stubs.qualification.CheckCrmFields(
        qpb.CheckCrmFieldsRequest(
            direction_id=setup.direction_id, entity_type=entity_type, entity_id=entity_id, **kw
        )
    )


def outcomes(events: Sequence[res.EventResult]) -> list[tuple[str, int]]:
    return [(e.event_name, e.outcome) for e in events]


async def direction_log(stubs: Stubs, direction_id: str) -> list[CapiEventLogRow]:
    async with stubs.app.db.session() as session:
        rows = await session.execute(
            select(CapiEventLogRow)
            .where(CapiEventLogRow.direction_id == int(direction_id))
            .order_by(CapiEventLogRow.id)
        )
        return list(rows.scalars())


async def table_counts(stubs: Stubs) -> tuple[int, int, int]:
    async with stubs.app.db.session() as session:
        return (
            int((await session.execute(select(func.count(CapiEventLogRow.id)))).scalar_one()),
            int((await session.execute(select(func.count(LeadRow.id)))).scalar_one()),
            int((await session.execute(select(func.count(DialogAnalysisRow.id)))).scalar_one()),
        )


# -- webhooks end to end -------------------------------------------------------------------


async def test_amocrm_webhook_reads_live_fields_and_sends_matched_levels(
    stubs: Stubs, graph: FakeGraph, amo: FakeAmoCrm
) -> None:
    setup = await amo_setup(
        stubs,
        amo,
        interest=[AMO_INTEREST],
        qualified=[AMO_QUALIFIED],
        scheduled=[AMO_SCHEDULED_UNMET],
    )
    response = await webhook(stubs, amo_webhook(setup.portal))

    (result,) = response.results
    assert (result.entity_type, result.entity_id, result.error) == ("deal", AMO_LEAD_ID, "")
    assert [(m.level, [f.field_id for f in m.matched_fields]) for m in result.matches] == [
        (res.LEVEL_INTEREST, ["1271495"]),
        (res.LEVEL_QUALIFIED, ["1271497"]),
    ]
    assert outcomes(result.events) == [
        ("Lead", res.SEND_OUTCOME_SENT),
        ("CompleteRegistration", res.SEND_OUTCOME_SENT),
    ]
    # The live REST read decided: the lead with its contacts, then the main contact.
    paths = [r.path for r in amo.requests]
    assert paths == [f"/api/v4/leads/{AMO_LEAD_ID}", "/api/v4/contacts/18273645"]
    assert amo.requests[0].query["with"] == ["contacts"]
    # One Graph request carried both levels, keyed by the contact's hashed phone and email.
    (post,) = graph.posts()
    data = post.json()["data"]
    assert [e["event_name"] for e in data] == ["Lead", "CompleteRegistration"]
    for event in data:
        assert event["user_data"]["ph"] == [PHONE_HASH]
        assert event["user_data"]["em"] == [EMAIL_HASH]
        assert PHONE_DIGITS not in post.body.decode()
    # The lead remembers its CRM deal; the log says the events came from the CRM.
    async with stubs.app.db.session() as session:
        lead = (
            await session.execute(
                select(LeadRow).where(LeadRow.direction_id == int(setup.direction_id))
            )
        ).scalar_one()
    assert (lead.contact_key, lead.crm_entity_type, lead.crm_entity_id) == (
        PHONE_DIGITS,
        "deal",
        AMO_LEAD_ID,
    )
    rows = await direction_log(stubs, setup.direction_id)
    assert [(r.level, r.status, r.source) for r in rows] == [
        (1, "success", "crm"),
        (2, "success", "crm"),
    ]


async def test_amocrm_contact_webhook_checks_contact_fields(
    stubs: Stubs, graph: FakeGraph, amo: FakeAmoCrm
) -> None:
    origin = res.CrmField(field_id="1271601", field_type="select", enum_value="instagram ads")
    setup = await amo_setup(stubs, amo, interest=[origin])
    body = f"contacts[update][0][id]=18273645&account[subdomain]={setup.portal}"
    (result,) = (await webhook(stubs, body)).results
    assert (result.entity_type, result.entity_id) == ("contact", "18273645")
    assert outcomes(result.events) == [("Lead", res.SEND_OUTCOME_SENT)]
    assert [r.path for r in amo.requests] == ["/api/v4/contacts/18273645"]
    assert [e["user_data"]["ph"] for e in graph.events()] == [[PHONE_HASH]]


async def test_bitrix_webhook_needs_the_connection_application_token(
    stubs: Stubs, graph: FakeGraph, bitrix: FakeBitrix24
) -> None:
    setup = await bitrix_setup(stubs, bitrix, interest=[BITRIX_INTEREST])

    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await webhook(stubs, bitrix_webhook(setup.portal, "forged-token"))
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_reason(denied.value) == "CRM_WEBHOOK_TOKEN_MISMATCH"
    assert bitrix.requests == [] and graph.posts() == []
    assert await direction_log(stubs, setup.direction_id) == []

    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await webhook(stubs, bitrix_webhook("unknown.bitrix24.ru", setup.application_token))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

    (result,) = (
        await webhook(stubs, bitrix_webhook(setup.portal, setup.application_token))
    ).results
    assert (result.entity_type, result.entity_id, result.error) == ("deal", BITRIX_DEAL_ID, "")
    assert outcomes(result.events) == [("Lead", res.SEND_OUTCOME_SENT)]
    methods = {r.path.rsplit("/", 1)[-1] for r in bitrix.requests}
    assert {"crm.deal.get.json", "crm.contact.get.json"} <= methods
    (event,) = graph.events()
    # The deal's contact 8841 holds +5511987654321.
    assert event["user_data"]["ph"] == [PHONE_HASH]


async def test_duplicate_and_concurrent_webhooks_send_each_level_once(
    stubs: Stubs, graph: FakeGraph, amo: FakeAmoCrm
) -> None:
    setup = await amo_setup(stubs, amo, interest=[AMO_INTEREST], qualified=[AMO_QUALIFIED])
    body = amo_webhook(setup.portal)
    responses = await asyncio.gather(*(webhook(stubs, body) for _ in range(5)))
    again = await webhook(stubs, body)

    sent = [e["event_name"] for e in graph.events()]
    assert sorted(sent) == ["CompleteRegistration", "Lead"]
    every = [e for r in [*responses, again] for e in r.results[0].events]
    assert sum(e.outcome == res.SEND_OUTCOME_SENT for e in every) == 2
    assert outcomes(again.results[0].events) == [
        ("Lead", res.SEND_OUTCOME_ALREADY_SENT),
        ("CompleteRegistration", res.SEND_OUTCOME_ALREADY_SENT),
    ]
    event_ids = {e.event_id for e in every}
    assert len(event_ids) == 2
    rows = await direction_log(stubs, setup.direction_id)
    assert sorted((r.level, r.status) for r in rows) == [(1, "success"), (2, "success")]


async def test_mass_webhook_batches_events_into_one_graph_request(
    stubs: Stubs, graph: FakeGraph, amo: FakeAmoCrm
) -> None:
    count = 1000
    pairs = [
        f"leads[status][{i}][id]={lead_id}&leads[status][{i}][status_id]=142"
        for i, lead_id in enumerate(amo.add_leads(30_000_000, 40_000_000, count, "+55 11 9"))
    ]
    setup = await amo_setup(stubs, amo, interest=[AMO_INTEREST])
    # The fake answers one request in a few ms; more reads in flight keep the test short.
    stubs.app.crm.concurrency = 32
    body = "&".join(pairs) + f"&account[subdomain]={setup.portal}"

    started = time.perf_counter()
    response = await webhook(stubs, body)
    elapsed = time.perf_counter() - started

    assert len(response.results) == count
    assert all(outcomes(r.events) == [("Lead", res.SEND_OUTCOME_SENT)] for r in response.results)
    posts = graph.posts()
    assert len(posts) == 1
    hashes = {e["user_data"]["ph"][0] for e in posts[0].json()["data"]}
    assert len(hashes) == count
    assert len(amo.requests) == 2 * count
    assert elapsed < 25, elapsed


# -- CheckCrmFields ------------------------------------------------------------------------


async def test_check_matches_or_rules_on_live_value_changes(
    stubs: Stubs, graph: FakeGraph, amo: FakeAmoCrm
) -> None:
    site = res.CrmField(field_id="1271495", field_type="select", enum_id="919465")
    budget = res.CrmField(field_id="1271507", field_type="numeric", enum_value="5000")
    setup = await amo_setup(stubs, amo, interest=[site, budget])

    first = await check(stubs, setup, "deal", AMO_LEAD_ID)
    assert (list(first.matches), list(first.events)) == ([], [])
    assert first.skipped_reason == "no configured CRM field matched"
    assert graph.posts() == []

    # Only the second rule of the level becomes true: OR is enough.
    amo.set_lead_field(AMO_LEAD_ID, 1271507, "5 000", field_type="numeric")
    second = await check(stubs, setup, "lead", AMO_LEAD_ID)
    assert [(m.level, [f.field_id for f in m.matched_fields]) for m in second.matches] == [
        (res.LEVEL_INTEREST, ["1271507"])
    ]
    assert outcomes(second.events) == [("Lead", res.SEND_OUTCOME_SENT)]
    assert second.dialog_id
    assert len(graph.posts()) == 1

    third = await check(stubs, setup, "deal", AMO_LEAD_ID)
    assert outcomes(third.events) == [("Lead", res.SEND_OUTCOME_ALREADY_SENT)]
    assert third.events[0].event_id == second.events[0].event_id
    assert third.dialog_id == second.dialog_id
    assert len(graph.posts()) == 1

    # Knowing the lead now, a check by phone finds the same deal.
    by_phone = await check(stubs, setup, "deal", contact_phone="+55 (11) 98765-4321")
    assert outcomes(by_phone.events) == [("Lead", res.SEND_OUTCOME_ALREADY_SENT)]


async def test_enum_value_only_rule_sends_cumulative_levels(
    stubs: Stubs, graph: FakeGraph, amo: FakeAmoCrm, bitrix: FakeBitrix24
) -> None:
    # amoCRM: the option text only, with other case and spacing.
    premium = res.CrmField(
        field_id="1271497", field_type="multiselect", enum_value=" suporte  PREMIUM "
    )
    setup = await amo_setup(stubs, amo, qualified=[premium])
    response = await check(stubs, setup, "deal", AMO_LEAD_ID)
    assert outcomes(response.events) == [
        ("Lead", res.SEND_OUTCOME_SENT),
        ("CompleteRegistration", res.SEND_OUTCOME_SENT),
    ]
    # Bitrix24: the list item's text, resolved from crm.deal.fields.
    plan = res.CrmField(
        field_id="UF_CRM_1724077801", field_type="enumeration", enum_value="plano anual"
    )
    wrong_entity = res.CrmField(
        field_id="UF_CRM_1724077801",
        field_type="enumeration",
        enum_value="plano anual",
        entity_type="contact",
    )
    bitrix_direction = await bitrix_setup(stubs, bitrix, interest=[wrong_entity], scheduled=[plan])
    response = await check(stubs, bitrix_direction, "deal", BITRIX_DEAL_ID)
    assert [m.level for m in response.matches] == [res.LEVEL_SCHEDULED]
    assert outcomes(response.events) == [
        ("Lead", res.SEND_OUTCOME_SENT),
        ("CompleteRegistration", res.SEND_OUTCOME_SENT),
        ("Schedule", res.SEND_OUTCOME_SENT),
    ]
    assert [len(p.json()["data"]) for p in graph.posts()] == [2, 3]


async def test_skipped_reasons(
    stubs: Stubs, graph: FakeGraph, amo: FakeAmoCrm, bitrix: FakeBitrix24
) -> None:
    disabled = await amo_setup(stubs, amo, interest=[AMO_INTEREST], enabled=False)
    assert (await check(stubs, disabled, "deal", AMO_LEAD_ID)).skipped_reason == (
        "CAPI disabled for the direction"
    )
    whatsapp = await amo_setup(stubs, amo, source=res.CAPI_SOURCE_WHATSAPP)
    assert (await check(stubs, whatsapp, "deal", AMO_LEAD_ID)).skipped_reason == (
        "direction source is whatsapp"
    )
    assert amo.requests == []
    # A deal without a contact has no phone: matched, but nothing to send.
    deal = dict(load_crm_fixture("bitrix_crm_deal_get.json")["result"], ID="5001", CONTACT_ID="0")
    bitrix.put_entity("deal", deal)
    setup = await bitrix_setup(stubs, bitrix, interest=[BITRIX_INTEREST])
    response = await check(stubs, setup, "deal", "5001")
    assert response.skipped_reason == "no phone on the CRM entity or its contact"
    assert [m.level for m in response.matches] == [res.LEVEL_INTEREST]
    assert list(response.events) == []
    assert graph.posts() == []


async def test_crm_rate_limit_burst_is_retried(
    stubs: Stubs, graph: FakeGraph, amo: FakeAmoCrm, bitrix: FakeBitrix24
) -> None:
    setup = await amo_setup(stubs, amo, interest=[AMO_INTEREST])
    amo.script_rate_limit(3, retry_after="0")
    response = await check(stubs, setup, "deal", AMO_LEAD_ID)
    assert outcomes(response.events) == [("Lead", res.SEND_OUTCOME_SENT)]
    assert [r.path for r in amo.requests].count(f"/api/v4/leads/{AMO_LEAD_ID}") == 4

    bitrix_direction = await bitrix_setup(stubs, bitrix, interest=[BITRIX_INTEREST])
    bitrix.script_query_limit(2)
    response = await check(stubs, bitrix_direction, "deal", BITRIX_DEAL_ID)
    assert outcomes(response.events) == [("Lead", res.SEND_OUTCOME_SENT)]

    # A burst longer than the retries: UNAVAILABLE, nothing sent, nothing half-written.
    before = await table_counts(stubs)
    amo.script_rate_limit(10, retry_after="0")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await check(stubs, setup, "deal", AMO_LEAD_ID)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_reason(err.value) == "CRM_RATE_LIMITED"
    assert await table_counts(stubs) == before
    assert len(graph.posts()) == 2


async def test_rejected_crm_credentials_fail_precondition_and_log_without_token(
    stubs: Stubs, graph: FakeGraph, amo: FakeAmoCrm, bitrix: FakeBitrix24
) -> None:
    revoked = "revoked-amo-token-0123456789"
    setup = await crm_setup(
        stubs, res.CRM_TYPE_AMOCRM, amo.base_url, access_token=revoked, interest=[AMO_INTEREST]
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await check(stubs, setup, "deal", AMO_LEAD_ID)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.details() == "amoCRM token rejected"
    assert error_reason(err.value) == "CRM_AUTH_FAILED"
    (row,) = await direction_log(stubs, setup.direction_id)
    assert (row.status, row.source, row.level, row.event_name) == ("error", "crm", 1, "Lead")
    assert row.error_message is not None
    assert "amoCRM token rejected" in row.error_message
    assert "Invalid user name or password" in row.error_message  # the response excerpt
    assert revoked not in (row.error_message + (row.hint or ""))
    assert row.dialog_id is None

    # Bitrix24: a webhook URL with a wrong code.
    wrong_url = f"{bitrix.base_url}/rest/1/wrongcode123/"
    bitrix_direction = await crm_setup(
        stubs, res.CRM_TYPE_BITRIX24, wrong_url, interest=[BITRIX_INTEREST]
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await check(stubs, bitrix_direction, "deal", BITRIX_DEAL_ID)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.details() == "Bitrix24 credentials rejected"
    (row,) = await direction_log(stubs, bitrix_direction.direction_id)
    assert row.error_message is not None and "wrongcode123" not in row.error_message
    assert graph.posts() == []


async def test_crm_answering_garbage_is_logged_not_a_crash(
    stubs: Stubs, graph: FakeGraph, amo: FakeAmoCrm
) -> None:
    setup = await amo_setup(stubs, amo, interest=[AMO_INTEREST])
    amo.script(FakeResponse(200, "<html><body>Scheduled maintenance</body></html>"))
    (result,) = (await webhook(stubs, amo_webhook(setup.portal))).results
    assert "not JSON" in result.error
    assert list(result.events) == []
    (row,) = await direction_log(stubs, setup.direction_id)
    assert row.status == "error" and row.error_message is not None
    assert "Scheduled maintenance" in row.error_message

    amo.script(FakeResponse(200, "<html>still down</html>"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await check(stubs, setup, "deal", AMO_LEAD_ID)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_reason(err.value) == "CRM_BAD_RESPONSE"
    assert graph.posts() == []

    # A per-entity failure leaves the other entities of the webhook alone.
    body = (
        f"leads[update][0][id]=99999999&leads[update][1][id]={AMO_LEAD_ID}"
        f"&account[subdomain]={setup.portal}"
    )
    missing, found = (await webhook(stubs, body)).results
    assert missing.entity_id == "99999999" and "not found" in missing.error
    assert outcomes(found.events) == [("Lead", res.SEND_OUTCOME_SENT)]


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"hello=world&foo=bar",
        b'{"some": "json"}',
        b"leads[update][0][name]=Deal&account[subdomain]=loja",
        b"leads[update][0][id]=12ab&account[subdomain]=loja",
        b"leads[update][0][id]=&account[subdomain]=loja",
        b"companies[update][0][id]=5&account[subdomain]=loja",
        b"leads[delete][0][id]=5&account[subdomain]=loja",
        b"event=ONCRMINVOICEUPDATE&data[FIELDS][ID]=5&auth[domain]=x.bitrix24.ru",
        b"event=ONCRMDEALUPDATE&data[FIELDS][ID]=abc&auth[domain]=x.bitrix24.ru",
        b"\xff\xfe\x00garbage",
        b"",
        b"leads[update][0][id]=1&account[subdomain]=loja&pad=" + b"x" * 300_000,
    ],
    ids=[
        "neither-crm",
        "json-neither",
        "missing-id",
        "non-numeric-id",
        "empty-id",
        "unsupported-entity",
        "unsupported-action",
        "unknown-bitrix-event",
        "bitrix-non-numeric",
        "not-utf8",
        "empty",
        "huge",
    ],
)
async def test_bad_webhook_bodies_are_invalid_argument(
    stubs: Stubs, graph: FakeGraph, body: bytes
) -> None:
    before = await table_counts(stubs)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await webhook(stubs, body)
    assert bad_fields(err.value) == ["body"]
    assert error_reason(err.value) == "INVALID_CRM_WEBHOOK"
    assert await table_counts(stubs) == before
    assert graph.posts() == []


async def test_bad_check_requests_are_invalid_argument(stubs: Stubs, amo: FakeAmoCrm) -> None:
    setup = await amo_setup(stubs, amo, interest=[AMO_INTEREST])
    cases: list[tuple[dict[str, Any], str]] = [
        (dict(direction_id="", entity_type="deal", entity_id="1"), "direction_id"),
        (
            dict(direction_id=setup.direction_id, entity_type="invoice", entity_id="1"),
            "entity_type",
        ),
        (dict(direction_id=setup.direction_id, entity_type="", entity_id="1"), "entity_type"),
        (dict(direction_id=setup.direction_id, entity_type="deal", entity_id="12a"), "entity_id"),
        (dict(direction_id=setup.direction_id, entity_type="deal"), "entity_id"),
    ]
    for fields, bad in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stubs.qualification.CheckCrmFields(qpb.CheckCrmFieldsRequest(**fields))
        assert bad_fields(err.value) == [bad], fields
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.qualification.CheckCrmFields(
            qpb.CheckCrmFieldsRequest(direction_id="987654321", entity_type="deal", entity_id="1")
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await check(stubs, setup, "deal", contact_phone="+55 11 90000-0000")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(err.value) == "CRM_ENTITY_UNKNOWN"
    assert amo.requests == []


# -- ListCrmFields -------------------------------------------------------------------------


async def test_list_crm_fields_for_both_crms(
    stubs: Stubs, amo: FakeAmoCrm, bitrix: FakeBitrix24
) -> None:
    amo_direction = await amo_setup(stubs, amo, interest=[AMO_INTEREST])
    fields = await stubs.settings.ListCrmFields(
        spb.ListCrmFieldsRequest(crm_connection_id=amo_direction.connection_id, entity_type="lead")
    )
    by_id = {f.field_id: f for f in fields.fields}
    assert by_id["1271495"].field_type == "select"
    assert ("919467", "WhatsApp - Anúncio") in [
        (e.enum_id, e.enum_value) for e in by_id["1271495"].enums
    ]
    contact_fields = await stubs.settings.ListCrmFields(
        spb.ListCrmFieldsRequest(
            crm_connection_id=amo_direction.connection_id, entity_type="contact"
        )
    )
    assert "1271601" in {f.field_id for f in contact_fields.fields}

    bitrix_direction = await bitrix_setup(stubs, bitrix, interest=[BITRIX_INTEREST])
    fields = await stubs.settings.ListCrmFields(
        spb.ListCrmFieldsRequest(
            crm_connection_id=bitrix_direction.connection_id, entity_type="deal"
        )
    )
    by_id = {f.field_id: f for f in fields.fields}
    assert by_id["UF_CRM_1724077760"].field_name == "Canal de entrada"
    assert ("3159", "WhatsApp - Anúncio") in [
        (e.enum_id, e.enum_value) for e in by_id["UF_CRM_1724077760"].enums
    ]

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.settings.ListCrmFields(
            spb.ListCrmFieldsRequest(
                crm_connection_id=amo_direction.connection_id, entity_type="company"
            )
        )
    assert bad_fields(err.value) == ["entity_type"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.settings.ListCrmFields(
            spb.ListCrmFieldsRequest(crm_connection_id="987654321", entity_type="deal")
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    amo.script_unauthorized()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.settings.ListCrmFields(
            spb.ListCrmFieldsRequest(
                crm_connection_id=amo_direction.connection_id, entity_type="deal"
            )
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


# -- ReconcileCrm --------------------------------------------------------------------------


async def test_reconcile_picks_up_a_change_that_never_had_a_webhook(
    stubs: Stubs, graph: FakeGraph, amo: FakeAmoCrm
) -> None:
    setup = await amo_setup(stubs, amo, interest=[AMO_INTEREST], qualified=[AMO_QUALIFIED])
    changed_at = int(time.time()) - 600
    amo.copy_lead(24871399, updated_at=changed_at)

    response = await stubs.qualification.ReconcileCrm(
        qpb.ReconcileCrmRequest(crm_connection_id=setup.connection_id)
    )
    # Only the recently changed lead is listed (the fixture lead changed a year ago).
    assert [(r.entity_type, r.entity_id) for r in response.results] == [("deal", "24871399")]
    assert response.entities_checked == 1
    assert outcomes(response.results[0].events) == [
        ("Lead", res.SEND_OUTCOME_SENT),
        ("CompleteRegistration", res.SEND_OUTCOME_SENT),
    ]
    (post,) = graph.posts()
    # Dated at the CRM change, which is inside Meta's 7-day window.
    assert {e["event_time"] for e in post.json()["data"]} == {changed_at}
    listing = [r for r in amo.requests if r.path == "/api/v4/leads"]
    assert listing and int(listing[0].query["filter[updated_at][from]"][0]) >= (
        int(time.time()) - 7 * 86400 - 60
    )
    async with stubs.app.db.session() as session:
        connection = await session.get(CrmConnectionRow, int(setup.connection_id))
        assert connection is not None and connection.last_reconciled_at is not None
        mark = connection.last_reconciled_at
    assert abs((datetime.now(UTC) - mark).total_seconds()) < 60

    # The next run starts from the mark: nothing new, nothing sent twice.
    again = await stubs.qualification.ReconcileCrm(
        qpb.ReconcileCrmRequest(crm_connection_id=setup.connection_id)
    )
    assert again.entities_checked == 0
    since = datetime.fromtimestamp(changed_at - 60, UTC)
    replay = await stubs.qualification.ReconcileCrm(
        qpb.ReconcileCrmRequest(crm_connection_id=setup.connection_id, since=_timestamp(since))
    )
    assert outcomes(replay.results[0].events) == [
        ("Lead", res.SEND_OUTCOME_ALREADY_SENT),
        ("CompleteRegistration", res.SEND_OUTCOME_ALREADY_SENT),
    ]
    assert len(graph.posts()) == 1

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.qualification.ReconcileCrm(
            qpb.ReconcileCrmRequest(crm_connection_id="987654321")
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_periodic_reconciliation_runs_due_connections(
    stubs: Stubs, graph: FakeGraph, bitrix: FakeBitrix24
) -> None:
    setup = await bitrix_setup(stubs, bitrix, interest=[BITRIX_INTEREST])
    deal = dict(
        load_crm_fixture("bitrix_crm_deal_get.json")["result"],
        ID="6001",
        DATE_MODIFY=datetime.now(UTC).replace(microsecond=0).isoformat(),
    )
    bitrix.put_entity("deal", deal)
    async with stubs.app.db.session() as session:
        await session.execute(
            update(CrmConnectionRow)
            .where(CrmConnectionRow.id == int(setup.connection_id))
            .values(reconcile_interval_seconds=3600)
        )
        await session.commit()
    crm = stubs.app.crm
    crm.reconcile_poll_seconds = 0.05
    crm.start()
    for _ in range(200):
        if graph.posts():
            break
        await asyncio.sleep(0.05)
    (event,) = graph.events()
    assert event["event_name"] == "Lead"
    listed = [r for r in bitrix.requests if r.path.endswith("crm.deal.list.json")]
    # Due once, then not again within the interval.
    await asyncio.sleep(0.3)
    assert len([r for r in bitrix.requests if r.path.endswith("crm.deal.list.json")]) == len(listed)


def _timestamp(value: datetime) -> Any:
    from google.protobuf.timestamp_pb2 import Timestamp

    ts = Timestamp()
    ts.FromDatetime(value)
    return ts
