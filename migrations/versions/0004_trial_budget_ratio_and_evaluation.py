"""trial budget ratio, feasibility and evaluation

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('trials', schema=None) as batch_op:
        batch_op.add_column(sa.Column('budget_ratio', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('feasible', sa.Boolean(), nullable=True))
        batch_op.add_column(
            sa.Column('evaluation', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table('trials', schema=None) as batch_op:
        batch_op.drop_column('evaluation')
        batch_op.drop_column('feasible')
        batch_op.drop_column('budget_ratio')
