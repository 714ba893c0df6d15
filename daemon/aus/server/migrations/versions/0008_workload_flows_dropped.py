"""flow records a workload reported dropped

Revision ID: 0008
Revises: 0007

Each flow batch carries the number of records its workload had to drop
(window cap, full spool, refused batches); the workload's row keeps their
sum and when the last non-zero count came, so an operator can tell whose
records are incomplete.
"""
import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('workloads', schema=None) as batch_op:
        batch_op.add_column(sa.Column('flows_dropped', sa.BigInteger(), nullable=False,
                                      server_default='0'))
        batch_op.add_column(sa.Column('flows_dropped_at', sa.DateTime(timezone=True),
                                      nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('workloads', schema=None) as batch_op:
        batch_op.drop_column('flows_dropped_at')
        batch_op.drop_column('flows_dropped')
