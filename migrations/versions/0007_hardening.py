"""idempotency body hashes and stored config sizes

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('experiments', schema=None) as batch_op:
        # SHA-256 of the request an Idempotency-Key first came with: a reuse with another body is refused.
        batch_op.add_column(sa.Column('idempotency_hash', sa.String(length=64), nullable=True))
        # Bytes of the stored config (its JSON text), summed per owner against PRUNEHUB_OWNER_QUOTA_MB.
        batch_op.add_column(sa.Column('config_bytes', sa.Integer(), server_default='0', nullable=False))
    # Existing rows count what they store: the JSON text of their config (JSONB renders as text on PostgreSQL).
    op.execute(sa.text("UPDATE experiments SET config_bytes = length(CAST(config AS TEXT))"))


def downgrade() -> None:
    with op.batch_alter_table('experiments', schema=None) as batch_op:
        batch_op.drop_column('config_bytes')
        batch_op.drop_column('idempotency_hash')
