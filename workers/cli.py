"""The operator CLI: ``vectory <command>`` (console script, ``workers.cli:app``).

Settings come from the environment like the API and the worker
(``VECTORY_*``, ``core/settings.py``), read afresh on every invocation.

    vectory simulate dm --text "price?" --account 17841400000000 --wait 10
    vectory runs list [--workspace WS] [--status S] [--limit N]
    vectory runs show RUN_ID
    vectory runs replay RUN_ID [--out tests/histories/NAME.json]
    vectory keys rotate [--check]
    vectory workspace export WORKSPACE_ID --out FILE.zip
    vectory inbox dead-letters [--workspace WS] [--limit N] [--json]
    vectory inbox retry ID... | --all [--workspace WS]
    vectory migrate

Errors print one ``error: ...`` line on stderr and exit 1 (``simulate``
keeps ``sandbox.simulate``'s exit codes); no tracebacks.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import json
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(
    name="vectory",
    help="Vectory operator commands (settings from VECTORY_* environment variables).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
simulate_app = typer.Typer(help="Simulate inbound platform events against a running API and sandbox.", no_args_is_help=True)
runs_app = typer.Typer(help="Automation runs: list, inspect, replay.", no_args_is_help=True)
keys_app = typer.Typer(help="Master-key rotation of stored secrets.", no_args_is_help=True)
workspace_app = typer.Typer(help="Workspace operations.", no_args_is_help=True)
inbox_app = typer.Typer(help="The durable inbox: events Temporal refused for good (dead letters).", no_args_is_help=True)
app.add_typer(simulate_app, name="simulate")
app.add_typer(runs_app, name="runs")
app.add_typer(keys_app, name="keys")
app.add_typer(workspace_app, name="workspace")
app.add_typer(inbox_app, name="inbox")

# Temporal: a CLI fails fast instead of waiting for a server to come up.
CONNECT_ATTEMPTS = 2
CONNECT_DELAY_SECONDS = 0.5
QUERY_TIMEOUT_SECONDS = 5.0

F = TypeVar("F", bound=Callable[..., Any])


class CliError(Exception):
    """An expected failure: printed as ``error: <message>``, exit code 1."""


def _fail(message: str) -> NoReturn:
    raise CliError(message)


def _describe_error(exc: BaseException) -> str:
    from pydantic import ValidationError
    from sqlalchemy.exc import SQLAlchemyError
    from temporalio.service import RPCError

    from core.db import DatabaseNotMigrated

    if isinstance(exc, CliError):
        return str(exc)
    if isinstance(exc, DatabaseNotMigrated):
        return f"{exc} (or `vectory migrate`)"
    if isinstance(exc, ValidationError):
        return f"invalid settings: {exc}"
    if isinstance(exc, SQLAlchemyError):
        return f"database error: {getattr(exc, 'orig', None) or exc}"
    if isinstance(exc, RPCError):
        return f"Temporal error ({exc.status.name}): {exc.message}"
    return f"{type(exc).__name__}: {exc}"


def _errors_to_exit(func: F) -> F:
    """Every failure becomes one line on stderr and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException):  # typer's own exits and usage errors
            raise
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except Exception as exc:
            typer.echo(f"error: {_describe_error(exc)}", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


# -- shared plumbing ---------------------------------------------------------------


def _settings():
    """Fresh settings from the environment on every invocation (not the cached
    ``get_settings()``: tests and long-lived callers change the environment)."""
    from core.settings import Settings

    return Settings()


def _engine(settings):
    from core.db import engine_for

    return engine_for(settings.database_url)


def _console(*, stderr: bool = False) -> Console:
    # One per invocation: picks up the current stdout/stderr and COLUMNS.
    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def _when(value: datetime | None) -> str:
    if value is None:
        return "-"
    if value.tzinfo is None:  # stored in UTC; SQLite hands it back naive
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()


def _keys(settings, engine):
    from core.codec import KeyStore
    from core.crypto import TokenVault

    return KeyStore(engine, TokenVault(settings.keyring()))


async def _temporal(settings, keys):
    from core.codec import data_converter
    from core.temporal import connect

    try:
        return await connect(settings, data_converter(keys), attempts=CONNECT_ATTEMPTS, delay=CONNECT_DELAY_SECONDS)
    except RuntimeError as exc:  # "cannot reach Temporal at <address>: <reason>"
        raise CliError(str(exc)) from None


def _is_not_found(exc: BaseException) -> bool:
    from temporalio.service import RPCError, RPCStatusCode

    return isinstance(exc, RPCError) and exc.status == RPCStatusCode.NOT_FOUND


# -- simulate ----------------------------------------------------------------------


class MetaPlatform(StrEnum):
    instagram = "instagram"
    messenger = "messenger"


@simulate_app.command("dm")
@_errors_to_exit
def simulate_dm(
    text: str = typer.Option(..., "--text", help="the message text"),
    account: str | None = typer.Option(None, help="business account id (default: $VECTORY_DEMO_ACCOUNT)"),
    sender: str | None = typer.Option(None, help="the person's IGSID / PSID"),
    platform: MetaPlatform = typer.Option(MetaPlatform.instagram, case_sensitive=False),
    wait: float = typer.Option(10.0, help="seconds to wait for the reply (0 = don't wait)"),
    mid: str | None = typer.Option(None, help="platform message id (default: generated)"),
    api: str | None = typer.Option(None, help="API base URL (default: $VECTORY_PUBLIC_URL)"),
    sandbox: str | None = typer.Option(None, help="sandbox base URL (default: $VECTORY_SANDBOX_URL)"),
) -> None:
    """An inbound DM (Instagram or Messenger), then wait for the automated reply.

    Delegates to ``python -m sandbox.simulate dm`` and keeps its exit codes:
    0 delivered (and reply seen), 1 rejected or no reply in time, 2 configuration or connection error.
    """
    # sandbox/ is a development tool, not part of the production image
    # (tests/test_compose.py): looked up at run time, like workers/devstack.py does.
    try:
        simulate = importlib.import_module("sandbox.simulate")
    except ModuleNotFoundError:
        _fail("`simulate` needs the sandbox package (sandbox/), a development tool absent from this installation")

    argv = ["dm", "--text", text, "--platform", platform.value, "--wait", str(wait)]
    for flag, value in (("--account", account), ("--sender", sender), ("--mid", mid), ("--api", api), ("--sandbox", sandbox)):
        if value is not None:
            argv += [flag, value]
    code = simulate.main(argv)
    if code:
        raise typer.Exit(code)


# -- runs --------------------------------------------------------------------------


@runs_app.command("list")
@_errors_to_exit
def runs_list(
    workspace: str | None = typer.Option(None, "--workspace", "-w", help="only this workspace's runs"),
    status: str | None = typer.Option(None, "--status", "-s", help="running | waiting | completed | failed | cancelled"),
    limit: int = typer.Option(50, "--limit", "-n", min=1, max=10000),
    as_json: bool = typer.Option(False, "--json", help="JSON lines instead of a table"),
) -> None:
    """Runs recorded in the database, newest first."""
    from sqlmodel import Session, col, select

    from core.db import Run

    engine = _engine(_settings())
    query = select(Run)
    if workspace:
        query = query.where(Run.workspace_id == workspace)
    if status:
        query = query.where(Run.status == status)
    with Session(engine) as db:
        rows = db.exec(query.order_by(col(Run.started_at).desc()).limit(limit)).all()
    console = _console()
    if as_json:
        for run in rows:
            typer.echo(json.dumps({
                "id": run.id, "workspace_id": run.workspace_id, "automation_id": run.automation_id,
                "version": run.version, "contact_id": run.contact_id, "status": run.status,
                "started_at": _iso(run.started_at), "ended_at": _iso(run.ended_at),
            }))
        return
    if not rows:
        console.print("no runs")
        return
    table = Table(title=f"runs ({len(rows)})", title_justify="left")
    table.add_column("id", overflow="fold")
    table.add_column("automation", overflow="fold")
    table.add_column("contact", overflow="fold")
    table.add_column("status")
    table.add_column("started (UTC)", no_wrap=True)
    table.add_column("ended (UTC)", no_wrap=True)
    for run in rows:
        table.add_row(
            run.id, f"{run.automation_id} v{run.version}", run.contact_id, run.status, _when(run.started_at), _when(run.ended_at)
        )
    console.print(table)


async def _live_status(settings, engine, run_id: str) -> tuple[Any, str, str]:
    """(RunStatus or None, execution status or "", why the live query failed or "")."""
    from temporalio.client import WorkflowExecutionStatus

    from core.contracts import RunStatus

    try:
        client = await _temporal(settings, _keys(settings, engine))
    except CliError as exc:
        return None, "", str(exc)
    handle = client.get_workflow_handle(run_id)
    try:
        description = await asyncio.wait_for(handle.describe(), QUERY_TIMEOUT_SECONDS)
    except Exception as exc:
        return None, "", "not found in Temporal" if _is_not_found(exc) else f"describe failed: {_describe_error(exc)}"
    execution = description.status.name.lower() if description.status is not None else ""
    if description.status == WorkflowExecutionStatus.TERMINATED:
        execution = "terminated"
    try:
        live = await asyncio.wait_for(handle.query("status", result_type=RunStatus), QUERY_TIMEOUT_SECONDS)
    except TimeoutError:
        return None, execution, f"status query timed out after {QUERY_TIMEOUT_SECONDS:g} s (is a worker running?)"
    except Exception as exc:
        return None, execution, f"status query failed: {_describe_error(exc)}"
    return live, execution, ""


@runs_app.command("show")
@_errors_to_exit
def runs_show(
    run_id: str = typer.Argument(..., help="the run id (its AutomationRun workflow id)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
) -> None:
    """A run's status and step trail: live from the workflow (query), else the recorded trail."""
    from sqlmodel import Session

    from core.db import Run

    settings = _settings()
    engine = _engine(settings)
    with Session(engine) as db:
        run = db.get(Run, run_id)
    live, execution, why = asyncio.run(_live_status(settings, engine, run_id))
    if run is None and live is None:
        _fail(f"run not found: {run_id!r}" + (f" ({why})" if why and "not found" not in why else ""))

    if live is not None:
        status, current_step, source = live.status, live.current_step, "workflow"
        trail = [dict(t.__dict__) for t in live.trail]
    else:
        assert run is not None
        status, current_step, source = run.status, "", "database"
        trail = list(run.trail or [])
    if execution in ("terminated", "canceled"):  # the workflow's own status does not know
        status = "cancelled" if execution == "canceled" else execution

    info: dict[str, Any] = {
        "id": run_id,
        "status": status,
        "current_step": current_step,
        "automation": f"{run.automation_id} v{run.version}" if run else f"{live.automation_id} v{live.version}",
        "contact": run.contact_id if run else "-",
        "channel": run.channel_id if run else "-",
        "workspace": run.workspace_id if run else "-",
        "started": _when(run.started_at) if run else "-",
        "ended": _when(run.ended_at) if run else "-",
        "trail_source": source,
    }
    if as_json:
        typer.echo(json.dumps({**info, "trail": trail}, indent=2))
        return
    console = _console()
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column(overflow="fold")
    for key, value in info.items():
        summary.add_row(key, str(value or "-"))
    console.print(summary)
    if source == "database" and why:
        console.print(f"[yellow]live status unavailable ({why}); showing the trail last recorded in the database[/]")
    trail_table = Table(title=f"trail ({len(trail)} step(s))", title_justify="left")
    for name in ("step", "type", "status", "at", "detail"):
        trail_table.add_column(name, overflow="fold")
    for entry in trail:
        trail_table.add_row(
            str(entry.get("step_id", "")), str(entry.get("type", "")), str(entry.get("status", "")),
            str(entry.get("at", "")), str(entry.get("detail", "")),
        )
    console.print(trail_table)



def _payloads_of(message: Any, found: list) -> None:
    """Every temporal.api.common.v1.Payload inside a protobuf message, in place."""
    from google.protobuf.descriptor import FieldDescriptor

    if message.DESCRIPTOR.full_name == "temporal.api.common.v1.Payload":
        found.append(message)
        return
    for field, value in message.ListFields():
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        if field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                for item in value.values():
                    _payloads_of(item, found)
        elif hasattr(value, "DESCRIPTOR"):  # a single message
            _payloads_of(value, found)
        else:  # a repeated message field
            for item in value:
                _payloads_of(item, found)


async def decoded_history(history: Any, codec: Any) -> Any:
    """A copy of a history with every payload decoded by ``codec`` (decrypted),
    so it replays without the keys, like the files in tests/histories."""
    from temporalio.api.history.v1 import History
    from temporalio.client import WorkflowHistory

    proto = History(events=list(history.events))  # copies the events
    payloads: list = []
    for event in proto.events:
        _payloads_of(event, payloads)
    if payloads:
        for target, plain in zip(payloads, await codec.decode(payloads), strict=True):
            target.CopyFrom(plain)
    return WorkflowHistory(history.workflow_id, list(proto.events))


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _inline_run_conversation(engine, run_id: str) -> str | None:
    """The conversation workflow id of a recorded run without a workflow of
    its own (a one-message flow), else None."""
    from sqlmodel import Session

    from core.contracts import conversation_workflow_id
    from core.db import Run

    with Session(engine) as db:
        run = db.get(Run, run_id)
    if run is None:
        return None
    return conversation_workflow_id(run.workspace_id, run.channel_id, run.contact_id)


async def _replay(settings, engine, run_id: str, out: Path | None, keep_encrypted: bool) -> str | None:
    """Replays the run; returns the replay failure (None when it replayed)."""
    from temporalio.worker import Replayer

    from workers.main import WORKFLOWS, workflow_runner

    keys = _keys(settings, engine)
    client = await _temporal(settings, keys)
    try:
        history = await client.get_workflow_handle(run_id).fetch_history()
    except Exception as exc:
        if not _is_not_found(exc):
            raise
        conversation = _inline_run_conversation(engine, run_id)
        if conversation is None:
            _fail(f"run not found: {run_id!r} has no workflow in Temporal (namespace {settings.temporal_namespace!r})")
        # A one-message flow completes inside its conversation workflow.
        typer.echo(f"the run completed inside its conversation: replaying {conversation}")
        history = await client.get_workflow_handle(conversation).fetch_history()
    if out is not None:
        saved = history if keep_encrypted else await decoded_history(history, client.data_converter.payload_codec)
        await asyncio.to_thread(_write_text, out, saved.to_json())
        typer.echo(f"history saved to {out} ({len(history.events)} events{', encrypted' if keep_encrypted else ''})")
    replayer = Replayer(workflows=WORKFLOWS, workflow_runner=workflow_runner("strict"), data_converter=client.data_converter)
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    if result.replay_failure is None:
        return None
    return f"{type(result.replay_failure).__name__}: {result.replay_failure}"


@runs_app.command("replay")
@_errors_to_exit
def runs_replay(
    run_id: str = typer.Argument(..., help="the run id (any workflow id works: conversations too)"),
    out: Path | None = typer.Option(
        None, "--out", "-o", dir_okay=False,
        help="save the history JSON here (payloads decrypted, so it replays in tests/histories without keys)",
    ),
    keep_encrypted: bool = typer.Option(False, "--keep-encrypted", help="save the payloads as stored (encrypted)"),
) -> None:
    """Fetch a workflow's history from Temporal and replay it on this code (non-determinism check)."""
    settings = _settings()
    failure = asyncio.run(_replay(settings, _engine(settings), run_id, out, keep_encrypted))
    if failure is None:
        typer.echo("replay OK")
        return
    typer.echo(f"replay FAILED: {failure}", err=True)
    raise typer.Exit(1)


# -- keys --------------------------------------------------------------------------


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    )


@keys_app.command("rotate")
@_errors_to_exit
def keys_rotate(
    check: bool = typer.Option(False, "--check", help="only count ciphertexts not under the primary key; exit 1 if any"),
    batch_size: int = typer.Option(200, "--batch-size", min=1),
) -> None:
    """Re-encrypt channel tokens, webhook secrets and data keys under the first key of VECTORY_MASTER_KEY.

    Idempotent and safe while the API and workers run (see core/rotation.py for the runbook).
    """
    from sqlalchemy import func
    from sqlmodel import Session, col, select

    from core.crypto import TokenVault
    from core.db import Channel, DataKey
    from core.rotation import RotationReport, count_stale, rotate_keys

    settings = _settings()
    engine = _engine(settings)
    vault = TokenVault(settings.keyring())
    primary = vault.primary_key_id
    console = _console()

    if check:
        stale = count_stale(engine, primary)
        if stale.total:
            kids = ", ".join(f"{kid}={n}" for kid, n in sorted(stale.key_ids.items()))
            console.print(
                f"{stale.total} ciphertext(s) not under primary key {primary!r}: tokens={stale.tokens} "
                f"secrets={stale.secrets} data_keys={stale.data_keys} (by key: {kids})"
            )
            raise typer.Exit(1)
        console.print(f"ok: every ciphertext is under primary key {primary!r}")
        return

    with Session(engine) as db:
        totals = {
            "channel": db.exec(
                select(func.count()).select_from(Channel).where(
                    col(Channel.token_ciphertext).is_not(None) | col(Channel.webhook_secret_ciphertext).is_not(None)
                )
            ).one(),
            "datakey": db.exec(select(func.count()).select_from(DataKey).where(col(DataKey.wrapped).is_not(None))).one(),
        }
    console.print(f"rotating to primary key {primary!r}")
    with _progress(_console(stderr=True)) as bar:
        tasks = {name: bar.add_task(name, total=total) for name, total in totals.items()}

        def advance(table: str, scanned: int, _report: RotationReport) -> None:
            bar.update(tasks[table], completed=scanned, total=max(scanned, totals[table]))

        report = rotate_keys(engine, vault, batch_size=batch_size, progress=advance)
    console.print(f"done: {report.summary()}")
    for failure in report.failures:
        console.print(f"failed: {failure}")
    if report.failures:
        raise typer.Exit(1)


# -- workspace ---------------------------------------------------------------------


@workspace_app.command("export")
@_errors_to_exit
def workspace_export(
    workspace_id: str = typer.Argument(...),
    out: Path = typer.Option(..., "--out", "-o", dir_okay=False, help="the ZIP file to write"),
) -> None:
    """The same archive as GET /v1/workspace/export: one <table>.jsonl per table and a manifest.json."""
    from sqlmodel import Session

    from core.audit import audit_now
    from core.db import Workspace
    from core.personal_data import write_workspace_zip

    settings = _settings()
    engine = _engine(settings)
    with Session(engine) as db:
        if db.get(Workspace, workspace_id) is None:
            _fail(f"workspace not found: {workspace_id!r}")
    audit_now(engine, workspace_id, "operator", "workspace.export", workspace_id)

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    try:
        with partial.open("wb") as handle, _progress(_console(stderr=True)) as bar:
            tasks: dict[str, Any] = {}

            def advance(table: str, written: int, total: int) -> None:
                if table not in tasks:
                    tasks[table] = bar.add_task(table, total=total)
                bar.update(tasks[table], completed=written, total=total)

            *_, counts = write_workspace_zip(engine, workspace_id, handle, progress=advance)
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    typer.echo(f"exported {sum(counts.values())} row(s) from {len(counts)} table(s) to {out}")


# -- inbox -------------------------------------------------------------------------


@inbox_app.command("dead-letters")
@_errors_to_exit
def inbox_dead_letters(
    workspace: str | None = typer.Option(None, "--workspace", "-w", help="only this workspace's dead letters"),
    limit: int = typer.Option(100, "--limit", "-n", min=1, max=10000),
    as_json: bool = typer.Option(False, "--json", help="JSON lines instead of a table"),
) -> None:
    """Inbox events Temporal refused for good, oldest first, with the reason (never their content)."""
    from sqlmodel import Session, col, select

    from core.db import DeadLetter

    query = select(DeadLetter)
    if workspace:
        query = query.where(DeadLetter.workspace_id == workspace)
    with Session(_engine(_settings())) as db:
        rows = db.exec(query.order_by(col(DeadLetter.id)).limit(limit)).all()
    if as_json:
        for row in rows:
            typer.echo(json.dumps({
                "id": row.id, "workspace_id": row.workspace_id, "channel_id": row.channel_id,
                "contact_id": row.contact_id, "event_id": row.event_id, "kind": row.event.get("kind", ""),
                "reason": row.reason, "received_at": _iso(row.created_at),
                "dead_lettered_at": _iso(row.dead_lettered_at),
            }))
        return
    console = _console()
    if not rows:
        console.print("no dead letters")
        return
    table = Table(title=f"dead letters ({len(rows)})", title_justify="left")
    for name in ("id", "workspace", "channel", "contact", "kind", "reason"):
        table.add_column(name, overflow="fold")
    table.add_column("received (UTC)", no_wrap=True)
    for row in rows:
        table.add_row(
            str(row.id), row.workspace_id, row.channel_id, row.contact_id, str(row.event.get("kind", "")),
            row.reason, _when(row.created_at),
        )
    console.print(table)


@inbox_app.command("retry")
@_errors_to_exit
def inbox_retry(
    ids: list[int] | None = typer.Argument(None, help="dead letter ids (from `vectory inbox dead-letters`)"),
    all_: bool = typer.Option(False, "--all", help="every dead letter (of --workspace)"),
    workspace: str | None = typer.Option(None, "--workspace", "-w", help="with --all: only this workspace's"),
) -> None:
    """Move dead letters back into the inbox: the API's relay hands them to Temporal again within a second
    (one refused again becomes a dead letter again)."""
    from api.inbox import requeue_dead_letters

    if bool(ids) == all_:
        _fail("give dead letter ids or --all")
    if workspace and not all_:
        _fail("--workspace goes with --all")
    moved = requeue_dead_letters(_engine(_settings()), ids=None if all_ else ids, workspace_id=workspace)
    missing = sorted(set(ids or []) - set(moved))
    typer.echo(f"moved {len(moved)} dead letter(s) back to the inbox")
    if missing:
        _fail(f"no dead letter with id {', '.join(map(str, missing))}")


# -- migrate -----------------------------------------------------------------------


@app.command("migrate")
@_errors_to_exit
def migrate_command() -> None:
    """Upgrade the database (VECTORY_DATABASE_URL) to the newest schema (alembic upgrade head)."""
    from sqlalchemy.engine import make_url

    from core.db import head_revisions, migrate

    settings = _settings()
    migrate(settings.database_url)
    url = make_url(settings.database_url).render_as_string(hide_password=True)
    typer.echo(f"database at {url} is at {', '.join(head_revisions())} (head)")


if __name__ == "__main__":
    app()
