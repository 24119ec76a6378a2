"""amoCRM and Bitrix24 REST adapters against the local fake servers."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

import pytest

from capi_server.adapters.crm import (
    AmoCrmClient,
    AsyncRateLimiter,
    Bitrix24Client,
    CrmError,
    RetryPolicy,
)
from capi_server.domain.crm import (
    CrmFieldRule,
    CrmType,
    EntityType,
    match_crm_fields,
)
from capi_server.domain.levels import Level
from tests.fakes.crm import FakeAmoCrm, FakeBitrix24
from tests.fakes.http import FakeResponse

# Fast retries and a generous rate so tests measure behaviour, not waiting.
FAST_RETRY = RetryPolicy(max_attempts=4, backoff_seconds=0.01, max_wait_seconds=1.0)
FAST_RATE = 1000.0


@pytest.fixture
def amo_fake() -> Iterator[FakeAmoCrm]:
    with FakeAmoCrm() as fake:
        yield fake


@pytest.fixture
def bitrix_fake() -> Iterator[FakeBitrix24]:
    with FakeBitrix24() as fake:
        yield fake


@pytest.fixture
async def amo(amo_fake: FakeAmoCrm) -> AsyncIterator[AmoCrmClient]:
    client = AmoCrmClient(
        base_url=amo_fake.base_url,
        access_token=amo_fake.token,
        rate_per_second=FAST_RATE,
        retry=FAST_RETRY,
    )
    yield client
    await client.aclose()


@pytest.fixture
async def bitrix(bitrix_fake: FakeBitrix24) -> AsyncIterator[Bitrix24Client]:
    client = Bitrix24Client(
        webhook_url=bitrix_fake.webhook_url, rate_per_second=FAST_RATE, retry=FAST_RETRY
    )
    yield client
    await client.aclose()


# ---------------------------------------------------------------------------------------
# amoCRM
# ---------------------------------------------------------------------------------------


async def test_amo_get_lead_reads_fields_and_main_contact(
    amo: AmoCrmClient, amo_fake: FakeAmoCrm
) -> None:
    deal = await amo.get_entity(EntityType.DEAL, "24871305")

    assert (deal.crm_type, deal.entity_type, deal.entity_id) == (
        CrmType.AMOCRM,
        EntityType.DEAL,
        "24871305",
    )
    assert deal.fields["1271495"].enum_ids == ("919467",)
    assert deal.fields["1271495"].values == ("WhatsApp - Anúncio",)
    assert deal.fields["1271497"].enum_ids == ("919481", "919483")
    assert deal.fields["1276648"].values == ("true",)
    assert deal.fields["1271505"].values == ("1764288000",)
    assert deal.contact_phones == ("+55 11 98765-4321", "5511987654321")
    assert deal.contact_emails == ("maria.souza@example.com",)
    assert deal.linked_contact_ids == ("18273645",)
    assert deal.updated_at == 1764080100
    assert deal.main_contact is not None
    assert deal.main_contact.fields["1271601"].enum_ids == ("920011",)

    requests = amo_fake.requests
    assert [r.path for r in requests] == ["/api/v4/leads/24871305", "/api/v4/contacts/18273645"]
    assert requests[0].query["with"] == ["contacts"]
    assert requests[0].headers["authorization"] == f"Bearer {amo_fake.token}"


async def test_amo_field_change_is_seen_by_matching(
    amo: AmoCrmClient, amo_fake: FakeAmoCrm
) -> None:
    rules = {Level.SCHEDULED: [CrmFieldRule("1271509", field_type="radiobutton", enum_id="919503")]}
    before = await amo.get_entity(EntityType.DEAL, "24871305")
    assert match_crm_fields(rules, before, CrmType.AMOCRM) == {}

    amo_fake.set_lead_field(
        24871305, 1271509, "Qualificado", enum_id=919503, field_type="radiobutton"
    )
    after = await amo.get_entity(EntityType.DEAL, "24871305")
    assert match_crm_fields(rules, after, CrmType.AMOCRM) == {
        Level.SCHEDULED: rules[Level.SCHEDULED]
    }


async def test_amo_get_contact(amo: AmoCrmClient) -> None:
    contact = await amo.get_entity(EntityType.CONTACT, "18273645")
    assert contact.entity_type is EntityType.CONTACT
    assert contact.contact_phones == ("+55 11 98765-4321", "5511987654321")
    assert contact.linked_contact_ids == ()


async def test_amo_missing_lead_is_not_found(amo: AmoCrmClient) -> None:
    with pytest.raises(CrmError) as caught:
        await amo.get_entity(EntityType.DEAL, "1")
    assert caught.value.kind == "not_found"
    assert not caught.value.is_transient


async def test_amo_lead_without_custom_fields_or_contacts(
    amo: AmoCrmClient, amo_fake: FakeAmoCrm
) -> None:
    amo_fake.put_lead({"id": 5, "custom_fields_values": None, "_embedded": {"contacts": []}})
    deal = await amo.get_entity(EntityType.DEAL, "5")
    assert deal.fields == {}
    assert deal.contact_phones == ()
    assert deal.main_contact is None
    assert len(amo_fake.requests) == 1


async def test_amo_list_fields_follows_pages(amo_fake: FakeAmoCrm) -> None:
    amo_fake.fields_page_size = 3  # 7 fields -> pages of 3, 3, 1
    client = AmoCrmClient(
        base_url=amo_fake.base_url, access_token=amo_fake.token, rate_per_second=FAST_RATE
    )
    try:
        fields = await client.list_fields(EntityType.DEAL)
    finally:
        await client.aclose()

    assert len(fields) == 7
    by_id = {f.field_id: f for f in fields}
    assert by_id["1271495"].field_type == "select"
    assert by_id["1271495"].field_name == "Canal de entrada"
    assert ("919467", "WhatsApp - Anúncio") in by_id["1271495"].enums
    assert by_id["1271509"].enums == (("919501", "Novo"), ("919503", "Qualificado"))
    assert by_id["1271503"].enums == ()
    assert [r.query["page"] for r in amo_fake.requests] == [["1"], ["2"], ["3"]]


async def test_amo_list_contact_fields(amo: AmoCrmClient, amo_fake: FakeAmoCrm) -> None:
    fields = await amo.list_fields(EntityType.CONTACT)
    assert [f.field_id for f in fields] == ["178382", "178384", "1271601"]
    assert amo_fake.requests[0].path == "/api/v4/contacts/custom_fields"


async def test_amo_list_changed_since(amo: AmoCrmClient, amo_fake: FakeAmoCrm) -> None:
    amo_fake.copy_lead(100, updated_at=1764090000)
    amo_fake.copy_lead(101, updated_at=1764000000)  # older than `since`
    ids = await amo.list_changed_since(EntityType.DEAL, 1764080000, limit=10)
    assert ids == ["24871305", "100"]
    assert amo_fake.requests[0].query["filter[updated_at][from]"] == ["1764080000"]

    assert await amo.list_changed_since(EntityType.DEAL, 1800000000, limit=10) == []


async def test_amo_429_burst_then_success(amo: AmoCrmClient, amo_fake: FakeAmoCrm) -> None:
    amo_fake.script_rate_limit(times=2)
    contact = await amo.get_entity(EntityType.CONTACT, "18273645")
    assert contact.entity_id == "18273645"
    assert len(amo_fake.requests) == 3


async def test_amo_429_retry_after_header_is_honoured(
    amo: AmoCrmClient, amo_fake: FakeAmoCrm
) -> None:
    amo_fake.script_rate_limit(times=1, retry_after="0.3")
    started = time.monotonic()
    await amo.get_entity(EntityType.CONTACT, "18273645")
    assert time.monotonic() - started >= 0.3
    assert len(amo_fake.requests) == 2


async def test_amo_429_retries_are_bounded(amo: AmoCrmClient, amo_fake: FakeAmoCrm) -> None:
    amo_fake.script_rate_limit(times=10)
    with pytest.raises(CrmError) as caught:
        await amo.get_entity(EntityType.CONTACT, "18273645")
    assert caught.value.kind == "rate_limited"
    assert caught.value.is_transient
    assert caught.value.http_status == 429
    assert len(amo_fake.requests) == FAST_RETRY.max_attempts


async def test_amo_long_retry_after_fails_fast(amo: AmoCrmClient, amo_fake: FakeAmoCrm) -> None:
    amo_fake.script_rate_limit(times=1, retry_after="300")
    with pytest.raises(CrmError) as caught:
        await amo.get_entity(EntityType.CONTACT, "18273645")
    assert caught.value.kind == "rate_limited"
    assert caught.value.retry_after_seconds == 300
    assert len(amo_fake.requests) == 1


async def test_amo_401_is_auth_error(amo_fake: FakeAmoCrm) -> None:
    client = AmoCrmClient(
        base_url=amo_fake.base_url, access_token="revoked", rate_per_second=FAST_RATE
    )
    try:
        with pytest.raises(CrmError) as caught:
            await client.get_entity(EntityType.DEAL, "24871305")
    finally:
        await client.aclose()
    error = caught.value
    assert (error.kind, error.message, error.http_status) == ("auth", "amoCRM token rejected", 401)
    assert "Invalid user name or password" in error.response_excerpt
    assert not error.is_transient
    assert "revoked" not in str(error)
    assert len(amo_fake.requests) == 1  # no retries for auth


@pytest.mark.parametrize(
    "response",
    [
        pytest.param(FakeResponse(200, "<html><body>Bad gateway</body></html>"), id="html"),
        pytest.param(FakeResponse(200, b'{"id": 24871305, "custom_fi'), id="truncated-json"),
        pytest.param(FakeResponse(200, [1, 2]), id="json-array"),
        pytest.param(FakeResponse(418, "teapot"), id="odd-status"),
    ],
)
async def test_amo_garbage_is_bad_response(
    amo: AmoCrmClient, amo_fake: FakeAmoCrm, response: FakeResponse
) -> None:
    amo_fake.script(response)
    with pytest.raises(CrmError) as caught:
        await amo.get_entity(EntityType.DEAL, "24871305")
    assert caught.value.kind == "bad_response"
    assert caught.value.response_excerpt
    assert len(caught.value.response_excerpt) <= 500


async def test_amo_5xx_then_success(amo: AmoCrmClient, amo_fake: FakeAmoCrm) -> None:
    amo_fake.script(FakeResponse(502, "bad gateway"))
    contact = await amo.get_entity(EntityType.CONTACT, "18273645")
    assert contact.entity_id == "18273645"
    assert len(amo_fake.requests) == 2


async def test_amo_unreachable_is_unavailable() -> None:
    with FakeAmoCrm() as fake:
        base_url = fake.base_url
    client = AmoCrmClient(
        base_url=base_url, access_token="t", rate_per_second=FAST_RATE, retry=FAST_RETRY
    )
    try:
        with pytest.raises(CrmError) as caught:
            await client.get_entity(EntityType.CONTACT, "1")
    finally:
        await client.aclose()
    assert caught.value.kind == "unavailable"
    assert caught.value.is_transient


async def test_amo_rate_limiter_spaces_requests(amo_fake: FakeAmoCrm) -> None:
    client = AmoCrmClient(
        base_url=amo_fake.base_url, access_token=amo_fake.token, rate_per_second=20.0
    )
    try:
        started = time.monotonic()
        for _ in range(5):
            await client.get_entity(EntityType.CONTACT, "18273645")
        elapsed = time.monotonic() - started
    finally:
        await client.aclose()
    # Burst of 1 at 20/s: the 2nd..5th requests wait 50 ms each.
    assert elapsed >= 0.19
    assert len(amo_fake.requests) == 5


async def test_rate_limiter_token_bucket_with_fake_clock() -> None:
    now = [0.0]
    sleeps: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    limiter = AsyncRateLimiter(7.0, burst=2, clock=lambda: now[0], sleep=fake_sleep)
    for _ in range(4):
        await limiter.acquire()
    # Two tokens at once, then one every 1/7 s.
    assert sleeps == pytest.approx([1 / 7, 1 / 7])


# ---------------------------------------------------------------------------------------
# Bitrix24
# ---------------------------------------------------------------------------------------


async def test_bitrix_get_deal_resolves_lists_and_contact(
    bitrix: Bitrix24Client, bitrix_fake: FakeBitrix24
) -> None:
    deal = await bitrix.get_entity(EntityType.DEAL, "4127")

    assert (deal.crm_type, deal.entity_type, deal.entity_id) == (
        CrmType.BITRIX24,
        EntityType.DEAL,
        "4127",
    )
    canal = deal.fields["UF_CRM_1724077760"]
    assert (canal.enum_ids, canal.values) == (("3159",), ("WhatsApp - Anúncio",))
    assert deal.fields["UF_CRM_1724077801"].enum_ids == ("3171", "3173")
    assert deal.fields["UF_CRM_1724077801"].values == ("Plano anual", "Suporte premium")
    assert deal.fields["STAGE_ID"].values == ("C2:PREPARATION",)
    assert "UF_CRM_1724077850" not in deal.fields  # empty "" is no value
    assert deal.contact_phones == ("+5511987654321", "(11) 3333-4444")
    assert deal.contact_emails == ("maria.souza@example.com",)
    assert deal.linked_contact_ids == ("8841",)
    assert deal.updated_at == 1764080400  # 2025-11-25T17:20:00+03:00
    assert deal.main_contact is not None
    assert deal.main_contact.fields["UF_CRM_1720697698689"].values == ("Instagram Ads",)

    methods = [r.path.rsplit("/", 1)[-1] for r in bitrix_fake.requests]
    assert methods == [
        "crm.deal.get.json",
        "crm.deal.fields.json",
        "crm.contact.get.json",
        "crm.contact.fields.json",
    ]
    assert bitrix_fake.requests[0].query["id"] == ["4127"]

    # Field metadata is cached: a second read costs two requests, not four.
    bitrix_fake.server.take()
    await bitrix.get_entity(EntityType.DEAL, "4127")
    assert len(bitrix_fake.requests) == 2


async def test_bitrix_matching_by_value_and_contact_rule(
    bitrix: Bitrix24Client, bitrix_fake: FakeBitrix24
) -> None:
    by_value = CrmFieldRule(
        "UF_CRM_1724077760", field_type="enumeration", enum_value="whatsapp - anúncio"
    )
    contact_rule = CrmFieldRule(
        "UF_CRM_1720697698689", field_type="enumeration", enum_id="3203", entity_type="contact"
    )
    rules = {Level.INTEREST: [by_value], Level.QUALIFIED: [contact_rule]}
    deal = await bitrix.get_entity(EntityType.DEAL, "4127")
    assert match_crm_fields(rules, deal, CrmType.BITRIX24) == {Level.INTEREST: [by_value]}

    bitrix_fake.set_contact_field(8841, "UF_CRM_1720697698689", "3203")
    deal = await bitrix.get_entity(EntityType.DEAL, "4127")
    assert match_crm_fields(rules, deal, CrmType.BITRIX24) == {
        Level.INTEREST: [by_value],
        Level.QUALIFIED: [contact_rule],
    }


async def test_bitrix_lead_has_own_phones(
    bitrix: Bitrix24Client, bitrix_fake: FakeBitrix24
) -> None:
    bitrix_fake.put_entity(
        "lead",
        {
            "ID": "77",
            "TITLE": "x",
            "CONTACT_ID": None,
            "DATE_MODIFY": "2025-11-25T17:20:00+03:00",
            "PHONE": [
                {"ID": "1", "VALUE_TYPE": "WORK", "VALUE": "+5511999990000", "TYPE_ID": "PHONE"}
            ],
        },
    )
    lead = await bitrix.get_entity(EntityType.LEAD, "77")
    assert lead.entity_type is EntityType.LEAD
    assert lead.contact_phones == ("+5511999990000",)
    assert lead.main_contact is None


async def test_bitrix_missing_deal_is_not_found(bitrix: Bitrix24Client) -> None:
    with pytest.raises(CrmError) as caught:
        await bitrix.get_entity(EntityType.DEAL, "999")
    assert (caught.value.kind, caught.value.http_status) == ("not_found", 400)


async def test_bitrix_list_fields_with_items(
    bitrix: Bitrix24Client, bitrix_fake: FakeBitrix24
) -> None:
    fields = {f.field_id: f for f in await bitrix.list_fields(EntityType.DEAL)}
    canal = fields["UF_CRM_1724077760"]
    assert canal.field_name == "Canal de entrada"
    assert canal.field_type == "enumeration"
    assert canal.enums == (
        ("3157", "Site"),
        ("3159", "WhatsApp - Anúncio"),
        ("3161", "WhatsApp - Orgânico"),
        ("3163", "Indicação"),
    )
    assert fields["UF_CRM_1724077850"].field_type == "boolean"
    assert fields["TITLE"].field_name == "Title"
    assert bitrix_fake.requests[0].path.endswith("/crm.deal.fields.json")


async def test_bitrix_list_changed_since(bitrix: Bitrix24Client, bitrix_fake: FakeBitrix24) -> None:
    ids = await bitrix.list_changed_since(EntityType.DEAL, 1764080000, limit=10)
    assert ids == ["4127"]
    request = bitrix_fake.requests[0]
    assert request.path.endswith("/crm.deal.list.json")
    assert request.query["filter[>DATE_MODIFY]"] == ["2025-11-25T14:13:20+00:00"]
    assert await bitrix.list_changed_since(EntityType.DEAL, 1764090000, limit=10) == []


async def test_bitrix_query_limit_burst_then_success(
    bitrix: Bitrix24Client, bitrix_fake: FakeBitrix24
) -> None:
    bitrix_fake.script_query_limit(times=3)
    fields = await bitrix.list_fields(EntityType.DEAL)
    assert fields
    assert len(bitrix_fake.requests) == 4


async def test_bitrix_query_limit_retries_are_bounded(
    bitrix: Bitrix24Client, bitrix_fake: FakeBitrix24
) -> None:
    bitrix_fake.script_query_limit(times=10)
    with pytest.raises(CrmError) as caught:
        await bitrix.list_fields(EntityType.DEAL)
    assert (caught.value.kind, caught.value.http_status) == ("rate_limited", 503)
    assert "QUERY_LIMIT_EXCEEDED" in caught.value.response_excerpt
    assert len(bitrix_fake.requests) == FAST_RETRY.max_attempts


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (401, "expired_token"),
        (401, "NO_AUTH_FOUND"),
        (401, "invalid_token"),
        (403, "INSUFFICIENT_SCOPE"),
    ],
)
async def test_bitrix_auth_errors(
    bitrix: Bitrix24Client, bitrix_fake: FakeBitrix24, status: int, error: str
) -> None:
    bitrix_fake.script_error(status, error, "denied")
    with pytest.raises(CrmError) as caught:
        await bitrix.get_entity(EntityType.DEAL, "4127")
    assert (caught.value.kind, caught.value.message) == ("auth", "Bitrix24 credentials rejected")
    assert len(bitrix_fake.requests) == 1


async def test_bitrix_wrong_webhook_code_is_auth_error(bitrix_fake: FakeBitrix24) -> None:
    client = Bitrix24Client(
        webhook_url=f"{bitrix_fake.base_url}/rest/1/wrongcode", rate_per_second=FAST_RATE
    )
    try:
        with pytest.raises(CrmError) as caught:
            await client.get_entity(EntityType.DEAL, "4127")
    finally:
        await client.aclose()
    assert caught.value.kind == "auth"
    assert "wrongcode" not in str(caught.value)


@pytest.mark.parametrize(
    "response",
    [
        pytest.param(FakeResponse(200, "<html><body>Portal is updating</body></html>"), id="html"),
        pytest.param(FakeResponse(200, b'{"result": {"ID": "41'), id="truncated-json"),
        pytest.param(FakeResponse(200, {"time": {}}), id="no-result"),
        pytest.param(FakeResponse(200, {"result": ["not", "an", "object"]}), id="result-list"),
    ],
)
async def test_bitrix_garbage_is_bad_response(
    bitrix: Bitrix24Client, bitrix_fake: FakeBitrix24, response: FakeResponse
) -> None:
    bitrix_fake.script(response)
    with pytest.raises(CrmError) as caught:
        await bitrix.get_entity(EntityType.DEAL, "4127")
    assert caught.value.kind == "bad_response"
    assert caught.value.response_excerpt
    assert len(bitrix_fake.requests) == 1


async def test_bitrix_500_then_success(bitrix: Bitrix24Client, bitrix_fake: FakeBitrix24) -> None:
    bitrix_fake.script(FakeResponse(500, "<html>oops</html>"))
    fields = await bitrix.list_fields(EntityType.CONTACT)
    assert {f.field_id for f in fields} >= {"UF_CRM_1720697698689"}
    assert len(bitrix_fake.requests) == 2
