"""Payload encryption: per-workspace keys, crypto-shredding, codec server."""

from __future__ import annotations

import base64
import secrets
from datetime import UTC, datetime

import pytest
from sqlmodel import SQLModel
from temporalio.api.common.v1 import Payload
from temporalio.converter import ActivitySerializationContext, WorkflowSerializationContext

from core.codec import ENCODING, EncryptionCodec, KeyDestroyedError, KeyStore, data_converter, scope_of
from core.crypto import TokenVault
from core.db import make_engine

from conftest import CODEC_TOKEN


@pytest.fixture
def keys(tmp_path) -> KeyStore:
    engine = make_engine(f"sqlite:///{tmp_path / 'k.db'}")
    SQLModel.metadata.create_all(engine)
    return KeyStore(engine, TokenVault([("k1", secrets.token_bytes(32))]))


def ctx(workflow_id: str) -> WorkflowSerializationContext:
    return WorkflowSerializationContext(namespace="default", workflow_id=workflow_id)


def plain(text: str) -> Payload:
    return Payload(metadata={"encoding": b"json/plain"}, data=f'"{text}"'.encode())


async def test_payloads_are_encrypted_per_workspace_and_round_trip(keys):
    codec = EncryptionCodec(keys)
    a = codec.with_context(ctx("ws_a/conv/ch_1/ct_1"))
    b = codec.with_context(ctx("ws_b/run/au_1/ct_2/x"))
    [ea] = await a.encode([plain("my email is ana@example.com")])
    [eb] = await b.encode([plain("hello")])
    assert ea.metadata["encoding"] == ENCODING
    assert b"ana@example.com" not in ea.SerializeToString()
    assert ea.metadata["encryption-key-id"].decode().startswith("ws_a:")
    assert eb.metadata["encryption-key-id"].decode().startswith("ws_b:")
    # Any codec instance can decode: the key id travels with the payload.
    fresh = EncryptionCodec(KeyStore(keys.engine, keys.vault))
    assert (await fresh.decode([ea]))[0].data == b'"my email is ana@example.com"'
    # Unencrypted payloads (histories from before encryption) pass through.
    assert (await fresh.decode([plain("old")]))[0].data == b'"old"'
    assert scope_of("ConnectSomething") == "system"


def activity_ctx(workflow_id: str, activity_id: str) -> ActivitySerializationContext:
    return ActivitySerializationContext(
        namespace="default", workflow_id=workflow_id, workflow_type="Conversation",
        activity_type="send_message", activity_task_queue="q", is_local=True, activity_id=activity_id,
    )


async def test_data_converter_with_context_is_built_once_per_workspace(keys):
    """Every command's context gives the converter of its workspace, built once
    (the SDK asks per command), and encrypting under that workspace's key."""
    base = data_converter(keys)
    a1 = base.with_context(ctx("ws_a/conv/ch_1/ct_1"))
    a2 = base.with_context(activity_ctx("ws_a/conv/ch_1/ct_1", "3"))
    a3 = base.with_context(activity_ctx("ws_a/run/au_1/ct_9/x", "7"))
    b = a1.with_context(ctx("ws_b/conv/ch_2/ct_2"))
    assert a1 is a2 is a3 and a1 is not base and b is not a1
    assert b is base.with_context(activity_ctx("ws_b/run/x/y/z", "1"))
    assert base.with_context(ctx("ConnectChannel/ch_1")) is base  # system scope
    assert a1.with_context(ctx("ConnectChannel/ch_1")) is base
    [ea] = await a3.encode(["ana@example.com"])
    [eb] = await b.encode(["bo@example.com"])
    [es] = await base.encode(["system"])
    assert ea.metadata["encryption-key-id"].decode().startswith("ws_a:")
    assert eb.metadata["encryption-key-id"].decode().startswith("ws_b:")
    assert es.metadata["encryption-key-id"].decode().startswith("system:")
    assert await base.decode([ea, eb, es]) == ["ana@example.com", "bo@example.com", "system"]


async def test_destroyed_workspace_key_makes_old_payloads_undecodable(keys):
    codec = EncryptionCodec(keys).with_context(ctx("ws_gone/conv/x/y"))
    [encrypted] = await codec.encode([plain("secret")])
    [other] = await EncryptionCodec(keys).with_context(ctx("ws_kept/conv/x/y")).encode([plain("kept")])
    assert keys.destroy("ws_gone") == 1
    fresh = EncryptionCodec(KeyStore(keys.engine, keys.vault))
    with pytest.raises(KeyDestroyedError, match="destroyed"):
        await fresh.decode([encrypted])
    assert (await fresh.decode([other]))[0].data == b'"kept"'
    # A new key is created if the scope is used again; the old one stays dead.
    [again] = await codec.encode([plain("new")])
    assert again.metadata["encryption-key-id"] != encrypted.metadata["encryption-key-id"]


async def test_codec_server_decodes_with_its_token_only(stack):
    codec = EncryptionCodec(stack.deps.keys).with_context(ctx("ws_codec/conv/a/b"))
    [encrypted] = await codec.encode([plain("order #991 for Zoe")])
    body = {
        "payloads": [
            {
                "metadata": {k: base64.b64encode(v).decode() for k, v in encrypted.metadata.items()},
                "data": base64.b64encode(encrypted.data).decode(),
            }
        ]
    }
    r = await stack.api.post("/codec/decode", json=body, headers={"Authorization": f"Bearer {CODEC_TOKEN}"})
    assert r.status_code == 200, r.text
    decoded = r.json()["payloads"][0]
    assert base64.b64decode(decoded["data"]) == b'"order #991 for Zoe"'
    assert base64.b64decode(decoded["metadata"]["encoding"]) == b"json/plain"
    assert (await stack.api.post("/codec/decode", json=body)).status_code == 401
    r = await stack.api.post("/codec/decode", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = await stack.api.post(f"/codec/t/{CODEC_TOKEN}/decode", json=body)
    assert r.status_code == 200
    # CORS preflight from the Temporal UI origin is allowed.
    r = await stack.api.options(
        "/codec/decode",
        headers={"Origin": "http://127.0.0.1:8233", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type,x-namespace"},
    )
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://127.0.0.1:8233"


def test_payload_converter_reads_contracts_exactly_as_the_sdk_does():
    """core.codec.PayloadConverter (dataclass field types resolved once per
    class) gives the same values as the SDK's default converter, for nested,
    optional, list and defaulted fields, and refuses what the SDK refuses."""
    from temporalio.converter import DefaultPayloadConverter

    from core.codec import PayloadConverter
    from core.contracts import (
        Attachment,
        AutomationSnapshot,
        ContactSnapshot,
        InboundEvent,
        RecordInboundResult,
        RecordRunInput,
        RunInput,
        SendMessageInput,
        SendMessageResult,
        TrailEntry,
    )

    ours, sdk = PayloadConverter(), DefaultPayloadConverter()
    event = InboundEvent("mid.1", "instagram", "1784", "99", "message", text="hi",
                         attachments=[Attachment("image", "https://cdn/x.jpg")])
    contact = ContactSnapshot("c1", "99", first_name="Ann", fields={"email": "a@b.co"}, tags=["vip"])
    automation = AutomationSnapshot("a1", 3, "menu", {"steps": [{"id": "s", "type": "send_message", "text": "x"}]})
    values = [
        RecordInboundResult(duplicate=False, contact=contact, automations=[automation]),
        RecordInboundResult(duplicate=True),
        RunInput("r1", "w1", "ch1", "instagram", contact, automation, trigger=event, context={"k": [1, 2]}),
        RunInput("r2", "w1", "ch1", "telegram", contact, automation),
        SendMessageInput("ch1", "c1", "99", "key", "text", completes_run=RecordRunInput(
            "r1", "w1", "ch1", "c1", "a1", 3, "completed", [TrailEntry("s", "send_message", "done", "t", "x")])),
        SendMessageResult("m1", profile_looked_up=True, contact=contact, text="Hi Ann"),
        None,
    ]
    # Encoding gives the SDK's bytes, also for dataclasses nested in plain
    # containers and for the values its encoder special-cases.
    mixed = {"when": datetime(2026, 11, 29, 10, 0, tzinfo=UTC), "tags": {"vip"}, "pair": (1, contact),
             "by_id": {"a1": automation}, "events": [event, None]}
    assert ours.to_payloads([mixed]) == sdk.to_payloads([mixed])
    for value in values:
        payload = ours.to_payloads([value])
        assert payload == sdk.to_payloads([value])
        hint = type(value)
        assert ours.from_payloads(payload, [hint]) == sdk.from_payloads(payload, [hint]) == [value]
    # Missing fields take their defaults, unknown ones are ignored.
    sparse = sdk.to_payloads([{"duplicate": False, "contact": {"id": "c1", "external_id": "9"}, "extra": 1}])
    assert ours.from_payloads(sparse, [RecordInboundResult]) == [RecordInboundResult(False, ContactSnapshot("c1", "9"))]
    # A required field missing, or a dataclass given a non-object, fails as with the SDK.
    for bad in ({"contact": {"id": "c1"}, "duplicate": False}, {"duplicate": False, "contact": "nope"}):
        payload = sdk.to_payloads([bad])
        with pytest.raises(Exception):  # noqa: B017 - the SDK's own error types
            sdk.from_payloads(payload, [RecordInboundResult])
        with pytest.raises(Exception):  # noqa: B017
            ours.from_payloads(payload, [RecordInboundResult])
