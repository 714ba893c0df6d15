"""enforcement mode set centrally

Revision ID: 0007
Revises: 0006

Orgs that exist already get no default: their bundles say nothing about
the mode until an administrator sets one, so upgrading the server never
changes what a running fleet enforces. New orgs start in visibility
(``aus.server.enforcement.NEW_ORG_DEFAULT``).
"""
import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('enforcement_modes',
    sa.Column('org_id', sa.String(length=64), nullable=False),
    sa.Column('workload', sa.String(length=255), nullable=False),
    sa.Column('mode', sa.String(length=16), nullable=False),
    sa.Column('changed_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('changed_by', sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(['org_id'], ['orgs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('org_id', 'workload')
    )
    with op.batch_alter_table('workloads', schema=None) as batch_op:
        batch_op.add_column(sa.Column('applied_mode', sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('workloads', schema=None) as batch_op:
        batch_op.drop_column('applied_mode')
    op.drop_table('enforcement_modes')
