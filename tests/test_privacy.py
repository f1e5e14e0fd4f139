"""Privacy promises, proven end to end: erasure really deletes, workspace
erasure crypto-shreds histories, restriction stops processing, retention
deletes old messages, the audit log records without content."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import inspect, text
from sqlmodel import Session, select
from temporalio.api.common.v1 import Payload
from temporalio.service import RPCError, RPCStatusCode

from activities.privacy import PrivacyActivities
from core.codec import EncryptionCodec, KeyDestroyedError, KeyStore
from core.contracts import (
    RETENTION_SWEEP_WORKFLOW,
    EraseStepInput,
    RetentionResult,
    RetentionSweepInput,
    contact_id_for,
    conversation_workflow_id,
)
from core.db import Channel, Contact, DeadLetter, Message, RateBucket, SendRecord, Workspace

from conftest import ADMIN_TOKEN, CODEC_TOKEN
from helpers import (
    connect_instagram,
    create_automation,
    create_tenant,
    new_sender,
    sandbox_messages,
    send_dm,
    wait_for,
    wait_for_messages,
)


def rows_mentioning(engine, needles: list[str]) -> list[str]:
    """Every table row (serialised) that contains any of the needles."""
    found = []
    with engine.connect() as conn:
        for table in inspect(engine).get_table_names():
            for row in conn.execute(text(f'select * from "{table}"')):
                dumped = json.dumps([str(v) for v in row])
                if any(n in dumped for n in needles):
                    found.append(f"{table}: {dumped[:200]}")
    return found


async def run_flow(stack, tenant, account_id, channel_id, person, keyword="price"):
    await create_automation(
        stack, tenant, channel_id, {"type": "dm_keyword", "keywords": [keyword]},
        [{"id": "a", "type": "send_message", "text": "Reply with your email"},
         {"id": "w", "type": "wait_for_reply", "validate": "email", "save_to_field": "email"}],
    )
    await send_dm(stack, account_id, person, f"{keyword} for the unicorn lamp")
    await wait_for_messages(stack, person, 1)


def _dead_letter(workspace_id: str, channel_id: str, contact_id: str, person: str, text: str, **kw) -> DeadLetter:
    return DeadLetter(workspace_id=workspace_id, channel_id=channel_id, contact_id=contact_id,
                      event_id=f"m-{person}-{text}", event={"sender_id": person, "text": text},
                      reason="INVALID_ARGUMENT: Blob data size exceeds limit.", **kw)


async def wait_job(stack, tenant, job_id, timeout=30):
    async def done():
        r = await stack.api.get(f"/v1/erasures/{job_id}", headers=tenant.headers)
        return r.status_code == 200 and r.json()["status"] == "completed" and r.json()
    return await wait_for(done, timeout=timeout)


async def test_erasing_a_contact_deletes_every_row_about_them(stack):
    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    person = new_sender()
    await stack.sandbox.post("/_sandbox/profiles", json={"user_id": person, "name": "Quincy Unicornfield"})
    await run_flow(stack, tenant, account_id, channel["id"], person)
    contact = (await stack.api.get("/v1/contacts", headers=tenant.headers)).json()["data"][0]
    r = await stack.api.post("/v1/broadcasts", headers=tenant.headers,
                             json={"channel_id": channel["id"], "text": "Lamps are back"})
    assert r.status_code == 202, r.text
    await wait_for_messages(stack, person, 2)
    with Session(stack.deps.engine) as db:  # an event of theirs Temporal refused (api/inbox.py)
        db.add(_dead_letter(tenant.workspace_id, channel["id"], contact["id"], person, "the unicorn lamp again"))
        db.commit()
    assert rows_mentioning(stack.deps.engine, [person, "unicorn lamp", "Quincy"])

    other = await create_tenant(stack, "Other")
    assert (await stack.api.delete(f"/v1/contacts/{contact['id']}", headers=other.headers)).status_code == 404

    executions = [(wf.id, wf.run_id) async for wf in stack.client.list_workflows(f"ContactId = '{contact['id']}'")]
    assert len(executions) >= 2  # the conversation and the run
    r = await stack.api.delete(f"/v1/contacts/{contact['id']}", headers=tenant.headers)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["scope"] == "contact" and job["status_url"].endswith(f"/privacy/deletions/{job['id']}")
    done = await wait_job(stack, tenant, job["id"])
    assert done, "erasure did not complete"
    assert "contacts=1" in done["detail"]

    assert rows_mentioning(stack.deps.engine, [person, "unicorn lamp", "Quincy"]) == []
    # Only the erasure job itself (our pseudonymous id, for idempotency) remains
    # (the broadcast's send record, whose key ends with the contact id, too is gone).
    assert [r.split(":")[0] for r in rows_mentioning(stack.deps.engine, [contact["id"]])] == ["erasurejob"]
    assert (await stack.api.get(f"/v1/contacts/{contact['id']}", headers=tenant.headers)).status_code == 404
    again = await stack.api.delete(f"/v1/contacts/{contact['id']}", headers=tenant.headers)
    assert again.status_code == 202 and again.json()["id"] == job["id"]
    # The waiting run was stopped: a reply no longer reaches it.
    await send_dm(stack, account_id, person, "q@example.com")
    await asyncio.sleep(1.0)
    assert len(await sandbox_messages(stack, person)) == 2  # the flow's question, the broadcast
    # The person wrote again (their contact is back): erasing them again is a
    # new job that deletes what they wrote since, not the old job's answer.
    async def back():
        return (await stack.api.get(f"/v1/contacts/{contact['id']}", headers=tenant.headers)).status_code == 200

    assert await wait_for(back, timeout=15)
    r = await stack.api.delete(f"/v1/contacts/{contact['id']}", headers=tenant.headers)
    assert r.status_code == 202 and r.json()["id"] != job["id"]
    assert await wait_job(stack, tenant, r.json()["id"])
    assert rows_mentioning(stack.deps.engine, [person, "q@example.com"]) == []
    # The first erasure's workflow histories (the conversation, the run) are
    # deleted from Temporal too, closed ones included: the workspace's key
    # would still decode them. (The dev server deletes ~30 s after asked.)
    assert "histories deleted" in done["detail"]

    async def histories_gone():
        for workflow_id, run_id in executions:
            try:
                await stack.client.get_workflow_handle(workflow_id, run_id=run_id).describe()
                return False
            except RPCError as err:
                if err.status != RPCStatusCode.NOT_FOUND:
                    raise
        return True

    assert await wait_for(histories_gone, timeout=90, interval=1.0)


async def test_erasing_a_workspace_revokes_deletes_and_crypto_shreds_histories(stack):
    tenant = await create_tenant(stack)
    channel, account_id, token = await connect_instagram(stack, tenant)
    person = new_sender()
    await run_flow(stack, tenant, account_id, channel["id"], person)
    conversations = [
        wf async for wf in stack.client.list_workflows(f"WorkspaceId = '{tenant.workspace_id}'")
    ]
    assert conversations
    history = await stack.client.get_workflow_handle(conversations[0].id).fetch_history()
    encrypted = [
        p for e in history.events if e.HasField("workflow_execution_started_event_attributes")
        for p in e.workflow_execution_started_event_attributes.input.payloads
    ]
    assert encrypted and encrypted[0].metadata["encoding"] == b"binary/encrypted"
    with Session(stack.deps.engine) as db:  # refused before it was recorded: no contact row
        db.add(_dead_letter(tenant.workspace_id, channel["id"], "ct_never_recorded", person, "unicorn lamp?"))
        db.commit()

    codec_body = {"payloads": [{"metadata": {k: base64.b64encode(v).decode() for k, v in p.metadata.items()},
                                "data": base64.b64encode(p.data).decode()} for p in encrypted]}
    codec_auth = {"Authorization": f"Bearer {CODEC_TOKEN}"}
    assert (await stack.api.post("/codec/decode", json=codec_body, headers=codec_auth)).status_code == 200

    r = await stack.api.delete("/v1/workspace", headers=tenant.headers)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]

    async def completed():
        with Session(stack.deps.engine) as db:
            row = db.exec(text("select status from erasurejob where id = :i"), params={"i": job_id}).one()
        return row[0] == "completed"

    assert await wait_for(completed, timeout=40)
    assert (await stack.api.get("/v1/workspace", headers=tenant.headers)).status_code == 401
    with Session(stack.deps.engine) as db:
        assert db.get(Workspace, tenant.workspace_id) is None
    leftovers = [
        r for r in rows_mentioning(stack.deps.engine, [tenant.workspace_id, person, account_id])
        if not r.startswith(("auditentry", "erasurejob", "datakey"))
    ]
    assert leftovers == []
    assert rows_mentioning(stack.deps.engine, [person, "unicorn lamp"]) == []
    revokes = (await stack.sandbox.get("/_sandbox/calls", params={"path_contains": "/permissions"})).json()["calls"]
    assert any(c["method"] == "DELETE" for c in revokes)
    # Its histories can no longer be decrypted by anyone, the API's codec
    # endpoint included (its process had the key cached from the signals).
    fresh = EncryptionCodec(KeyStore(stack.deps.engine, stack.deps.vault))
    with pytest.raises(KeyDestroyedError, match="destroyed"):
        await fresh.decode(encrypted)
    assert (await stack.api.post("/codec/decode", json=codec_body, headers=codec_auth)).status_code == 410
    running = [
        wf async for wf in stack.client.list_workflows(
            f"WorkspaceId = '{tenant.workspace_id}' AND ExecutionStatus = 'Running'"
        ) if not wf.id.startswith("erase/")
    ]
    assert running == []


async def test_restricted_contact_triggers_nothing_and_running_runs_stop(stack):
    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    person = new_sender()
    await run_flow(stack, tenant, account_id, channel["id"], person, keyword="restrict")
    contact = (await stack.api.get("/v1/contacts", headers=tenant.headers)).json()["data"][0]
    r = await stack.api.patch(
        f"/v1/contacts/{contact['id']}", json={"processing_restricted": True}, headers=tenant.headers
    )
    assert r.status_code == 200 and r.json()["processing_restricted"] is True

    async def cancelled():
        runs = (await stack.api.get("/v1/runs", headers=tenant.headers)).json()["data"]
        return runs and runs[0]["status"] == "cancelled"

    assert await wait_for(cancelled)
    await send_dm(stack, account_id, person, "restrict please")
    await asyncio.sleep(1.0)
    assert len(await sandbox_messages(stack, person)) == 1  # only the message from before
    messages = (await stack.api.get(f"/v1/contacts/{contact['id']}/messages", headers=tenant.headers)).json()
    assert messages["data"][0]["text"] == "restrict please"  # logged as required
    r = await stack.api.patch(f"/v1/contacts/{contact['id']}", json={"consent_withdrawn": True}, headers=tenant.headers)
    assert r.json()["consent_withdrawn"] is True


async def test_retention_sweep_deletes_only_messages_older_than_the_period(stack):
    short = await create_tenant(stack, "Short retention")
    long_ = await create_tenant(stack, "Long retention")
    r = await stack.api.patch("/v1/workspace", json={"retention_days": 30}, headers=short.headers)
    assert r.status_code == 200 and r.json()["retention_days"] == 30
    r = await stack.api.patch("/v1/workspace", json={"retention_days": 0}, headers=short.headers)
    assert r.status_code == 422
    await stack.api.patch("/v1/workspace", json={"retention_days": 365}, headers=long_.headers)
    now = datetime.now(UTC)
    with Session(stack.deps.engine) as db:
        for ws in (short, long_):
            for age, label in ((100, "old"), (5, "new")):
                db.add(Message(workspace_id=ws.workspace_id, channel_id="ch_x", contact_id="ct_x", direction="in",
                               text=f"{label}-{ws.workspace_id}", created_at=now - timedelta(days=age)))
                db.add(_dead_letter(ws.workspace_id, "ch_x", "ct_x", "p", f"{label}-{ws.workspace_id}",
                                    created_at=now - timedelta(days=age)))
        db.commit()
    result = await stack.client.execute_workflow(
        RETENTION_SWEEP_WORKFLOW, RetentionSweepInput(), id=f"retention-test-{short.workspace_id}",
        task_queue=stack.settings.task_queue, result_type=RetentionResult,
    )
    assert result.messages_deleted >= 1
    with Session(stack.deps.engine) as db:
        texts = {row[0] for row in db.exec(text("select text from message where channel_id = 'ch_x'")).all()}
    assert f"old-{short.workspace_id}" not in texts
    assert f"new-{short.workspace_id}" in texts
    assert {f"old-{long_.workspace_id}", f"new-{long_.workspace_id}"} <= texts
    assert result.dead_letters_deleted >= 1
    with Session(stack.deps.engine) as db:
        dead = {row.event["text"] for row in db.exec(select(DeadLetter).where(DeadLetter.channel_id == "ch_x")).all()}
    assert f"old-{short.workspace_id}" not in dead
    assert {f"new-{short.workspace_id}", f"old-{long_.workspace_id}", f"new-{long_.workspace_id}"} <= dead


async def decoded_history(stack, workflow_id: str, run_id: str) -> str:
    """Every payload of one run's history, decrypted and joined."""
    history = await stack.client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
    payloads: list[Payload] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            if "data" in node and isinstance(node.get("metadata"), dict):
                payloads.append(Payload(
                    metadata={k: base64.b64decode(v) for k, v in node["metadata"].items()},
                    data=base64.b64decode(node["data"]),
                ))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(history.to_json()))
    codec = EncryptionCodec(KeyStore(stack.deps.engine, stack.deps.vault))
    return " ".join(p.data.decode(errors="replace") for p in await codec.decode(payloads))


async def test_retention_sweep_expires_workflow_histories_older_than_the_period(stack):
    tenant = await create_tenant(stack, "One-day retention")
    assert (await stack.api.patch("/v1/workspace", json={"retention_days": 1}, headers=tenant.headers)).status_code == 200
    channel, account_id, _ = await connect_instagram(stack, tenant)
    await create_automation(
        stack, tenant, channel["id"], {"type": "dm_keyword", "keywords": ["price"]},
        [{"id": "a", "type": "send_message", "text": "The lamp is 40 EUR"},
         {"id": "b", "type": "send_message", "text": "Shipping is free"}],
    )
    person = new_sender()
    first = await send_dm(stack, account_id, person, "price of the velvet lamp")
    await wait_for_messages(stack, person, 2)
    keeper = await create_tenant(stack, "Default retention")
    keeper_channel, keeper_account, _ = await connect_instagram(stack, keeper)
    await create_automation(stack, keeper, keeper_channel["id"], {"type": "dm_keyword", "keywords": ["price"]},
                            [{"id": "a", "type": "send_message", "text": "Ask us"}])
    await send_dm(stack, keeper_account, new_sender(), "price of the brass lamp")

    async def executions(tenant_, workflow_type=None, status=None):
        query = f"WorkspaceId = '{tenant_.workspace_id}'"
        return {
            (wf.workflow_type, wf.id, wf.run_id) async for wf in stack.client.list_workflows(query)
            if workflow_type in (None, wf.workflow_type) and status in (None, wf.status.name)
        }

    assert await wait_for(lambda: executions(tenant, "AutomationRun", "COMPLETED"))
    assert await wait_for(lambda: executions(keeper, "ConversationWorkflow"))
    before = await executions(tenant)
    conversation = next((i, r) for t, i, r in before if t == "ConversationWorkflow")
    assert "velvet lamp" in await decoded_history(stack, *conversation)
    kept = await executions(keeper, "ConversationWorkflow")

    # Two days on, the one-day workspace's histories hold expired messages.
    later = datetime.now(UTC) + timedelta(days=2)
    result = await stack.client.execute_workflow(
        RETENTION_SWEEP_WORKFLOW, RetentionSweepInput(now_iso=later.isoformat()),
        id=f"retention-histories-{tenant.workspace_id}", task_queue=stack.settings.task_queue,
        result_type=RetentionResult,
    )
    assert result.conversations_rotated >= 1 and result.histories_deleted >= 3  # connect, run, old conversation run
    # The conversation continued as new: its running run carries its state
    # but none of the person's messages; the run and the old run are gone.
    handle = stack.client.get_workflow_handle(conversation[0])
    current = await handle.describe()
    assert current.run_id != conversation[1] and current.status.name == "RUNNING"
    assert "velvet lamp" not in await decoded_history(stack, conversation[0], current.run_id)

    async def gone():
        for _, workflow_id, run_id in before:
            try:
                await stack.client.get_workflow_handle(workflow_id, run_id=run_id).describe()
                return False
            except RPCError as err:
                assert err.status == RPCStatusCode.NOT_FOUND
        return True

    assert await wait_for(gone, timeout=90, interval=1.0)
    # The other workspace (90 days) kept its conversation's run.
    assert await executions(keeper, "ConversationWorkflow") == kept
    # The new run answers the person, and still knows their first message
    # (a platform's redelivery of it is not answered again).
    await send_dm(stack, account_id, person, "price again")
    assert len(await wait_for_messages(stack, person, 4)) == 4
    await send_dm(stack, account_id, person, "price of the velvet lamp", mid=first["message"]["mid"])
    await asyncio.sleep(1.0)
    assert len(await sandbox_messages(stack, person)) == 4


async def test_contact_ids_are_keyed_per_channel_and_older_channels_keep_theirs(stack):
    """Workflow ids and the ContactId search attribute show a contact id:
    keyed with the channel's own key, it cannot be matched by trying platform
    user ids (a Telegram chat id is short). A channel connected before keyed
    ids (its key empty after migration 0008) keeps its contacts' ids."""
    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    legacy, legacy_account, _ = await connect_instagram(stack, tenant)
    with Session(stack.deps.engine) as db:
        row = db.get(Channel, legacy["id"])
        key = db.get(Channel, channel["id"]).contact_key
        row.contact_key = ""
        db.add(row)
        db.commit()
    assert len(key) == 32
    person = new_sender()
    for account in (account_id, legacy_account):
        await send_dm(stack, account, person, "hello")

    async def contacts():
        r = await stack.api.get("/v1/contacts", headers=tenant.headers)
        data = r.json()["data"]
        return len(data) == 2 and {c["channel_id"]: c["id"] for c in data}

    ids = await wait_for(contacts)
    assert ids, "both contacts recorded"
    unkeyed = contact_id_for(channel["id"], person, key="")
    assert ids[channel["id"]] == contact_id_for(channel["id"], person, key=key) != unkeyed
    assert ids[legacy["id"]] == contact_id_for(legacy["id"], person, key="")
    ws = tenant.workspace_id
    for channel_id, contact_id in ids.items():
        conversation = stack.client.get_workflow_handle(conversation_workflow_id(ws, channel_id, contact_id))
        assert (await conversation.describe()).status.name == "RUNNING"
    assert unkeyed not in str([wf.id async for wf in stack.client.list_workflows(f"WorkspaceId = '{ws}'")])
    listing = await stack.api.get("/v1/channels", headers=tenant.headers)
    assert listing.status_code == 200 and key not in listing.text


async def test_audit_log_records_actions_without_content_and_attestation_is_required(stack):
    r = await stack.api.post("/v1/workspaces", json={"name": "No attestation"},
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert r.status_code == 422 and "business_use_attestation" in r.text
    r = await stack.api.post("/v1/workspaces", json={"name": "x", "business_use_attestation": False},
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert r.status_code == 422
    tenant = await create_tenant(stack)
    channel, account_id, token = await connect_instagram(stack, tenant)
    person = new_sender()
    await run_flow(stack, tenant, account_id, channel["id"], person, keyword="audit")
    entries = (await stack.api.get("/v1/audit", headers=tenant.headers)).json()["data"]
    actions = {e["action"] for e in entries}
    assert {"workspace.create", "channel.connect", "token.use"} <= actions
    dumped = json.dumps(entries)
    assert "unicorn" not in dumped and person not in dumped and token not in dumped


async def test_retention_schedule_is_created_once_and_runs_daily(stack):
    from workers.main import RETENTION_SCHEDULE_ID, ensure_schedules

    await ensure_schedules(stack.client, stack.settings)
    await ensure_schedules(stack.client, stack.settings)  # idempotent
    description = await stack.client.get_schedule_handle(RETENTION_SCHEDULE_ID).describe()
    assert description.schedule.spec.intervals[0].every == timedelta(days=1)
    assert description.schedule.action.workflow == RETENTION_SWEEP_WORKFLOW


def test_erasure_finds_rows_that_name_a_contact_only_inside_a_key(stack):
    """Telegram's per-chat rate buckets and the send records of runs and
    broadcasts carry the contact in a key: erasing the contact deletes those,
    erasing the channel every row of the bot, and nothing of another chat."""
    engine = stack.deps.engine
    suffix = secrets.token_hex(4)
    ws, ch, bot = f"ws_k{suffix}", f"ch_k{suffix}", f"9{int(suffix, 16)}"
    gone, stays = f"ct_a{suffix}", f"ct_b{suffix}"
    with Session(engine) as db:
        db.add(Workspace(id=ws, name="keys", api_key_hash=f"h{suffix}"))
        db.flush()
        db.add(Channel(id=ch, workspace_id=ws, platform="telegram", external_id=bot, status="active"))
        db.flush()
        db.add_all([Contact(id=gone, workspace_id=ws, channel_id=ch, external_id="41"),
                    Contact(id=stays, workspace_id=ws, channel_id=ch, external_id="42")])
        db.add_all([RateBucket(key=k, tat=0.0)
                    for k in (f"tg:chat:{bot}:41", f"tg:chat:{bot}:42", f"tg:bot:{bot}")])
        db.add_all([SendRecord(idempotency_key=k, channel_id=ch, platform_message_id="1")
                    for k in (f"run_1/{gone}/a/1", f"bc_1/{gone}", f"run_2/{stays}/a/1", f"bc_1/{stays}")])
        db.commit()

    def left() -> tuple[set[str], set[str]]:
        with Session(engine) as db:
            buckets = {b.key for b in db.exec(select(RateBucket)) if bot in b.key}
            sends = {s.idempotency_key for s in db.exec(select(SendRecord).where(SendRecord.channel_id == ch))}
        return buckets, sends

    privacy = PrivacyActivities(engine, keys=stack.deps.keys)
    counts = privacy.purge_subject(EraseStepInput(job_id="k", workspace_id=ws, scope="contact", contact_id=gone))
    assert counts["rate_buckets"] == 1 and counts["send_records"] == 2 and counts["contacts"] == 1
    assert left() == ({f"tg:chat:{bot}:42", f"tg:bot:{bot}"}, {f"run_2/{stays}/a/1", f"bc_1/{stays}"})
    counts = privacy.purge_subject(EraseStepInput(job_id="c", workspace_id=ws, scope="channels", channel_ids=[ch]))
    assert counts["contacts"] == 1 and counts["channels"] == 1 and left() == (set(), set())
