"""Database engine and SQLModel tables.

SQLite (embedded default) and PostgreSQL run the same code. Secrets are
stored only as vault ciphertext (``core.crypto``); API keys only as a hash.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    Engine,
    Index,
    Text,
    UniqueConstraint,
    delete,
    event,
    func,
    insert,
    inspect,
)
from sqlalchemy import false as sa_false
from sqlalchemy.orm import Session as OrmSession
from sqlmodel import Field, Session, SQLModel, create_engine, select


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


class Workspace(SQLModel, table=True):
    id: str = Field(primary_key=True)
    name: str
    api_key_hash: str = Field(index=True, unique=True)
    # Message log and closed-run records older than this are deleted daily.
    retention_days: int = 90
    # Attestation at creation: a business account run by adults (18+).
    business_attested_at: datetime | None = None
    status: str = "active"  # active | erasing
    created_at: datetime = Field(default_factory=utcnow)


def listing_index(table: str, *columns: str) -> Index:
    """The index a list route pages by: its filter column, then the
    route's order (LIMIT/OFFSET walk it instead of sorting every row)."""
    return Index(f"ix_{table}_{'_'.join(columns)}", *columns)


class Channel(SQLModel, table=True):
    __table_args__ = (listing_index("channel", "workspace_id", "created_at", "id"),)
    id: str = Field(primary_key=True)
    workspace_id: str = Field(foreign_key="workspace.id")
    platform: str  # instagram | messenger | telegram
    name: str = ""
    # The platform account id: IG professional account id, Page id, bot id.
    external_id: str = Field(default="", index=True)
    # Meta user whose grant is revoked on disconnect ("me" when unknown).
    platform_user_id: str = ""
    status: str = "connecting"  # connecting | active | needs_reconnect | failed | disconnecting | disconnected
    status_detail: str = ""
    token_ciphertext: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    webhook_secret_ciphertext: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    # Instagram Login long-lived tokens expire after 60 days; refreshed before.
    token_expires_at: datetime | None = None
    # The key of this channel's contact ids (core.contracts.contact_id_for), so
    # nobody who sees workflow ids without the database can try platform user
    # ids against them. Empty for channels connected before (migration 0008):
    # their contacts keep their unkeyed ids.
    contact_key: str = Field(default_factory=lambda: secrets.token_hex(16))
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class Automation(SQLModel, table=True):
    __table_args__ = (
        listing_index("automation", "workspace_id", "created_at", "id"),
        listing_index("automation", "channel_id", "created_at", "id"),
    )
    id: str = Field(primary_key=True)
    workspace_id: str = Field(foreign_key="workspace.id")
    channel_id: str = Field(foreign_key="channel.id")
    name: str
    status: str = "active"  # active | paused
    version: int = 1
    definition: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class AutomationVersion(SQLModel, table=True):
    __table_args__ = (UniqueConstraint("automation_id", "version"),)
    id: int | None = Field(default=None, primary_key=True)
    automation_id: str = Field(index=True, foreign_key="automation.id")
    version: int
    definition: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)


class Contact(SQLModel, table=True):
    __table_args__ = (
        UniqueConstraint("channel_id", "external_id"),
        listing_index("contact", "workspace_id", "created_at", "id"),
        listing_index("contact", "channel_id", "created_at", "id"),
    )
    id: str = Field(primary_key=True)
    workspace_id: str = Field(foreign_key="workspace.id")
    channel_id: str = Field(foreign_key="channel.id")
    external_id: str
    first_name: str = ""
    last_name: str = ""
    username: str = ""
    tags: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    fields: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    human_takeover: bool = False
    processing_restricted: bool = False
    consent_withdrawn: bool = False
    last_inbound_at: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


# A longer key (or one a text column cannot hold) is stored as a digest, so
# a btree can index it: PostgreSQL refuses index entries over ~2,700 bytes.
TAG_KEY_MAX_BYTES = 200


def tag_key(tag: str) -> str:
    """How a tag is looked up: case-insensitive, as ``Contact.tags`` is
    matched everywhere (flows, broadcast segments, ``?tag=``)."""
    key = tag.lower()
    raw = key.encode("utf-8", "surrogatepass")
    if len(raw) > TAG_KEY_MAX_BYTES or "\x00" in key or any("\ud800" <= ch <= "\udfff" for ch in key):
        return "sha256:" + hashlib.sha256(raw).hexdigest()
    return key


class ContactTag(SQLModel, table=True):
    """A contact's tags as lookup keys (``tag_key``), one row each: the index
    behind ``GET /v1/contacts?tag=``. ``Contact.tags`` stays the record (as
    written, in order); these rows follow it on every ORM write
    (``_sync_contact_tags``), so a Core statement that writes tags must
    call ``sync_contact_tags`` itself."""

    __table_args__ = (Index("ix_contacttag_workspace_id_tag", "workspace_id", "tag", "contact_id"),)
    contact_id: str = Field(primary_key=True, foreign_key="contact.id", ondelete="CASCADE")
    tag: str = Field(primary_key=True)
    workspace_id: str


CONTACT_TAGS = ContactTag.__table__  # type: ignore[attr-defined]


def sync_contact_tags(conn, contacts: list[tuple[str, str, list[str] | None]]) -> None:
    """Make the ``contacttag`` rows of (contact id, workspace id, tags) match those tags."""
    if not contacts:
        return
    conn.execute(delete(CONTACT_TAGS).where(CONTACT_TAGS.c.contact_id.in_([c[0] for c in contacts])))
    rows = [
        {"contact_id": contact_id, "workspace_id": workspace_id, "tag": key}
        for contact_id, workspace_id, tags in contacts
        for key in dict.fromkeys(tag_key(t) for t in tags or [] if isinstance(t, str))
    ]
    if rows:
        conn.execute(insert(CONTACT_TAGS), rows)


@event.listens_for(OrmSession, "after_flush")
def _sync_contact_tags(session: OrmSession, _context) -> None:
    new = [c for c in session.new if isinstance(c, Contact) and c.tags]
    changed = [c for c in session.dirty if isinstance(c, Contact) and inspect(c).attrs.tags.history.has_changes()]
    sync_contact_tags(session.connection(), [(c.id, c.workspace_id, c.tags) for c in (*new, *changed)])


class Message(SQLModel, table=True):
    """The message log, inbound and outbound.

    Inbound rows are unique per channel and platform event id: the database
    half of webhook dedupe (the workflow keeps the other half).
    """

    __table_args__ = (
        UniqueConstraint("channel_id", "platform_event_id"),
        listing_index("message", "contact_id", "created_at", "id"),
    )
    id: int | None = Field(default=None, primary_key=True)
    workspace_id: str = Field(index=True)
    channel_id: str = Field(index=True)
    contact_id: str
    direction: str  # in | out
    kind: str = "message"
    text: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    payload: str = ""
    platform_event_id: str | None = None  # inbound: mid / update id; outbound: platform message id
    run_id: str = ""
    # Inbound: the conversation run (and the event's place in it) that
    # recorded the row; its own retry after a crash is not a redelivery.
    recorded_by: str = Field(default="", sa_column_kwargs={"server_default": ""})
    # Inbound: the platform sent a longer text than it documents; cut to
    # its maximum (core/inbound.py).
    truncated: bool = Field(default=False, sa_column_kwargs={"server_default": sa_false()})
    created_at: datetime = Field(default_factory=utcnow, index=True)


class SendRecord(SQLModel, table=True):
    """Idempotency record of one outbound send (key: run, step, visit)."""

    idempotency_key: str = Field(primary_key=True)
    channel_id: str = Field(index=True)
    platform_message_id: str
    created_at: datetime = Field(default_factory=utcnow)


def count_sends(session: Session, key_prefix: str) -> int:
    """Sends recorded under ``<key_prefix>/...`` (a broadcast's messages).
    A LIKE prefix match: a range on the key would follow the database
    collation, which need not order '/' before '0' on PostgreSQL."""
    key = SendRecord.idempotency_key
    return session.exec(
        select(func.count()).select_from(SendRecord).where(key.startswith(f"{key_prefix}/", autoescape=True))
    ).one()


class Run(SQLModel, table=True):
    __table_args__ = (listing_index("run", "workspace_id", "started_at", "id"),)
    id: str = Field(primary_key=True)  # the AutomationRun workflow id
    workspace_id: str
    channel_id: str = Field(index=True)
    contact_id: str = Field(index=True)
    automation_id: str = Field(index=True)
    version: int
    status: str = "running"
    trail: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    started_at: datetime = Field(default_factory=utcnow)
    ended_at: datetime | None = None


class AiUsage(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    workspace_id: str = Field(index=True)
    run_id: str = ""
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    created_at: datetime = Field(default_factory=utcnow)


class AuditEntry(SQLModel, table=True):
    """Who did what, when, without message content or personal data."""

    __table_args__ = (listing_index("auditentry", "workspace_id", "id"),)
    id: int | None = Field(default=None, primary_key=True)
    workspace_id: str
    actor: str  # api_key | admin | worker | platform:meta | operator
    action: str  # channel.connect, token.use, contact.export, contact.erase, ...
    target: str = ""  # an object id (never a platform user id or a name)
    detail: str = ""
    created_at: datetime = Field(default_factory=utcnow, index=True)


class ErasureJob(SQLModel, table=True):
    """An erasure request and its progress; shown to API clients and, for
    Meta data-deletion callbacks, to the person at /privacy/deletions/{code}."""

    id: str = Field(primary_key=True)  # also the confirmation code
    workspace_id: str = Field(index=True)
    scope: str  # contact | workspace | platform_user
    target: str = Field(index=True)  # contact id / workspace id / "<channel id>:<platform user id digest>"
    source: str = "api"  # api | meta_data_deletion | meta_deauthorize
    status: str = "pending"  # pending | running | completed | failed
    detail: str = ""
    created_at: datetime = Field(default_factory=utcnow)
    completed_at: datetime | None = None


class Broadcast(SQLModel, table=True):
    """A message sent to a segment of a channel's contacts (BroadcastWorkflow)."""

    __table_args__ = (listing_index("broadcast", "workspace_id", "created_at", "id"),)
    id: str = Field(primary_key=True)
    workspace_id: str = Field(foreign_key="workspace.id")
    channel_id: str = Field(index=True)
    name: str = ""
    text: str = Field(sa_column=Column(Text, nullable=False))
    # [{"title", "payload"}] / [{"title", "payload", "url"}], as sent (core.contracts QuickReply / Button).
    quick_replies: list[dict[str, str]] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False, server_default="[]")
    )
    buttons: list[dict[str, str]] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False, server_default="[]")
    )
    segment: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    status: str = "queued"  # queued | running | completed | cancelled | failed
    sent: int = 0
    failed: int = 0
    skipped: dict[str, int] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None


class InboxEvent(SQLModel, table=True):
    """A verified webhook event held while Temporal is unreachable; the
    relay hands it to its conversation and deletes it (durable inbox)."""

    # The relay reads the next rows by (priority, id).
    __table_args__ = (UniqueConstraint("channel_id", "event_id"), Index("ix_inboxevent_priority_id", "priority", "id"))
    id: int | None = Field(default=None, primary_key=True)
    channel_id: str = Field(index=True)
    contact_id: str = Field(index=True)
    event_id: str
    event: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)
    # Temporal task priority of the event's conversation (workflows/common.py):
    # the relay hands conversations' events over before comments.
    priority: int = Field(default=3, sa_column_kwargs={"server_default": "3"})


class DeadLetter(SQLModel, table=True):
    """An inbox event Temporal refused for good (api/inbox.py), set aside
    with the reason so the contact's later events go on; an operator lists
    and retries it (``vectory inbox``). Holds the person's message: erased
    and expired like the message log."""

    __table_args__ = (UniqueConstraint("channel_id", "event_id"),)
    id: int | None = Field(default=None, primary_key=True)
    workspace_id: str = Field(index=True)
    channel_id: str = Field(index=True)
    contact_id: str = Field(index=True)
    event_id: str
    event: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    priority: int = 3
    reason: str = ""
    created_at: datetime = Field(default_factory=utcnow, index=True)  # when the webhook received it
    dead_lettered_at: datetime = Field(default_factory=utcnow)


class DataKey(SQLModel, table=True):
    """A workspace's payload-encryption key, wrapped by the master keyring.
    ``wrapped`` is None once destroyed (crypto-shredding); the row stays as a
    tombstone so old payloads fail with "key destroyed"."""

    kid: str = Field(primary_key=True)
    scope: str = Field(index=True)
    wrapped: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime = Field(default_factory=utcnow)
    destroyed_at: datetime | None = None


class RateBucket(SQLModel, table=True):
    """One outbound rate-limit bucket (GCRA, ``core.ratelimit``).

    ``tat`` is the theoretical arrival time (epoch seconds) of the next cell.
    A row whose ``tat`` is in the past behaves exactly like a missing row,
    so such rows can be deleted at any time (``RateLimiter.prune``).
    """

    key: str = Field(primary_key=True)  # e.g. "meta:dm:<account id>", "tg:chat:<bot id>:<chat id>"
    tat: float
    updated_at: datetime = Field(default_factory=utcnow)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    # Deleted secrets are overwritten on disk, not left in free pages.
    cur.execute("PRAGMA secure_delete=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        # A short pool timeout: exhaustion answers an error instead of stalling.
        engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, pool_timeout=5)
    return engine


ALEMBIC_INI = Path(__file__).resolve().parent.parent / "alembic.ini"


class DatabaseNotMigrated(RuntimeError):
    """The database schema is not at the code's Alembic head revision."""


def alembic_config(url: str | None = None):
    """The repo's alembic.ini as a Config, aimed at ``url`` (None: VECTORY_DATABASE_URL)."""
    from alembic.config import Config

    config = Config(str(ALEMBIC_INI))
    # migrations/env.py reads the URL from here (no ini interpolation of "%").
    config.attributes["url"] = url
    config.attributes["configure_logger"] = False
    return config


def head_revisions() -> tuple[str, ...]:
    """The Alembic head revision(s) of the code (one, unless branches diverge)."""
    from alembic.script import ScriptDirectory

    return tuple(ScriptDirectory.from_config(alembic_config()).get_heads())


def _safe_url(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


@contextmanager
def _quiet_alembic() -> Iterator[None]:
    """Alembic logs its imports and context setup at INFO: noise at every start."""
    logger = logging.getLogger("alembic")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_migrated(engine: Engine) -> None:
    """Raise DatabaseNotMigrated unless the database is at the code's head revision."""
    with _quiet_alembic():
        from alembic.runtime.migration import MigrationContext

        heads = head_revisions()
        with engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_heads()
            unversioned = not current and _has_app_tables(conn)
    if set(current) == set(heads):
        return
    at = ", ".join(current) or "empty"
    raise DatabaseNotMigrated(
        f"database at {_safe_url(engine)} is not migrated (at {at}, code expects {', '.join(heads)}):"
        f" run `make migrate`{_UNVERSIONED_HINT if unversioned else ''}"
    )


_UNVERSIONED_HINT = (
    "; it has Vectory tables but no alembic_version table (created before migrations existed):"
    " delete a development database (`make clean`), or once check it matches the models and mark it"
    " with `.venv/bin/alembic stamp head`"
)


def _has_app_tables(conn) -> bool:
    return bool(set(inspect(conn).get_table_names()) & set(SQLModel.metadata.tables))


def migrate(url: str) -> None:
    """``alembic upgrade head`` on ``url`` (tests, the devstack; ``make migrate`` is the CLI twin)."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            if not MigrationContext.configure(conn).get_current_heads() and _has_app_tables(conn):
                raise DatabaseNotMigrated(
                    f"cannot migrate the database at {_safe_url(engine)}{_UNVERSIONED_HINT}"
                )
    finally:
        engine.dispose()
    command.upgrade(alembic_config(url), "head")


@lru_cache
def engine_for(url: str) -> Engine:
    """The process's engine for ``url``; refuses an unmigrated database.

    Not cached when it raises: migrate, then call again.
    """
    engine = make_engine(url)
    try:
        check_migrated(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    with Session(engine, expire_on_commit=False) as session:
        yield session
