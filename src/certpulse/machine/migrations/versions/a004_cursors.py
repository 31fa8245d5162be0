"""cursors: every consumer's place in the event log in one table

Revision ID: a004
Revises: a003
Create Date: 2026-12-06 07:00:00

The notification tasks kept their cursor in ``tasks.cursor`` and the rebind engine in
``state['rebind_cursor']``; retention honoured only the first. Both move here, as
``task:<name>`` and ``rebind``.
"""
from alembic import op
import sqlalchemy as sa


revision = 'a004'
down_revision = 'a003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('cursors',
    sa.Column('consumer', sa.String(length=80), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('consumer', name=op.f('pk_cursors'))
    )
    op.execute("INSERT INTO cursors (consumer, seq) SELECT 'task:' || name, cursor FROM tasks")
    # The rebind cursor was a JSON number in the state table.
    op.execute("INSERT INTO cursors (consumer, seq) SELECT 'rebind', CAST(value AS INTEGER) FROM state "
               "WHERE name = 'rebind_cursor'")
    op.execute("DELETE FROM state WHERE name = 'rebind_cursor'")
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.drop_column('cursor')


def downgrade() -> None:
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('cursor', sa.Integer(), nullable=False, server_default='0'))
    op.execute("UPDATE tasks SET cursor = COALESCE((SELECT seq FROM cursors WHERE consumer = 'task:' || tasks.name), 0)")
    op.execute("INSERT INTO state (name, value) SELECT 'rebind_cursor', CAST(seq AS TEXT) FROM cursors "
               "WHERE consumer = 'rebind'")
    op.drop_table('cursors')
