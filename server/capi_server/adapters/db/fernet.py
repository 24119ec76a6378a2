"""Tokens at rest encrypted with Fernet keys (CAPI_ENCRYPTION_KEYS).

The first key encrypts; every key decrypts, so a key can be rotated by putting the new
key first and keeping the old one until every row has been rewritten.
"""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from capi_server.adapters.db.secrets import UndecryptableSecret

PREFIX = "fernet:"


class FernetCipher:
    def __init__(self, cipher: MultiFernet) -> None:
        self._cipher = cipher

    @classmethod
    def from_keys(cls, keys: str) -> FernetCipher:
        parsed = [k.strip() for k in keys.split(",") if k.strip()]
        if not parsed:
            raise ValueError("CAPI_ENCRYPTION_KEYS holds no key")
        try:
            return cls(MultiFernet([Fernet(k.encode()) for k in parsed]))
        except ValueError as exc:
            raise ValueError(
                "CAPI_ENCRYPTION_KEYS must be comma-separated Fernet keys "
                "(32 url-safe base64-encoded bytes each)"
            ) from exc

    def encrypt(self, plaintext: str) -> str:
        return PREFIX + self._cipher.encrypt(plaintext.encode()).decode()

    def decrypt(self, stored: str) -> str:
        if not stored.startswith(PREFIX):
            # Written before encryption was switched on: still usable, re-encrypted on update.
            return stored
        try:
            return self._cipher.decrypt(stored[len(PREFIX) :].encode()).decode()
        except InvalidToken:
            raise UndecryptableSecret(
                "a stored token cannot be decrypted with CAPI_ENCRYPTION_KEYS"
            ) from None
