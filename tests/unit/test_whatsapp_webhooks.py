"""Parsing of raw WhatsApp webhooks: Evolution `messages.upsert` (several versions) and the
Cloud API `messages` webhook, against the shared fixtures and hand-built variants."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capi_server.domain.whatsapp_webhooks import (
    MAX_WEBHOOK_BYTES,
    SKIP_BROADCAST_LIST,
    SKIP_CLOUD_NO_MESSAGES,
    SKIP_GROUP,
    SKIP_NEWSLETTER,
    SKIP_STATUS_BROADCAST,
    AdReferral,
    InboundMessage,
    InvalidWebhook,
    SkippedWebhook,
    parse_whatsapp_webhook,
)

FIXTURES = Path("/work/shared/fixtures/evolution")
if not FIXTURES.is_dir():  # the repo copy, when the shared tree is not mounted
    FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "evolution"

CLICK_ID = "AffClickId_0123456789-abc"


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def parse_one(payload: dict[str, Any] | str | bytes) -> InboundMessage | SkippedWebhook:
    raw = json.dumps(payload) if isinstance(payload, dict) else payload
    results = parse_whatsapp_webhook(raw)
    assert len(results) == 1
    return results[0]


def parse_message(payload: dict[str, Any] | str | bytes) -> InboundMessage:
    result = parse_one(payload)
    assert isinstance(result, InboundMessage), result
    return result


def evolution(
    *,
    key: dict[str, Any] | None = None,
    message: dict[str, Any] | None = None,
    event: str = "messages.upsert",
    **data: Any,
) -> dict[str, Any]:
    """A minimal current-Evolution upsert; `key` entries and `data` entries override."""
    full_key: dict[str, Any] = {
        "remoteJid": "5511987654321@s.whatsapp.net",
        "fromMe": False,
        "id": "MSG1",
    }
    full_key.update(key or {})
    full_data: dict[str, Any] = {
        "key": full_key,
        "pushName": "Ana",
        "message": {"conversation": "hello"} if message is None else message,
        "messageType": "conversation",
        "messageTimestamp": 1764079200,
    }
    full_data.update(data)
    return {"event": event, "instance": "inst-1", "data": full_data}


def cloud(
    *messages: dict[str, Any], contacts: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    return {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "102290129340398",
                "changes": [
                    {
                        "field": "messages",
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {
                                "display_phone_number": "15550783881",
                                "phone_number_id": "106540352242922",
                            },
                            "contacts": contacts
                            if contacts is not None
                            else [{"profile": {"name": "Sheena"}, "wa_id": "16505551234"}],
                            "messages": list(messages),
                        },
                    }
                ],
            }
        ],
    }


def cloud_text(body: str = "hi", **extra: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "from": "16505551234",
        "id": "wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA=",
        "timestamp": "1749416383",
        "type": "text",
        "text": {"body": body},
    }
    message.update(extra)
    return message


# --- the shared fixtures --------------------------------------------------------------------


def test_fixture_plain_text_pn_addressing() -> None:
    message = parse_message(fixture_bytes("messages_upsert_text.json"))
    assert message == InboundMessage(
        source="evolution",
        instance_name="loja-centro",
        message_id="3A5F1C2B9D8E7A6B5C4D",
        contact_phone="5511987654321",
        contact_lid="104857600123456",
        from_me=False,
        text="Olá, gostaria de saber o preço do plano anual",
        message_type="conversation",
        sent_at=1764079200,
        ctwa_clid=None,
        from_ad_without_click_id=False,
        push_name="Maria Souza",
        ad=None,
    )
    assert message.contact_key == "5511987654321"


def test_fixture_ctwa_with_lid_addressing() -> None:
    message = parse_message(fixture_bytes("messages_upsert_ctwa_referral.json"))
    assert message == InboundMessage(
        source="evolution",
        instance_name="loja-centro",
        message_id="AC1830B11436BAC01F6FA6196C534B8A",
        contact_phone="5521998765432",
        contact_lid="203456789012345",
        from_me=False,
        text="Olá! Tenho interesse e queria mais informações, por favor.",
        message_type="conversation",
        sent_at=1764079500,
        ctwa_clid="AffExAmPlEcTwAcLiD0123456789abcdefGHIJKLmnopQRSTuvwxYZ_-0123456789",
        from_ad_without_click_id=False,
        push_name="João Pereira",
        ad=AdReferral(
            source_id="120212345678901234",
            source_url="https://fb.me/1AbCdEfGh",
            source_type="ad",
            source_app="instagram",
            media_type="image",
        ),
    )


def test_fixture_from_me_is_parsed_not_skipped() -> None:
    message = parse_message(fixture_bytes("messages_upsert_from_me.json"))
    assert message == InboundMessage(
        source="evolution",
        instance_name="loja-centro",
        message_id="3EB0A1B2C3D4E5F6A7B8C9",
        contact_phone="5511987654321",
        contact_lid=None,
        from_me=True,
        text="Oi Maria! O plano anual custa R$ 1.200. Posso te enviar o link?",
        message_type="conversation",
        sent_at=1764079320,
        ctwa_clid=None,
        from_ad_without_click_id=False,
        # "Você" is Evolution's placeholder for the business itself, not the contact.
        push_name=None,
        ad=None,
    )


def test_fixture_group_is_skipped() -> None:
    assert parse_one(fixture_bytes("messages_upsert_group.json")) == SkippedWebhook(SKIP_GROUP)


def test_str_and_bytes_bodies_parse_alike() -> None:
    raw = fixture_bytes("messages_upsert_text.json")
    assert parse_whatsapp_webhook(raw) == parse_whatsapp_webhook(raw.decode("utf-8"))


def test_repr_does_not_leak_personal_data() -> None:
    message = parse_message(fixture_bytes("messages_upsert_ctwa_referral.json"))
    shown = repr(message)
    for secret in ("5521998765432", "203456789012345", "João", "Olá"):
        assert secret not in shown


# --- text variants --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "message_type", "expected_text"),
    [
        ({"conversation": "current"}, "conversation", "current"),
        # Evolution < 2.1 did not fold extendedTextMessage into conversation.
        (
            {"extendedTextMessage": {"text": "older", "contextInfo": {}}},
            "extendedTextMessage",
            "older",
        ),
        ({"imageMessage": {"caption": "photo", "mimetype": "image/jpeg"}}, "imageMessage", "photo"),
        ({"videoMessage": {"caption": "clip"}}, "videoMessage", "clip"),
        ({"documentMessage": {"caption": "doc", "fileName": "a.pdf"}}, "documentMessage", "doc"),
        ({"conversation": "", "imageMessage": {"caption": "x"}}, "imageMessage", "x"),
        ({"stickerMessage": {"mimetype": "image/webp"}}, "stickerMessage", ""),
        ({"audioMessage": {"seconds": 4, "ptt": True}}, "audioMessage", ""),
        ({"imageMessage": {"mimetype": "image/jpeg"}}, "imageMessage", ""),
    ],
)
def test_text_sources(message: dict[str, Any], message_type: str, expected_text: str) -> None:
    parsed = parse_message(evolution(message=message, messageType=message_type))
    assert parsed.text == expected_text
    assert parsed.message_type == message_type


def test_message_type_is_derived_when_missing() -> None:
    payload = evolution(message={"messageContextInfo": {}, "audioMessage": {"seconds": 3}})
    del payload["data"]["messageType"]
    parsed = parse_message(payload)
    assert (parsed.message_type, parsed.text) == ("audioMessage", "")


def test_message_without_content_is_still_a_message() -> None:
    payload = evolution()
    del payload["data"]["message"]
    del payload["data"]["messageType"]
    parsed = parse_message(payload)
    assert (parsed.message_type, parsed.text) == ("unknown", "")


# --- click id and ad attribution ------------------------------------------------------------


def test_click_id_in_lifted_context_info_with_string_media_type() -> None:
    # Pre-2.3.6 protobufjs JSON: enums as strings.
    payload = evolution(
        contextInfo={
            "externalAdReply": {
                "ctwaClid": CLICK_ID,
                "sourceType": "ad",
                "sourceId": "120200000000000001",
                "sourceUrl": "https://fb.me/x",
                "mediaType": "VIDEO",
            }
        }
    )
    parsed = parse_message(payload)
    assert parsed.ctwa_clid == CLICK_ID
    assert parsed.from_ad_without_click_id is False
    assert parsed.ad == AdReferral("120200000000000001", "https://fb.me/x", "ad", None, "video")


@pytest.mark.parametrize(("raw", "expected"), [(0, "none"), (1, "image"), (2, "video"), (9, None)])
def test_numeric_media_type(raw: int, expected: str | None) -> None:
    payload = evolution(contextInfo={"externalAdReply": {"ctwaClid": CLICK_ID, "mediaType": raw}})
    ad = parse_message(payload).ad
    assert ad is not None
    assert ad.media_type == expected


def test_click_id_in_older_nested_context_info() -> None:
    payload = evolution(
        message={
            "extendedTextMessage": {
                "text": "Hi, I saw your ad",
                "contextInfo": {
                    "externalAdReply": {"ctwaClid": CLICK_ID, "sourceType": "ad", "sourceId": 42}
                },
            }
        },
        messageType="extendedTextMessage",
    )
    parsed = parse_message(payload)
    assert (parsed.text, parsed.ctwa_clid) == ("Hi, I saw your ad", CLICK_ID)
    assert parsed.ad is not None
    assert parsed.ad.source_id == "42"


def test_click_id_in_nested_image_context_info() -> None:
    payload = evolution(
        message={
            "imageMessage": {
                "caption": "ad pic",
                "contextInfo": {"externalAdReply": {"ctwaClid": CLICK_ID}},
            }
        },
        messageType="imageMessage",
    )
    assert parse_message(payload).ctwa_clid == CLICK_ID


def test_lifted_click_id_wins_over_nested_one() -> None:
    payload = evolution(
        contextInfo={"externalAdReply": {"ctwaClid": "lifted"}},
        message={
            "extendedTextMessage": {
                "text": "t",
                "contextInfo": {"externalAdReply": {"ctwaClid": "nested"}},
            }
        },
    )
    assert parse_message(payload).ctwa_clid == "lifted"


@pytest.mark.parametrize("key_style", ["ctwaClid", "ctwa_clid"])
def test_click_id_on_seed_referral_path_top_level(key_style: str) -> None:
    payload = evolution(contextInfo={"referral": {key_style: CLICK_ID, "sourceId": "7"}})
    parsed = parse_message(payload)
    assert parsed.ctwa_clid == CLICK_ID
    assert parsed.ad is not None
    assert parsed.ad.source_id == "7"


def test_click_id_on_seed_referral_path_nested() -> None:
    payload = evolution(
        message={
            "extendedTextMessage": {
                "text": "t",
                "contextInfo": {"referral": {"ctwaClid": CLICK_ID}},
            }
        }
    )
    assert parse_message(payload).ctwa_clid == CLICK_ID


def test_external_ad_reply_click_id_wins_over_referral() -> None:
    payload = evolution(
        contextInfo={
            "referral": {"ctwaClid": "from-referral"},
            "externalAdReply": {"ctwaClid": "from-ad-reply"},
        }
    )
    assert parse_message(payload).ctwa_clid == "from-ad-reply"


@pytest.mark.parametrize(
    "context_info",
    [
        {"conversionSource": "FB_Ads"},
        {"entryPointConversionSource": "ctwa_ad", "ctwaPayload": "QUJD"},
        {"externalAdReply": {"sourceType": "ad", "sourceId": "1", "title": "Promo"}},
        {"referral": {"sourceUrl": "https://fb.me/y"}},
    ],
)
def test_ad_chat_without_click_id_is_flagged(context_info: dict[str, Any]) -> None:
    parsed = parse_message(evolution(contextInfo=context_info))
    assert parsed.ctwa_clid is None
    assert parsed.from_ad_without_click_id is True


@pytest.mark.parametrize(
    "context_info",
    [
        {
            "entryPointConversionSource": "global_search_new_chat",
            "entryPointConversionApp": "whatsapp",
        },
        {"externalAdReply": {"title": "a link preview", "sourceUrl": "https://example.com"}},
        {"expiration": 0, "mentionedJid": []},
    ],
)
def test_non_ad_context_is_not_flagged(context_info: dict[str, Any]) -> None:
    parsed = parse_message(evolution(contextInfo=context_info))
    assert (parsed.ctwa_clid, parsed.from_ad_without_click_id, parsed.ad) == (None, False, None)


# --- phones, LIDs and chat kinds ------------------------------------------------------------


def test_device_suffix_is_dropped() -> None:
    parsed = parse_message(evolution(key={"remoteJid": "5511987654321:12@s.whatsapp.net"}))
    assert parsed.contact_phone == "5511987654321"


def test_legacy_c_us_server_is_a_phone() -> None:
    parsed = parse_message(evolution(key={"remoteJid": "5511987654321@c.us"}))
    assert parsed.contact_phone == "5511987654321"


def test_lid_without_phone_is_keyed_by_lid() -> None:
    # Evolution 2.2.x: only the LID, no remoteJidAlt (evolution-api#2466).
    payload = evolution(
        key={"remoteJid": "13718000000001@lid"},
        contextInfo={"externalAdReply": {"ctwaClid": CLICK_ID}},
    )
    parsed = parse_message(payload)
    assert (parsed.contact_phone, parsed.contact_lid) == (None, "13718000000001")
    assert parsed.contact_key == "lid:13718000000001"
    assert parsed.ctwa_clid == CLICK_ID


def test_lid_with_remote_jid_alt_phone_and_device_suffix() -> None:
    payload = evolution(
        key={
            "remoteJid": "66417458159826@lid",
            "remoteJidAlt": "5599912345678:3@s.whatsapp.net",
            "addressingMode": "lid",
        }
    )
    parsed = parse_message(payload)
    assert (parsed.contact_phone, parsed.contact_lid) == ("5599912345678", "66417458159826")
    assert parsed.contact_key == "5599912345678"


def test_baileys_6_sender_pn_variant() -> None:
    payload = evolution(
        key={"remoteJid": "66417458159826@lid", "senderPn": "5599912345678@s.whatsapp.net"}
    )
    parsed = parse_message(payload)
    assert (parsed.contact_phone, parsed.contact_lid) == ("5599912345678", "66417458159826")


def test_baileys_6_sender_lid_variant() -> None:
    payload = evolution(key={"senderLid": "66417458159826@lid"})
    parsed = parse_message(payload)
    assert (parsed.contact_phone, parsed.contact_lid) == ("5511987654321", "66417458159826")


def test_empty_alt_fields_are_ignored() -> None:
    payload = evolution(key={"remoteJidAlt": "", "participant": ""})
    parsed = parse_message(payload)
    assert (parsed.contact_phone, parsed.contact_lid) == ("5511987654321", None)


@pytest.mark.parametrize(
    ("remote_jid", "reason"),
    [
        ("120363041234567890@g.us", SKIP_GROUP),
        ("5511987654321-1600000000@g.us", SKIP_GROUP),
        ("status@broadcast", SKIP_STATUS_BROADCAST),
        ("1600000000@broadcast", SKIP_BROADCAST_LIST),
        ("120363111111111111@newsletter", SKIP_NEWSLETTER),
        ("13135550002@bot", "unsupported chat server bot"),
    ],
)
def test_non_dialog_chats_are_skipped(remote_jid: str, reason: str) -> None:
    assert parse_one(evolution(key={"remoteJid": remote_jid})) == SkippedWebhook(reason)


def test_from_me_with_lid_addressing() -> None:
    payload = evolution(
        key={
            "remoteJid": "203456789012345@lid",
            "remoteJidAlt": "5521998765432@s.whatsapp.net",
            "fromMe": True,
        },
        pushName="Loja Centro",
    )
    parsed = parse_message(payload)
    assert (parsed.from_me, parsed.contact_phone, parsed.push_name) == (
        True,
        "5521998765432",
        None,
    )


# --- events and envelope --------------------------------------------------------------------


@pytest.mark.parametrize("event", ["messages.upsert", "MESSAGES_UPSERT", "messages-upsert"])
def test_upsert_event_name_variants_are_accepted(event: str) -> None:
    assert parse_message(evolution(event=event)).message_id == "MSG1"


@pytest.mark.parametrize(
    "event", ["connection.update", "messages.update", "MESSAGES_UPDATE", "send.message", "qrcode"]
)
def test_other_events_are_skipped(event: str) -> None:
    payload = {"event": event, "instance": "inst-1", "data": {"state": "open"}}
    assert parse_one(payload) == SkippedWebhook(f"event {event} is not a message")


def test_event_name_in_skip_reason_is_sanitised() -> None:
    result = parse_one({"event": "evil\nlog line 5511987654321" + "x" * 100, "data": {}})
    assert isinstance(result, SkippedWebhook)
    assert "\n" not in result.reason
    assert len(result.reason) < 100


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        (1764079200, 1764079200),
        ("1764079200", 1764079200),
        ({"low": 1764079200, "high": 0, "unsigned": False}, 1764079200),
        ({"low": -1, "high": 0}, 4294967295),  # protobufjs keeps `low` signed
        (1764079200.0, 1764079200),
        (1764079200123, 1764079200),  # milliseconds
        (None, None),
        (0, None),
        ("", None),
    ],
)
def test_timestamp_shapes(timestamp: Any, expected: int | None) -> None:
    assert parse_message(evolution(messageTimestamp=timestamp)).sent_at == expected


def test_missing_timestamp_is_none() -> None:
    payload = evolution()
    del payload["data"]["messageTimestamp"]
    assert parse_message(payload).sent_at is None


def test_missing_instance_and_from_me_default() -> None:
    payload = evolution()
    del payload["instance"]
    del payload["data"]["key"]["fromMe"]
    parsed = parse_message(payload)
    assert (parsed.instance_name, parsed.from_me) == (None, False)


# --- Cloud API -------------------------------------------------------------------------------


def test_cloud_text_message() -> None:
    parsed = parse_message(cloud(cloud_text("Hello there")))
    assert parsed == InboundMessage(
        source="cloud_api",
        instance_name="106540352242922",
        message_id="wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA=",
        contact_phone="16505551234",
        contact_lid=None,
        from_me=False,
        text="Hello there",
        message_type="text",
        sent_at=1749416383,
        ctwa_clid=None,
        from_ad_without_click_id=False,
        push_name="Sheena",
        ad=None,
    )


def test_cloud_referral_with_click_id() -> None:
    referral = {
        "source_url": "https://fb.me/3cr4Wqqkv",
        "source_id": "120226305854810726",
        "source_type": "ad",
        "body": "Chat with us",
        "headline": "Chat with us",
        "media_type": "image",
        "image_url": "https://scontent.xx.fbcdn.net/v/t45.1600-4/x.jpg",
        "ctwa_clid": "Aff-n8ZTODiE79d22KtAwQKj9e_mIEOOj27vDVwFjN80dp4_0NiNhEgpGo0AHemvuSoifXaytf",
        "welcome_message": {"text": "Hi there!"},
    }
    parsed = parse_message(cloud(cloud_text(referral=referral)))
    assert parsed.ctwa_clid == referral["ctwa_clid"]
    assert parsed.from_ad_without_click_id is False
    assert parsed.ad == AdReferral(
        "120226305854810726", "https://fb.me/3cr4Wqqkv", "ad", None, "image"
    )


def test_cloud_referral_without_click_id_is_flagged() -> None:
    # Ads placed in WhatsApp Status carry no ctwa_clid.
    parsed = parse_message(cloud(cloud_text(referral={"source_id": "1", "source_type": "ad"})))
    assert (parsed.ctwa_clid, parsed.from_ad_without_click_id) == (None, True)


def test_cloud_several_messages_and_captions() -> None:
    image = {
        "from": "447700900123",
        "id": "wamid.2",
        "timestamp": "1749416400",
        "type": "image",
        "image": {"caption": "look", "mime_type": "image/jpeg", "id": "m1"},
    }
    sticker = {"from": "447700900123", "id": "wamid.3", "type": "sticker", "sticker": {}}
    results = parse_whatsapp_webhook(json.dumps(cloud(cloud_text("one"), image, sticker)))
    messages = [r for r in results if isinstance(r, InboundMessage)]
    assert len(messages) == len(results) == 3
    assert [(m.message_id, m.text, m.message_type) for m in messages] == [
        (
            "wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA=",
            "one",
            "text",
        ),
        ("wamid.2", "look", "image"),
        ("wamid.3", "", "sticker"),
    ]
    # The push name belongs to its wa_id only.
    assert [m.push_name for m in messages] == ["Sheena", None, None]


def test_cloud_status_update_is_skipped() -> None:
    payload = cloud()
    value = payload["entry"][0]["changes"][0]["value"]
    del value["messages"]
    value["statuses"] = [{"id": "wamid.1", "status": "delivered"}]
    assert parse_whatsapp_webhook(json.dumps(payload)) == [SkippedWebhook(SKIP_CLOUD_NO_MESSAGES)]


def test_cloud_other_field_and_object_are_skipped() -> None:
    payload = cloud(cloud_text())
    payload["entry"][0]["changes"][0]["field"] = "account_update"
    assert parse_one(payload) == SkippedWebhook("cloud api field account_update is not messages")
    assert parse_one({"object": "page", "entry": []}) == SkippedWebhook(
        "cloud api object page is not whatsapp"
    )


def test_cloud_empty_entry_list_is_skipped() -> None:
    payload = {"object": "whatsapp_business_account", "entry": []}
    assert parse_one(payload) == SkippedWebhook(SKIP_CLOUD_NO_MESSAGES)


# --- malformed input ------------------------------------------------------------------------


def _without(payload: dict[str, Any], *path: str | int) -> dict[str, Any]:
    result = copy.deepcopy(payload)
    node: Any = result
    for step in path[:-1]:
        node = node[step]
    del node[path[-1]]
    return result


def _with(payload: dict[str, Any], value: Any, *path: str | int) -> dict[str, Any]:
    result = copy.deepcopy(payload)
    node: Any = result
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    return result


BASE = evolution()


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b"not json", "body"),
        (b'{"event": "messages.upsert"', "body"),
        (b"\xff\xfe{}", "body"),
        ('{"event": "\ud800"}', "body"),
        (b'{"event": NaN}', "body"),
        (b"[" * 100_000 + b"]" * 100_000, "body"),
        (b"[1, 2]", "body"),
        (b'"a string"', "body"),
        (b"{}", "event"),
        (json.dumps({**BASE, "event": 5}), "event"),
        (json.dumps(_without(BASE, "data")), "data"),
        (json.dumps(_with(BASE, [BASE["data"]], "data")), "data"),
        (json.dumps(_without(BASE, "data", "key")), "data.key"),
        (json.dumps(_without(BASE, "data", "key", "remoteJid")), "data.key.remoteJid"),
        (json.dumps(_with(BASE, 5511, "data", "key", "remoteJid")), "data.key.remoteJid"),
        (json.dumps(_with(BASE, "no-at-sign", "data", "key", "remoteJid")), "data.key.remoteJid"),
        (
            json.dumps(_with(BASE, "abc@s.whatsapp.net", "data", "key", "remoteJid")),
            "data.key.remoteJid",
        ),
        (
            json.dumps(_with(BASE, "+5511987654321@s.whatsapp.net", "data", "key", "remoteJid")),
            "data.key.remoteJid",
        ),
        (
            json.dumps(_with(BASE, "1234567890123456@s.whatsapp.net", "data", "key", "remoteJid")),
            "data.key.remoteJid",
        ),
        (json.dumps(_with(BASE, "abc@lid", "data", "key", "remoteJid")), "data.key.remoteJid"),
        (
            json.dumps(_with(BASE, "x@s.whatsapp.net", "data", "key", "remoteJidAlt")),
            "data.key.remoteJidAlt",
        ),
        (json.dumps(_without(BASE, "data", "key", "id")), "data.key.id"),
        (json.dumps(_with(BASE, "true", "data", "key", "fromMe")), "data.key.fromMe"),
        (json.dumps(_with(BASE, "soon", "data", "messageTimestamp")), "data.messageTimestamp"),
        (json.dumps(_with(BASE, -5, "data", "messageTimestamp")), "data.messageTimestamp"),
        (
            json.dumps(_with(BASE, 1, "data", "messageTimestamp")).replace(
                '"messageTimestamp": 1', '"messageTimestamp": 1e999'
            ),
            "data.messageTimestamp",
        ),
        (json.dumps(_with(BASE, "9" * 5000, "data", "messageTimestamp")), "data.messageTimestamp"),
        (
            json.dumps(_with(BASE, {"low": "1"}, "data", "messageTimestamp")),
            "data.messageTimestamp",
        ),
        (json.dumps(_with(BASE, "x", "data", "message")), "data.message"),
        (
            json.dumps(_with(BASE, 7, "data", "message", "conversation")),
            "data.message.conversation",
        ),
        (json.dumps(_with(BASE, [], "data", "contextInfo")), "data.contextInfo"),
        (
            json.dumps(_with(BASE, {"externalAdReply": {"ctwaClid": 5}}, "data", "contextInfo")),
            "data.contextInfo.externalAdReply.ctwaClid",
        ),
        (
            json.dumps(_with(BASE, {"externalAdReply": {"mediaType": []}}, "data", "contextInfo")),
            "data.contextInfo.externalAdReply.mediaType",
        ),
        (json.dumps(_with(BASE, 3, "instance")), "instance"),
        (json.dumps({"object": 1}), "object"),
        (json.dumps({"object": "whatsapp_business_account", "entry": {}}), "entry"),
        (
            json.dumps(
                _with(
                    cloud(cloud_text()),
                    "+1 650",
                    "entry",
                    0,
                    "changes",
                    0,
                    "value",
                    "messages",
                    0,
                    "from",
                )
            ),
            "entry[0].changes[0].value.messages[0].from",
        ),
        (
            json.dumps(
                _without(
                    cloud(cloud_text()), "entry", 0, "changes", 0, "value", "messages", 0, "id"
                )
            ),
            "entry[0].changes[0].value.messages[0].id",
        ),
        (
            json.dumps(_without(cloud(cloud_text()), "entry", 0, "changes", 0, "field")),
            "entry[0].changes[0].field",
        ),
    ],
)
def test_malformed_input_raises_invalid_webhook(raw: str | bytes, field: str) -> None:
    with pytest.raises(InvalidWebhook) as caught:
        parse_whatsapp_webhook(raw)
    assert caught.value.field == field
    assert caught.value.reason


def test_too_large_body_is_rejected_before_parsing() -> None:
    padding = "x" * MAX_WEBHOOK_BYTES
    oversized = json.dumps(evolution(padding=padding))
    for raw in (oversized, oversized.encode()):
        with pytest.raises(InvalidWebhook) as caught:
            parse_whatsapp_webhook(raw)
        assert caught.value.reason == "webhook body too large"
    # Multi-byte characters count as bytes: under the limit in characters, over it in bytes.
    wide = json.dumps(evolution(padding="é" * (MAX_WEBHOOK_BYTES // 2)), ensure_ascii=False)
    assert len(wide) < MAX_WEBHOOK_BYTES < len(wide.encode())
    with pytest.raises(InvalidWebhook, match="too large"):
        parse_whatsapp_webhook(wide)


def test_error_messages_do_not_quote_the_phone() -> None:
    payload = _with(BASE, "55119876x4321@s.whatsapp.net", "data", "key", "remoteJid")
    with pytest.raises(InvalidWebhook) as caught:
        parse_whatsapp_webhook(json.dumps(payload))
    assert "5511" not in str(caught.value)


# --- property tests: any input parses or raises InvalidWebhook, nothing else ------------------

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)

SAMPLE_BODIES: list[dict[str, Any]] = [
    *(json.loads(fixture_bytes(name)) for name in sorted(p.name for p in FIXTURES.glob("*.json"))),
    evolution(
        key={"remoteJid": "1@lid", "senderPn": "5511987654321@s.whatsapp.net"},
        message={
            "extendedTextMessage": {"text": "t", "contextInfo": {"referral": {"ctwaClid": "c"}}}
        },
        messageTimestamp={"low": 1, "high": 0},
    ),
    cloud(cloud_text(referral={"ctwa_clid": "c", "media_type": "video"})),
]


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, child in node.items():
            found.extend(_paths(child, (*prefix, key)))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            found.extend(_paths(child, (*prefix, index)))
    return found


def _parses_or_rejects(raw: str | bytes) -> None:
    try:
        results = parse_whatsapp_webhook(raw)
    except InvalidWebhook as error:
        assert error.field
        return
    assert results, "never an empty list"
    for result in results:
        if isinstance(result, InboundMessage):
            assert result.message_id
            assert result.contact_phone is None or result.contact_phone.isdigit()
            assert result.contact_phone is not None or result.contact_lid is not None
            assert result.sent_at is None or result.sent_at > 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash(raw: bytes) -> None:
    _parses_or_rejects(raw)


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES)
def test_random_json_never_crashes(value: Any) -> None:
    _parses_or_rejects(json.dumps(value))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(SAMPLE_BODIES), st.floats(min_value=0.0, max_value=1.0))
def test_truncated_webhooks_never_crash(body: dict[str, Any], fraction: float) -> None:
    raw = json.dumps(body).encode()
    _parses_or_rejects(raw[: int(len(raw) * fraction)])


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_webhooks_never_crash(data: st.DataObject) -> None:
    body = copy.deepcopy(data.draw(st.sampled_from(SAMPLE_BODIES)))
    path = data.draw(st.sampled_from(_paths(body)))
    node = body
    for step in path[:-1]:
        node = node[step]
    if data.draw(st.booleans()) and isinstance(node, dict):
        del node[path[-1]]
    else:
        node[path[-1]] = data.draw(JSON_VALUES)
    _parses_or_rejects(json.dumps(body))
