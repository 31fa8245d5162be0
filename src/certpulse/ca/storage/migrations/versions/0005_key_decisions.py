"""blocked keys and the key-to-principal rule

* blocked_keys: the SPKI SHA-256 of every key whose certificate was revoked for keyCompromise,
  with the serial and the time; the request policy refuses such a key to anyone.
* requests.key_sha256 (indexed with principal_id): the SPKI SHA-256 of each request's key, so
  that a key requested by one principal is refused to every other in one indexed lookup.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 09:40:00
"""
import sqlalchemy as sa
from alembic import op

from certpulse.sql.types import UTCDateTime

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'blocked_keys',
        sa.Column('key_sha256', sa.String(length=64), nullable=False),
        sa.Column('serial', sa.String(length=40), nullable=False),
        sa.Column('authority_id', sa.Integer(), nullable=False),
        sa.Column('blocked_at', UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(['authority_id'], ['authorities.id'],
                                name=op.f('fk_blocked_keys_authority_id_authorities')),
        sa.PrimaryKeyConstraint('key_sha256', name=op.f('pk_blocked_keys')),
    )
    with op.batch_alter_table('requests', schema=None) as batch_op:
        batch_op.add_column(sa.Column('key_sha256', sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f('ix_requests_key_sha256_principal_id'), ['key_sha256', 'principal_id'],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table('requests', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_requests_key_sha256_principal_id'))
        batch_op.drop_column('key_sha256')
    op.drop_table('blocked_keys')
