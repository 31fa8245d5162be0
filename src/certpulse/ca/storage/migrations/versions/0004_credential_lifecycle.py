"""credentials can be withdrawn: API keys expire and are revoked, tokens are superseded

* api_keys.expires_at (optional, set by ``apikey add --expires``) and api_keys.revoked_at
  (``apikey revoke``): a key past either opens nothing. The row stays, so ``apikey list`` shows
  what existed and the name is never given to another key.
* enrollment_tokens.superseded_at: ``principal token`` marks the principal's earlier unused
  tokens, which can then no longer be exchanged.

Principals need no new column: ``principal disable`` uses ``enabled``, and ``principal remove``
deletes the row (its certificates and requests keep their rows, unlinked from it).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 09:40:00
"""
import sqlalchemy as sa
from alembic import op

from certpulse.sql.types import UTCDateTime

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('expires_at', UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column('revoked_at', UTCDateTime(), nullable=True))
    with op.batch_alter_table('enrollment_tokens', schema=None) as batch_op:
        batch_op.add_column(sa.Column('superseded_at', UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('enrollment_tokens', schema=None) as batch_op:
        batch_op.drop_column('superseded_at')
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_column('revoked_at')
        batch_op.drop_column('expires_at')
