"""drafts, provisioned policy versions

The rules and ip_lists tables become the org's draft; what workloads
enforce is the newest row of policy_versions. Each org that had rules or
IP lists keeps its policy in force: it is snapshotted here as the first
version, numbered like the bundle that carried it.

Revision ID: 0006
Revises: 0005
"""
import datetime as dt

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('policy_versions',
    sa.Column('org_id', sa.String(length=64), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('policy', sa.JSON(), nullable=False),
    sa.Column('note', sa.Text(), nullable=False),
    sa.Column('key_id', sa.String(length=64), nullable=True),
    sa.Column('rolled_back_from', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['org_id'], ['orgs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('org_id', 'version')
    )
    _snapshot_policies_in_force(op.get_bind())


def _snapshot_policies_in_force(conn) -> None:
    """The tables as they are, as each org's first version (same shape as
    aus.server.policyversions.draft_spec writes; kept here so the
    migration never changes with the application's models)."""
    import json

    json_columns = {'destinations', 'services', 'entries', 'spec', 'policy'}
    t = {name: sa.table(name, *(sa.column(c, sa.JSON) if c in json_columns else sa.column(c)
                                for c in cols)) for name, cols in {
        'orgs': ('id',),
        'rules': ('id', 'org_id', 'name', 'description', 'destinations', 'services', 'position'),
        'rule_sources': ('rule_id', 'group_id', 'position'),
        'groups': ('id', 'org_id', 'display_name'),
        'ip_lists': ('id', 'org_id', 'name', 'entries'),
        'bundles': ('org_id', 'version', 'body'),
        'policy_versions': ('org_id', 'version', 'spec', 'policy', 'note', 'key_id',
                            'rolled_back_from', 'created_at'),
    }.items()}

    now = dt.datetime.now(dt.timezone.utc)
    for (org_id,) in conn.execute(sa.select(t['orgs'].c.id)).all():
        r = t['rules']
        rules = conn.execute(sa.select(r.c.id, r.c.name, r.c.description, r.c.destinations,
                                       r.c.services).where(r.c.org_id == org_id)
                             .order_by(r.c.position, r.c.name)).all()
        lists = conn.execute(sa.select(t['ip_lists'].c.id, t['ip_lists'].c.name,
                                       t['ip_lists'].c.entries)
                             .where(t['ip_lists'].c.org_id == org_id)
                             .order_by(t['ip_lists'].c.name)).all()
        if not rules and not lists:
            continue
        names = dict(conn.execute(sa.select(t['groups'].c.id, t['groups'].c.display_name)
                                  .where(t['groups'].c.org_id == org_id)).all())
        spec_rules = []
        for rid, name, desc, dests, svcs in rules:
            rs = t['rule_sources']
            gids = conn.execute(sa.select(rs.c.group_id).where(rs.c.rule_id == rid)
                                .order_by(rs.c.position)).scalars().all()
            spec_rules.append({"id": rid, "name": name, "description": desc or "",
                               "sources": [{"id": g, "name": names.get(g)} for g in gids],
                               "destinations": dests, "services": svcs})
        spec = {"rules": spec_rules,
                "ip_lists": [{"id": i, "name": n, "entries": e} for i, n, e in lists]}
        b = t['bundles']
        bundle = conn.execute(sa.select(b.c.version, b.c.body).where(b.c.org_id == org_id)).first()
        policy = {}
        if bundle is not None and bundle.body:
            policy = json.loads(bundle.body).get("policy", {})
        conn.execute(t['policy_versions'].insert().values(
            org_id=org_id, version=max(bundle.version if bundle is not None else 0, 1),
            spec=spec, policy=policy, note="the policy in force when version history began",
            key_id=None, rolled_back_from=None, created_at=now))


def downgrade() -> None:
    op.drop_table('policy_versions')
