"""indexes for listing and counting at scale (1,000,000 certificates)

* requests (status, id) replaces (status, created_at): ``GET /v1/requests?status=S`` orders by
  id, so it now reads its first rows in order instead of sorting every request of that status
  (PostgreSQL walked the primary key and filtered, reading the whole table for a rare status).
* requests (template_name, status, created_at): the metrics' request counts (and the oldest
  pending request) are read from the index alone.
* audit (reason, action, template_name) WHERE reason IS NOT NULL: the metrics' refusal counts
  read the refusal rows only; issuance and approval rows (no reason) never enter it.
* certificates ix_certificates_counts (authority_id, template_name, status, revocation_reason,
  revoked_at, not_after): the metrics' issued / revoked / still-valid counts are read from the
  index alone, not from rows that each carry a certificate. Not led by status: without
  statistics (the CA never runs ANALYZE) SQLite then took it for lookups by serial or by
  principal that also say status = 'issued', and read every issued certificate.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 06:30:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

REFUSALS_ONLY = sa.text('reason IS NOT NULL')


def upgrade() -> None:
    op.drop_index(op.f('ix_requests_status_created_at'), table_name='requests')
    op.create_index(op.f('ix_requests_status_id'), 'requests', ['status', 'id'], unique=False)
    op.create_index(op.f('ix_requests_template_name_status_created_at'), 'requests',
                    ['template_name', 'status', 'created_at'], unique=False)
    op.create_index(op.f('ix_audit_reason_action_template_name'), 'audit', ['reason', 'action', 'template_name'],
                    unique=False, sqlite_where=REFUSALS_ONLY, postgresql_where=REFUSALS_ONLY)
    op.create_index(op.f('ix_certificates_counts'), 'certificates',
                    ['authority_id', 'template_name', 'status', 'revocation_reason', 'revoked_at', 'not_after'],
                    unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_certificates_counts'), table_name='certificates')
    op.drop_index(op.f('ix_audit_reason_action_template_name'), table_name='audit')
    op.drop_index(op.f('ix_requests_template_name_status_created_at'), table_name='requests')
    op.drop_index(op.f('ix_requests_status_id'), table_name='requests')
    op.create_index(op.f('ix_requests_status_created_at'), 'requests', ['status', 'created_at'], unique=False)
