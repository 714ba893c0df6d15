"""indexes for the traffic API

The traffic API reads newest first within a time window; its default view
and its user filter use the indexes of 0004 ((org_id, last_seen) and
(org_id, user_name, last_seen)). These add the other filters the console
offers by exact value: a workload, and a destination address.

Revision ID: 0005
Revises: 0004
"""
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_flows_org_workload', 'flows', ['org_id', 'workload', 'last_seen'])
    op.create_index('ix_flows_org_dst', 'flows', ['org_id', 'dst', 'last_seen'])


def downgrade() -> None:
    op.drop_index('ix_flows_org_dst', table_name='flows')
    op.drop_index('ix_flows_org_workload', table_name='flows')
