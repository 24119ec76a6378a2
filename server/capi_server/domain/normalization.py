"""Normalise and SHA-256 hash user data the way Meta's business SDK does.

Meta matches `user_data.ph` / `user_data.em` against its own users only when both sides
normalised the value identically before hashing. The reference is the official Python SDK,
`facebook_business/adobjects/serverside/normalize.py` (`Normalize.normalize`); the rules below
repeat it step by step, and tests compare our hashes with the SDK's. The SDK itself is not
imported here: it is a test oracle, not a runtime dependency.

SDK rules reproduced:
- every field: `lower()` then `strip()`; a result that matches `^[a-f0-9]{32}$` or
  `^[a-f0-9]{64}$` is taken as already hashed and sent unchanged;
- email: must match `.+@.+\\..+` (the SDK's deliberately loose check);
- phone: drop `[\\s\\-()]`, drop `^\\+?0{0,2}` (the SDK does it twice, so up to four leading
  zeros go), reject a leading 0, then require `^\\d{1,4}\\(?\\d{2,3}\\)?\\d{4,}$` (in effect:
  only digits, at least seven of them, country code first).

Our additions, all applied *before* the SDK phone rule and only where the SDK would send a
number that cannot match anyone (a local number without country code) or would reject it:
- WhatsApp JIDs (`77011234567@s.whatsapp.net`, `...:12@s.whatsapp.net`, `...@c.us`) become
  their digits: the JID user part is always the international number. `@lid`, `@g.us` and
  other servers carry no phone number and are rejected.
- Local formats with a trunk prefix ("8 701 123 45 67" in KZ, "8 (916) 123-45-67" in RU,
  "030 123456" in DE) are turned into international digits with `phonenumbers` and the
  direction's default region. See `normalize_phone` for when phonenumbers is trusted.
- Dots are removed like the other separators ("206.207.2008"), and non-ASCII decimal digits
  (Arabic-Indic and the like) become ASCII digits. The SDK rejects the first and would hash
  the second as-is, which never matches.

Error messages never contain the rejected value: they end up in logs and gRPC errors, and
the value is personal data.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

import phonenumbers

__all__ = [
    "InvalidUserData",
    "hash_country",
    "hash_email",
    "hash_phone",
    "is_already_hashed",
    "normalize_country",
    "normalize_email",
    "normalize_phone",
    "sha256_hex",
]

_MD5_HEX = re.compile(r"^[a-f0-9]{32}$")
_SHA256_HEX = re.compile(r"^[a-f0-9]{64}$")
_EMAIL = re.compile(r".+@.+\..+")
# The SDK strips `[\s\-()]`; we also strip dots, which the SDK rejects (a harmless superset:
# every input the SDK accepts contains no dot, so its result is unchanged).
_PHONE_SEPARATORS = re.compile(r"[\s\-().]")
_PHONE_LEADING_PLUS_AND_ZEROS = re.compile(r"^\+?0{0,2}")
_INTERNATIONAL_PHONE = re.compile(r"^\d{1,4}\(?\d{2,3}\)?\d{4,}$")
_ASCII_DIGITS = re.compile(r"^[0-9]+$")
# JID user part: digits, then an optional device suffix (":12"), then the phone servers.
# "c.us" is the whatsapp-web.js spelling of "s.whatsapp.net".
_PHONE_JID = re.compile(r"^(?P<user>[0-9]+)(?::[0-9]+)?@(?:s\.whatsapp\.net|c\.us)$")
_COUNTRY_EXCLUDED_CHARS = re.compile(r"[^a-z]")


class InvalidUserData(ValueError):
    """A user_data value that cannot be normalised; `field` says which input was wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def sha256_hex(value: str) -> str:
    """SHA-256 of the UTF-8 bytes as lower-case hex (the SDK's `hash_sha_256`)."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def is_already_hashed(value: str) -> bool:
    """True for 32 or 64 lower-case hex chars: the SDK sends such values unchanged."""
    return _MD5_HEX.match(value) is not None or _SHA256_HEX.match(value) is not None


def normalize_email(raw: str) -> str:
    """Trimmed, lower-cased email, or a pre-hashed value unchanged.

    Raises InvalidUserData(field="email") when it does not look like `x@y.z`.
    """
    cleaned = raw.lower().strip()
    if is_already_hashed(cleaned):
        return cleaned
    if _EMAIL.match(cleaned) is None:
        raise InvalidUserData("email", "email is not in the form name@domain.tld")
    return cleaned


def hash_email(raw: str) -> str:
    """SHA-256 of the normalised email; a pre-hashed value is returned unchanged."""
    normalized = normalize_email(raw)
    if is_already_hashed(normalized):
        return normalized
    return sha256_hex(normalized)


def normalize_phone(raw: str, default_region: str | None = None) -> str:
    """International digits without `+` (e.g. "77011234567"), or a pre-hashed value unchanged.

    `default_region` (ISO 3166-1 alpha-2, e.g. "KZ") is where local numbers are assumed to be.

    Decision on when `phonenumbers` is used (it is never used without a region):
    - `+...` / `00...` and WhatsApp JIDs are explicitly international: only the SDK rule runs,
      so such inputs hash exactly like the SDK whatever the region.
    - Otherwise the digits are read both ways: as the SDK does (already international, e.g.
      "79161234567" or "12062072008") and by phonenumbers in the default region.
      phonenumbers' answer wins only when it is a valid number and either the SDK reading is
      not a valid number ("9161234567" in RU, "2062072008" in US) or the input starts with
      the region's trunk prefix ("8 ..." in RU/KZ, "0 ..." in DE/GB). The trunk prefix check
      matters: "8 499 123 45 67" (a Moscow number) is also a valid Vietnamese number +84...
    - When phonenumbers finds no valid number, the SDK rule decides (metadata can lag behind
      new number ranges; an SDK-shaped number is still worth sending).

    Raises InvalidUserData(field="contact_phone") when no rule yields a number.
    """
    cleaned = raw.lower().strip()
    if is_already_hashed(cleaned):
        return cleaned
    if "@" in cleaned:
        return _normalize_phone_jid(cleaned)

    cleaned = _to_ascii_digits(cleaned)
    without_separators = _PHONE_SEPARATORS.sub("", cleaned)
    sdk_digits = _sdk_international_number(without_separators)
    explicitly_international = without_separators.startswith(("+", "00"))
    if explicitly_international or not default_region:
        return _require_phone(sdk_digits)

    region_digits = _region_international_number(without_separators, default_region.upper())
    if region_digits is None or region_digits == sdk_digits:
        return _require_phone(sdk_digits)
    if (
        sdk_digits is not None
        and _is_valid_international(sdk_digits)
        and not _starts_with_trunk_prefix(without_separators, default_region.upper())
    ):
        return sdk_digits
    return region_digits


def hash_phone(raw: str, default_region: str | None = None) -> str:
    """SHA-256 of the normalised phone; a pre-hashed value is returned unchanged."""
    # Decide "pre-hashed" on the input, as the SDK does, not on the normalised digits: a
    # 32-digit phone after removing "+" would otherwise look like an MD5 and go out unhashed.
    if is_already_hashed(raw.lower().strip()):
        return raw.lower().strip()
    return sha256_hex(normalize_phone(raw, default_region))


def normalize_country(raw: str) -> str:
    """Lower-case ISO 3166-1 alpha-2 code ("us"), or a pre-hashed value unchanged.

    Like the SDK, every non-letter is dropped first (" US " -> "us"). The SDK checks the
    code against pycountry; we check it against the regions phonenumbers knows, which are the
    same codes except for a few uninhabited territories (AQ, BV, GS, HM, PN, TF, UM) - no
    customer of ours dials from there.
    """
    cleaned = raw.lower().strip()
    if is_already_hashed(cleaned):
        return cleaned
    code = _COUNTRY_EXCLUDED_CHARS.sub("", cleaned)
    if len(code) != 2 or code.upper() not in phonenumbers.SUPPORTED_REGIONS:
        raise InvalidUserData("country", "country is not an ISO 3166-1 alpha-2 code")
    return code


def hash_country(raw: str) -> str:
    """SHA-256 of the normalised country code; a pre-hashed value is returned unchanged."""
    normalized = normalize_country(raw)
    if is_already_hashed(normalized):
        return normalized
    return sha256_hex(normalized)


def _normalize_phone_jid(jid: str) -> str:
    match = _PHONE_JID.match(jid)
    if match is None:
        # @lid (privacy id), @g.us (group), @broadcast, @newsletter: no phone number in them.
        raise InvalidUserData("contact_phone", "WhatsApp JID does not carry a phone number")
    return _require_phone(_sdk_international_number(match.group("user")))


def _sdk_international_number(phone: str) -> str | None:
    """The SDK's phone rule on a string whose separators are already removed."""
    # normalize() strips the prefix once and get_international_number() strips it again,
    # so "0000 1 206..." loses four zeros in the SDK; repeat that to hash identically.
    phone = _PHONE_LEADING_PLUS_AND_ZEROS.sub("", phone, count=1)
    phone = _PHONE_LEADING_PLUS_AND_ZEROS.sub("", phone, count=1)
    if phone.startswith("0"):
        return None
    match = _INTERNATIONAL_PHONE.match(phone)
    return None if match is None else match.group()


def _require_phone(digits: str | None) -> str:
    if digits is None:
        raise InvalidUserData(
            "contact_phone", "phone number is not an international number with country code"
        )
    return digits


def _to_ascii_digits(value: str) -> str:
    if value.isascii():
        return value
    return "".join(_ascii_digit(char) for char in value)


def _ascii_digit(char: str) -> str:
    decimal = unicodedata.decimal(char, None)
    return char if decimal is None else str(decimal)


def _region_international_number(phone: str, region: str) -> str | None:
    """International digits per phonenumbers in `region`, only for a valid number."""
    # Only digits reach phonenumbers: it would also accept letters ("1-800-FLOWERS") and
    # extensions, which the SDK rejects and which have no place in a hashed identifier.
    if _ASCII_DIGITS.match(phone) is None:
        return None
    try:
        parsed = phonenumbers.parse(phone, region)
    except phonenumbers.NumberParseException:
        return None  # includes an unknown region code
    if not phonenumbers.is_valid_number(parsed):
        return None
    # E.164 keeps the Italian leading zero that `national_number` drops ("+39 06 ...").
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164).lstrip("+")


def _is_valid_international(digits: str) -> bool:
    try:
        return phonenumbers.is_valid_number(phonenumbers.parse("+" + digits, None))
    except phonenumbers.NumberParseException:
        return False


def _starts_with_trunk_prefix(phone: str, region: str) -> bool:
    metadata = phonenumbers.PhoneMetadata.metadata_for_region(region)
    if metadata is None or not metadata.national_prefix:
        return False
    return phone.startswith(metadata.national_prefix)
