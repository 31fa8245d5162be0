"""requests.idempotency_key: a retried submission returns the first result

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 03:20:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('requests', schema=None) as batch_op:
        batch_op.add_column(sa.Column('idempotency_key', sa.String(length=64), nullable=True))
        batch_op.create_unique_constraint(
            batch_op.f('uq_requests_principal_id_idempotency_key'), ['principal_id', 'idempotency_key'])


def downgrade() -> None:
    with op.batch_alter_table('requests', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('uq_requests_principal_id_idempotency_key'), type_='unique')
        batch_op.drop_column('idempotency_key')
