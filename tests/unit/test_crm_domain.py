"""CRM webhook parsing, field matching and rule validation (pure domain)."""

from __future__ import annotations

import json
from urllib.parse import urlencode

import pytest

from capi_server.domain.crm import (
    MAX_CRM_WEBHOOK_BYTES,
    CrmEntity,
    CrmFieldRule,
    CrmFieldValue,
    CrmType,
    CrmWebhookEntity,
    EntityType,
    InvalidCrmWebhook,
    match_crm_fields,
    parse_crm_webhook,
    validate_field_rule,
)
from capi_server.domain.levels import Level
from tests.fakes.crm import load_crm_fixture

FORM = "application/x-www-form-urlencoded"


def form(pairs: list[tuple[str, str]]) -> bytes:
    return urlencode(pairs).encode()


# ---------------------------------------------------------------------------------------
# Webhook parsing
# ---------------------------------------------------------------------------------------


def test_amocrm_lead_update_fixture() -> None:
    hook = parse_crm_webhook(load_crm_fixture("amocrm_webhook_lead_update.txt").encode(), FORM)
    assert hook.crm_type is CrmType.AMOCRM
    assert hook.entities == (CrmWebhookEntity(EntityType.DEAL, "24871305", "update"),)
    assert hook.amo_subdomain == "exemploloja"
    assert hook.amo_account_id == "31234567"
    assert hook.bitrix_domain is None


def test_bitrix_deal_update_fixture() -> None:
    hook = parse_crm_webhook(load_crm_fixture("bitrix_webhook_deal_update.txt").encode(), FORM)
    assert hook.crm_type is CrmType.BITRIX24
    assert hook.entities == (CrmWebhookEntity(EntityType.DEAL, "4127", "update"),)
    assert hook.bitrix_domain == "exemplo.bitrix24.com.br"
    assert hook.bitrix_member_id == "a223c6b3710f85df22e9377d6c4f7553"
    assert hook.bitrix_application_token == "51856fefc120afa4b628cc82d3935cce"
    assert hook.bitrix_event == "ONCRMDEALUPDATE"
    assert hook.sent_at_unix == 1764080400


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        pytest.param(
            [
                ("leads[status][0][id]", "101"),
                ("leads[status][0][status_id]", "142"),
                ("leads[status][0][pipeline_id]", "7712345"),
                ("leads[status][0][old_status_id]", "141"),
                ("leads[status][0][old_pipeline_id]", "7712345"),
                ("account[id]", "31234567"),
                ("account[subdomain]", "Loja"),
            ],
            [(EntityType.DEAL, "101", "status")],
            id="amo-status-hook",
        ),
        pytest.param(
            [("leads[add][0][id]", "7"), ("account[subdomain]", "loja")],
            [(EntityType.DEAL, "7", "add")],
            id="amo-lead-add",
        ),
        pytest.param(
            [("contacts[update][0][id]", "18273645"), ("contacts[add][0][id]", "5")],
            [(EntityType.CONTACT, "18273645", "update"), (EntityType.CONTACT, "5", "add")],
            id="amo-contacts",
        ),
        pytest.param(
            [
                ("leads[update][0][id]", "1"),
                ("leads[update][1][id]", "2"),
                ("leads[status][0][id]", "1"),  # the same lead again: listed once
                ("contacts[update][0][id]", "1"),  # a contact with the same id is another entity
            ],
            [
                (EntityType.DEAL, "1", "update"),
                (EntityType.DEAL, "2", "update"),
                (EntityType.CONTACT, "1", "update"),
            ],
            id="amo-several-deduplicated",
        ),
        pytest.param(
            [("event", "ONCRMLEADADD"), ("data[FIELDS][ID]", "55"), ("ts", "1")],
            [(EntityType.LEAD, "55", "add")],
            id="bitrix-lead-add",
        ),
        pytest.param(
            [("event", "onCrmContactUpdate"), ("data[FIELDS][ID]", "8841")],
            [(EntityType.CONTACT, "8841", "update")],
            id="bitrix-contact-update-mixed-case",
        ),
        pytest.param(
            [("event", "ONCRMDEALADD"), ("data[FIELDS][ID]", "0042")],
            [(EntityType.DEAL, "42", "add")],
            id="bitrix-leading-zeros",
        ),
    ],
)
def test_webhook_variants(
    pairs: list[tuple[str, str]], expected: list[tuple[EntityType, str, str]]
) -> None:
    hook = parse_crm_webhook(form(pairs), FORM)
    assert [tuple(e) for e in hook.entities] == expected


def test_amo_status_hook_tenant() -> None:
    body = form(
        [("leads[status][0][id]", "9"), ("account[subdomain]", "Loja"), ("account[id]", "3")]
    )
    hook = parse_crm_webhook(body, FORM)
    assert (hook.amo_subdomain, hook.amo_account_id) == ("loja", "3")


def test_json_bodies_are_accepted() -> None:
    bitrix = {
        "event": "ONCRMDEALUPDATE",
        "data": {"FIELDS": {"ID": 4127}},
        "auth": {"domain": "x.bitrix24.com", "application_token": "t"},
    }
    hook = parse_crm_webhook(json.dumps(bitrix).encode(), "application/json")
    assert hook.entities == (CrmWebhookEntity(EntityType.DEAL, "4127", "update"),)
    assert hook.bitrix_application_token == "t"
    amo = {"leads": {"update": [{"id": 24871305}]}, "account": {"id": "1", "subdomain": "a"}}
    hook = parse_crm_webhook(json.dumps(amo).encode(), "text/plain")  # sniffed by "{"
    assert hook.entities == (CrmWebhookEntity(EntityType.DEAL, "24871305", "update"),)


@pytest.mark.parametrize(
    ("body", "content_type", "field"),
    [
        pytest.param(b"", FORM, "body", id="empty"),
        pytest.param(b"\xff\xfe", FORM, "body", id="invalid-utf8"),
        pytest.param(
            b"leads%5Bupdate%5D%5B0%5D%5Bid%5D=%FF", FORM, "body", id="invalid-utf8-escape"
        ),
        pytest.param(b"x" * (MAX_CRM_WEBHOOK_BYTES + 1), FORM, "body", id="too-large"),
        pytest.param(b"{not json", "application/json", "body", id="broken-json"),
        pytest.param(b"[1, 2]", "application/json", "body", id="json-array"),
        pytest.param(b"hello=world", FORM, "body", id="neither-crm"),
        pytest.param(form([("account[id]", "1")]), FORM, "body", id="amo-no-entities"),
        pytest.param(
            form([("leads[update][0][name]", "x")]), FORM, "leads[update][0][id]", id="amo-no-id"
        ),
        pytest.param(
            form([("leads[update][0][id]", "12a")]), FORM, "leads[update][0][id]", id="amo-bad-id"
        ),
        pytest.param(
            form([("leads[update][0]", "12")]), FORM, "leads[update][0][id]", id="amo-flat-item"
        ),
        pytest.param(
            form([("leads[delete][0][id]", "1")]), FORM, "leads[delete]", id="amo-delete-action"
        ),
        pytest.param(
            form([("companies[update][0][id]", "1")]), FORM, "companies", id="amo-companies"
        ),
        pytest.param(
            form([("leads[update][0][id]", "1"), ("account[id]", "abc")]),
            FORM,
            "account[id]",
            id="amo-bad-account-id",
        ),
        pytest.param(
            form([("leads[update][0][id]", "1"), ("leads[update][0][id][x]", "2")]),
            FORM,
            "leads[update][0][id][x]",
            id="conflicting-keys",
        ),
        pytest.param(
            form([("event", "ONCRMDEALDELETE"), ("data[FIELDS][ID]", "1")]),
            FORM,
            "event",
            id="bitrix-unknown-event",
        ),
        pytest.param(
            form([("event", "ONCRMDEALUPDATE")]), FORM, "data[FIELDS][ID]", id="bitrix-no-id"
        ),
        pytest.param(
            form([("event", "ONCRMDEALUPDATE"), ("data[FIELDS][ID]", "-5")]),
            FORM,
            "data[FIELDS][ID]",
            id="bitrix-negative-id",
        ),
        pytest.param(
            json.dumps({"event": "ONCRMDEALUPDATE", "data": {"FIELDS": {"ID": True}}}).encode(),
            "application/json",
            "data[FIELDS][ID]",
            id="bitrix-bool-id",
        ),
    ],
)
def test_bad_webhooks_are_rejected(body: bytes, content_type: str, field: str) -> None:
    with pytest.raises(InvalidCrmWebhook) as caught:
        parse_crm_webhook(body, content_type)
    assert caught.value.field == field
    assert caught.value.reason


def test_body_at_the_limit_is_parsed() -> None:
    head = b"leads%5Bupdate%5D%5B0%5D%5Bid%5D=1&pad="
    body = head + b"x" * (MAX_CRM_WEBHOOK_BYTES - len(head))
    assert len(body) == MAX_CRM_WEBHOOK_BYTES
    assert parse_crm_webhook(body, FORM).entities[0].entity_id == "1"


# ---------------------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------------------


def amo_deal(**fields: CrmFieldValue) -> CrmEntity:
    return CrmEntity(CrmType.AMOCRM, EntityType.DEAL, "24871305", fields=fields)


def value(field_id: str, *values: str, enum_ids: tuple[str, ...] = ()) -> CrmFieldValue:
    return CrmFieldValue(field_id, tuple(values), enum_ids)


AMO_DEAL = CrmEntity(
    CrmType.AMOCRM,
    EntityType.DEAL,
    "24871305",
    fields={
        "1271495": value("1271495", "WhatsApp - Anúncio", enum_ids=("919467",)),
        "1271497": value(
            "1271497", "Plano anual", "Suporte premium", enum_ids=("919481", "919483")
        ),
        "1271503": value("1271503", "AbC-clid"),
        "1271507": value("1271507", "1200"),
        "1276648": value("1276648", "true"),
    },
    main_contact=CrmEntity(
        CrmType.AMOCRM,
        EntityType.CONTACT,
        "18273645",
        fields={"1271601": value("1271601", "Instagram Ads", enum_ids=("920011",))},
    ),
)

BITRIX_CONTACT = CrmEntity(
    CrmType.BITRIX24,
    EntityType.CONTACT,
    "8841",
    fields={
        "UF_CRM_1720697698689": value("UF_CRM_1720697698689", "Instagram Ads", enum_ids=("3201",))
    },
)
BITRIX_DEAL = CrmEntity(
    CrmType.BITRIX24,
    EntityType.DEAL,
    "4127",
    fields={
        "UF_CRM_1724077760": value("UF_CRM_1724077760", "WhatsApp - Anúncio", enum_ids=("3159",)),
        "UF_CRM_1724077850": value("UF_CRM_1724077850", "Y"),
        # A field the contact also has, with a different value: entity_type must decide.
        "UF_CRM_1720697698689": value("UF_CRM_1720697698689", "3203"),
    },
    main_contact=BITRIX_CONTACT,
)
# A deal read without field metadata: list fields hold only raw item IDs.
BITRIX_RAW_DEAL = CrmEntity(
    CrmType.BITRIX24,
    EntityType.DEAL,
    "4127",
    fields={"UF_CRM_1724077801": value("UF_CRM_1724077801", "3171", "3173")},
)


def rule(field_id: str | int, **kwargs: str | None) -> CrmFieldRule:
    return CrmFieldRule(field_id=str(field_id), **kwargs)


@pytest.mark.parametrize(
    ("entity", "rules", "matches"),
    [
        pytest.param(
            AMO_DEAL,
            [rule(1271495, field_type="select", enum_id="919467")],
            True,
            id="amo-select-enum-id",
        ),
        pytest.param(
            AMO_DEAL,
            [rule(1271495, field_type="select", enum_id="919469")],
            False,
            id="amo-select-other-enum",
        ),
        pytest.param(
            AMO_DEAL,
            [rule(1271495, field_type="select", enum_value="  whatsapp   -  ANÚNCIO ")],
            True,
            id="amo-select-value-case-whitespace",
        ),
        pytest.param(
            AMO_DEAL,
            [rule(1271495, field_type="select", enum_id="919469", enum_value="WhatsApp - Anúncio")],
            False,
            id="enum-id-wins-over-value",
        ),
        pytest.param(
            AMO_DEAL,
            [rule(1271497, field_type="multiselect", enum_id="919483")],
            True,
            id="amo-multiselect-any-option",
        ),
        pytest.param(
            AMO_DEAL,
            [rule("01271495", field_type="select", enum_id="0919467")],
            True,
            id="ids-normalised",
        ),
        pytest.param(
            AMO_DEAL,
            [rule(1271503, field_type="text", enum_value="abc-CLID")],
            True,
            id="text-case-insensitive",
        ),
        pytest.param(AMO_DEAL, [rule(1271503, field_type="text")], True, id="text-filled-in"),
        pytest.param(
            AMO_DEAL,
            [rule(1271507, field_type="numeric", enum_value="1200.00")],
            True,
            id="numeric-compare",
        ),
        pytest.param(
            AMO_DEAL,
            [rule(1271507, field_type="numeric", enum_value="1201")],
            False,
            id="numeric-differs",
        ),
        pytest.param(
            AMO_DEAL,
            [rule(1276648, field_type="checkbox", enum_value="да")],
            True,
            id="checkbox-true-words",
        ),
        pytest.param(
            AMO_DEAL, [rule(1276648, field_type="checkbox")], True, id="checkbox-default-checked"
        ),
        pytest.param(
            AMO_DEAL,
            [rule(1276648, field_type="checkbox", enum_value="false")],
            False,
            id="checkbox-expect-unchecked",
        ),
        pytest.param(
            AMO_DEAL,
            [rule(999, field_type="checkbox", enum_value="false")],
            False,
            id="absent-field-never-matches",
        ),
        pytest.param(
            AMO_DEAL,
            [rule(1271601, field_type="select", enum_id="920011")],
            True,
            id="amo-contact-field-found-on-main-contact",
        ),
        pytest.param(
            AMO_DEAL,
            [
                rule(1271495, field_type="select", enum_id="1"),
                rule(1271503, field_type="text", enum_value="nope"),
            ],
            False,
            id="no-rule-matches",
        ),
        pytest.param(
            BITRIX_DEAL,
            [rule("UF_CRM_1724077760", field_type="enumeration", enum_id="3159")],
            True,
            id="bitrix-list-enum-id",
        ),
        pytest.param(
            BITRIX_DEAL,
            [rule("uf_crm_1724077760", field_type="enumeration", enum_value="whatsapp - anúncio")],
            True,
            id="bitrix-list-value-and-lowercase-code",
        ),
        pytest.param(
            BITRIX_RAW_DEAL,
            [rule("UF_CRM_1724077801", field_type="enumeration", enum_id="3173")],
            True,
            id="bitrix-raw-list-value-is-item-id",
        ),
        pytest.param(
            BITRIX_DEAL,
            [rule("UF_CRM_1724077850", field_type="boolean", enum_value="1")],
            True,
            id="bitrix-boolean-Y",
        ),
        pytest.param(
            BITRIX_DEAL,
            [
                rule(
                    "UF_CRM_1720697698689",
                    field_type="enumeration",
                    enum_id="3201",
                    entity_type="contact",
                )
            ],
            True,
            id="bitrix-contact-rule-uses-contact",
        ),
        pytest.param(
            BITRIX_DEAL,
            [rule("UF_CRM_1720697698689", field_type="enumeration", enum_id="3201")],
            False,
            id="bitrix-rule-without-entity-type-uses-deal",
        ),
        pytest.param(
            BITRIX_DEAL,
            [
                rule(
                    "UF_CRM_1724077760",
                    field_type="enumeration",
                    enum_id="3159",
                    entity_type="lead",
                )
            ],
            False,
            id="bitrix-lead-rule-ignores-deal",
        ),
    ],
)
def test_match_single_level(entity: CrmEntity, rules: list[CrmFieldRule], matches: bool) -> None:
    result = match_crm_fields({Level.INTEREST: rules}, entity, entity.crm_type)
    if matches:
        assert list(result) == [Level.INTEREST]
        assert set(result[Level.INTEREST]) <= set(rules)
    else:
        assert result == {}


def test_or_within_level_lists_every_matching_rule_per_level() -> None:
    hit_a = rule(1271495, field_type="select", enum_id="919467")
    miss = rule(1271495, field_type="select", enum_id="919469")
    hit_b = rule(1276648, field_type="checkbox", enum_value="1")
    level3_miss = rule(1271507, field_type="numeric", enum_value="5")
    result = match_crm_fields(
        {
            Level.INTEREST: [miss, hit_a],
            Level.QUALIFIED: [hit_b, hit_a],
            Level.SCHEDULED: [level3_miss],
        },
        AMO_DEAL,
        "amocrm",
    )
    assert result == {Level.INTEREST: [hit_a], Level.QUALIFIED: [hit_b, hit_a]}


def test_related_entities_can_be_passed_explicitly() -> None:
    deal = CrmEntity(CrmType.BITRIX24, EntityType.DEAL, "1")
    contact_rule = rule(
        "UF_CRM_1720697698689", field_type="enumeration", enum_id="3201", entity_type="contact"
    )
    assert match_crm_fields({Level.QUALIFIED: [contact_rule]}, deal, CrmType.BITRIX24) == {}
    result = match_crm_fields(
        {Level.QUALIFIED: [contact_rule]}, deal, CrmType.BITRIX24, related=[BITRIX_CONTACT]
    )
    assert result == {Level.QUALIFIED: [contact_rule]}


def test_rule_from_jsonb_entry_with_numeric_ids() -> None:
    entry = {
        "field_id": 1271495,
        "field_name": "Canal",
        "field_type": "select",
        "enum_id": 919467,
        "enum_value": "WhatsApp - Anúncio",
    }
    parsed = CrmFieldRule.from_json(entry)
    assert parsed.field_id == "1271495" and parsed.enum_id == "919467"
    assert parsed.entity_type is None
    assert match_crm_fields({Level.INTEREST: [parsed]}, AMO_DEAL, "amocrm") == {
        Level.INTEREST: [parsed]
    }
    assert CrmFieldRule.from_json(parsed.to_json()) == parsed


# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("candidate", "crm_type", "problem_paths"),
    [
        (rule(1, field_type="select", enum_id="2"), CrmType.AMOCRM, []),
        (rule(1, field_type="select", enum_value="Novo"), CrmType.AMOCRM, []),
        (rule("", field_type="text"), CrmType.AMOCRM, ["field_id"]),
        (rule(1, field_type="select"), CrmType.AMOCRM, ["enum_id"]),
        (rule(1, field_type="enumeration"), CrmType.BITRIX24, ["enum_id"]),
        (rule(1, field_type="select", enum_id="abc"), CrmType.AMOCRM, ["enum_id"]),
        (rule(1, field_type="checkbox", enum_value="maybe"), CrmType.AMOCRM, ["enum_value"]),
        (rule(1, field_type="numeric", enum_value="lots"), CrmType.AMOCRM, ["enum_value"]),
        (rule(1, field_type="text", entity_type="contact"), CrmType.AMOCRM, ["entity_type"]),
        (rule("UF_CRM_1", field_type="string", entity_type="contact"), CrmType.BITRIX24, []),
        (
            rule("UF_CRM_1", field_type="string", entity_type="company"),
            CrmType.BITRIX24,
            ["entity_type"],
        ),
    ],
)
def test_validate_field_rule(
    candidate: CrmFieldRule, crm_type: CrmType, problem_paths: list[str]
) -> None:
    problems = validate_field_rule(candidate, crm_type)
    assert [path for path, _ in problems] == problem_paths
    assert all(message for _, message in problems)
