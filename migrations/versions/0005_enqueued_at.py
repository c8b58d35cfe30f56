"""when the last message for an experiment or a trial was sent

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ('experiments', 'trials'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    for table in ('trials', 'experiments'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column('enqueued_at')
