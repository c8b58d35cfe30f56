"""task bundles: the bundles table and the experiment's bundle

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-09
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('bundles',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('owner', sa.String(length=128), nullable=False),
    sa.Column('digest', sa.String(length=71), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('files', sa.Integer(), nullable=False),
    sa.Column('unpacked_size', sa.BigInteger(), nullable=False),
    sa.Column('modules', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_bundles')),
    sa.UniqueConstraint('owner', 'digest', name=op.f('uq_bundles_owner_digest'))
    )
    with op.batch_alter_table('bundles', schema=None) as batch_op:
        batch_op.create_index('ix_bundles_owner_created', ['owner', 'created_at'], unique=False)

    with op.batch_alter_table('experiments', schema=None) as batch_op:
        batch_op.add_column(sa.Column('bundle', sa.String(length=71), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('experiments', schema=None) as batch_op:
        batch_op.drop_column('bundle')

    with op.batch_alter_table('bundles', schema=None) as batch_op:
        batch_op.drop_index('ix_bundles_owner_created')

    op.drop_table('bundles')
