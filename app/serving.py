"""How `enclave serve` runs uvicorn: one Config built from the settings (tests use the same one).

TLS: uvicorn's own ssl_* options cannot set a minimum protocol version, so the context comes from
``security.tls.server_context`` (TLS 1.3 only, optional mutual TLS) through uvicorn's
``ssl_context_factory`` hook (uvicorn >= 0.47). The factory is a module-level function bound with
functools.partial, so that it pickles into each worker process, which builds its own context.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import ssl
from pathlib import Path
from typing import Any

import uvicorn

from app.settings import Settings
from security.tls import server_context

log = logging.getLogger("enclave.api")


def _ssl_factory(certfile: str, keyfile: str, client_ca: str | None, _config: uvicorn.Config,
                 _default: Any) -> ssl.SSLContext:
    return server_context(certfile, keyfile, client_ca)


def exposed_storage(settings: Settings) -> list[str]:
    """Warnings for a data directory or SQLite database that other accounts may read."""
    from sqlalchemy.engine import make_url

    from app.private import exposed

    paths = [settings.resolved_data_dir]
    url = make_url(settings.resolved_database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        db = Path(url.database)
        paths += [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]
    return exposed(paths)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_unspecified(host: str) -> bool:
    """0.0.0.0 or :: (every interface)."""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def uvicorn_config(settings: Settings, app: Any = None, *, host: str | None = None,
                   port: int | None = None, workers: int | None = None, **extra: Any) -> uvicorn.Config:
    """``app`` defaults to the ASGI factory bound to ``settings`` (pickled into each worker)."""
    cfg = settings.server
    factory = app is None
    if factory:
        from app.api.asgi import factory as asgi_factory

        app = functools.partial(asgi_factory, settings)
    options: dict[str, Any] = {
        "host": host or cfg.host, "port": port or cfg.port, "workers": workers or cfg.workers,
        "factory": factory,
        # X-Forwarded-For is handled by the application (server.trusted_proxies), never by uvicorn's
        # default of trusting 127.0.0.1; no Server header advertising the stack. Logging is configured
        # by the app (JSON lines, request ids, no query strings): uvicorn's own config and access log stay off.
        "proxy_headers": False, "server_header": False,
        "log_config": None, "access_log": False, "log_level": settings.logging.level.lower(),
    }
    if cfg.tls_certfile is not None:
        options["ssl_certfile"] = str(cfg.tls_certfile)
        options["ssl_keyfile"] = str(cfg.tls_keyfile)
        options["ssl_context_factory"] = functools.partial(
            _ssl_factory, str(cfg.tls_certfile), str(cfg.tls_keyfile),
            str(cfg.tls_client_ca) if cfg.tls_client_ca else None)
    options.update(extra)
    return uvicorn.Config(app, **options)


def run(config: uvicorn.Config) -> None:
    """uvicorn.run() for a prepared Config (uvicorn.run itself only takes keyword options)."""
    from uvicorn.supervisors import Multiprocess

    server = uvicorn.Server(config)
    if config.workers > 1:
        sock = config.bind_socket()
        Multiprocess(config, sockets=[sock]).run()
    else:
        server.run()
    if not server.started and config.workers == 1:
        raise SystemExit(3)
