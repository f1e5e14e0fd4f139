"""Meta's privacy callbacks and the deletion status page.

- ``POST /webhooks/meta/deauthorize``: a person removed our app; disconnect
  (revoke, delete the token, stop workflows) every channel of theirs.
- ``POST /webhooks/meta/data-deletion``: a person asked Meta to delete their
  data; erase every channel of theirs (contacts and messages go with them)
  and answer with a status page URL and a confirmation code.
- ``GET /privacy/deletions/{code}``: that status page, for the person, and
  the ``status_url`` of every erasure the API starts (a contact, a
  workspace): it answers after the workspace is erased and its API key is
  dead. It shows a status and times only: no workspace, no user id, no
  personal data. The code is the job's id, 80 random bits (``api/erasure.py``).

Both callbacks carry a ``signed_request`` (``<b64url sig>.<b64url JSON>``,
HMAC-SHA256 of the payload part with the app secret). A forged, expired or
malformed one is refused with 400 and changes nothing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import html
import json
import logging
import re
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field
from sqlmodel import Session, col, or_, select
from temporalio.client import Client
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from api.deps import SessionDep
from api.erasure import new_job_id, start_erasure, status_url
from api.routes.channels import start_disconnect
from api.webhook_path import read_limited_body
from core.audit import audit
from core.db import Channel, ErasureJob

log = logging.getLogger("vectory.privacy")

router = APIRouter(tags=["privacy"])

META_PLATFORMS = ("instagram", "messenger")
ACTOR = "platform:meta"
SOURCE = "meta_data_deletion"
FUTURE_SKEW_SECONDS = 300
MAX_CALLBACK_BODY_BYTES = 64 * 1024
_B64URL = re.compile(r"^[A-Za-z0-9_-]+={0,2}$")
_CODE = re.compile(r"^er_[0-9a-f]{20}$")


class DeletionAnswer(BaseModel):
    url: str = Field(description="The status page of the request (`GET /privacy/deletions/{code}`).")
    confirmation_code: str


class SignedRequestError(ValueError):
    """The signed_request is malformed, forged or expired."""


def _b64url_decode(part: str, what: str) -> bytes:
    if not part or not _B64URL.match(part):
        raise SignedRequestError(f"malformed signed_request: the {what} is not base64url")
    stripped = part.rstrip("=")
    try:
        return base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))
    except (binascii.Error, ValueError):
        raise SignedRequestError(f"malformed signed_request: the {what} is not valid base64url") from None


def parse_signed_request(
    signed_request: str, app_secret: str, *, max_age_seconds: int = 86400, now: float | None = None
) -> dict:
    """Verify and decode a Meta ``signed_request``; return its JSON payload.

    The signature is HMAC-SHA256 with the app secret over the payload part
    exactly as received (the base64url text), compared in constant time.
    Raises ``SignedRequestError`` with the reason otherwise.
    """
    if not isinstance(signed_request, str) or not signed_request.strip():
        raise SignedRequestError("malformed signed_request: empty")
    if not app_secret:
        raise SignedRequestError("no app secret configured to verify the signed_request")
    parts = signed_request.strip().split(".")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise SignedRequestError("malformed signed_request: expected '<signature>.<payload>'")
    sig_part, payload_part = parts
    signature = _b64url_decode(sig_part, "signature")
    payload_bytes = _b64url_decode(payload_part, "payload")
    try:
        signed_bytes = payload_part.encode("ascii")
    except UnicodeEncodeError:  # pragma: no cover - excluded by the base64url check
        raise SignedRequestError("malformed signed_request: the payload is not ASCII") from None
    expected = hmac.new(app_secret.encode(), signed_bytes, hashlib.sha256).digest()
    if not hmac.compare_digest(signature, expected):
        raise SignedRequestError("invalid signature")
    try:
        payload = json.loads(payload_bytes)
    except (ValueError, UnicodeDecodeError):
        raise SignedRequestError("malformed signed_request: the payload is not JSON") from None
    if not isinstance(payload, dict):
        raise SignedRequestError("malformed signed_request: the payload is not a JSON object")
    algorithm = payload.get("algorithm")
    if not isinstance(algorithm, str) or algorithm.upper() != "HMAC-SHA256":
        raise SignedRequestError(f"unsupported algorithm {algorithm!r}: expected 'HMAC-SHA256'")
    user_id = payload.get("user_id")
    if not isinstance(user_id, str) or not user_id.strip():
        raise SignedRequestError("malformed signed_request: user_id (a string) is required")
    if "issued_at" in payload:
        issued_at = payload["issued_at"]
        if isinstance(issued_at, bool) or not isinstance(issued_at, int | float):
            raise SignedRequestError("malformed signed_request: issued_at is not a unix timestamp")
        current = time.time() if now is None else now
        if current - issued_at > max_age_seconds:
            raise SignedRequestError(f"signed_request expired: issued more than {max_age_seconds} s ago")
        if issued_at - current > FUTURE_SKEW_SECONDS:
            raise SignedRequestError("signed_request expired: issued_at lies more than 5 minutes in the future")
    return payload


def user_digest(user_id: str, key: str) -> str:
    """The Meta user id as kept in a deletion request's record: a keyed
    digest (HMAC-SHA256 with the app secret), so the record of an erasure
    keeps no id that could be matched against a list of known ids by anyone
    without the secret (a plain hash of a numeric id can be)."""
    return hmac.new(key.encode(), f"meta-user:{user_id}".encode(), hashlib.sha256).hexdigest()[:16]


def deletion_target(user_id: str, key: str) -> str:
    return f"meta-user:{user_digest(user_id, key)}"


async def _verified_user_id(request: Request) -> str:
    """Read the form field ``signed_request`` and verify it (400 otherwise).

    The urlencoded body is parsed here rather than with ``request.form()``,
    which needs the python-multipart package."""
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type and content_type != "application/x-www-form-urlencoded":
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, "send signed_request as application/x-www-form-urlencoded"
        )
    body = await read_limited_body(request, MAX_CALLBACK_BODY_BYTES)
    try:
        fields = parse_qs(body.decode("ascii"), keep_blank_values=True, max_num_fields=20)
    except (UnicodeDecodeError, ValueError):
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "malformed form body") from None
    values = fields.get("signed_request")
    if not values or not values[0]:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "missing form field signed_request")
    try:
        payload = parse_signed_request(values[0], request.app.state.settings.meta_app_secret)
    except SignedRequestError as exc:
        log.warning("refused a Meta privacy callback: %s", exc)
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from None
    return payload["user_id"].strip()


def _temporal(request: Request) -> Client:
    client = request.app.state.temporal
    if client is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "temporarily unavailable; retry")
    return client


def _channels_of(session: Session, user_id: str, *, include_disconnected: bool) -> list[Channel]:
    query = select(Channel).where(
        col(Channel.platform).in_(META_PLATFORMS),
        or_(Channel.platform_user_id == user_id, Channel.external_id == user_id),
    )
    if not include_disconnected:
        query = query.where(Channel.status != "disconnected")
    return list(session.exec(query.order_by(col(Channel.created_at), col(Channel.id))).all())


@router.post(
    "/webhooks/meta/deauthorize",
    operation_id="meta_deauthorize_callback",
    summary="Meta Deauthorize callback: disconnect the person's channels",
    description=(
        "Form field `signed_request`. Starts the DisconnectChannel workflow for every Instagram/Messenger "
        "channel of that Meta user, in any workspace, without waiting. 400 when forged, expired or malformed."
    ),
)
async def meta_deauthorize(request: Request, session: SessionDep) -> dict[str, Any]:
    user_id = await _verified_user_id(request)
    channels = _channels_of(session, user_id, include_disconnected=False)
    if not channels:
        return {"status": "ok", "channels": 0}
    temporal = _temporal(request)
    settings = request.app.state.settings
    for channel in channels:
        try:
            await start_disconnect(temporal, settings.task_queue, channel)
        except WorkflowAlreadyStartedError:
            pass  # already disconnecting (or done): nothing more to start
        except RPCError as err:
            log.error("temporal unavailable while disconnecting channel %s: %s", channel.id, err.status)
            session.commit()  # keep the audit entries of channels already handled
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "temporarily unavailable; retry") from None
        audit(session, channel.workspace_id, ACTOR, "channel.deauthorized", target=channel.id)
    session.commit()
    return {"status": "ok", "channels": len(channels)}


def _status_url(request: Request, code: str) -> str:
    return status_url(request.app.state.settings.public_url, code)


def _record_nothing_held(session: Session, target: str) -> ErasureJob:
    existing = session.exec(
        select(ErasureJob)
        .where(ErasureJob.scope == "platform_user", ErasureJob.target == target, ErasureJob.source == SOURCE)
        .order_by(col(ErasureJob.created_at))
    ).first()
    if existing is not None:
        return existing
    now = datetime.now(UTC)
    job = ErasureJob(
        id=new_job_id(),
        workspace_id="",
        scope="platform_user",
        target=target,
        source=SOURCE,
        status="completed",
        detail="no data held for this user",
        created_at=now,
        completed_at=now,
    )
    session.add(job)
    audit(session, "", ACTOR, "platform_user.erase.requested", target=job.id, detail=f"source={SOURCE}; no data held")
    session.commit()
    return job


@router.post(
    "/webhooks/meta/data-deletion",
    operation_id="meta_data_deletion_callback",
    summary="Meta Data Deletion Request callback: erase the person's data",
    description=(
        "Form field `signed_request`. Starts an erasure job per workspace holding channels of that Meta user "
        "(idempotent) and answers `{url, confirmation_code}` for the status page. 400 when forged or expired."
    ),
)
async def meta_data_deletion(request: Request, session: SessionDep) -> DeletionAnswer:
    user_id = await _verified_user_id(request)
    base_target = deletion_target(user_id, request.app.state.settings.meta_app_secret)
    channels = _channels_of(session, user_id, include_disconnected=True)
    if not channels:
        job = _record_nothing_held(session, base_target)
        return DeletionAnswer(url=_status_url(request, job.id), confirmation_code=job.id)
    temporal = _temporal(request)
    settings = request.app.state.settings
    by_workspace: dict[str, list[str]] = {}
    for channel in channels:
        by_workspace.setdefault(channel.workspace_id, []).append(channel.id)
    jobs: list[ErasureJob] = []
    for workspace_id in sorted(by_workspace):
        try:
            job, _created = await start_erasure(
                temporal,
                settings,
                session,
                workspace_id=workspace_id,
                scope="channels",
                # One job per workspace: start_erasure dedupes on (scope, target).
                target=f"{base_target}:{workspace_id}",
                source=SOURCE,
                actor=ACTOR,
                channel_ids=by_workspace[workspace_id],
                holds_data=True,  # these channels are there now: a job done before does not answer for them
            )
        except RPCError as err:
            log.error("temporal unavailable while starting a Meta data deletion: %s", err.status)
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "temporarily unavailable; retry") from None
        jobs.append(job)
    first = min(jobs, key=lambda j: (_aware(j.created_at), j.id))
    return DeletionAnswer(url=_status_url(request, first.id), confirmation_code=first.id)


def _aware(value: datetime | None) -> datetime:
    if value is None:
        return datetime.min.replace(tzinfo=UTC)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else _aware(value).isoformat()


def aggregate_status(jobs: list[ErasureJob]) -> tuple[str, datetime | None]:
    """One request's status over its jobs (one per workspace): failed if any
    failed, completed when all completed, running when any started."""
    statuses = {j.status for j in jobs}
    if "failed" in statuses:
        return "failed", None
    if statuses == {"completed"}:
        done = [j.completed_at for j in jobs if j.completed_at is not None]
        return "completed", max((_aware(d) for d in done), default=None)
    if statuses & {"running", "completed"}:
        return "running", None
    return "pending", None


def _request_jobs(session: Session, job: ErasureJob) -> list[ErasureJob]:
    """The jobs of the request behind a code: one per workspace holding the
    Meta user's channels (targets ``meta-user:<digest>:<workspace id>``),
    the newest per target (a failed job is superseded by its retry)."""
    if job.scope != "channels" or job.source != SOURCE or job.target.count(":") != 2:
        return [job]
    base = job.target.rsplit(":", 1)[0]
    rows = session.exec(
        select(ErasureJob).where(
            ErasureJob.scope == "channels",
            ErasureJob.source == SOURCE,
            col(ErasureJob.target).startswith(f"{base}:"),
        )
    ).all()
    newest: dict[str, ErasureJob] = {job.target: job}
    for row in rows:
        current = newest.get(row.target)
        if current is None or (_aware(row.created_at), row.id) > (_aware(current.created_at), current.id):
            newest[row.target] = row
    return list(newest.values())


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>Deletion request {code}</title></head>
<body style="font-family: system-ui, sans-serif; max-width: 40rem; margin: 3rem auto; padding: 0 1rem">
<h1>Deletion request {code}: {status}</h1>
<p>{explanation}</p>
<dl>
<dt>Requested</dt><dd>{created}</dd>
<dt>Completed</dt><dd>{completed}</dd>
</dl>
</body></html>
"""

_EXPLANATIONS = {
    "pending": "Your request has been received and is waiting to be processed.",
    "running": "Your data is being deleted.",
    "completed": "Your data has been deleted.",
    "failed": "Deleting your data has not finished because of a problem. Please check back later.",
}


@router.get(
    "/privacy/deletions/{code}",
    operation_id="deletion_status",
    summary="Status page of an erasure: a Meta data deletion request, or the `status_url` of an API erasure",
    description=(
        "No API key: it answers after the workspace is erased too. HTML for the person; `?format=json` or "
        "`Accept: application/json` for JSON. 404 for unknown codes."
    ),
    response_class=HTMLResponse,
    responses={200: {"content": {"application/json": {}}}, 404: {"description": "unknown code"}},
)
def deletion_status(code: str, request: Request, session: SessionDep):
    job = session.get(ErasureJob, code) if _CODE.match(code) else None
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "unknown deletion request")
    state, completed_at = aggregate_status(_request_jobs(session, job))
    body = {
        "confirmation_code": job.id,
        "status": state,
        "created_at": _iso(job.created_at),
        "completed_at": _iso(completed_at),
    }
    wants_json = request.query_params.get("format", "").lower() == "json" or (
        "application/json" in request.headers.get("accept", "").lower()
    )
    if wants_json:
        return JSONResponse(body, headers={"Cache-Control": "no-store"})
    page = _PAGE.format(
        code=html.escape(job.id),
        status=html.escape(state),
        explanation=html.escape(_EXPLANATIONS.get(state, "")),
        created=html.escape(body["created_at"] or "-"),
        completed=html.escape(body["completed_at"] or "not yet"),
    )
    return HTMLResponse(page, headers={"Cache-Control": "no-store"})
