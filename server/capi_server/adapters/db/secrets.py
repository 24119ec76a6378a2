"""Encryption of tokens at rest (ad account, user account and CRM tokens)."""

from __future__ import annotations

from typing import Protocol


class UndecryptableSecret(ValueError):
    """A stored secret that none of the configured keys opens (a key was removed)."""


class TokenCipher(Protocol):
    def encrypt(self, plaintext: str) -> str: ...

    def decrypt(self, stored: str) -> str: ...


class PlaintextCipher:
    """No encryption: only for local development (CAPI_INSECURE_DEV=true)."""

    def encrypt(self, plaintext: str) -> str:
        return plaintext

    def decrypt(self, stored: str) -> str:
        return stored
