"""Token vault: AES-256-GCM encryption of third-party secrets at rest.

Ciphertext format: ``v1.<key id>.<base64url(nonce || ciphertext+tag)>``.
The key id travels with the ciphertext so keys can rotate: the first key of
the keyring encrypts, every key of the keyring decrypts. The associated data
binds a ciphertext to its row and purpose (a token copied onto another
channel does not decrypt).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM


class VaultError(Exception):
    pass


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# Encryption contexts: each ciphertext is bound to the row and column it
# belongs to, so a ciphertext copied elsewhere does not decrypt.


def token_context(channel_id: str) -> str:
    return f"channel:{channel_id}:token"


def webhook_secret_context(channel_id: str) -> str:
    return f"channel:{channel_id}:webhook_secret"


def datakey_context(kid: str) -> str:
    return f"datakey:{kid}"


class TokenVault:
    def __init__(self, keyring: list[tuple[str, bytes]]):
        if not keyring:
            raise VaultError("the vault needs at least one key")
        self._primary_kid = keyring[0][0]
        self._keys = {kid: AESGCM(key) for kid, key in keyring}

    @property
    def primary_key_id(self) -> str:
        return self._primary_kid

    def encrypt(self, plaintext: str, context: str) -> str:
        nonce = os.urandom(12)
        ct = self._keys[self._primary_kid].encrypt(nonce, plaintext.encode(), context.encode())
        return f"v1.{self._primary_kid}.{_b64e(nonce + ct)}"

    def decrypt(self, ciphertext: str, context: str) -> str:
        try:
            version, kid, body = ciphertext.split(".", 2)
        except ValueError as exc:
            raise VaultError("malformed vault ciphertext") from exc
        if version != "v1":
            raise VaultError(f"unknown vault format {version!r}")
        aead = self._keys.get(kid)
        if aead is None:
            raise VaultError(f"vault key {kid!r} is not in the keyring")
        raw = _b64d(body)
        try:
            return aead.decrypt(raw[:12], raw[12:], context.encode()).decode()
        except InvalidTag as exc:
            raise VaultError("vault ciphertext failed authentication") from exc


def hash_api_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def constant_time_equals(a: str | bytes, b: str | bytes) -> bool:
    a_b = a.encode() if isinstance(a, str) else a
    b_b = b.encode() if isinstance(b, str) else b
    return hmac.compare_digest(a_b, b_b)


def meta_signature(app_secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()
