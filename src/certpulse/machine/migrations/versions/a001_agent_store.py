"""agent store

Revision ID: a001
Revises:
Create Date: 2026-11-22 03:19:44.043067
"""
from alembic import op
import sqlalchemy as sa
import certpulse.sql.types


revision = 'a001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('certificates',
    sa.Column('thumbprint', sa.String(length=40), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('subject', sa.Text(), nullable=False),
    sa.Column('names', sa.Text(), nullable=False),
    sa.Column('serial', sa.String(length=40), nullable=False),
    sa.Column('issuer', sa.Text(), nullable=False),
    sa.Column('not_before', certpulse.sql.types.UTCDateTime(), nullable=False),
    sa.Column('not_after', certpulse.sql.types.UTCDateTime(), nullable=False),
    sa.Column('template_oid', sa.String(length=128), nullable=True),
    sa.Column('template_name', sa.String(length=64), nullable=True),
    sa.Column('major_version', sa.Integer(), nullable=False),
    sa.Column('minor_version', sa.Integer(), nullable=False),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('policy_id', sa.String(length=64), nullable=True),
    sa.Column('issuer_name', sa.String(length=64), nullable=True),
    sa.Column('has_key', sa.Boolean(), nullable=False),
    sa.Column('archived', sa.Boolean(), nullable=False),
    sa.Column('archived_at', certpulse.sql.types.UTCDateTime(), nullable=True),
    sa.Column('replaced_by', sa.String(length=40), nullable=True),
    sa.Column('installed_at', certpulse.sql.types.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('thumbprint', name=op.f('pk_certificates'))
    )
    with op.batch_alter_table('certificates', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_certificates_not_after'), ['not_after'], unique=False)
        batch_op.create_index(batch_op.f('ix_certificates_template_name_archived'), ['template_name', 'archived'], unique=False)

    op.create_table('flights',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('template_name', sa.String(length=64), nullable=False),
    sa.Column('policy_url', sa.Text(), nullable=False),
    sa.Column('issuers', sa.Text(), nullable=False),
    sa.Column('issuer', sa.String(length=64), nullable=True),
    sa.Column('request_id', sa.Integer(), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('csr_der', sa.LargeBinary(), nullable=False),
    sa.Column('renewal_of', sa.String(length=40), nullable=True),
    sa.Column('replaces', sa.Text(), nullable=False),
    sa.Column('replace_action', sa.String(length=16), nullable=True),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('created_at', certpulse.sql.types.UTCDateTime(), nullable=False),
    sa.Column('submitted_at', certpulse.sql.types.UTCDateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_flights'))
    )
    op.create_table('state',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('value', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_state'))
    )


def downgrade() -> None:
    op.drop_table('state')
    op.drop_table('flights')
    with op.batch_alter_table('certificates', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_certificates_template_name_archived'))
        batch_op.drop_index(batch_op.f('ix_certificates_not_after'))

    op.drop_table('certificates')
