"""audit chain: records, chain head, signed checkpoints

Revision ID: 0005_audit
Revises: 0004
Create Date: 2026-12-01 12:40:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0005_audit'
down_revision = '0004'
branch_labels = None
depends_on = None

S = sqlmodel.sql.sqltypes.AutoString


def upgrade() -> None:
    op.create_table(
        'sec_audit_record',
        sa.Column('seq', sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column('time', S(length=40), nullable=False),
        sa.Column('request_id', S(length=128), nullable=True),
        sa.Column('subject', S(length=256), nullable=True),
        sa.Column('key_id', S(length=64), nullable=True),
        sa.Column('role', S(length=16), nullable=True),
        sa.Column('source_ip', S(length=64), nullable=True),
        sa.Column('action', S(length=64), nullable=False),
        sa.Column('knowledge_base', S(length=128), nullable=True),
        sa.Column('query_sha256', S(length=64), nullable=True),
        sa.Column('query_text', sa.Text(), nullable=True),
        sa.Column('chunk_ids', sa.Text(), nullable=False),
        sa.Column('model', S(length=256), nullable=True),
        sa.Column('adapter', S(length=256), nullable=True),
        sa.Column('answer_sha256', S(length=64), nullable=True),
        sa.Column('prompt_tokens', sa.Integer(), nullable=True),
        sa.Column('completion_tokens', sa.Integer(), nullable=True),
        sa.Column('latency_ms', sa.Integer(), nullable=True),
        sa.Column('status', S(length=32), nullable=False),
        sa.Column('detail', sa.Text(), nullable=True),
        sa.Column('prev_hash', S(length=64), nullable=False),
        sa.Column('hash', S(length=64), nullable=False),
        sa.PrimaryKeyConstraint('seq'),
    )
    with op.batch_alter_table('sec_audit_record', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_sec_audit_record_time'), ['time'], unique=False)
    # Its one row is created by the first append (not here: a restored backup brings its own).
    op.create_table(
        'sec_audit_head',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('seq', sa.BigInteger(), nullable=False),
        sa.Column('hash', S(length=64), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_table(
        'sec_audit_checkpoint',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('seq', sa.BigInteger(), nullable=False),
        sa.Column('hash', S(length=64), nullable=False),
        sa.Column('time', S(length=40), nullable=False),
        sa.Column('key_id', S(length=64), nullable=False),
        sa.Column('signature', sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table('sec_audit_checkpoint', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_sec_audit_checkpoint_seq'), ['seq'], unique=False)


def downgrade() -> None:
    op.drop_table('sec_audit_checkpoint')
    op.drop_table('sec_audit_head')
    with op.batch_alter_table('sec_audit_record', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_sec_audit_record_time'))
    op.drop_table('sec_audit_record')
