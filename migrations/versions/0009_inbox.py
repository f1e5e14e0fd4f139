"""message.truncated: an inbound text cut to the platform's maximum is recorded as such

Revision ID: 0009_inbox
Revises: 0008_channel_contact_key
Create Date: 2026-12-03 18:00:00.000000

Messages recorded before keep truncated = false (their texts were stored
whole).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0009_inbox'
down_revision: str | Sequence[str] | None = '0008_channel_contact_key'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.add_column(sa.Column('truncated', sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.drop_column('truncated')
