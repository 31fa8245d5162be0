"""revocation that relying parties see: CRLs, OCSP signers, revocation revisions

* authorities.revocation_revision: bumped by every revocation, hold or release of a certificate
  the authority issued, in the same transaction; CRLs and cached OCSP answers made at an older
  revision are stale.
* crls: each authority's latest signed CRL (number, revision, thisUpdate, nextUpdate, DER).
* ocsp_signers: the delegated OCSP signing certificates, one current per issuing authority.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 16:00:00
"""
import sqlalchemy as sa
from alembic import op

from certpulse.sql.types import UTCDateTime

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('authorities', schema=None) as batch_op:
        batch_op.add_column(sa.Column('revocation_revision', sa.Integer(), nullable=False,
                                      server_default=sa.text('0')))
    op.create_table(
        'crls',
        sa.Column('authority_id', sa.Integer(), nullable=False),
        sa.Column('number', sa.Integer(), nullable=False),
        sa.Column('revision', sa.Integer(), nullable=False),
        sa.Column('this_update', UTCDateTime(), nullable=False),
        sa.Column('next_update', UTCDateTime(), nullable=False),
        sa.Column('entries', sa.Integer(), nullable=False),
        sa.Column('der', sa.LargeBinary(), nullable=False),
        sa.Column('created_at', UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(['authority_id'], ['authorities.id'],
                                name=op.f('fk_crls_authority_id_authorities')),
        sa.PrimaryKeyConstraint('authority_id', name=op.f('pk_crls')),
    )
    op.create_table(
        'ocsp_signers',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('authority_id', sa.Integer(), nullable=False),
        sa.Column('serial', sa.String(length=40), nullable=False),
        sa.Column('certificate_der', sa.LargeBinary(), nullable=False),
        sa.Column('key_file', sa.String(length=255), nullable=False),
        sa.Column('not_before', UTCDateTime(), nullable=False),
        sa.Column('not_after', UTCDateTime(), nullable=False),
        sa.Column('created_at', UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(['authority_id'], ['authorities.id'],
                                name=op.f('fk_ocsp_signers_authority_id_authorities')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_ocsp_signers')),
    )
    op.create_index(op.f('ix_ocsp_signers_authority_id_not_after'), 'ocsp_signers', ['authority_id', 'not_after'],
                    unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_ocsp_signers_authority_id_not_after'), table_name='ocsp_signers')
    op.drop_table('ocsp_signers')
    op.drop_table('crls')
    with op.batch_alter_table('authorities', schema=None) as batch_op:
        batch_op.drop_column('revocation_revision')
