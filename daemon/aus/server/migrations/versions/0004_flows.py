"""flow records of workloads, merged by hour

On PostgreSQL ``flows`` is partitioned by range of ``hour``, one partition
per UTC day (``flows_pYYYYMMDD``), made ahead and on demand by
:mod:`aus.server.flowstore`, plus a default partition for rows of a day
without one; retention drops whole partitions. A unique
index or primary key of a partitioned table must hold the partition key,
so the primary key is (id, hour) there. SQLite has one table and an index
on ``hour`` that retention deletes by.

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

_MERGE_KEY = ('org_id', 'workload', 'login_uid', 'user_name', 'dst', 'proto', 'port',
              'verdict', 'rule', 'hour')

_POSTGRES = """
CREATE TABLE flows (
    id          BIGSERIAL NOT NULL,
    org_id      VARCHAR(64) NOT NULL,
    hour        TIMESTAMP WITH TIME ZONE NOT NULL,
    workload    VARCHAR(255) NOT NULL,
    login_uid   BIGINT NOT NULL,
    user_name   TEXT NOT NULL,
    groups      JSON NOT NULL,
    process     VARCHAR(64) NOT NULL,
    dst         VARCHAR(45) NOT NULL,
    proto       VARCHAR(8) NOT NULL,
    port        INTEGER NOT NULL,
    verdict     VARCHAR(16) NOT NULL,
    rule        VARCHAR(64) NOT NULL,
    first_seen  TIMESTAMP WITH TIME ZONE NOT NULL,
    last_seen   TIMESTAMP WITH TIME ZONE NOT NULL,
    count       BIGINT NOT NULL,
    CONSTRAINT pk_flows PRIMARY KEY (id, hour),
    CONSTRAINT uq_flows_merge UNIQUE (org_id, workload, login_uid, user_name, dst, proto, port,
                                      verdict, rule, hour)
) PARTITION BY RANGE (hour)
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(_POSTGRES)
        # Catches rows written past aus.server.flowstore (which makes each
        # day's partition first); making that day's partition moves them.
        op.execute("CREATE TABLE flows_default PARTITION OF flows DEFAULT")
    else:
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
        sa.UniqueConstraint(*_MERGE_KEY, name='uq_flows_merge')
        )
        op.create_index('ix_flows_hour', 'flows', ['hour'])
    # On PostgreSQL these are partitioned indexes: each partition gets its own.
    op.create_index('ix_flows_org_last_seen', 'flows', ['org_id', 'last_seen'])
    op.create_index('ix_flows_org_user', 'flows', ['org_id', 'user_name', 'last_seen'])


def downgrade() -> None:
    op.drop_table('flows')
