"""Payload encryption for Temporal: message content, names and every other
workflow/activity payload are AES-256-GCM encrypted before they reach the
server, with one data key per workspace.

- The key is chosen from the serialization context: workflow ids start with
  the workspace id (``ws_.../conv/...``), so every payload of a workspace's
  workflows and activities uses that workspace's key; anything else uses the
  ``system`` scope.
- Data keys are random, stored wrapped by the master keyring (the token
  vault), and cached in memory. Destroying a workspace's keys
  (crypto-shredding) leaves a tombstone, so decoding its old histories fails
  with a clear "key destroyed" error instead of "unknown key".
- Payloads without our encoding pass through decode unchanged, so histories
  written before encryption still replay.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import os
import threading
import typing
from collections.abc import Sequence
from datetime import UTC, datetime

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select
from temporalio.api.common.v1 import Payload
from temporalio.converter import (
    AdvancedJSONEncoder,
    CompositePayloadConverter,
    DataConverter,
    DefaultFailureConverterWithEncodedAttributes,
    DefaultPayloadConverter,
    JSONPlainPayloadConverter,
    JSONTypeConverter,
    PayloadCodec,
    SerializationContext,
    WithSerializationContext,
    value_to_type,
)

from core.crypto import TokenVault, datakey_context
from core.db import DataKey

ENCODING = b"binary/encrypted"
KEY_ID_METADATA = "encryption-key-id"
SYSTEM_SCOPE = "system"


class KeyDestroyedError(Exception):
    """The data key of this payload was destroyed: its workspace was erased."""


class UnknownKeyError(Exception):
    pass


def scope_of(workflow_id: str | None) -> str:
    if workflow_id and workflow_id.startswith("ws_") and "/" in workflow_id:
        return workflow_id.split("/", 1)[0]
    return SYSTEM_SCOPE


class KeyStore:
    """Per-scope data keys, wrapped by the master keyring."""

    def __init__(self, engine: Engine, vault: TokenVault):
        self.engine = engine
        self.vault = vault
        self._by_kid: dict[str, AESGCM] = {}
        self._active: dict[str, str] = {}  # scope -> kid
        self._lock = threading.Lock()

    def encryption_key(self, scope: str) -> tuple[str, AESGCM]:
        kid = self._active.get(scope)
        if kid is not None and kid in self._by_kid:
            return kid, self._by_kid[kid]
        with self._lock, Session(self.engine) as db:
            row = db.exec(
                select(DataKey).where(DataKey.scope == scope, DataKey.wrapped.is_not(None))  # type: ignore[union-attr]
            ).first()
            if row is None:
                row = self._create(db, scope)
            key = base64.b64decode(self.vault.decrypt(row.wrapped or "", datakey_context(row.kid)))
            aead = AESGCM(key)
            self._by_kid[row.kid] = aead
            self._active[scope] = row.kid
            return row.kid, aead

    def _create(self, db: Session, scope: str) -> DataKey:
        kid = f"{scope}:{os.urandom(6).hex()}"
        key = AESGCM.generate_key(bit_length=256)
        row = DataKey(kid=kid, scope=scope, wrapped=self.vault.encrypt(base64.b64encode(key).decode(), datakey_context(kid)))
        db.add(row)
        try:
            db.commit()
        except IntegrityError:
            db.rollback()
            existing = db.exec(
                select(DataKey).where(DataKey.scope == scope, DataKey.wrapped.is_not(None))  # type: ignore[union-attr]
            ).first()
            if existing is None:
                raise
            return existing
        return row

    def decryption_key(self, kid: str) -> AESGCM:
        aead = self._by_kid.get(kid)
        if aead is not None:
            return aead
        with Session(self.engine) as db:
            row = db.get(DataKey, kid)
        if row is None:
            raise UnknownKeyError(f"payload data key {kid!r} is unknown")
        if row.wrapped is None:
            raise KeyDestroyedError(f"payload data key {kid!r} was destroyed: its workspace was erased")
        aead = AESGCM(base64.b64decode(self.vault.decrypt(row.wrapped, datakey_context(kid))))
        self._by_kid[kid] = aead
        return aead

    def destroy(self, scope: str) -> int:
        """Crypto-shred: overwrite every data key of a scope, keep tombstones."""
        with self._lock, Session(self.engine) as db:
            rows = db.exec(select(DataKey).where(DataKey.scope == scope)).all()
            for row in rows:
                row.wrapped = None
                row.destroyed_at = datetime.now(UTC)
                db.add(row)
                self._by_kid.pop(row.kid, None)
            db.commit()
            self._active.pop(scope, None)
            return len(rows)

    def forget_cache(self) -> None:
        with self._lock:
            self._by_kid.clear()
            self._active.clear()


class EncryptionCodec(PayloadCodec, WithSerializationContext):
    def __init__(self, keys: KeyStore, scope: str = SYSTEM_SCOPE):
        self.keys = keys
        self.scope = scope

    def with_context(self, context: SerializationContext) -> EncryptionCodec:
        scope = scope_of(getattr(context, "workflow_id", None))
        return self if scope == self.scope else EncryptionCodec(self.keys, scope)

    async def _encryption_key(self) -> tuple[str, AESGCM]:
        kid = self.keys._active.get(self.scope)
        if kid is not None and kid in self.keys._by_kid:
            return kid, self.keys._by_kid[kid]
        return await asyncio.to_thread(self.keys.encryption_key, self.scope)

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        if not payloads:
            return []
        kid, aead = await self._encryption_key()
        out = []
        for p in payloads:
            nonce = os.urandom(12)
            data = nonce + aead.encrypt(nonce, p.SerializeToString(), kid.encode())
            out.append(Payload(metadata={"encoding": ENCODING, KEY_ID_METADATA: kid.encode()}, data=data))
        return out

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        out = []
        for p in payloads:
            if p.metadata.get("encoding", b"") != ENCODING:
                out.append(p)
                continue
            kid = p.metadata[KEY_ID_METADATA].decode()
            aead = self.keys._by_kid.get(kid) or await asyncio.to_thread(self.keys.decryption_key, kid)
            try:
                plain = aead.decrypt(p.data[:12], p.data[12:], kid.encode())
            except InvalidTag as exc:
                raise ValueError(f"payload failed authentication under key {kid!r}") from exc
            out.append(Payload.FromString(plain))
        return out


@functools.lru_cache(maxsize=1024)
def _dataclass_fields(cls: type) -> tuple[tuple[str, typing.Any, bool], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name], f.init) for f in dataclasses.fields(cls))


class DataclassConverter(JSONTypeConverter):
    """JSON to dataclass as the SDK converts it (fields missing from the JSON
    take their defaults, unknown ones are ignored, ``init=False`` fields are
    restored after construction), with each class's field types resolved
    once. The SDK resolves them per value (``typing.get_type_hints`` on
    string annotations: ~7 % of the worker's CPU in a burst, py-spy)."""

    def __init__(self) -> None:
        self._chain = [self]

    def to_typed_value(self, hint: type, value: typing.Any) -> typing.Any:
        if not (isinstance(hint, type) and dataclasses.is_dataclass(hint) and isinstance(value, dict)):
            return JSONTypeConverter.Unhandled
        init_values, late_values = {}, {}
        for name, field_type, init in _dataclass_fields(hint):
            if name in value:
                try:
                    converted = value_to_type(field_type, value[name], self._chain)
                except Exception as err:
                    raise TypeError(f"Failed converting field {name} on dataclass {hint}") from err
                (init_values if init else late_values)[name] = converted
        obj = hint(**init_values)
        for name, converted in late_values.items():
            object.__setattr__(obj, name, converted)
        return obj


@functools.lru_cache(maxsize=1024)
def _dataclass_names(cls: type) -> tuple[str, ...] | None:
    return tuple(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else None


class DataclassJSONEncoder(AdvancedJSONEncoder):
    """The SDK's JSON encoder with dataclasses turned into dicts one level at
    a time (``json`` comes back here for the nested ones). The SDK calls
    ``dataclasses.asdict``, which deep-copies every nested list and dict
    first (py-spy, a burst: the encoder's ``default`` from 3.6 % of the
    worker's CPU to 0.7 %). Same JSON: the payload converter sorts keys, and
    every value is encoded as before."""

    def default(self, o: typing.Any) -> typing.Any:
        names = _dataclass_names(type(o))
        if names is not None:
            return {name: getattr(o, name) for name in names}
        return super().default(o)


class PayloadConverter(CompositePayloadConverter):
    """The SDK's default payload converters, JSON with ``DataclassConverter``
    and ``DataclassJSONEncoder``."""

    def __init__(self) -> None:
        super().__init__(
            *(
                JSONPlainPayloadConverter(encoder=DataclassJSONEncoder, custom_type_converters=[DataclassConverter()])
                if isinstance(c, JSONPlainPayloadConverter)
                else c
                for c in DefaultPayloadConverter.default_encoding_payload_converters
            )
        )


@dataclasses.dataclass(frozen=True)
class ScopedDataConverter(DataConverter):
    """A ``DataConverter`` whose ``with_context`` answers per workspace.

    The codec is the only component that reads the serialization context,
    and it reads only the workspace (``scope_of``). The SDK asks for a
    converter with context for every command and activation of a workflow
    (each activity's context differs), and the stock ``with_context`` then
    clones the converter, building a new payload converter each time: 8 %
    of the worker's CPU in a burst. Here the converter of a scope is built
    once and shared by every context of that scope.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "_by_scope", {})

    def with_context(self, context: SerializationContext) -> ScopedDataConverter:
        scope = scope_of(getattr(context, "workflow_id", None))
        by_scope: dict[str, ScopedDataConverter] = self._by_scope  # type: ignore[attr-defined]
        converter = by_scope.get(scope)
        if converter is None:
            converter = super().with_context(context)
            if converter is not self:
                object.__setattr__(converter, "_by_scope", by_scope)
            by_scope[scope] = converter
        return converter


def data_converter(keys: KeyStore) -> DataConverter:
    """The data converter every client and worker uses: encrypted payloads,
    and failure messages/stack traces moved into the encrypted attributes."""
    return ScopedDataConverter(
        payload_converter_class=PayloadConverter,
        payload_codec=EncryptionCodec(keys),
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )
