"""FastAPI dependencies: settings, database session, Temporal client, auth.

Dependencies that never block are ``async def``: FastAPI runs a plain
``def`` dependency on its thread pool, a thread hop per request."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Query, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session, func, select
from sqlmodel.sql.expression import SelectOfScalar
from temporalio.client import Client

from core.crypto import TokenVault, constant_time_equals, hash_api_key
from core.db import Workspace
from core.settings import Settings

bearer = HTTPBearer(auto_error=False, description="Workspace API key (or the admin token for /v1/workspaces)")


async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    with Session(request.app.state.engine, expire_on_commit=False) as session:
        yield session


async def get_temporal(request: Request) -> Client:
    client = request.app.state.temporal
    if client is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "Temporal is not reachable; try again shortly")
    return client


async def get_vault(request: Request) -> TokenVault:
    return request.app.state.vault


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_session)]
# Past any real list (beyond it SQLite overflows: a 500); list routes bound their offset with it.
MAX_OFFSET = 10_000_000
MAX_PAGE_SIZE = 500
DEFAULT_PAGE_SIZE = 50
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description=f"Page size (at most {MAX_PAGE_SIZE}).")]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Rows of the list to skip.")]
COUNT_DESCRIPTION = "All that match the filters; `data` is the page (`limit`, `offset`)."


def paged(session: Session, query: SelectOfScalar, order: list, limit: int, offset: int) -> tuple[list, int]:
    """One page of ``query``'s rows in ``order`` (which must end with a
    unique column, so pages neither overlap nor skip), and how many match:
    both counted and cut by the database, never by loading every row."""
    total = session.exec(select(func.count()).select_from(query.order_by(None).subquery())).one()
    rows = session.exec(query.order_by(*order).offset(offset).limit(limit)).all()
    return list(rows), total


TemporalDep = Annotated[Client, Depends(get_temporal)]
VaultDep = Annotated[TokenVault, Depends(get_vault)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"})


def current_workspace(credentials: Credentials, session: SessionDep, request: Request) -> Workspace:
    if credentials is None or not credentials.credentials:
        raise _unauthorized("missing API key: send 'Authorization: Bearer <api key>'")
    workspace = session.exec(
        select(Workspace).where(Workspace.api_key_hash == hash_api_key(credentials.credentials))
    ).first()
    if workspace is None:
        raise _unauthorized("invalid API key")
    if workspace.status == "erasing" and request.method not in ("GET", "HEAD", "DELETE"):
        # Nothing new while its data is being deleted (a channel connected
        # now could outlive the erasure); reading, exporting and asking for
        # the erasure again still work.
        raise HTTPException(status.HTTP_409_CONFLICT, "the workspace is being erased")
    return workspace


async def require_admin(credentials: Credentials, settings: SettingsDep) -> None:
    if credentials is None or not constant_time_equals(credentials.credentials, settings.admin_token):
        raise _unauthorized("this endpoint needs the admin token (VECTORY_ADMIN_TOKEN)")


CurrentWorkspace = Annotated[Workspace, Depends(current_workspace)]
AdminDep = Annotated[None, Depends(require_admin)]
