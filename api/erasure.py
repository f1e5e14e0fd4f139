"""Start erasure jobs (idempotent): API deletes and Meta callbacks share this."""

from __future__ import annotations

import secrets

from sqlmodel import Session, col, select
from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy

from core.audit import audit
from core.contracts import ERASURE_WORKFLOWS, EraseInput
from core.db import ErasureJob
from core.settings import Settings
from workflows.common import search_attributes


def new_job_id() -> str:
    """An erasure job's id, also its status page's code: 80 random bits, so
    nobody finds a job's page by trying codes."""
    return f"er_{secrets.token_hex(10)}"


def status_url(public_url: str, job_id: str) -> str:
    """The job's status page (``GET /privacy/deletions/{code}``): no API key
    needed, so it answers after a workspace erasure too."""
    return f"{public_url.rstrip('/')}/privacy/deletions/{job_id}"


def existing_job(session: Session, workspace_id: str, scope: str, target: str) -> ErasureJob | None:
    """The latest erasure job of a target that did not fail, if any."""
    return session.exec(
        select(ErasureJob)
        .where(
            ErasureJob.workspace_id == workspace_id,
            ErasureJob.scope == scope,
            ErasureJob.target == target,
            ErasureJob.status != "failed",
        )
        .order_by(col(ErasureJob.created_at).desc())
    ).first()


async def start_erasure(
    temporal: Client,
    settings: Settings,
    session: Session,
    *,
    workspace_id: str,
    scope: str,
    target: str,
    source: str,
    actor: str,
    contact_id: str = "",
    channel_ids: list[str] | None = None,
    holds_data: bool = False,
) -> tuple[ErasureJob, bool]:
    """Return (job, created). A target already being or having been erased
    returns its existing job instead of starting another; a job still
    pending (its workflow never started: Temporal was unreachable when it was
    asked for) has its workflow started now, so asking again after a 503
    really erases. ``holds_data``: the target holds data now (a person who
    wrote again after their erasure, a reconnected account): a completed
    job does not answer for it, a new one erases it."""
    existing = existing_job(session, workspace_id, scope, target)
    if existing is not None and not (existing.status == "completed" and holds_data):
        if existing.status == "pending":
            await _start(temporal, settings, existing, contact_id, channel_ids)
        return existing, False
    job = ErasureJob(
        id=new_job_id(), workspace_id=workspace_id, scope=scope, target=target, source=source
    )
    session.add(job)
    audit(session, workspace_id, actor, f"{scope}.erase.requested", target=job.id, detail=f"source={source}")
    session.commit()
    await _start(temporal, settings, job, contact_id, channel_ids)
    return job, True


async def _start(
    temporal: Client, settings: Settings, job: ErasureJob, contact_id: str, channel_ids: list[str] | None
) -> None:
    """Start the job's workflow; one already running is left as it is."""
    await temporal.start_workflow(
        ERASURE_WORKFLOWS[job.scope],
        EraseInput(
            job_id=job.id,
            workspace_id=job.workspace_id,
            scope=job.scope,
            contact_id=contact_id,
            channel_ids=list(channel_ids or []),
        ),
        id=f"erase/{job.id}",
        task_queue=settings.task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        search_attributes=search_attributes(job.workspace_id),
    )
