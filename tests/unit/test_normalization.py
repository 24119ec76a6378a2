"""Normalisation and hashing of user_data, checked against Meta's own Python SDK."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import phonenumbers
import pytest
from facebook_business.adobjects.serverside.normalize import Normalize
from hypothesis import given, settings
from hypothesis import strategies as st

from capi_server.domain.normalization import (
    InvalidUserData,
    hash_country,
    hash_email,
    hash_phone,
    is_already_hashed,
    normalize_country,
    normalize_email,
    normalize_phone,
    sha256_hex,
)

VECTORS_PATH = Path("/work/shared/fixtures/meta_capi/normalization_vectors.json")
if not VECTORS_PATH.exists():  # the repo copy, when the shared tree is not mounted
    VECTORS_PATH = Path(__file__).parents[1] / "fixtures" / "meta_capi" / VECTORS_PATH.name

_ALL_VECTORS: list[dict[str, Any]] = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))
_IMPLEMENTED = {"ph", "em", "country"}
_VECTORS = [v for v in _ALL_VECTORS if v["field"] in _IMPLEMENTED and v["input"] is not None]
_PREHASHED_VECTORS = [v for v in _ALL_VECTORS if v["input"] is None]


def _normalize(field: str, raw: str) -> str:
    if field == "ph":
        return normalize_phone(raw)
    if field == "em":
        return normalize_email(raw)
    return normalize_country(raw)


def _hash(field: str, raw: str) -> str:
    if field == "ph":
        return hash_phone(raw)
    if field == "em":
        return hash_email(raw)
    return hash_country(raw)


def test_fixture_has_vectors_for_every_implemented_field() -> None:
    assert {v["field"] for v in _VECTORS} == _IMPLEMENTED


@pytest.mark.parametrize("vector", _VECTORS, ids=lambda v: f"{v['field']}:{v['input']!r}")
def test_fixture_vectors(vector: dict[str, Any]) -> None:
    assert _normalize(vector["field"], vector["input"]) == vector["normalized"]
    assert _hash(vector["field"], vector["input"]) == vector["sha256"]


@pytest.mark.parametrize("vector", _PREHASHED_VECTORS, ids=lambda v: str(v["field"]))
def test_fixture_prehashed_values_pass_through(vector: dict[str, Any]) -> None:
    prehashed = vector["sha256"]
    assert hash_phone(prehashed) == prehashed
    assert hash_email(prehashed) == prehashed
    assert normalize_phone(prehashed, "KZ") == prehashed


def test_sha256_hex_matches_hashlib_and_sdk() -> None:
    assert sha256_hex("77011234567") == hashlib.sha256(b"77011234567").hexdigest()
    assert sha256_hex("ü@x.de") == Normalize.hash_sha_256("ü@x.de")


@pytest.mark.parametrize(
    ("raw", "region", "expected"),
    [
        ("8 701 123 45 67", "KZ", "77011234567"),
        ("8(701)1234567", "KZ", "77011234567"),
        ("87011234567", "kz", "77011234567"),  # region case does not matter
        ("7011234567", "KZ", "77011234567"),  # no trunk prefix, no country code
        ("8 (916) 123-45-67", "RU", "79161234567"),
        ("9161234567", "RU", "79161234567"),
        # A Moscow number that is also a valid Vietnamese +84 99... number: the trunk
        # prefix decides for the local reading.
        ("8 499 123 45 67", "RU", "74991234567"),
        ("030 123456", "DE", "4930123456"),
        ("07911 123456", "GB", "447911123456"),
        ("06 1234 5678", "IT", "390612345678"),  # Italy keeps the leading zero
        ("206.207.2008", "US", "12062072008"),
        ("2062072008", "US", "12062072008"),
    ],
)
def test_local_formats_become_international(raw: str, region: str, expected: str) -> None:
    assert normalize_phone(raw, region) == expected
    assert hash_phone(raw, region) == sha256_hex(expected)


@pytest.mark.parametrize(
    ("raw", "region", "expected"),
    [
        ("+1 (206) 207-2008", "KZ", "12062072008"),
        ("+1 (206) 207-2008", "RU", "12062072008"),
        ("+1 (206) 207-2008", None, "12062072008"),
        ("79161234567", "RU", "79161234567"),
        ("79161234567", "KZ", "79161234567"),
        ("77011234567", "KZ", "77011234567"),
        ("12062072008", "US", "12062072008"),
        ("12062072008", "KZ", "12062072008"),  # a valid US number is not re-read as KZ
        ("0012062072008", "RU", "12062072008"),
        ("0012062072008", "DE", "12062072008"),
        ("5511987654321", "KZ", "5511987654321"),
        # Brazilian JID-style number without the 9th digit: phonenumbers calls it invalid,
        # the SDK rule still sends it.
        ("551187654321", "KZ", "551187654321"),
        ("+7 701 123 45 67", "US", "77011234567"),
    ],
)
def test_numbers_with_country_code_stay_as_they_are(
    raw: str, region: str | None, expected: str
) -> None:
    assert normalize_phone(raw, region) == expected


def test_without_region_local_formats_follow_the_sdk() -> None:
    # No region, no way to know the country: exactly what the SDK would send.
    assert normalize_phone("8 701 123 45 67") == "87011234567"
    assert Normalize.normalize_field_skip_hashing("ph", "8 701 123 45 67") == "87011234567"


def test_unknown_region_falls_back_to_the_sdk_rule() -> None:
    assert normalize_phone("8 701 123 45 67", "ZZ") == "87011234567"


@pytest.mark.parametrize(
    ("jid", "expected"),
    [
        ("77011234567@s.whatsapp.net", "77011234567"),
        ("77011234567:12@s.whatsapp.net", "77011234567"),
        (" 5511987654321@S.WhatsApp.net ", "5511987654321"),
        ("79161234567@c.us", "79161234567"),
    ],
)
def test_whatsapp_jids_become_digits(jid: str, expected: str) -> None:
    # The region must not re-read a JID: its user part is always international.
    assert normalize_phone(jid, "KZ") == expected
    assert hash_phone(jid) == sha256_hex(expected)


@pytest.mark.parametrize(
    "jid",
    ["66417458159826@lid", "120363012345678901@g.us", "status@broadcast", "123@newsletter"],
)
def test_jids_without_a_phone_are_rejected(jid: str) -> None:
    with pytest.raises(InvalidUserData) as excinfo:
        normalize_phone(jid)
    assert excinfo.value.field == "contact_phone"


def test_non_ascii_digits_become_ascii() -> None:
    assert normalize_phone("+٧ ٧٠١ ١٢٣ ٤٥ ٦٧") == "77011234567"


def test_sdk_drops_up_to_four_leading_zeros() -> None:
    # normalize.py strips `^\+?0{0,2}` twice; the hash must follow that quirk.
    assert normalize_phone("000012062072008") == "12062072008"
    assert Normalize.normalize_field_skip_hashing("ph", "000012062072008") == "12062072008"


@pytest.mark.parametrize(
    ("raw", "region"),
    [
        ("", None),
        ("   ", "KZ"),
        ("123456", None),  # too short
        ("0000012062072008", None),  # a fifth leading zero survives
        ("+1 206 CALL-NOW", "US"),
        ("1-800-FLOWERS", "US"),  # phonenumbers would read letters; we do not
        ("12062072008 ext. 12", "US"),
        ("+12062072008+", None),
        ("not a phone", "RU"),
    ],
)
def test_invalid_phones_raise(raw: str, region: str | None) -> None:
    with pytest.raises(InvalidUserData) as excinfo:
        hash_phone(raw, region)
    assert excinfo.value.field == "contact_phone"
    assert raw.strip() == "" or raw not in str(excinfo.value)  # no personal data in errors


@pytest.mark.parametrize("raw", ["", "   ", "joe", "joe@eg", "@eg.com", "joe@.com", "joe@"])
def test_invalid_emails_raise(raw: str) -> None:
    with pytest.raises(InvalidUserData) as excinfo:
        hash_email(raw)
    assert excinfo.value.field == "email"


def test_uppercase_prehashed_values_are_lowercased_and_kept() -> None:
    digest = sha256_hex("joe@eg.com")
    assert hash_email(" " + digest.upper() + " ") == digest
    assert hash_phone(digest.upper()) == digest
    md5 = hashlib.md5(b"x", usedforsecurity=False).hexdigest()
    assert hash_phone(md5) == md5
    assert is_already_hashed(md5)
    assert not is_already_hashed(md5[:-1])


def test_32_digit_phone_after_plus_is_hashed_like_the_sdk() -> None:
    # 32 digits look like an MD5 once "+" is gone; the SDK decides on the input and hashes.
    raw = "+" + "1" * 32
    assert hash_phone(raw) == Normalize.normalize_field("ph", raw)
    assert hash_phone(raw) != "1" * 32


@pytest.mark.parametrize("raw", ["", "u", "usa", "zz", "12"])
def test_invalid_countries_raise(raw: str) -> None:
    with pytest.raises(InvalidUserData) as excinfo:
        hash_country(raw)
    assert excinfo.value.field == "country"


# --- property tests against the SDK -----------------------------------------------------

_separator = st.sampled_from(["", "", " ", "-", "(", ")", "  ", "\t"])
_digit_group = st.text(alphabet="0123456789", min_size=1, max_size=4)


@st.composite
def _phone_strings(draw: st.DrawFn) -> str:
    """Realistic phone spellings: +, 00, brackets, dashes, spaces, odd leading zeros."""
    prefix = draw(st.sampled_from(["", "", "+", "00", "+00", "0", "000", " +"]))
    country_code = draw(st.text(alphabet="0123456789", min_size=1, max_size=3))
    groups = draw(st.lists(_digit_group, min_size=1, max_size=5))
    parts = [prefix, country_code]
    for group in groups:
        parts.append(draw(_separator))
        parts.append(group)
    suffix = draw(st.sampled_from(["", "", " ", "\n"]))
    return "".join(parts) + suffix


def _sdk_phone_hash(raw: str) -> str | None:
    try:
        result = Normalize.normalize_field("ph", raw)
    except ValueError:
        return None
    assert isinstance(result, str)
    return result


@settings(max_examples=400, deadline=None)
@given(_phone_strings())
def test_phone_hash_equals_sdk_without_region(raw: str) -> None:
    sdk = _sdk_phone_hash(raw)
    if sdk is None:
        with pytest.raises(InvalidUserData):
            hash_phone(raw)
    else:
        assert hash_phone(raw) == sdk


@settings(max_examples=300, deadline=None)
@given(
    _phone_strings().map(lambda s: "+" + s.lstrip(" +")),
    st.sampled_from(["KZ", "RU", "US", "DE", "GB", "BR", "IT"]),
)
def test_explicit_international_phone_hash_equals_sdk_in_any_region(raw: str, region: str) -> None:
    sdk = _sdk_phone_hash(raw)
    if sdk is None:
        with pytest.raises(InvalidUserData):
            hash_phone(raw, region)
    else:
        assert hash_phone(raw, region) == sdk


@settings(max_examples=200, deadline=None)
@given(
    st.from_regex(r"\A(7|1|44|49|55|86)[1-9][0-9]{8,10}\Z"),
    st.sampled_from(["KZ", "RU", "US", "DE", "GB", "BR"]),
)
def test_valid_international_digits_are_never_rewritten(digits: str, region: str) -> None:
    # Digits that are a valid number with their country code keep it whatever the region,
    # unless they start with the region's trunk prefix (then they read as a local number).
    parsed = phonenumbers.parse("+" + digits)
    trunk = phonenumbers.PhoneMetadata.metadata_for_region(region)
    assert trunk is not None
    if not phonenumbers.is_valid_number(parsed) or (
        trunk.national_prefix and digits.startswith(trunk.national_prefix)
    ):
        return
    assert normalize_phone(digits, region) == digits


_email_case = st.sampled_from([str.lower, str.upper, str.title, lambda s: s])
_padding = st.sampled_from(["", " ", "  ", "\t", "\n "])


@settings(max_examples=300, deadline=None)
@given(st.emails(), _email_case, _padding, _padding)
def test_email_hash_equals_sdk(email: str, recase: Any, left: str, right: str) -> None:
    raw = left + recase(email) + right
    assert hash_email(raw) == Normalize.normalize_field("em", raw)


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=40))
def test_arbitrary_text_email_accepted_exactly_when_sdk_accepts(raw: str) -> None:
    try:
        sdk: str | None = Normalize.normalize_field("em", raw)
    except TypeError:
        sdk = None
    if sdk is None:
        with pytest.raises(InvalidUserData):
            hash_email(raw)
    else:
        assert hash_email(raw) == sdk
