"""auth state: the revocation generation

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table('auth_state',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('revocations', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.bulk_insert(table, [{'id': 1, 'revocations': 0}])


def downgrade() -> None:
    op.drop_table('auth_state')
