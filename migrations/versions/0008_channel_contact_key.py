"""channel.contact_key: keyed contact ids for channels connected from now on

Revision ID: 0008_channel_contact_key
Revises: 0007_broadcast_buttons
Create Date: 2026-11-30 00:10:00.000000

Channels connected before keep an empty key, so their contacts keep their
(unkeyed) ids and running conversations.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0008_channel_contact_key'
down_revision: str | Sequence[str] | None = '0007_broadcast_buttons'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('channel', schema=None) as batch_op:
        batch_op.add_column(sa.Column('contact_key', sa.String(), server_default='', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('channel', schema=None) as batch_op:
        batch_op.drop_column('contact_key')
