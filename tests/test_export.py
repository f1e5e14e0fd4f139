"""Data access and portability: the contact export and the workspace ZIP.

The coverage guard needs no server: a new table with a contact or workspace
id fails it until ``core/personal_data.py`` declares how it is exported and erased.
"""

from __future__ import annotations

import io
import json
import zipfile

from sqlmodel import SQLModel

import core.db  # noqa: F401  (registers every table in the metadata)
from core.personal_data import EXPORTED_TABLES, NOT_EXPORTED, PERSONAL_DATA, contact_tables

from helpers import (
    connect_instagram,
    create_automation,
    create_tenant,
    new_sender,
    send_dm,
    wait_for,
    wait_for_messages,
)

# Tables with a contact_id column that the contact export may leave out, and why.
CONTACT_EXPORT_ALLOWED_GAPS: dict[str, str] = {
    "inboxevent": "transient queue while Temporal is down; its events reach the message log once relayed",
}

# Columns whose names look secret but hold no credential.
NOT_SECRET = {("aiusage", "prompt_tokens"), ("aiusage", "completion_tokens"), ("channel", "token_expires_at")}
SECRET_MARKERS = ("token", "secret", "_key", "ciphertext", "password", "wrapped")


def test_every_table_with_personal_or_workspace_data_is_exported_and_erased():
    tables = SQLModel.metadata.tables
    assert set(tables) == set(PERSONAL_DATA), "every table is declared in core/personal_data.py, and only tables"
    for name, table in tables.items():
        spec = PERSONAL_DATA[name]
        assert spec.table is table
        assert spec.exported != bool(spec.not_exported), f"{name}: exported, or a reason why not"
        if "contact_id" in table.c:
            assert name in contact_tables() or name in CONTACT_EXPORT_ALLOWED_GAPS, (
                f"table {name!r} has a contact_id: add it to the contact export in core/personal_data.py"
            )
            assert spec.contact_scope, f"{name}: has a contact_id, so erasing a contact must find its rows"
        if "workspace_id" in table.c:
            assert spec.exported, f"table {name!r} has a workspace_id: export it"
        if {"workspace_id", "channel_id"} & set(table.c.keys()) or spec.contact_scope or spec.contact_custom:
            erased = spec.workspace_column or spec.channel_scope or spec.channel_custom
            assert erased or spec.kept, f"{name}: erased with its workspace or channel, or a reason why kept"
            assert spec.contact_scope or spec.contact_custom or not spec.unlink, name
    assert "workspace" in EXPORTED_TABLES
    assert set(NOT_EXPORTED) == {"datakey", "sendrecord", "inboxevent", "ratebucket"}
    assert {"contact", "message", "run", "deadletter"} <= contact_tables()
    for spec_name, spec in PERSONAL_DATA.items():
        assert spec_name == spec.table.name
        assert spec.excluded <= set(spec.table.c.keys()), f"{spec_name}: excludes an unknown column"


def test_the_map_deletes_rows_before_the_rows_they_point_to():
    order = list(PERSONAL_DATA)
    for name, table in SQLModel.metadata.tables.items():
        for fk in table.foreign_keys:
            assert order.index(name) < order.index(fk.column.table.name), f"{name} -> {fk.column.table.name}"


def test_no_exported_column_is_a_credential():
    for name, spec in EXPORTED_TABLES.items():
        for column in spec.columns():
            if (name, column) in NOT_SECRET:
                continue
            assert not any(marker in column for marker in SECRET_MARKERS), f"{name}.{column} is exported"
        assert "api_key_hash" not in spec.columns()
    assert EXPORTED_TABLES["channel"].excluded >= {"token_ciphertext", "webhook_secret_ciphertext", "contact_key"}
    assert "api_key_hash" in EXPORTED_TABLES["workspace"].excluded


async def test_contact_and_workspace_export_end_to_end(stack):
    tenant = await create_tenant(stack, "Exporter")
    channel, account_id, token = await connect_instagram(stack, tenant)
    automation = await create_automation(
        stack, tenant, channel["id"], {"type": "dm_keyword", "keywords": ["export"]},
        [{"id": "hi", "type": "send_message", "text": "Here is your export reply"}],
    )
    person = new_sender()
    await send_dm(stack, account_id, person, "please export me")
    assert len(await wait_for_messages(stack, person, 1)) == 1

    contacts = (await stack.api.get("/v1/contacts", headers=tenant.headers)).json()
    contact = next(c for c in contacts["data"] if c["external_id"] == person)

    async def run_completed():
        r = await stack.api.get("/v1/runs", params={"contact_id": contact["id"]}, headers=tenant.headers)
        runs = r.json()["data"]
        return runs if runs and all(run["status"] == "completed" for run in runs) else None

    runs = await wait_for(run_completed, timeout=20)
    assert runs, "the run did not complete"

    async def both_messages_logged():
        r = await stack.api.get(f"/v1/contacts/{contact['id']}/messages", headers=tenant.headers)
        return len(r.json()["data"]) >= 2

    assert await wait_for(both_messages_logged)

    # -- contact export ----------------------------------------------------------
    r = await stack.api.get(f"/v1/contacts/{contact['id']}/export", headers=tenant.headers)
    assert r.status_code == 200, r.text
    assert token not in r.text
    doc = r.json()
    assert doc["exported_at"]
    assert doc["contact"]["id"] == contact["id"]
    assert doc["contact"]["external_id"] == person
    texts = {(m["direction"], m["text"]) for m in doc["messages"]}
    assert ("in", "please export me") in texts
    assert ("out", "Here is your export reply") in texts
    assert all(m["contact_id"] == contact["id"] for m in doc["messages"])
    assert [run["id"] for run in doc["runs"]] == [runs[0]["id"]]
    assert doc["runs"][0]["automation_id"] == automation["id"]
    assert isinstance(doc["ai_usage"], list)
    assert doc["dead_letters"] == []  # nothing of theirs was refused by Temporal
    assert all(entry["target"] == contact["id"] for entry in doc["audit"])

    # The export itself is audited.
    again = (await stack.api.get(f"/v1/contacts/{contact['id']}/export", headers=tenant.headers)).json()
    assert any(entry["action"] == "contact.export" for entry in again["audit"])

    # -- workspace export --------------------------------------------------------
    r = await stack.api.get("/v1/workspace/export", headers=tenant.headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/zip"
    assert f'filename="vectory-export-{tenant.workspace_id}.zip"' in r.headers["content-disposition"]
    assert token.encode() not in r.content
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        names = set(zf.namelist())
        files = {name: zf.read(name).decode() for name in names}
    manifest = json.loads(files["manifest.json"])
    assert manifest["workspace_id"] == tenant.workspace_id
    assert manifest["exported_at"]
    for table in ("channel", "contact", "message", "run", "automation", "workspace", "automationversion"):
        assert manifest["tables"][table] >= 1, table
    assert names == {"manifest.json"} | {f"{table}.jsonl" for table in manifest["tables"]}
    assert "token_ciphertext" in manifest["excluded"]["columns"]["channel"]
    assert set(manifest["excluded"]["tables"]) == set(NOT_EXPORTED)
    for name, text in files.items():
        assert token not in text, name
        if name.endswith(".jsonl"):
            rows = [json.loads(line) for line in text.splitlines()]
            assert len(rows) == manifest["tables"][name.removesuffix(".jsonl")]

    channels = [json.loads(line) for line in files["channel.jsonl"].splitlines()]
    assert [c["id"] for c in channels] == [channel["id"]]
    for row in channels:
        assert not any(
            ("token" in key and key != "token_expires_at") or "ciphertext" in key or "secret" in key
            or key == "contact_key" for key in row
        )
    workspaces = [json.loads(line) for line in files["workspace.jsonl"].splitlines()]
    assert [w["id"] for w in workspaces] == [tenant.workspace_id]
    assert "api_key_hash" not in workspaces[0]
    assert tenant.api_key not in r.content.decode("latin-1")
    messages = [json.loads(line) for line in files["message.jsonl"].splitlines()]
    assert {"please export me", "Here is your export reply"} <= {m["text"] for m in messages}
    assert all(m["workspace_id"] == tenant.workspace_id for m in messages)
    assert all(m["created_at"].endswith("+00:00") for m in messages)
    audit_actions = {json.loads(line)["action"] for line in files["auditentry.jsonl"].splitlines()}
    assert {"contact.export", "workspace.export"} <= audit_actions

    # -- another tenant sees only its own (empty) data ---------------------------
    other = await create_tenant(stack, "Stranger")
    r = await stack.api.get(f"/v1/contacts/{contact['id']}/export", headers=other.headers)
    assert r.status_code == 404
    r = await stack.api.get("/v1/workspace/export", headers=other.headers)
    assert r.status_code == 200
    assert f"vectory-export-{other.workspace_id}.zip" in r.headers["content-disposition"]
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        manifest = json.loads(zf.read("manifest.json"))
        assert manifest["workspace_id"] == other.workspace_id
        assert manifest["tables"]["workspace"] == 1
        for table in ("channel", "contact", "message", "run", "automation", "automationversion", "aiusage"):
            assert manifest["tables"][table] == 0, table
            assert zf.read(f"{table}.jsonl") == b""
        for name in zf.namelist():
            content = zf.read(name).decode()
            assert tenant.workspace_id not in content, name
            assert contact["id"] not in content, name
    r = await stack.api.get("/v1/workspace/export")
    assert r.status_code == 401
