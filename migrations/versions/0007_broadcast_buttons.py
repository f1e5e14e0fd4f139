"""broadcast.quick_replies / broadcast.buttons: broadcasts carry quick replies or buttons

Revision ID: 0007_broadcast_buttons
Revises: 0006_inbox_priority
Create Date: 2026-11-29 18:20:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0007_broadcast_buttons'
down_revision: str | Sequence[str] | None = '0006_inbox_priority'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('broadcast', schema=None) as batch_op:
        batch_op.add_column(sa.Column('quick_replies', sa.JSON(), server_default='[]', nullable=False))
        batch_op.add_column(sa.Column('buttons', sa.JSON(), server_default='[]', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('broadcast', schema=None) as batch_op:
        batch_op.drop_column('buttons')
        batch_op.drop_column('quick_replies')
