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

# Values that are secrets wherever they appear; the words around them ("bearer", "token") stay, so
# that "bearer token refused" reads as written. Hand-written: no logging library scrubs output.
# A value after "Bearer " or "token:" is scrubbed when it is shaped like a credential: 8+
# characters with a digit or a symbol, or 24+ characters of anything (JWTs, opaque tokens).
_TEXT = r"""[^\s'"\\,;}&]"""
_SECRET_SHAPED = rf"(?:(?={_TEXT}*[0-9._~+/=-]){_TEXT}{{8,}}|{_TEXT}{{24,}})"
_Q = r"""\\?['"]"""  # a quote, escaped inside JSON log lines
_SECRETS = [
    (re.compile(r"enc_[a-z0-9]{12}_[A-Za-z0-9_-]{43}"), "enc_[REDACTED]"),  # Enclave API keys
    (re.compile(rf"(?i)(\bbearer\s+){_SECRET_SHAPED}"), r"\1[REDACTED]"),
    # The Authorization header's value, whatever its shape (after its scheme word).
    (re.compile(rf"(?i)(\bauthorization(?:{_Q})?\s*[:=]\s*(?:{_Q})?(?:(?:bearer|basic|token)\s+)?){_TEXT}+"),
     r"\1[REDACTED]"),
    (re.compile(r"(://[^:/@\s]+:)[^@\s]+@"), r"\1[REDACTED]@"),  # passwords in URLs (database_url)
    # key=value and quoted keys ('password': ...) are values whatever their shape ...
    (re.compile(rf"(?i)(\b(?:api_?key|password|passwd|secret|\w*token)=(?:{_Q})?){_TEXT}+"), r"\1[REDACTED]"),
    (re.compile(rf"(?i)({_Q}(?:api_?key|password|passwd|secret|\w*token){_Q}\s*:\s*(?:{_Q})?){_TEXT}+"),
     r"\1[REDACTED]"),
    (re.compile(rf"(?i)(\b(?:api_?key|password|passwd|secret)\s*:\s*(?:{_Q})?){_TEXT}+"), r"\1[REDACTED]"),
    # ... while after a bare "token:" ("invalid token: Signature has expired") only a secret-shaped one is.
    (re.compile(rf"(?i)(\b\w*token\s*:\s*(?:{_Q})?){_SECRET_SHAPED}"), r"\1[REDACTED]"),
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
