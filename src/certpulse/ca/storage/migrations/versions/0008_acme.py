"""ACME: accounts, external account binding keys, orders, authorizations, challenges, spent nonces

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 19:15:00
"""
import sqlalchemy as sa
from alembic import op

from certpulse.sql.types import UTCDateTime

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'acme_accounts',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('key_thumbprint', sa.String(length=64), nullable=False),
        sa.Column('jwk', sa.Text(), nullable=False),
        sa.Column('principal_id', sa.Integer(), nullable=True),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('contact', sa.Text(), nullable=False),
        sa.Column('eab_kid', sa.String(length=64), nullable=True),
        sa.Column('created_at', UTCDateTime(), nullable=False),
        sa.Column('updated_at', UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(['principal_id'], ['principals.id'],
                                name=op.f('fk_acme_accounts_principal_id_principals')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_acme_accounts')),
        sa.UniqueConstraint('key_thumbprint', name=op.f('uq_acme_accounts_key_thumbprint')),
    )
    op.create_index(op.f('ix_acme_accounts_principal_id'), 'acme_accounts', ['principal_id'], unique=False)
    op.create_table(
        'acme_eab_keys',
        sa.Column('kid', sa.String(length=64), nullable=False),
        sa.Column('principal_id', sa.Integer(), nullable=False),
        sa.Column('key_digest', sa.String(length=64), nullable=False),
        sa.Column('created_at', UTCDateTime(), nullable=False),
        sa.Column('expires_at', UTCDateTime(), nullable=False),
        sa.Column('used_at', UTCDateTime(), nullable=True),
        sa.Column('account_id', sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(['account_id'], ['acme_accounts.id'],
                                name=op.f('fk_acme_eab_keys_account_id_acme_accounts')),
        sa.ForeignKeyConstraint(['principal_id'], ['principals.id'],
                                name=op.f('fk_acme_eab_keys_principal_id_principals')),
        sa.PrimaryKeyConstraint('kid', name=op.f('pk_acme_eab_keys')),
    )
    op.create_index(op.f('ix_acme_eab_keys_principal_id'), 'acme_eab_keys', ['principal_id'], unique=False)
    op.create_table(
        'acme_orders',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('account_id', sa.Integer(), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('profile', sa.String(length=64), nullable=False),
        sa.Column('identifiers', sa.Text(), nullable=False),
        sa.Column('not_before', UTCDateTime(), nullable=True),
        sa.Column('not_after', UTCDateTime(), nullable=True),
        sa.Column('expires_at', UTCDateTime(), nullable=False),
        sa.Column('replaces', sa.Integer(), nullable=True),
        sa.Column('request_id', sa.Integer(), nullable=True),
        sa.Column('certificate_id', sa.Integer(), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('created_at', UTCDateTime(), nullable=False),
        sa.Column('updated_at', UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(['account_id'], ['acme_accounts.id'],
                                name=op.f('fk_acme_orders_account_id_acme_accounts')),
        sa.ForeignKeyConstraint(['certificate_id'], ['certificates.id'],
                                name=op.f('fk_acme_orders_certificate_id_certificates')),
        sa.ForeignKeyConstraint(['replaces'], ['certificates.id'],
                                name=op.f('fk_acme_orders_replaces_certificates')),
        sa.ForeignKeyConstraint(['request_id'], ['requests.id'],
                                name=op.f('fk_acme_orders_request_id_requests')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_acme_orders')),
    )
    op.create_index(op.f('ix_acme_orders_account_id_id'), 'acme_orders', ['account_id', 'id'], unique=False)
    op.create_index(op.f('ix_acme_orders_request_id'), 'acme_orders', ['request_id'], unique=False)
    op.create_index(op.f('ix_acme_orders_replaces'), 'acme_orders', ['replaces'], unique=False)
    op.create_table(
        'acme_authorizations',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('order_id', sa.Integer(), nullable=False),
        sa.Column('account_id', sa.Integer(), nullable=False),
        sa.Column('identifier_type', sa.String(length=8), nullable=False),
        sa.Column('identifier_value', sa.String(length=255), nullable=False),
        sa.Column('wildcard', sa.Boolean(), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('expires_at', UTCDateTime(), nullable=False),
        sa.Column('created_at', UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(['account_id'], ['acme_accounts.id'],
                                name=op.f('fk_acme_authorizations_account_id_acme_accounts')),
        sa.ForeignKeyConstraint(['order_id'], ['acme_orders.id'],
                                name=op.f('fk_acme_authorizations_order_id_acme_orders')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_acme_authorizations')),
    )
    op.create_index(op.f('ix_acme_authorizations_order_id'), 'acme_authorizations', ['order_id'], unique=False)
    op.create_table(
        'acme_challenges',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('authorization_id', sa.Integer(), nullable=False),
        sa.Column('type', sa.String(length=16), nullable=False),
        sa.Column('token', sa.String(length=64), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('started_at', UTCDateTime(), nullable=True),
        sa.Column('validated_at', UTCDateTime(), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('record', sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(['authorization_id'], ['acme_authorizations.id'],
                                name=op.f('fk_acme_challenges_authorization_id_acme_authorizations')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_acme_challenges')),
    )
    op.create_index(op.f('ix_acme_challenges_authorization_id'), 'acme_challenges', ['authorization_id'],
                    unique=False)
    op.create_table(
        'acme_spent_nonces',
        sa.Column('nonce', sa.String(length=64), nullable=False),
        sa.Column('spent_at', UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint('nonce', name=op.f('pk_acme_spent_nonces')),
    )
    op.create_index(op.f('ix_acme_spent_nonces_spent_at'), 'acme_spent_nonces', ['spent_at'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_acme_spent_nonces_spent_at'), table_name='acme_spent_nonces')
    op.drop_table('acme_spent_nonces')
    op.drop_index(op.f('ix_acme_challenges_authorization_id'), table_name='acme_challenges')
    op.drop_table('acme_challenges')
    op.drop_index(op.f('ix_acme_authorizations_order_id'), table_name='acme_authorizations')
    op.drop_table('acme_authorizations')
    op.drop_index(op.f('ix_acme_orders_replaces'), table_name='acme_orders')
    op.drop_index(op.f('ix_acme_orders_request_id'), table_name='acme_orders')
    op.drop_index(op.f('ix_acme_orders_account_id_id'), table_name='acme_orders')
    op.drop_table('acme_orders')
    op.drop_index(op.f('ix_acme_eab_keys_principal_id'), table_name='acme_eab_keys')
    op.drop_table('acme_eab_keys')
    op.drop_index(op.f('ix_acme_accounts_principal_id'), table_name='acme_accounts')
    op.drop_table('acme_accounts')
