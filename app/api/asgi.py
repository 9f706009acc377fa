"""ASGI factory for uvicorn (`enclave serve`); each worker process builds its own container."""

from __future__ import annotations

from app.api.app import create_app
from app.container import Container
from app.logs import configure_logging
from app.settings import load_settings


def factory():
    settings = load_settings()
    configure_logging(settings.logging.format, settings.logging.level)  # in every worker process
    return create_app(Container(settings))
