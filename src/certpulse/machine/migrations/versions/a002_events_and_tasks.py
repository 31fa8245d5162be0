"""events and tasks

Revision ID: a002
Revises: a001
Create Date: 2026-11-22 06:00:00
"""
from alembic import op
import sqlalchemy as sa
import certpulse.sql.types


revision = 'a002'
down_revision = 'a001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('events',
    sa.Column('seq', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('event_id', sa.Integer(), nullable=False),
    sa.Column('channel', sa.String(length=8), nullable=False),
    sa.Column('time', certpulse.sql.types.UTCDateTime(), nullable=False),
    sa.Column('uid', sa.Integer(), nullable=False),
    sa.Column('action', sa.String(length=32), nullable=True),
    sa.Column('template', sa.String(length=64), nullable=True),
    sa.Column('old_thumbprint', sa.String(length=40), nullable=True),
    sa.Column('new_thumbprint', sa.String(length=40), nullable=True),
    sa.Column('body', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('seq', name=op.f('pk_events')),
    sqlite_autoincrement=True
    )
    op.create_index(op.f('ix_events_event_id'), 'events', ['event_id'], unique=False)
    op.create_index(op.f('ix_events_time'), 'events', ['time'], unique=False)
    op.create_table('tasks',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('task_type', sa.String(length=32), nullable=False),
    sa.Column('command', sa.Text(), nullable=False),
    sa.Column('args', sa.Text(), nullable=False),
    sa.Column('channel', sa.String(length=8), nullable=False),
    sa.Column('old_thumbprint', sa.String(length=40), nullable=True),
    sa.Column('timeout', sa.Float(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('created_at', certpulse.sql.types.UTCDateTime(), nullable=False),
    sa.Column('cursor', sa.Integer(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', certpulse.sql.types.UTCDateTime(), nullable=True),
    sa.Column('runs', sa.Integer(), nullable=False),
    sa.Column('failures', sa.Integer(), nullable=False),
    sa.Column('last_run_at', certpulse.sql.types.UTCDateTime(), nullable=True),
    sa.Column('last_outcome', sa.String(length=16), nullable=True),
    sa.Column('last_exit', sa.Integer(), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_tasks'))
    )
    op.create_table('task_runs',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('task_name', sa.String(length=64), nullable=False),
    sa.Column('event_seq', sa.Integer(), nullable=True),
    sa.Column('event_id', sa.Integer(), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('started_at', certpulse.sql.types.UTCDateTime(), nullable=False),
    sa.Column('finished_at', certpulse.sql.types.UTCDateTime(), nullable=False),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('exit_status', sa.Integer(), nullable=True),
    sa.Column('output', sa.LargeBinary(), nullable=False),
    sa.Column('output_truncated', sa.Boolean(), nullable=False),
    sa.Column('detail', sa.Text(), nullable=False),
    sa.Column('test', sa.Boolean(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_task_runs')),
    sqlite_autoincrement=True
    )
    op.create_index(op.f('ix_task_runs_task_name_id'), 'task_runs', ['task_name', 'id'], unique=False)
    op.create_table('expiry_notices',
    sa.Column('thumbprint', sa.String(length=40), nullable=False),
    sa.Column('threshold', sa.String(length=16), nullable=False),
    sa.Column('raised_at', certpulse.sql.types.UTCDateTime(), nullable=False),
    sa.Column('event_seq', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('thumbprint', 'threshold', name='pk_expiry_notices')
    )


def downgrade() -> None:
    op.drop_table('expiry_notices')
    op.drop_index(op.f('ix_task_runs_task_name_id'), table_name='task_runs')
    op.drop_table('task_runs')
    op.drop_table('tasks')
    op.drop_index(op.f('ix_events_time'), table_name='events')
    op.drop_index(op.f('ix_events_event_id'), table_name='events')
    op.drop_table('events')
