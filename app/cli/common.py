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


class CliSession:
    """What one command invocation shares: its ``--config`` and the container built from it on first
    use. It lives in the invocation's context (``ctx.obj``; commands take ``ctx: typer.Context``),
    not in module or class state, so two invocations in one process never share a container."""

    def __init__(self, config: Path | None):
        self.config = config
        self._container = None

    def container(self):
        if self._container is None:
            from app.container import Container
            from app.settings import load_settings

            self._container = Container(load_settings(self.config))
        return self._container


def set_config(ctx: typer.Context, config: Path | None) -> None:
    """Called by each console script's callback, before any command runs: the invocation's session
    goes into its context (``ctx.obj``, which the commands' contexts inherit)."""
    from app.private import use_private_umask

    use_private_umask()  # every console script: what it writes is the service account's only
    ctx.obj = CliSession(config)


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
    from app.services.access import AccessDenied
    from app.services.audit import AuditUnavailable
    from app.services.documents import DocumentNotFound
    from security.api_keys import ApiKeyError
    from security.audit import AuditError
    from security.tls import TlsError

    return (AclError, IngestError, ModelError, KnowledgeBaseError, ApiKeyError, BackupError, TlsError, FileNotFoundError,
            ValidationError, RuntimeError, AuditError, AuditUnavailable, DocumentNotFound, AccessDenied)


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
