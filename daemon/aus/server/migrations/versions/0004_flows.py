"""flow records of workloads, merged by hour

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('flows',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True,
              nullable=False),
    sa.Column('org_id', sa.String(length=64), nullable=False),
    sa.Column('hour', sa.DateTime(timezone=True), nullable=False),
    sa.Column('workload', sa.String(length=255), nullable=False),
    sa.Column('login_uid', sa.BigInteger(), nullable=False),
    sa.Column('user_name', sa.Text(), nullable=False),
    sa.Column('groups', sa.JSON(), nullable=False),
    sa.Column('process', sa.String(length=64), nullable=False),
    sa.Column('dst', sa.String(length=45), nullable=False),
    sa.Column('proto', sa.String(length=8), nullable=False),
    sa.Column('port', sa.Integer(), nullable=False),
    sa.Column('verdict', sa.String(length=16), nullable=False),
    sa.Column('rule', sa.String(length=64), nullable=False),
    sa.Column('first_seen', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_seen', sa.DateTime(timezone=True), nullable=False),
    sa.Column('count', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('org_id', 'workload', 'login_uid', 'user_name', 'dst', 'proto', 'port',
                        'verdict', 'rule', 'hour', name='uq_flows_merge')
    )
    op.create_index('ix_flows_org_last_seen', 'flows', ['org_id', 'last_seen'])
    op.create_index('ix_flows_org_user', 'flows', ['org_id', 'user_name', 'last_seen'])


def downgrade() -> None:
    op.drop_table('flows')
