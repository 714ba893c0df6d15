"""scoped API keys and the audit trail

Revision ID: 0009
Revises: 0008

An API key gets scopes (scim, workload, read, admin) and a label; keys
made before keep "admin", what they could do. ``audit_events`` records
every change to an org's configuration with the key that made it.
"""
import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('scopes', sa.String(length=64), nullable=False,
                                      server_default='admin'))
        batch_op.add_column(sa.Column('label', sa.Text(), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        'audit_events',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'),
                  autoincrement=True, nullable=False),
        sa.Column('org_id', sa.String(length=64), nullable=False),
        sa.Column('at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('key_id', sa.String(length=64), nullable=False),
        sa.Column('key_label', sa.Text(), nullable=False),
        sa.Column('action', sa.String(length=64), nullable=False),
        sa.Column('target', sa.Text(), nullable=False),
        sa.Column('before', sa.JSON(), nullable=True),
        sa.Column('after', sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_audit_org_id', 'audit_events', ['org_id', 'id'])


def downgrade() -> None:
    op.drop_index('ix_audit_org_id', table_name='audit_events')
    op.drop_table('audit_events')
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_column('revoked_at')
        batch_op.drop_column('label')
        batch_op.drop_column('scopes')
