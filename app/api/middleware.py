"""Request ids, the access log and the HTTP duration metric; the security headers. Pure ASGI middleware.

Pure ASGI (not ``BaseHTTPMiddleware``) so that the duration covers a streamed answer up to its last
byte, the request id context variable is set in the task that runs the endpoint, and no request
pays for ``call_next``'s extra task and body stream (docs/benchmarks.md, "Search over HTTP").
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from app.logs import REQUEST_ID
from app.metrics import HTTP_REQUEST_DURATION

access_log = logging.getLogger("enclave.access")
# A client's id is kept only when it is short and plain (it ends up in logs and headers).
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def route_template(scope) -> str:
    """The matched route's template (``/v1/conversations/{conversation_id}``), never the raw path:
    raw paths carry ids and would make one series per value."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if path:
        return path
    return "unmatched"


class RequestContextMiddleware:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        incoming = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"x-request-id"), "")
        request_id = incoming if _CLIENT_ID.match(incoming) else uuid.uuid4().hex
        token = REQUEST_ID.set(request_id)
        started = time.perf_counter()
        status = 500
        done = False

        async def send_wrapper(message):
            nonlocal status, done
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                done = True
            await send(message)
            if done:
                self._record(scope, status, started)

        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException:
            if not done:
                done = True
                self._record(scope, 500, started)
            raise
        finally:
            if not done:  # the client went away before the last byte
                self._record(scope, status if status != 500 else 499, started)
            REQUEST_ID.reset(token)

    @staticmethod
    def _record(scope, status: int, started: float) -> None:
        seconds = time.perf_counter() - started
        route = route_template(scope)
        HTTP_REQUEST_DURATION.labels(scope["method"], route, str(status)).observe(seconds)
        # Route template only: the path may hold ids, the query string anything a client typed.
        access_log.info("%s %s %d %.1f ms", scope["method"], route, status, seconds * 1000,
                        extra={"method": scope["method"], "route": route, "status": status,
                               "duration_ms": round(seconds * 1000, 1)})


# The pages load nothing from elsewhere and use no inline code: a strict policy costs nothing.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
_API_PATHS = ("/v1/", "/docs", "/redoc", "/openapi")
_EVERYWHERE = ((b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"))
_OVER_HTTPS = ((b"strict-transport-security", b"max-age=31536000"),)
_ON_PAGES = ((b"content-security-policy", CSP.encode()), (b"x-frame-options", b"DENY"))


class SecurityHeadersMiddleware:
    """Stamps when the request arrived (audit records carry the latency from here) and adds the
    security headers a response does not set itself: nosniff and no referrer everywhere, HSTS over
    HTTPS, and on the pages (not the API) the content security policy and no framing."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope.setdefault("state", {})["started"] = time.perf_counter()  # read back as request.state.started
        extra = (_EVERYWHERE + (_OVER_HTTPS if scope.get("scheme") == "https" else ())
                 + (() if scope["path"].startswith(_API_PATHS) else _ON_PAGES))

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in extra if k not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
