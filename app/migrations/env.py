"""Alembic environment: runs on the connection handed in by app.db (no alembic.ini needed)."""

from alembic import context
from sqlmodel import SQLModel

import retrieval.tables  # noqa: F401  (registers the tables on SQLModel.metadata)
import security.tables  # noqa: F401
import app.conversations  # noqa: F401
import finetune.registry  # noqa: F401

target_metadata = SQLModel.metadata


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        engine = context.config.attributes["engine"]
        with engine.begin() as connection:
            _run(connection)
    else:
        _run(connection)


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations_online()
