"""contacttag: contacts' tags as indexed lookup keys; list routes' indexes

Revision ID: 0009_paging
Revises: 0008_channel_contact_key
Create Date: 2026-12-03 18:41:42.917771

The tags of existing contacts are copied into contacttag (keys as
``core.db.tag_key`` makes them: lowercased; a tag over 200 bytes, as stored
before tags had a length limit, becomes a digest and is still found).
Single-column indexes that a list route filters by become (filter, order)
indexes, so a page is read from the index instead of sorting every row.
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel  # noqa: F401 (AutoString columns render as sqlmodel.sql.sqltypes.AutoString)
from alembic import op

from core.db import tag_key

# revision identifiers, used by Alembic.
revision: str = "0009_paging"
down_revision: str | Sequence[str] | None = "0008_channel_contact_key"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (table, old single-column index, new index, its columns)
LIST_INDEXES = [
    ("auditentry", "ix_auditentry_workspace_id", "ix_auditentry_workspace_id_id", ["workspace_id", "id"]),
    (
        "automation",
        "ix_automation_channel_id",
        "ix_automation_channel_id_created_at_id",
        ["channel_id", "created_at", "id"],
    ),
    (
        "automation",
        "ix_automation_workspace_id",
        "ix_automation_workspace_id_created_at_id",
        ["workspace_id", "created_at", "id"],
    ),
    (
        "broadcast",
        "ix_broadcast_workspace_id",
        "ix_broadcast_workspace_id_created_at_id",
        ["workspace_id", "created_at", "id"],
    ),
    (
        "channel",
        "ix_channel_workspace_id",
        "ix_channel_workspace_id_created_at_id",
        ["workspace_id", "created_at", "id"],
    ),
    (
        "contact",
        "ix_contact_channel_id",
        "ix_contact_channel_id_created_at_id",
        ["channel_id", "created_at", "id"],
    ),
    (
        "contact",
        "ix_contact_workspace_id",
        "ix_contact_workspace_id_created_at_id",
        ["workspace_id", "created_at", "id"],
    ),
    (
        "message",
        "ix_message_contact_id",
        "ix_message_contact_id_created_at_id",
        ["contact_id", "created_at", "id"],
    ),
    ("run", "ix_run_workspace_id", "ix_run_workspace_id_started_at_id", ["workspace_id", "started_at", "id"]),
]
BATCH = 1000


def upgrade() -> None:
    op.create_table(
        "contacttag",
        sa.Column("contact_id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("tag", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("workspace_id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.ForeignKeyConstraint(["contact_id"], ["contact.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("contact_id", "tag"),
    )
    with op.batch_alter_table("contacttag", schema=None) as batch_op:
        batch_op.create_index(
            "ix_contacttag_workspace_id_tag", ["workspace_id", "tag", "contact_id"], unique=False
        )
    _copy_tags()
    for table, old, new, columns in LIST_INDEXES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.create_index(new, columns, unique=False)
            batch_op.drop_index(old)


def _copy_tags() -> None:
    conn = op.get_bind()
    contact = sa.table(
        "contact",
        sa.column("id", sa.String),
        sa.column("workspace_id", sa.String),
        sa.column("tags", sa.JSON),
    )
    contacttag = sa.table(
        "contacttag",
        sa.column("contact_id", sa.String),
        sa.column("tag", sa.String),
        sa.column("workspace_id", sa.String),
    )
    after = ""
    while True:
        rows = conn.execute(
            sa.select(contact.c.id, contact.c.workspace_id, contact.c.tags)
            .where(contact.c.id > after)
            .order_by(contact.c.id)
            .limit(BATCH)
        ).all()
        if not rows:
            return
        after = rows[-1].id
        values = [
            {"contact_id": row.id, "workspace_id": row.workspace_id, "tag": key}
            for row in rows
            for key in dict.fromkeys(tag_key(t) for t in row.tags or [] if isinstance(t, str))
        ]
        if values:
            conn.execute(contacttag.insert(), values)


def downgrade() -> None:
    for table, old, new, columns in reversed(LIST_INDEXES):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.create_index(old, [columns[0]], unique=False)
            batch_op.drop_index(new)
    with op.batch_alter_table("contacttag", schema=None) as batch_op:
        batch_op.drop_index("ix_contacttag_workspace_id_tag")
    op.drop_table("contacttag")
