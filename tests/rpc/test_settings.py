"""SettingsService through gRPC, on SQLite and PostgreSQL."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from capi.v1 import resources_pb2 as res
from capi.v1 import settings_service_pb2 as pb
from tests.conftest import Stubs, unique
from tests.helpers import bad_fields, error_reason


async def make_account(stubs: Stubs, token: str = "user-token") -> str:
    resp = await stubs.settings.CreateUserAccount(
        pb.CreateUserAccountRequest(
            user_account=res.UserAccount(name="Acme", access_token=token, default_region="KZ")
        )
    )
    return str(resp.user_account.id)


def crm_direction(account: str, connection: str, **capi: object) -> res.Direction:
    settings = res.CapiSettings(
        enabled=True,
        source=res.CAPI_SOURCE_CRM,
        crm_type=res.CRM_TYPE_AMOCRM,
        crm_connection_id=connection,
        interest_fields=[
            res.CrmField(field_id="111", field_type="select", enum_id="5", enum_value="Hot")
        ],
    )
    for key, value in capi.items():
        setattr(settings, key, value)
    return res.Direction(
        user_account_id=account, name="CRM dir", pixel_id="1234567890", capi=settings
    )


async def make_amo_connection(stubs: Stubs, account: str) -> str:
    resp = await stubs.settings.CreateCrmConnection(
        pb.CreateCrmConnectionRequest(
            crm_connection=res.CrmConnection(
                user_account_id=account,
                crm_type=res.CRM_TYPE_AMOCRM,
                base_url=f"https://{unique('shop')}.amocrm.ru",
                access_token="amo-secret",
            )
        )
    )
    return str(resp.crm_connection.id)


async def test_direction_round_trip(stubs: Stubs) -> None:
    account = await make_account(stubs)
    instance = unique("inst")
    created = await stubs.settings.CreateDirection(
        pb.CreateDirectionRequest(
            direction=res.Direction(
                user_account_id=account,
                name="Dental",
                instance_name=instance,
                pixel_id="123456",
                whatsapp_business_account_id="987",
                qualification_prompt="Ask about the tooth",
                capi=res.CapiSettings(
                    enabled=True,
                    source=res.CAPI_SOURCE_WHATSAPP,
                    test_event_code="TEST123",
                    event_names=res.EventNames(interest="LeadSubmitted"),
                ),
            )
        )
    )
    direction = created.direction
    assert direction.id
    got = await stubs.settings.GetDirection(pb.GetDirectionRequest(id=direction.id))
    assert got.direction == direction
    assert got.direction.instance_name == instance
    assert got.direction.capi.event_names.interest == "LeadSubmitted"
    assert got.direction.capi.event_names.qualified == "CompleteRegistration"
    # LeadSubmitted is accepted for business messaging; the seed's other names warn.
    assert not any("'LeadSubmitted'" in w and "rejected" in w for w in created.warnings)
    assert any("CompleteRegistration" in w for w in created.warnings)


async def test_tokens_are_write_only(stubs: Stubs) -> None:
    resp = await stubs.settings.CreateUserAccount(
        pb.CreateUserAccountRequest(user_account=res.UserAccount(name="A", access_token="s3cr3t"))
    )
    assert resp.user_account.has_access_token
    assert resp.user_account.access_token == ""
    assert "s3cr3t" not in str(resp)


async def test_crm_direction_with_connection(stubs: Stubs) -> None:
    account = await make_account(stubs)
    connection = await make_amo_connection(stubs, account)
    created = await stubs.settings.CreateDirection(
        pb.CreateDirectionRequest(direction=crm_direction(account, connection))
    )
    got = await stubs.settings.GetDirection(pb.GetDirectionRequest(id=created.direction.id))
    field = got.direction.capi.interest_fields[0]
    assert (field.field_id, field.enum_id, field.enum_value) == ("111", "5", "Hot")
    assert got.direction.capi.crm_connection_id == connection


@pytest.mark.parametrize(
    ("mutate", "expected_field"),
    [
        (lambda d: setattr(d.capi, "source", res.CAPI_SOURCE_UNSPECIFIED), "direction.capi.source"),
        (lambda d: d.capi.ClearField("interest_fields"), "direction.capi.interest_fields"),
        (
            lambda d: d.capi.interest_fields.add(field_id="", enum_id="1"),
            "direction.capi.interest_fields[1].field_id",
        ),
        (
            lambda d: d.capi.interest_fields.add(field_id="9", field_type="select"),
            "direction.capi.interest_fields[1].enum_id",
        ),
        (
            lambda d: d.capi.interest_fields.add(field_id="9", enum_id="2", entity_type="deal"),
            "direction.capi.interest_fields[1].entity_type",
        ),
        (
            lambda d: setattr(d.capi, "crm_type", res.CRM_TYPE_UNSPECIFIED),
            "direction.capi.crm_type",
        ),
        (lambda d: setattr(d, "pixel_id", ""), "direction.pixel_id"),
        (lambda d: setattr(d, "pixel_id", "pixel-abc"), "direction.pixel_id"),
        (lambda d: setattr(d, "name", ""), "direction.name"),
        (lambda d: setattr(d.capi, "crm_connection_id", "abc"), "direction.capi.crm_connection_id"),
    ],
)
async def test_direction_validation(stubs: Stubs, mutate: object, expected_field: str) -> None:
    account = await make_account(stubs)
    connection = await make_amo_connection(stubs, account)
    direction = crm_direction(account, connection)
    mutate(direction)  # type: ignore[operator]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stubs.settings.CreateDirection(pb.CreateDirectionRequest(direction=direction))
    assert expected_field in bad_fields(info.value)


async def test_bitrix_entity_type_rules(stubs: Stubs) -> None:
    account = await make_account(stubs)
    conn = await stubs.settings.CreateCrmConnection(
        pb.CreateCrmConnectionRequest(
            crm_connection=res.CrmConnection(
                user_account_id=account,
                crm_type=res.CRM_TYPE_BITRIX24,
                base_url="https://portal.bitrix24.ru/rest/1/abc123/",
                application_token="app-token",
            )
        )
    )
    assert conn.crm_connection.portal == "portal.bitrix24.ru"
    assert "abc123" not in conn.crm_connection.base_url
    direction = crm_direction(account, conn.crm_connection.id, crm_type=res.CRM_TYPE_BITRIX24)
    direction.capi.interest_fields[0].entity_type = "deal"
    created = await stubs.settings.CreateDirection(pb.CreateDirectionRequest(direction=direction))
    assert created.direction.capi.interest_fields[0].entity_type == "deal"
    direction.capi.interest_fields[0].entity_type = "company"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stubs.settings.CreateDirection(pb.CreateDirectionRequest(direction=direction))
    assert "direction.capi.interest_fields[0].entity_type" in bad_fields(info.value)


async def test_not_found(stubs: Stubs) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stubs.settings.GetDirection(pb.GetDirectionRequest(id="999999999"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(info.value) == "DIRECTION_NOT_FOUND"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stubs.settings.CreateDirection(
            pb.CreateDirectionRequest(
                direction=res.Direction(user_account_id="999999999", name="x")
            )
        )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stubs.settings.GetDirection(pb.GetDirectionRequest(id="not-a-number"))
    assert bad_fields(info.value) == ["id"]


async def test_failed_update_leaves_settings_unchanged(stubs: Stubs) -> None:
    account = await make_account(stubs)
    connection = await make_amo_connection(stubs, account)
    created = await stubs.settings.CreateDirection(
        pb.CreateDirectionRequest(direction=crm_direction(account, connection))
    )
    before = await stubs.settings.GetDirection(pb.GetDirectionRequest(id=created.direction.id))
    bad = res.Direction(id=created.direction.id, pixel_id="")
    bad.capi.CopyFrom(created.direction.capi)
    bad.capi.ClearField("interest_fields")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stubs.settings.UpdateDirection(
            pb.UpdateDirectionRequest(
                direction=bad, update_mask=FieldMask(paths=["pixel_id", "capi.interest_fields"])
            )
        )
    fields = bad_fields(info.value)
    assert "direction.pixel_id" in fields
    after = await stubs.settings.GetDirection(pb.GetDirectionRequest(id=created.direction.id))
    assert after == before


async def test_update_with_mask_changes_only_named_fields(stubs: Stubs) -> None:
    account = await make_account(stubs)
    created = await stubs.settings.CreateDirection(
        pb.CreateDirectionRequest(
            direction=res.Direction(user_account_id=account, name="Old", pixel_id="42")
        )
    )
    update = res.Direction(id=created.direction.id, name="New", pixel_id="")
    update.capi.enabled = True
    update.capi.source = res.CAPI_SOURCE_WHATSAPP
    resp = await stubs.settings.UpdateDirection(
        pb.UpdateDirectionRequest(
            direction=update, update_mask=FieldMask(paths=["name", "capi.enabled", "capi.source"])
        )
    )
    assert resp.direction.name == "New"
    assert resp.direction.pixel_id == "42"
    assert resp.direction.capi.enabled
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stubs.settings.UpdateDirection(
            pb.UpdateDirectionRequest(direction=update, update_mask=FieldMask(paths=["bogus"]))
        )
    assert bad_fields(info.value) == ["update_mask.paths"]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stubs.settings.UpdateDirection(pb.UpdateDirectionRequest(direction=update))
    assert bad_fields(info.value) == ["update_mask.paths"]


async def test_instance_name_is_unique(stubs: Stubs) -> None:
    account = await make_account(stubs)
    instance = unique("inst")
    direction = res.Direction(user_account_id=account, name="A", instance_name=instance)
    await stubs.settings.CreateDirection(pb.CreateDirectionRequest(direction=direction))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stubs.settings.CreateDirection(pb.CreateDirectionRequest(direction=direction))
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_list_directions_pages(stubs: Stubs) -> None:
    account = await make_account(stubs)
    names = [f"d{i}" for i in range(5)]
    for name in names:
        await stubs.settings.CreateDirection(
            pb.CreateDirectionRequest(direction=res.Direction(user_account_id=account, name=name))
        )
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await stubs.settings.ListDirections(
            pb.ListDirectionsRequest(user_account_id=account, page_size=2, page_token=token)
        )
        pages += 1
        seen += [d.name for d in page.directions]
        token = page.next_page_token
        if not token:
            break
    assert seen == names
    assert pages == 3
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stubs.settings.ListDirections(pb.ListDirectionsRequest(page_token="garbage!"))
    assert bad_fields(info.value) == ["page_token"]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stubs.settings.ListDirections(pb.ListDirectionsRequest(page_size=-1))
    assert bad_fields(info.value) == ["page_size"]


async def test_pixel_choices_with_aggregation_warning(stubs: Stubs) -> None:
    account = await make_account(stubs)
    choices = await stubs.settings.ListPixelChoices(
        pb.ListPixelChoicesRequest(user_account_id=account)
    )
    assert not choices.choices and not choices.warning
    for name, pixel in (("A", "111"), ("B", "111"), ("C", "222")):
        created = await stubs.settings.CreateDirection(
            pb.CreateDirectionRequest(
                direction=res.Direction(user_account_id=account, name=name, pixel_id=pixel)
            )
        )
    assert any(
        "aggregated" in w
        for w in (
            await stubs.settings.CreateDirection(
                pb.CreateDirectionRequest(
                    direction=res.Direction(user_account_id=account, name="D", pixel_id="222")
                )
            )
        ).warnings
    )
    assert created.direction.pixel_id == "222"
    choices = await stubs.settings.ListPixelChoices(
        pb.ListPixelChoicesRequest(user_account_id=account)
    )
    assert [(c.pixel_id, list(c.direction_names)) for c in choices.choices] == [
        ("111", ["A", "B"]),
        ("222", ["C", "D"]),
    ]
    assert "aggregated" in choices.warning


async def test_ad_account_token_refresh(stubs: Stubs) -> None:
    account = await make_account(stubs)
    ad = await stubs.settings.CreateAdAccount(
        pb.CreateAdAccountRequest(ad_account=res.AdAccount(user_account_id=account, name="Ads"))
    )
    assert not ad.ad_account.has_access_token
    updated = await stubs.settings.UpdateAdAccount(
        pb.UpdateAdAccountRequest(
            ad_account=res.AdAccount(id=ad.ad_account.id, access_token="fresh"),
            update_mask=FieldMask(paths=["access_token"]),
        )
    )
    assert updated.ad_account.has_access_token
    assert updated.ad_account.name == "Ads"
