"""bundle deltas

Revision ID: 0010
Revises: 0009

Each published bundle version keeps the delta from the version before it
(membership adds and removes, the policy or enforcement when they
changed), so a daemon that holds a recent version downloads only what
changed, from any replica. Only the last versions are kept. The index on
users' last modification lets a build tell cheaply whether any user
changed (else it reuses the member lists it read before).
"""
import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'bundle_deltas',
        sa.Column('org_id', sa.String(length=64), nullable=False),
        sa.Column('version', sa.Integer(), nullable=False),
        sa.Column('from_version', sa.Integer(), nullable=False),
        sa.Column('body', sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(['org_id'], ['orgs.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('org_id', 'version'),
    )
    op.create_index('ix_users_org_modified', 'users', ['org_id', 'modified_at'])


def downgrade() -> None:
    op.drop_index('ix_users_org_modified', table_name='users')
    op.drop_table('bundle_deltas')
