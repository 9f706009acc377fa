"""ASGI factory for uvicorn (`enclave serve`); each worker process builds its own container."""

from __future__ import annotations

from app.api.app import create_app
from app.container import Container
from app.settings import load_settings


def factory():
    return create_app(Container(load_settings()))
