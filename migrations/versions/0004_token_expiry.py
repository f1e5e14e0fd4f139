"""token expiry: when an Instagram long-lived token must be refreshed (RefreshTokens schedule)

Revision ID: 0004_token_expiry
Revises: 0003_rate_buckets
Create Date: 2026-11-29 03:10:09.731199

"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel  # noqa: F401 (AutoString columns render as sqlmodel.sql.sqltypes.AutoString)
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0004_token_expiry'
down_revision: str | Sequence[str] | None = '0003_rate_buckets'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('channel', schema=None) as batch_op:
        batch_op.add_column(sa.Column('token_expires_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('channel', schema=None) as batch_op:
        batch_op.drop_column('token_expires_at')

