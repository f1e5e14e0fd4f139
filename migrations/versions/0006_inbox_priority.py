"""inbox_event.priority: the relay hands conversations' events over before comments

Revision ID: 0006_inbox_priority
Revises: 0005_message_recorded_by
Create Date: 2026-11-29 14:05:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0006_inbox_priority'
down_revision: str | Sequence[str] | None = '0005_message_recorded_by'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('inboxevent', schema=None) as batch_op:
        batch_op.add_column(sa.Column('priority', sa.Integer(), server_default='3', nullable=False))
        batch_op.create_index('ix_inboxevent_priority_id', ['priority', 'id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('inboxevent', schema=None) as batch_op:
        batch_op.drop_index('ix_inboxevent_priority_id')
        batch_op.drop_column('priority')
