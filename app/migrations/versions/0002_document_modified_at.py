"""document modification time (date filters in retrieval)

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("kb_document", schema=None) as batch_op:
        batch_op.add_column(sa.Column("modified_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("kb_document", schema=None) as batch_op:
        batch_op.drop_column("modified_at")
