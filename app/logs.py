"""Logging: JSON lines (python-json-logger) or text, every record carrying the request id, and
secrets scrubbed from the final output whatever a message or a traceback contains.

The request id lives in a context variable that the HTTP middleware sets (``X-Request-ID`` from
the client, or a fresh one); Starlette's thread pool copies the context, so records written from
worker threads carry it too.

What is never logged: request bodies (questions, documents), query strings, API keys, passwords.
The access log is written by the middleware (method, route template, status, duration), not by
uvicorn, whose access log would print the raw URL with its query string.
"""

from __future__ import annotations

import logging
import re
import sys
from contextvars import ContextVar

from pythonjsonlogger.json import JsonFormatter

REQUEST_ID: ContextVar[str | None] = ContextVar("enclave_request_id", default=None)

# Patterns that are secrets wherever they appear. Hand-written: no logging library scrubs output.
_SECRETS = [
    (re.compile(r"enc_[a-z0-9]{12}_[A-Za-z0-9_-]{43}"), "enc_[REDACTED]"),  # Enclave API keys
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"), r"\1[REDACTED]"),
    (re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?)[^'\"\s,}]+"), r"\1[REDACTED]"),
    (re.compile(r"(://[^:/@\s]+:)[^@\s]+@"), r"\1[REDACTED]@"),  # passwords in URLs (database_url)
    (re.compile(r"(?i)((?:api_key|password|secret|token)['\"]?\s*[:=]\s*['\"]?)[^'\"\s,}]+"), r"\1[REDACTED]"),
]


def redact(text: str) -> str:
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class RedactingJsonFormatter(JsonFormatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class RedactingTextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


_HANDLER_NAME = "enclave"


def configure_logging(fmt: str = "json", level: str = "INFO", stream=None) -> None:
    """Install one handler (stderr by default) on the root logger; a second call replaces it."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(_RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(RedactingJsonFormatter(
            ["asctime", "levelname", "name", "message", "request_id"],
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            datefmt="%Y-%m-%dT%H:%M:%S%z", json_ensure_ascii=False,
        ))
    else:
        handler.setFormatter(RedactingTextFormatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # uvicorn's own loggers go through the same handler; its access log is replaced by ours.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    for noisy in ("httpx", "httpcore", "urllib3", "multipart"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
