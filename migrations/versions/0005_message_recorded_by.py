"""message.recorded_by: the conversation run that recorded an inbound event (its own retry is no redelivery)

Revision ID: 0005_message_recorded_by
Revises: 0004_token_expiry
Create Date: 2026-11-29 13:20:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel  # noqa: F401 (AutoString columns render as sqlmodel.sql.sqltypes.AutoString)
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0005_message_recorded_by'
down_revision: str | Sequence[str] | None = '0004_token_expiry'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.add_column(
            sa.Column('recorded_by', sqlmodel.sql.sqltypes.AutoString(), server_default='', nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.drop_column('recorded_by')
