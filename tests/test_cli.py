"""The operator CLI (workers/cli.py) against the real stack.

``CliRunner.invoke`` is synchronous and the stack lives in the session's event
loop, so every command that talks to the API, Temporal or the worker runs in
a thread (``asyncio.to_thread``); the environment points the CLI at the stack.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import secrets
import time
import zipfile
from pathlib import Path

import pytest
from sqlmodel import Session, select
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer
from typer.testing import CliRunner

from core.crypto import TokenVault
from core.db import Channel, Run, Workspace, make_engine
from core.personal_data import EXPORTED_TABLES
from core.settings import Settings
from workers.cli import app
from workers.main import WORKFLOWS, workflow_runner

from conftest import APP_SECRET, free_port
from helpers import (
    RefusingTemporal,
    connect_instagram,
    create_automation,
    create_tenant,
    new_sender,
    sandbox_messages,
    send_dm,
    text_of,
    wait_for,
    wait_for_messages,
)

runner = CliRunner()

REPLY = "Prices start at 10 EUR."
FLOW = {
    "trigger": {"type": "dm_keyword", "keywords": ["price"], "match": "contains"},
    # Two steps, so the run is an AutomationRun workflow (a one-message flow
    # completes inside its conversation: see the inline test below).
    "steps": [{"id": "answer", "type": "send_message", "text": REPLY},
              {"id": "tag", "type": "add_tag", "tag": "asked-price"}],
}


def cli_env(stack, **overrides: str) -> dict[str, str]:
    s = stack.settings
    env = {
        "VECTORY_ENVIRONMENT": "test",
        "VECTORY_DATABASE_URL": s.database_url,
        "VECTORY_TEMPORAL_ADDRESS": s.temporal_address,
        "VECTORY_TEMPORAL_NAMESPACE": s.temporal_namespace,
        "VECTORY_MASTER_KEY": s.master_key,
        "VECTORY_TASK_QUEUE": s.task_queue,
        "VECTORY_PUBLIC_URL": stack.api_url,
        "VECTORY_SANDBOX_URL": stack.sandbox_url,
        "VECTORY_META_APP_SECRET": APP_SECRET,
        "COLUMNS": "400",  # rich tables: no folded ids
    }
    env.update(overrides)
    return env


async def invoke(stack, args: list[str], **overrides: str):
    return await asyncio.to_thread(runner.invoke, app, args, env=cli_env(stack, **overrides))


@pytest.fixture(scope="module")
async def flow(stack):
    """One completed run, created end to end (webhook → conversation → run)."""
    tenant = await create_tenant(stack, "CLI Co")
    channel, account_id, _ = await connect_instagram(stack, tenant)
    await create_automation(stack, tenant, channel["id"], FLOW["trigger"], FLOW["steps"])
    person = new_sender()
    await send_dm(stack, account_id, person, "what's the price?")
    calls = await wait_for_messages(stack, person, 1)
    assert [text_of(c) for c in calls] == [REPLY]

    async def completed_run():
        with Session(stack.deps.engine) as db:
            return db.exec(
                select(Run).where(Run.workspace_id == tenant.workspace_id, Run.status == "completed")
            ).first()

    run = await wait_for(completed_run)
    assert run is not None, "the run was not recorded as completed"
    return {"tenant": tenant, "account_id": account_id, "run": run}


# -- runs ------------------------------------------------------------------------


async def test_runs_list_shows_the_e2e_run(stack, flow):
    run = flow["run"]
    result = await invoke(stack, ["runs", "list", "--workspace", run.workspace_id])
    assert result.exit_code == 0, result.output
    assert run.id in result.output
    assert run.contact_id in result.output
    assert f"{run.automation_id} v1" in result.output
    assert "completed" in result.output

    result = await invoke(stack, ["runs", "list", "--workspace", run.workspace_id, "--status", "completed", "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in rows] == [run.id]
    assert rows[0]["ended_at"]

    result = await invoke(stack, ["runs", "list", "--workspace", run.workspace_id, "--status", "failed"])
    assert result.exit_code == 0, result.output
    assert "no runs" in result.output


async def test_runs_show_prints_the_live_trail(stack, flow):
    run = flow["run"]
    result = await invoke(stack, ["runs", "show", run.id])
    assert result.exit_code == 0, result.output
    assert "workflow" in result.output  # trail_source: the live query
    assert "completed" in result.output
    assert "answer" in result.output and "send_message" in result.output and "done" in result.output

    result = await invoke(stack, ["runs", "show", run.id, "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["trail_source"] == "workflow"
    assert shown["status"] == "completed"
    assert [(t["step_id"], t["status"]) for t in shown["trail"]] == [("answer", "done"), ("tag", "done")]


async def test_runs_show_falls_back_to_the_database_when_temporal_is_down(stack, flow):
    run = flow["run"]
    result = await invoke(stack, ["runs", "show", run.id], VECTORY_TEMPORAL_ADDRESS=f"127.0.0.1:{free_port()}")
    assert result.exit_code == 0, result.output
    assert "database" in result.output
    assert "live status unavailable" in result.output
    assert "answer" in result.output
    assert "Traceback" not in result.output


async def test_runs_replay_ok_and_saved_history_replays_without_keys(stack, flow, tmp_path):
    run = flow["run"]
    out = tmp_path / "cli_run.json"
    result = await invoke(stack, ["runs", "replay", run.id, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "replay OK" in result.output
    document = json.loads(out.read_text())
    assert document["events"][0]["eventType"] == "EVENT_TYPE_WORKFLOW_EXECUTION_STARTED"
    # Decrypted, like tests/histories: it replays without the data converter.
    assert base64.b64encode(b"binary/encrypted").decode() not in out.read_text()
    history = WorkflowHistory.from_json(out.stem, out.read_text())
    result = await Replayer(workflows=WORKFLOWS, workflow_runner=workflow_runner("strict")).replay_workflow(
        history, raise_on_replay_failure=False
    )
    assert result.replay_failure is None, repr(result.replay_failure)

    encrypted = tmp_path / "encrypted.json"
    result = await invoke(stack, ["runs", "replay", run.id, "--out", str(encrypted), "--keep-encrypted"])
    assert result.exit_code == 0, result.output
    assert base64.b64encode(b"binary/encrypted").decode() in encrypted.read_text()


async def test_a_one_message_run_is_shown_and_replayed_through_its_conversation(stack, tmp_path):
    tenant = await create_tenant(stack, "Inline Co")
    channel, account_id, _ = await connect_instagram(stack, tenant)
    await create_automation(stack, tenant, channel["id"], {"type": "dm_keyword", "keywords": ["hours"]},
                            [{"id": "hours", "type": "send_message", "text": "Open 9 to 5."}])
    person = new_sender()
    await send_dm(stack, account_id, person, "hours?")
    await wait_for_messages(stack, person, 1)

    async def recorded():
        with Session(stack.deps.engine) as db:
            return db.exec(select(Run).where(Run.workspace_id == tenant.workspace_id)).first()

    run = await wait_for(recorded)
    result = await invoke(stack, ["runs", "show", run.id, "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert (shown["status"], shown["trail_source"]) == ("completed", "database")
    assert [(t["step_id"], t["status"]) for t in shown["trail"]] == [("hours", "done")]

    out = tmp_path / "inline.json"
    result = await invoke(stack, ["runs", "replay", run.id, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "inside its conversation" in result.output and "replay OK" in result.output
    started = json.loads(out.read_text())["events"][0]["workflowExecutionStartedEventAttributes"]
    assert started["workflowType"]["name"] == "ConversationWorkflow"


async def test_unknown_run_is_a_clear_error(stack):
    for command in ("show", "replay"):
        result = await invoke(stack, ["runs", command, "ws_0000000000000000/run/nope"])
        assert result.exit_code == 1, result.output
        assert "run not found" in result.stderr
        assert "Traceback" not in result.output


async def test_temporal_unreachable_is_a_clear_error(stack, flow):
    result = await invoke(
        stack, ["runs", "replay", flow["run"].id], VECTORY_TEMPORAL_ADDRESS=f"127.0.0.1:{free_port()}"
    )
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: cannot reach Temporal at 127.0.0.1:")
    assert "Traceback" not in result.output


# -- simulate ----------------------------------------------------------------------


async def test_simulate_dm_delegates_to_the_sandbox_simulator(stack, flow):
    person = new_sender()
    result = await invoke(
        stack, ["simulate", "dm", "--text", "price please", "--account", flow["account_id"], "--sender", person,
                "--wait", "15"],
    )
    assert result.exit_code == 0, result.output
    assert "/webhooks/meta -> 200" in result.output
    assert "reply received after" in result.output and REPLY in result.output

    async def settled():  # the run behind that reply is complete too (the export test counts runs)
        with Session(stack.deps.engine) as db:
            runs = db.exec(select(Run).where(Run.workspace_id == flow["tenant"].workspace_id)).all()
        return len(runs) == 2 and all(r.status == "completed" for r in runs)

    assert await wait_for(settled)

    result = await invoke(stack, ["simulate", "dm", "--text", "hi", "--wait", "0"], VECTORY_DEMO_ACCOUNT="")
    assert result.exit_code == 2, result.output  # simulate's "configuration error"
    assert "no account" in result.stderr


# -- workspace export --------------------------------------------------------------


async def test_workspace_export_matches_the_api_archive(stack, flow, tmp_path):
    tenant = flow["tenant"]
    out = tmp_path / "export" / "ws.zip"
    result = await invoke(stack, ["workspace", "export", tenant.workspace_id, "--out", str(out)])
    assert result.exit_code == 0, result.output
    with zipfile.ZipFile(out) as zf:
        names = set(zf.namelist())
        manifest = json.loads(zf.read("manifest.json"))
        runs = [json.loads(line) for line in zf.read("run.jsonl").decode().splitlines()]
    assert manifest["workspace_id"] == tenant.workspace_id
    assert set(manifest["tables"]) == set(EXPORTED_TABLES)
    assert names == {"manifest.json"} | {f"{t}.jsonl" for t in EXPORTED_TABLES}
    assert flow["run"].id in [r["id"] for r in runs]
    assert not out.with_name(out.name + ".partial").exists()

    r = await stack.api.get("/v1/workspace/export", headers=tenant.headers)
    assert r.status_code == 200, r.text
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        assert set(zf.namelist()) == names
        api_manifest = json.loads(zf.read("manifest.json"))
    assert api_manifest["excluded"] == manifest["excluded"]
    for table, count in manifest["tables"].items():
        if table != "auditentry":  # both exports audit themselves
            assert api_manifest["tables"][table] == count, table

    result = await invoke(stack, ["workspace", "export", "ws_missing", "--out", str(tmp_path / "x.zip")])
    assert result.exit_code == 1
    assert "workspace not found" in result.stderr
    assert not (tmp_path / "x.zip").exists()


# -- inbox dead letters -----------------------------------------------------------


async def test_inbox_dead_letters_are_listed_and_retried(stack):
    """A DM Temporal refuses for good (INVALID_ARGUMENT) is set aside after
    the relay's one attempt, without tripping the webhooks' circuit breaker
    for everyone else; the CLI lists it (reason, no content) and, once the
    cause is gone, retries it: the relay hands it over and it is answered."""
    from core.db import DeadLetter

    tenant = await create_tenant(stack, "Dead letters")
    channel, account_id, _ = await connect_instagram(stack, tenant)
    await create_automation(stack, tenant, channel["id"], {"type": "dm_keyword", "keywords": ["price"]},
                            [{"id": "r", "type": "send_message", "text": REPLY}])
    state = stack.api_app.state
    client = state.temporal
    person, mid = new_sender(), f"m-refused-{secrets.token_hex(4)}"
    refusing = RefusingTemporal(client, refuse={mid})
    state.temporal = refusing
    try:
        await send_dm(stack, account_id, person, "price, secret words", mid=mid)

        def dead_letters() -> list:
            with Session(stack.deps.engine) as db:
                return list(db.exec(select(DeadLetter).where(DeadLetter.channel_id == channel["id"])).all())

        async def set_aside():
            return await asyncio.to_thread(dead_letters)

        assert await wait_for(set_aside, timeout=15)
        assert state.webhooks.temporal_down_until < time.monotonic()  # not "Temporal is down"
        assert refusing.handed.count(mid) == 2  # the webhook's signal, then the relay's one attempt
        assert await sandbox_messages(stack, person) == []
    finally:
        state.temporal = client

    result = await invoke(stack, ["inbox", "dead-letters", "--workspace", tenant.workspace_id])
    assert result.exit_code == 0, result.output
    assert "INVALID_ARGUMENT: Blob data size exceeds limit." in result.output
    assert "secret words" not in result.output
    result = await invoke(stack, ["inbox", "dead-letters", "--workspace", tenant.workspace_id, "--json"])
    [row] = [json.loads(line) for line in result.stdout.splitlines()]
    assert row["event_id"] == mid and row["kind"] == "message" and row["workspace_id"] == tenant.workspace_id

    result = await invoke(stack, ["inbox", "retry"])
    assert result.exit_code == 1 and "give dead letter ids or --all" in result.stderr
    result = await invoke(stack, ["inbox", "retry", str(row["id"])])
    assert result.exit_code == 0, result.output
    assert "moved 1 dead letter(s) back to the inbox" in result.output
    assert [text_of(c) for c in await wait_for_messages(stack, person, 1)] == [REPLY]
    result = await invoke(stack, ["inbox", "dead-letters", "--workspace", tenant.workspace_id])
    assert "no dead letters" in result.output
    result = await invoke(stack, ["inbox", "retry", str(row["id"])])
    assert result.exit_code == 1 and f"no dead letter with id {row['id']}" in result.stderr
    result = await invoke(stack, ["inbox", "retry", "--all", "--workspace", tenant.workspace_id])
    assert result.exit_code == 0 and "moved 0 dead letter(s)" in result.output


# -- keys and migrate (own database, no stack) -------------------------------------


def _key() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")


def test_migrate_then_keys_rotate_check_and_rotate(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    old, new = f"old:{_key()}", f"new:{_key()}"
    env = {"VECTORY_ENVIRONMENT": "test", "VECTORY_DATABASE_URL": url, "VECTORY_MASTER_KEY": old}

    result = runner.invoke(app, ["runs", "list"], env=env)
    assert result.exit_code == 1
    assert "is not migrated" in result.stderr and "vectory migrate" in result.stderr

    result = runner.invoke(app, ["migrate"], env=env)
    assert result.exit_code == 0, result.output
    assert "(head)" in result.output

    result = runner.invoke(app, ["keys", "rotate", "--check"], env=env)
    assert result.exit_code == 0, result.output
    assert "ok: every ciphertext is under primary key 'old'" in result.output

    engine = make_engine(url)
    vault = TokenVault(Settings(master_key=old).keyring())
    with Session(engine) as db:
        db.add(Workspace(id="ws_cli", name="cli", api_key_hash="h"))
        db.commit()
        db.add(Channel(
            id="ch_cli", workspace_id="ws_cli", platform="instagram", status="active",
            token_ciphertext=vault.encrypt("tok", "channel:ch_cli:token"),
        ))
        db.commit()
    engine.dispose()

    env["VECTORY_MASTER_KEY"] = f"{new},{old}"
    result = runner.invoke(app, ["keys", "rotate", "--check"], env=env)
    assert result.exit_code == 1
    assert "1 ciphertext(s) not under primary key 'new': tokens=1" in result.output
    assert "(by key: old=1)" in result.output

    result = runner.invoke(app, ["keys", "rotate", "--batch-size", "1"], env=env)
    assert result.exit_code == 0, result.output
    assert "rotating to primary key 'new'" in result.output
    assert "tokens_rewrapped=1" in result.output and "failures=0" in result.output

    result = runner.invoke(app, ["keys", "rotate", "--check"], env=env)
    assert result.exit_code == 0, result.output
    assert "primary key 'new'" in result.output


def test_invalid_master_key_is_a_clear_error(tmp_path: Path):
    env = {"VECTORY_ENVIRONMENT": "test", "VECTORY_DATABASE_URL": f"sqlite:///{tmp_path / 'k.db'}",
           "VECTORY_MASTER_KEY": "not-a-keyring"}
    assert runner.invoke(app, ["migrate"], env=env).exit_code == 0
    result = runner.invoke(app, ["keys", "rotate", "--check"], env=env)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ")
    assert "VECTORY_MASTER_KEY must be" in result.stderr
