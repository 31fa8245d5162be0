"""bindings

Revision ID: a003
Revises: a002
Create Date: 2026-11-22 06:10:00
"""
from alembic import op
import sqlalchemy as sa
import certpulse.sql.types


revision = 'a003'
down_revision = 'a002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('bindings',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('template', sa.String(length=64), nullable=True),
    sa.Column('thumbprint', sa.String(length=40), nullable=True),
    sa.Column('target', sa.String(length=40), nullable=True),
    sa.Column('options', sa.Text(), nullable=False),
    sa.Column('probe', sa.Text(), nullable=True),
    sa.Column('auto', sa.Boolean(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', certpulse.sql.types.UTCDateTime(), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('last_output', sa.Text(), nullable=True),
    sa.Column('verdict', sa.String(length=16), nullable=True),
    sa.Column('served', sa.String(length=40), nullable=True),
    sa.Column('checked_at', certpulse.sql.types.UTCDateTime(), nullable=True),
    sa.Column('created_at', certpulse.sql.types.UTCDateTime(), nullable=False),
    sa.Column('updated_at', certpulse.sql.types.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_bindings'))
    )


def downgrade() -> None:
    op.drop_table('bindings')
