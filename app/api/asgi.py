"""ASGI factory for uvicorn (`enclave serve`); each worker process builds its own container.

`enclave serve` binds the Settings it built to the factory (functools.partial), and uvicorn pickles
that into every worker process: the workers get the operator's exact configuration as an argument,
never through an environment variable the parent wrote for them.
"""

from __future__ import annotations

from app.api.app import create_app
from app.container import Container
from app.logs import configure_logging
from app.settings import Settings, load_settings


def factory(settings: Settings | None = None):
    settings = settings if settings is not None else load_settings()
    configure_logging(settings.logging.format, settings.logging.level)  # in every worker process
    return create_app(Container(settings))
