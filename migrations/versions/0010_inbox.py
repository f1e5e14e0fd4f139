"""message.truncated and the deadletter table: an inbox event Temporal refuses for good is set aside

Revision ID: 0010_inbox
Revises: 0009_paging
Create Date: 2026-12-03 18:00:00.000000

Messages recorded before keep truncated = false (their texts were stored
whole).
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0010_inbox'
down_revision: str | Sequence[str] | None = '0009_paging'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.add_column(sa.Column('truncated', sa.Boolean(), server_default=sa.false(), nullable=False))
    op.create_table('deadletter',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('workspace_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('channel_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('contact_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('event_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('event', sa.JSON(), nullable=False),
    sa.Column('priority', sa.Integer(), nullable=False),
    sa.Column('reason', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('dead_lettered_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('channel_id', 'event_id')
    )
    with op.batch_alter_table('deadletter', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_deadletter_channel_id'), ['channel_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_deadletter_contact_id'), ['contact_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_deadletter_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_deadletter_workspace_id'), ['workspace_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('deadletter', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_deadletter_workspace_id'))
        batch_op.drop_index(batch_op.f('ix_deadletter_created_at'))
        batch_op.drop_index(batch_op.f('ix_deadletter_contact_id'))
        batch_op.drop_index(batch_op.f('ix_deadletter_channel_id'))
    op.drop_table('deadletter')
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.drop_column('truncated')
