"""bundle build status; case-insensitive keys for write-time policy checks

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('bundles', schema=None) as batch_op:
        batch_op.add_column(sa.Column('build_error', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('build_failing_since', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('build_attempts', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('build_retry_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('build_failures_total', sa.Integer(), server_default='0',
                                      nullable=False))
    with op.batch_alter_table('rules', schema=None) as batch_op:
        batch_op.add_column(sa.Column('name_key', sa.String(length=63), nullable=True))
        batch_op.create_index('ix_rules_org_name_key', ['org_id', 'name_key'], unique=False)
    with op.batch_alter_table('groups', schema=None) as batch_op:
        batch_op.add_column(sa.Column('external_id_key', sa.Text(), nullable=True))
        batch_op.create_index('ix_groups_org_external_key', ['org_id', 'external_id_key'],
                              unique=False)
        batch_op.create_index('ix_groups_org_sid', ['org_id', 'sid'], unique=False)

    # Keys of the rows already there, computed as the application does
    # (casefold is not SQL's lower() beyond ASCII).
    from aus.core.policy import external_id_key, name_key

    conn = op.get_bind()
    rules = sa.table('rules', sa.column('id', sa.String), sa.column('name', sa.String),
                     sa.column('name_key', sa.String))
    groups = sa.table('groups', sa.column('id', sa.String), sa.column('external_id', sa.Text),
                      sa.column('external_id_key', sa.Text))
    for rid, name in conn.execute(sa.select(rules.c.id, rules.c.name)).all():
        conn.execute(rules.update().where(rules.c.id == rid).values(name_key=name_key(name)))
    for gid, ext in conn.execute(sa.select(groups.c.id, groups.c.external_id)
                                 .where(groups.c.external_id.is_not(None))).all():
        conn.execute(groups.update().where(groups.c.id == gid)
                     .values(external_id_key=external_id_key(ext) or None))


def downgrade() -> None:
    with op.batch_alter_table('groups', schema=None) as batch_op:
        batch_op.drop_index('ix_groups_org_sid')
        batch_op.drop_index('ix_groups_org_external_key')
        batch_op.drop_column('external_id_key')
    with op.batch_alter_table('rules', schema=None) as batch_op:
        batch_op.drop_index('ix_rules_org_name_key')
        batch_op.drop_column('name_key')
    with op.batch_alter_table('bundles', schema=None) as batch_op:
        batch_op.drop_column('build_failures_total')
        batch_op.drop_column('build_retry_at')
        batch_op.drop_column('build_attempts')
        batch_op.drop_column('build_failing_since')
        batch_op.drop_column('build_error')
