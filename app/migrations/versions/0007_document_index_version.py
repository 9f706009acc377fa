"""document index version (which chunker/embedder produced a document's chunks; ingest reindex)

Revision ID: 0007
Revises: 0006_finetune
"""
import sqlalchemy as sa
from alembic import op

revision = "0007_index_version"
down_revision = "0006_finetune"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("kb_document", schema=None) as batch_op:
        batch_op.add_column(sa.Column("index_version", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("kb_document", schema=None) as batch_op:
        batch_op.drop_column("index_version")
