"""fine-tuning: adapter registry and job history

Revision ID: 0006_finetune
Revises: 0005_audit
Create Date: 2026-12-01 13:00:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0006_finetune'
down_revision = '0005_audit'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('ft_adapter',
    sa.Column('version', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('base_model', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
    sa.Column('base_model_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('dataset_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('hyperparameters', sa.Text(), nullable=False),
    sa.Column('metrics', sa.Text(), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('previous_version', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('promoted_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.PrimaryKeyConstraint('version')
    )
    with op.batch_alter_table('ft_adapter', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_ft_adapter_dataset_hash'), ['dataset_hash'], unique=False)
        batch_op.create_index(batch_op.f('ix_ft_adapter_status'), ['status'], unique=False)

    op.create_table('ft_job',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('trigger', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('version', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
    sa.Column('dataset_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('message', sa.Text(), nullable=False),
    sa.Column('started_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('finished_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sqlite_autoincrement=True
    )


def downgrade() -> None:
    op.drop_table('ft_job')
    with op.batch_alter_table('ft_adapter', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_ft_adapter_status'))
        batch_op.drop_index(batch_op.f('ix_ft_adapter_dataset_hash'))
    op.drop_table('ft_adapter')
