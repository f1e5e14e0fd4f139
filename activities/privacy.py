"""Privacy activities: erasure (stop, purge, crypto-shred) and retention.

Every activity here is idempotent, so an erasure interrupted by a crash
resumes where it stopped and a second erasure of the same subject is a
no-op.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, text
from sqlmodel import Session, col, select
from temporalio import activity
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.workflowservice.v1 import DeleteWorkflowExecutionRequest
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from core.audit import audit
from core.codec import KeyStore
from core.contracts import (
    CONVERSATION_WORKFLOW,
    EraseStepInput,
    ExpireHistorySignal,
    JobStatusInput,
    RetentionInput,
    RetentionResult,
    StopWorkflowsResult,
    conversation_workflow_id,
)
from core.db import (
    Channel,
    Contact,
    ErasureJob,
    Run,
    Workspace,
    utcnow,
)
from core.personal_data import OPEN_RUN_STATES, Subject, erasure_statements, retention_statements


class PrivacyActivities:
    def __init__(self, engine: Engine, keys: KeyStore, temporal: Client | None = None):
        self.engine = engine
        self.keys = keys
        self.temporal = temporal

    # -- job bookkeeping ---------------------------------------------------------

    @activity.defn(name="set_erasure_status")
    def set_erasure_status(self, input: JobStatusInput) -> None:
        with Session(self.engine) as db:
            job = db.get(ErasureJob, input.job_id)
            if job is None:
                return
            job.status = input.status
            job.detail = input.detail[:500]
            if input.status in ("completed", "failed"):
                job.completed_at = utcnow()
                audit(db, job.workspace_id, "worker", f"{job.scope}.erase.{input.status}", target=job.id)
            db.add(job)
            db.commit()

    @activity.defn(name="list_erasure_channels")
    def list_erasure_channels(self, input: EraseStepInput) -> list[str]:
        if input.scope != "workspace":
            return list(input.channel_ids)
        with Session(self.engine) as db:
            return list(db.exec(select(Channel.id).where(Channel.workspace_id == input.workspace_id)).all())

    # -- stop ------------------------------------------------------------------------

    def _subject_contacts(self, db: Session, input: EraseStepInput) -> list[Contact]:
        query = select(Contact)
        if input.scope == "contact":
            query = query.where(Contact.id == input.contact_id)
        elif input.scope == "channels":
            query = query.where(col(Contact.channel_id).in_(input.channel_ids or [""]))
        else:
            query = query.where(Contact.workspace_id == input.workspace_id)
        return list(db.exec(query).all())

    def _workflow_ids(self, input: EraseStepInput) -> list[str]:
        with Session(self.engine) as db:
            contacts = self._subject_contacts(db, input)
            contact_ids = [c.id for c in contacts] or [""]
            runs = db.exec(
                select(Run.id).where(col(Run.contact_id).in_(contact_ids), col(Run.status).in_(OPEN_RUN_STATES))
            ).all()
            conversations = [conversation_workflow_id(c.workspace_id, c.channel_id, c.id) for c in contacts]
            return list(runs) + conversations

    @activity.defn(name="stop_subject_workflows")
    async def stop_subject_workflows(self, input: EraseStepInput) -> StopWorkflowsResult:
        """Terminate the subject's conversations and runs (and, for a
        workspace, anything else still running under its id)."""
        if self.temporal is None:
            raise RuntimeError("no Temporal client configured")
        ids = await asyncio.to_thread(self._workflow_ids, input)
        if input.scope == "workspace":
            query = f"WorkspaceId = '{_quoted(input.workspace_id)}' AND ExecutionStatus = 'Running'"
            try:
                async for wf in self.temporal.list_workflows(query):
                    if not wf.id.startswith("erase/") and wf.id not in ids:
                        ids.append(wf.id)
            except RPCError as err:  # visibility without our search attributes: DB ids suffice
                activity.logger.warning("visibility query failed: %s", err.status)
        stopped = 0
        for workflow_id in ids:
            activity.heartbeat(stopped)
            try:
                await self.temporal.get_workflow_handle(workflow_id).terminate(reason="erasure requested")
                stopped += 1
            except RPCError as err:
                if err.status != RPCStatusCode.NOT_FOUND:
                    raise
        deleted = 0
        if input.scope in ("contact", "channels"):
            deleted = await self._delete_histories(input, ids)
        return StopWorkflowsResult(stopped=stopped, histories_deleted=deleted)

    async def _delete_histories(self, input: EraseStepInput, stopped_ids: list[str]) -> int:
        """Delete the subject's executions from Temporal: the ones just
        stopped and every closed one (finished runs, a conversation's earlier
        runs before continue-as-new, a channel's broadcasts). Their payloads
        hold the person's messages, and the workspace's key still decodes
        them: without this they stayed readable until the namespace's
        retention. A workspace's histories are crypto-shredded instead
        (``destroy_workspace_keys``)."""
        assert self.temporal is not None
        if input.scope == "contact":
            query = f"ContactId = '{_quoted(input.contact_id)}'"
        else:
            query = " OR ".join(f"ChannelId = '{_quoted(c)}'" for c in input.channel_ids if c)
        executions = {(workflow_id, "") for workflow_id in stopped_ids}
        if query:
            try:
                async for wf in self.temporal.list_workflows(f"({query}) AND ExecutionStatus != 'Running'"):
                    if not wf.id.startswith("erase/"):
                        executions.add((wf.id, wf.run_id or ""))
            except RPCError as err:  # visibility without our search attributes: the stopped ones still go
                activity.logger.warning("visibility query failed: %s", err.status)
        return await self._delete_executions(sorted(executions))

    async def _delete_executions(self, executions: list[tuple[str, str]]) -> int:
        """Delete executions (workflow id, run id; an empty run id: the
        latest run) from Temporal; ones already gone count for nothing."""
        assert self.temporal is not None
        deleted = 0
        for workflow_id, run_id in executions:
            activity.heartbeat(deleted)
            try:
                await self.temporal.workflow_service.delete_workflow_execution(
                    DeleteWorkflowExecutionRequest(
                        namespace=self.temporal.namespace,
                        workflow_execution=WorkflowExecution(workflow_id=workflow_id, run_id=run_id),
                    )
                )
                deleted += 1
            except RPCError as err:
                if err.status != RPCStatusCode.NOT_FOUND:
                    raise
        return deleted

    # -- purge -----------------------------------------------------------------------

    @activity.defn(name="purge_subject")
    def purge_subject(self, input: EraseStepInput) -> dict[str, int]:
        """Delete the subject's rows, as the personal-data map says
        (core/personal_data.py). Audit entries keep only non-personal facts:
        entries that named an erased contact lose that target."""
        subject = Subject(input.scope, input.workspace_id, input.contact_id, tuple(input.channel_ids))
        counts: dict[str, int] = {}
        with Session(self.engine) as db:
            for name, statement in erasure_statements(db, subject):
                counts[name] = counts.get(name, 0) + (db.exec(statement).rowcount or 0)  # type: ignore[call-overload]
            db.commit()
            if self.engine.dialect.name == "sqlite":
                db.exec(text("PRAGMA wal_checkpoint(TRUNCATE)"))  # type: ignore[call-overload]
        return counts

    @activity.defn(name="destroy_workspace_keys")
    def destroy_workspace_keys(self, input: EraseStepInput) -> int:
        """Crypto-shred: the workspace's remaining Temporal histories become
        undecodable ("key destroyed")."""
        return self.keys.destroy(input.workspace_id)

    # -- retention -------------------------------------------------------------------

    def _retention_periods(self) -> list[tuple[str, int]]:
        with Session(self.engine) as db:
            return [(w, d) for w, d in db.exec(select(Workspace.id, Workspace.retention_days)).all()]

    @activity.defn(name="retention_sweep")
    def retention_sweep(self, input: RetentionInput) -> RetentionResult:
        """Delete messages, dead letters (by when they were received) and
        closed-run records older than each workspace's retention period."""
        now = datetime.fromisoformat(input.now_iso)
        result = RetentionResult()
        with Session(self.engine) as db:
            for workspace_id, days in self._retention_periods():
                for name, statement in retention_statements(workspace_id, now - timedelta(days=days)):
                    deleted = db.exec(statement).rowcount or 0  # type: ignore[call-overload]
                    setattr(result, f"{name}_deleted", getattr(result, f"{name}_deleted") + deleted)
            db.commit()
        return result

    @activity.defn(name="expire_histories")
    async def expire_histories(self, input: RetentionInput) -> RetentionResult:
        """Temporal's part of retention: a history holds the messages of its
        run, so per workspace, conversations whose run started before the
        cutoff are asked to continue as new (``ExpireHistorySignal``), and
        closed executions that started before it (conversations' earlier
        runs, automation runs, broadcasts) are deleted, whatever the
        namespace's own retention. Other executions still running since
        before the cutoff (a flow waiting longer than the period) are
        counted: they keep their input until they end."""
        if self.temporal is None:
            raise RuntimeError("no Temporal client configured")
        now = datetime.fromisoformat(input.now_iso)
        result = RetentionResult()
        for workspace_id, days in await asyncio.to_thread(self._retention_periods):
            cutoff = now - timedelta(days=days)
            scope = f"WorkspaceId = '{_quoted(workspace_id)}' AND StartTime < '{_rfc3339(cutoff)}'"
            signal = ExpireHistorySignal(cutoff_epoch_seconds=cutoff.timestamp())
            try:
                async for wf in self.temporal.list_workflows(f"{scope} AND ExecutionStatus = 'Running'"):
                    activity.heartbeat(result.conversations_rotated)
                    if wf.workflow_type != CONVERSATION_WORKFLOW:
                        result.running_past_period += 1
                        continue
                    try:
                        await self.temporal.get_workflow_handle(wf.id, run_id=wf.run_id).signal(
                            "expire_history", signal
                        )
                        result.conversations_rotated += 1
                    except RPCError as err:
                        if err.status != RPCStatusCode.NOT_FOUND:  # closed meanwhile: the next round deletes it
                            raise
                closed = [
                    (wf.id, wf.run_id or "")
                    async for wf in self.temporal.list_workflows(f"{scope} AND ExecutionStatus != 'Running'")
                ]
            except RPCError as err:
                if err.status != RPCStatusCode.INVALID_ARGUMENT:
                    raise
                # Visibility without our search attributes: nothing to select by.
                activity.logger.warning("visibility query failed: %s", err.status)
                return result
            result.histories_deleted += await self._delete_executions(closed)
        return result


def _rfc3339(moment: datetime) -> str:
    """A time in a visibility query."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _quoted(value: str) -> str:
    """A value inside a single-quoted visibility query string."""
    return value.replace("\\", "\\\\").replace("'", "\\'")
