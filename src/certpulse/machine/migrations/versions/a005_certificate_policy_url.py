"""certificates.policy_url: the policy server that issued each certificate

Revision ID: a005
Revises: a004
Create Date: 2026-12-06 07:10:00

Revocation status is asked of the server that issued a certificate, not of the first one
configured. Certificates installed before this revision get it from the policy server whose
policy id they carry, when the agent knows it (``certpulse.agent.revocation.issuing_client``).
"""
from alembic import op
import sqlalchemy as sa


revision = 'a005'
down_revision = 'a004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('certificates', schema=None) as batch_op:
        batch_op.add_column(sa.Column('policy_url', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('certificates', schema=None) as batch_op:
        batch_op.drop_column('policy_url')
