"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-22 03:04:55.519032
"""
from alembic import op
import sqlalchemy as sa
import certpulse.sql.types


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('api_keys',
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('created_at', certpulse.sql.types.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('key_hash', name=op.f('pk_api_keys')),
    sa.UniqueConstraint('name', name=op.f('uq_api_keys_name'))
    )
    op.create_table('audit',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('at', certpulse.sql.types.UTCDateTime(), nullable=False),
    sa.Column('actor', sa.String(length=128), nullable=False),
    sa.Column('action', sa.String(length=32), nullable=False),
    sa.Column('template_name', sa.String(length=64), nullable=True),
    sa.Column('request_id', sa.Integer(), nullable=True),
    sa.Column('serial', sa.String(length=40), nullable=True),
    sa.Column('names', sa.Text(), nullable=True),
    sa.Column('reason', sa.String(length=64), nullable=True),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit'))
    )
    with op.batch_alter_table('audit', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audit_at'), ['at'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_request_id'), ['request_id'], unique=False)

    op.create_table('authorities',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('certificate_der', sa.LargeBinary(), nullable=False),
    sa.Column('key_file', sa.String(length=255), nullable=True),
    sa.Column('parent_id', sa.Integer(), nullable=True),
    sa.Column('cost', sa.Integer(), nullable=False),
    sa.Column('renewal_only', sa.Boolean(), nullable=False),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('created_at', certpulse.sql.types.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['parent_id'], ['authorities.id'], name=op.f('fk_authorities_parent_id_authorities')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_authorities')),
    sa.UniqueConstraint('name', name=op.f('uq_authorities_name'))
    )
    op.create_table('principals',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('roles', sa.String(length=255), nullable=False),
    sa.Column('credential_hash', sa.String(length=64), nullable=True),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('created_at', certpulse.sql.types.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_principals')),
    sa.UniqueConstraint('credential_hash', name=op.f('uq_principals_credential_hash')),
    sa.UniqueConstraint('name', name=op.f('uq_principals_name'))
    )
    op.create_table('settings',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('value', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_settings'))
    )
    op.create_table('templates',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('oid', sa.String(length=128), nullable=False),
    sa.Column('major_version', sa.Integer(), nullable=False),
    sa.Column('minor_version', sa.Integer(), nullable=False),
    sa.Column('document', sa.Text(), nullable=False),
    sa.Column('created_at', certpulse.sql.types.UTCDateTime(), nullable=False),
    sa.Column('updated_at', certpulse.sql.types.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_templates')),
    sa.UniqueConstraint('oid', name=op.f('uq_templates_oid'))
    )
    op.create_table('certificates',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('authority_id', sa.Integer(), nullable=False),
    sa.Column('serial', sa.String(length=40), nullable=False),
    sa.Column('request_id', sa.Integer(), nullable=True),
    sa.Column('principal_id', sa.Integer(), nullable=True),
    sa.Column('template_name', sa.String(length=64), nullable=False),
    sa.Column('subject', sa.Text(), nullable=False),
    sa.Column('names', sa.Text(), nullable=False),
    sa.Column('not_before', certpulse.sql.types.UTCDateTime(), nullable=False),
    sa.Column('not_after', certpulse.sql.types.UTCDateTime(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('der', sa.LargeBinary(), nullable=True),
    sa.Column('thumbprint', sa.String(length=40), nullable=True),
    sa.Column('revoked_at', certpulse.sql.types.UTCDateTime(), nullable=True),
    sa.Column('revocation_reason', sa.String(length=32), nullable=True),
    sa.Column('created_at', certpulse.sql.types.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['authority_id'], ['authorities.id'], name=op.f('fk_certificates_authority_id_authorities')),
    sa.ForeignKeyConstraint(['principal_id'], ['principals.id'], name=op.f('fk_certificates_principal_id_principals')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_certificates')),
    sa.UniqueConstraint('authority_id', 'serial', name=op.f('uq_certificates_authority_id_serial'))
    )
    with op.batch_alter_table('certificates', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_certificates_authority_id_revoked_at'), ['authority_id', 'revoked_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_certificates_not_after'), ['not_after'], unique=False)
        batch_op.create_index(batch_op.f('ix_certificates_principal_id_template_name'), ['principal_id', 'template_name'], unique=False)
        batch_op.create_index(batch_op.f('ix_certificates_serial'), ['serial'], unique=False)
        batch_op.create_index(batch_op.f('ix_certificates_thumbprint'), ['thumbprint'], unique=False)

    op.create_table('enrollment_tokens',
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('principal_id', sa.Integer(), nullable=False),
    sa.Column('expires_at', certpulse.sql.types.UTCDateTime(), nullable=False),
    sa.Column('used_at', certpulse.sql.types.UTCDateTime(), nullable=True),
    sa.Column('created_at', certpulse.sql.types.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['principal_id'], ['principals.id'], name=op.f('fk_enrollment_tokens_principal_id_principals')),
    sa.PrimaryKeyConstraint('token_hash', name=op.f('pk_enrollment_tokens'))
    )
    op.create_table('group_members',
    sa.Column('group_name', sa.String(length=64), nullable=False),
    sa.Column('principal_id', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['principal_id'], ['principals.id'], name=op.f('fk_group_members_principal_id_principals')),
    sa.PrimaryKeyConstraint('group_name', 'principal_id', name=op.f('pk_group_members'))
    )
    with op.batch_alter_table('group_members', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_group_members_principal_id'), ['principal_id'], unique=False)

    op.create_table('issuer_templates',
    sa.Column('authority_id', sa.Integer(), nullable=False),
    sa.Column('template_name', sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(['authority_id'], ['authorities.id'], name=op.f('fk_issuer_templates_authority_id_authorities')),
    sa.PrimaryKeyConstraint('authority_id', 'template_name', name=op.f('pk_issuer_templates'))
    )
    op.create_table('requests',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('principal_id', sa.Integer(), nullable=True),
    sa.Column('requester', sa.String(length=128), nullable=False),
    sa.Column('template_name', sa.String(length=64), nullable=False),
    sa.Column('template_major', sa.Integer(), nullable=False),
    sa.Column('template_minor', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('csr_der', sa.LargeBinary(), nullable=False),
    sa.Column('subject', sa.Text(), nullable=False),
    sa.Column('names', sa.Text(), nullable=False),
    sa.Column('renewal_of', sa.Integer(), nullable=True),
    sa.Column('authority_id', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('created_at', certpulse.sql.types.UTCDateTime(), nullable=False),
    sa.Column('decided_at', certpulse.sql.types.UTCDateTime(), nullable=True),
    sa.Column('decided_by', sa.String(length=128), nullable=True),
    sa.Column('certificate_id', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['authority_id'], ['authorities.id'], name=op.f('fk_requests_authority_id_authorities')),
    sa.ForeignKeyConstraint(['principal_id'], ['principals.id'], name=op.f('fk_requests_principal_id_principals')),
    sa.ForeignKeyConstraint(['renewal_of'], ['certificates.id'], name=op.f('fk_requests_renewal_of_certificates')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_requests'))
    )
    with op.batch_alter_table('requests', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_requests_principal_id'), ['principal_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_requests_status_created_at'), ['status', 'created_at'], unique=False)

    op.create_table('archived_keys',
    sa.Column('request_id', sa.Integer(), nullable=False),
    sa.Column('authority_id', sa.Integer(), nullable=False),
    sa.Column('envelope', sa.Text(), nullable=False),
    sa.Column('created_at', certpulse.sql.types.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['authority_id'], ['authorities.id'], name=op.f('fk_archived_keys_authority_id_authorities')),
    sa.ForeignKeyConstraint(['request_id'], ['requests.id'], name=op.f('fk_archived_keys_request_id_requests')),
    sa.PrimaryKeyConstraint('request_id', name=op.f('pk_archived_keys'))
    )


def downgrade() -> None:
    op.drop_table('archived_keys')
    with op.batch_alter_table('requests', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_requests_status_created_at'))
        batch_op.drop_index(batch_op.f('ix_requests_principal_id'))

    op.drop_table('requests')
    op.drop_table('issuer_templates')
    with op.batch_alter_table('group_members', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_group_members_principal_id'))

    op.drop_table('group_members')
    op.drop_table('enrollment_tokens')
    with op.batch_alter_table('certificates', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_certificates_thumbprint'))
        batch_op.drop_index(batch_op.f('ix_certificates_serial'))
        batch_op.drop_index(batch_op.f('ix_certificates_principal_id_template_name'))
        batch_op.drop_index(batch_op.f('ix_certificates_not_after'))
        batch_op.drop_index(batch_op.f('ix_certificates_authority_id_revoked_at'))

    op.drop_table('certificates')
    op.drop_table('templates')
    op.drop_table('settings')
    op.drop_table('principals')
    op.drop_table('authorities')
    with op.batch_alter_table('audit', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_request_id'))
        batch_op.drop_index(batch_op.f('ix_audit_at'))

    op.drop_table('audit')
    op.drop_table('api_keys')
