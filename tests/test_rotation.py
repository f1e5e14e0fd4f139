"""Master-key rotation: every ciphertext moves to the new key, the old key can
then be retired, and payloads stored before the rotation still decode."""

from __future__ import annotations

import asyncio
import base64
import secrets

import pytest
from sqlmodel import Session, SQLModel, select
from temporalio.api.common.v1 import Payload
from temporalio.client import Client
from temporalio.converter import WorkflowSerializationContext
from typer.testing import CliRunner

from core.codec import EncryptionCodec, KeyStore, data_converter
from core.crypto import TokenVault, VaultError, token_context, webhook_secret_context
from core.db import AuditEntry, Channel, DataKey, Workspace, make_engine, migrate
from core.rotation import count_stale, rotate_keys
from workers.cli import app as cli

from helpers import (
    connect_instagram,
    create_automation,
    create_tenant,
    new_sender,
    send_dm,
    text_of,
    wait_for_messages,
)


def ctx(workflow_id: str) -> WorkflowSerializationContext:
    return WorkflowSerializationContext(namespace="default", workflow_id=workflow_id)


def all_ciphertexts(engine) -> list[str]:
    with Session(engine) as db:
        out = []
        for ch in db.exec(select(Channel)).all():
            out += [c for c in (ch.token_ciphertext, ch.webhook_secret_ciphertext) if c]
        out += [k.wrapped for k in db.exec(select(DataKey)).all() if k.wrapped]
        return out


@pytest.fixture
def engine(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'rot.db'}")
    SQLModel.metadata.create_all(engine)
    with Session(engine) as db:
        db.add(Workspace(id="ws_x", name="x", api_key_hash="h"))
        db.commit()
    return engine


def add_channel(engine, vault: TokenVault, channel_id: str, token: str | None, secret: str | None = None) -> None:
    with Session(engine) as db:
        db.add(Channel(
            id=channel_id, workspace_id="ws_x", platform="telegram" if secret else "instagram", status="active",
            token_ciphertext=vault.encrypt(token, token_context(channel_id)) if token else None,
            webhook_secret_ciphertext=vault.encrypt(secret, webhook_secret_context(channel_id)) if secret else None,
        ))
        db.commit()


async def test_rotation_rewraps_everything_and_old_key_can_be_retired(engine):
    k_old, k_new = secrets.token_bytes(32), secrets.token_bytes(32)
    vault_old = TokenVault([("old", k_old)])
    tokens = {f"ch_{i}": f"IGAA{secrets.token_hex(8)}" for i in range(5)}
    for channel_id, token in tokens.items():
        add_channel(engine, vault_old, channel_id, token)
    add_channel(engine, vault_old, "ch_tg", "123:AAtoken", "hook-secret")
    add_channel(engine, vault_old, "ch_empty", None)
    tokens["ch_tg"] = "123:AAtoken"

    keys_old = KeyStore(engine, vault_old)
    keys_old.encryption_key("ws_x")
    keys_old.encryption_key("ws_gone")
    keys_old.destroy("ws_gone")  # a tombstone: nothing to rewrap
    payload = Payload(metadata={"encoding": b"json/plain"}, data=b'"ana@example.com"')
    [encrypted] = await EncryptionCodec(keys_old).with_context(ctx("ws_x/conv/ch_0/ct_1")).encode([payload])
    assert count_stale(engine, "new").total == 8

    vault_new = TokenVault([("new", k_new), ("old", k_old)])
    batches: list[tuple[str, int]] = []
    report = rotate_keys(engine, vault_new, batch_size=2, progress=lambda t, n, r: batches.append((t, n)))
    assert (report.tokens_rewrapped, report.secrets_rewrapped, report.data_keys_rewrapped) == (6, 1, 1)
    assert report.already_current == 0 and report.failures == []
    assert batches == [("channel", 2), ("channel", 4), ("channel", 6), ("datakey", 1)]
    assert all(c.startswith("v1.new.") for c in all_ciphertexts(engine))

    # Only the new key from here on: every secret decrypts under its context...
    only_new = TokenVault([("new", k_new)])
    with Session(engine) as db:
        for channel_id, token in tokens.items():
            row = db.get(Channel, channel_id)
            assert only_new.decrypt(row.token_ciphertext, token_context(channel_id)) == token
        tg = db.get(Channel, "ch_tg")
        assert only_new.decrypt(tg.webhook_secret_ciphertext, webhook_secret_context("ch_tg")) == "hook-secret"
        with pytest.raises(VaultError):
            vault_old.decrypt(db.get(Channel, "ch_0").token_ciphertext, token_context("ch_0"))
        audit = db.exec(select(AuditEntry).where(AuditEntry.action == "keys.rotate")).one()
        assert (audit.workspace_id, audit.actor, audit.target) == ("", "operator", "new")
        assert "tokens_rewrapped=6" in audit.detail
        assert not any(t in audit.detail for t in tokens.values())
    # ...and the payload encrypted before the rotation still decodes: only the
    # data key's wrapping changed, never the payload.
    [decoded] = await EncryptionCodec(KeyStore(engine, only_new)).decode([encrypted])
    assert decoded.data == b'"ana@example.com"'

    again = rotate_keys(engine, vault_new)
    assert again.rewrapped == 0 and again.already_current == 8 and again.failures == []
    assert count_stale(engine, "new").total == 0


def test_undecryptable_row_is_reported_by_id_and_does_not_stop_the_run(engine):
    k_old, k_new = secrets.token_bytes(32), secrets.token_bytes(32)
    add_channel(engine, TokenVault([("lost", secrets.token_bytes(32))]), "ch_a", "secret-token-a")
    add_channel(engine, TokenVault([("old", k_old)]), "ch_b", "secret-token-b")
    report = rotate_keys(engine, TokenVault([("new", k_new), ("old", k_old)]))
    assert report.tokens_rewrapped == 1
    assert len(report.failures) == 1
    assert report.failures[0].startswith("channel ch_a token (key 'lost')")
    assert "secret-token" not in report.failures[0]
    stale = count_stale(engine, "new")
    assert (stale.total, dict(stale.key_ids)) == (1, {"lost": 1})


def test_cli_rotates_and_check_gates_retiring_the_old_key(tmp_path):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    migrate(url)  # the CLI refuses an unmigrated database, like the API and worker
    engine = make_engine(url)
    with Session(engine) as db:
        db.add(Workspace(id="ws_x", name="x", api_key_hash="h"))
        db.commit()
    k_old, k_new = secrets.token_bytes(32), secrets.token_bytes(32)
    add_channel(engine, TokenVault([("old", k_old)]), "ch_1", "tok", "sec")
    KeyStore(engine, TokenVault([("old", k_old)])).encryption_key("ws_x")

    def b64(key: bytes) -> str:
        return base64.urlsafe_b64encode(key).decode()

    def rotate(*args: str, keys: str) -> tuple[int, str]:
        result = CliRunner().invoke(cli, ["keys", "rotate", *args], env={
            "VECTORY_DATABASE_URL": url, "VECTORY_MASTER_KEY": keys, "COLUMNS": "200",
        })
        return result.exit_code, result.output

    both = f"new:{b64(k_new)},old:{b64(k_old)}"
    code, out = rotate("--check", keys=both)
    assert code == 1 and "3 ciphertext(s)" in out
    code, out = rotate(keys=both)
    assert code == 0 and "tokens_rewrapped=1 secrets_rewrapped=1 data_keys_rewrapped=1" in out
    assert "tok" not in out.replace("tokens_", "")
    assert rotate("--check", keys=both)[0] == 0
    assert rotate("--check", keys=f"new:{b64(k_new)}")[0] == 0  # old key retired


async def test_after_rotation_with_old_key_retired_every_channel_still_sends(stack):
    tenant = await create_tenant(stack, "Rotation Co")
    channel, account_id, _ = await connect_instagram(stack, tenant)
    engine = stack.deps.engine
    old_ring = stack.settings.keyring()  # [(kid, key)] the whole stack runs with
    old_kid = old_ring[0][0]
    new_key = secrets.token_bytes(32)
    original = (stack.deps.vault, stack.deps.keys, stack.client)

    # The API process keeps the old vault and the original client (whose codec
    # holds the original KeyStore) for the whole test: it is not "restarted".
    # It still encodes this workspace's payloads as long as the data keys are
    # in its in-memory cache, so warm it before the rows are rewrapped. For the
    # same reason no channel is connected (the API encrypts tokens) and no
    # Telegram webhook is posted (the API decrypts webhook secrets) while the
    # rows are under the new key only.
    await asyncio.to_thread(original[1].encryption_key, tenant.workspace_id)
    await asyncio.to_thread(original[1].encryption_key, "system")

    report = await asyncio.to_thread(rotate_keys, engine, TokenVault([("rot2", new_key), *old_ring]))
    assert report.failures == []
    assert report.tokens_rewrapped >= 1 and report.data_keys_rewrapped >= 1
    assert count_stale(engine, "rot2").total == 0
    with Session(engine) as db:
        row = db.get(Channel, channel["id"])
        assert row.token_ciphertext.startswith("v1.rot2.")
        with pytest.raises(VaultError):
            TokenVault(old_ring).decrypt(row.token_ciphertext, token_context(channel["id"]))

    try:
        # "Restart the workers with the old key retired": a vault with only
        # the new key, a KeyStore on it and a client whose codec uses it.
        await stack.stop_worker()
        stack.deps.vault = TokenVault([("rot2", new_key)])
        stack.deps.keys = KeyStore(engine, stack.deps.vault)
        stack.client = await Client.connect(
            stack.settings.temporal_address,
            namespace=stack.settings.temporal_namespace,
            data_converter=data_converter(stack.deps.keys),
        )
        await stack.start_worker()

        await create_automation(
            stack, tenant, channel["id"], {"type": "dm_keyword", "keywords": ["rotate"]},
            [{"id": "r", "type": "send_message", "text": "Still here after the key rotation"}],
        )
        person = new_sender()
        await send_dm(stack, account_id, person, "did you rotate?")
        calls = await wait_for_messages(stack, person, 1, timeout=30)
        assert len(calls) == 1
        assert text_of(calls[0]) == "Still here after the key rotation"
    finally:
        # Put the stack back for later tests: rotate every row (including any
        # written by the rotated worker) back to the original key, then restart
        # the original worker with its original vault, KeyStore and client.
        await stack.stop_worker()
        back = await asyncio.to_thread(rotate_keys, engine, TokenVault([*old_ring, ("rot2", new_key)]))
        stack.deps.vault, stack.deps.keys, stack.client = original
        await stack.start_worker()
    assert back.failures == []
    assert count_stale(engine, old_kid).total == 0
