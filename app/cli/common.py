"""Shared pieces of the console scripts: the --config option, the container, clean error exits."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console

# No model hub, ever: every model comes from the models directory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

console = Console(stderr=True)
out = Console()

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML config file (default: $ENCLAVE_CONFIG).", show_default=False),
]


class State:
    config: Path | None = None
    _container = None

    @classmethod
    def container(cls):
        if cls._container is None:
            from app.container import Container
            from app.settings import load_settings

            cls._container = Container(load_settings(cls.config))
        return cls._container


def set_config(config: Path | None) -> None:
    from app.private import use_private_umask

    use_private_umask()  # every console script: what it writes is the service account's only
    State.config = config
    State._container = None


def kb_name(value: str | None) -> str | None:
    """``--kb``: refused (usage error, exit 2) unless it can be a knowledge-base name (retrieval.names)."""
    from retrieval.names import KB_NAME_RULE, is_kb_name

    if value is not None and not is_kb_name(value):
        raise typer.BadParameter(f"invalid knowledge base name {value!r}; use {KB_NAME_RULE}")
    return value


def user_errors() -> tuple[type[BaseException], ...]:
    from ingest.acl import AclError
    from ingest.pipeline import IngestError
    from llm.models import ModelError
    from retrieval.store import KnowledgeBaseError
    from app.backup import BackupError
    from app.services.audit import AuditUnavailable
    from app.services.documents import DocumentNotFound
    from security.api_keys import ApiKeyError
    from security.audit import AuditError
    from security.tls import TlsError

    return (AclError, IngestError, ModelError, KnowledgeBaseError, ApiKeyError, BackupError, TlsError, FileNotFoundError,
            ValidationError, RuntimeError, AuditError, AuditUnavailable, DocumentNotFound)


def cli_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the errors users can fix into one clear line and exit code 2 (no traceback)."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except user_errors() as exc:
            message = str(exc) or type(exc).__name__  # never a bare "error:"
            console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True, soft_wrap=True)
            sys.exit(2)

    return wrapper
