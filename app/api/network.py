"""Network-level guards, as ASGI middleware around the whole application (pages, API, docs).

- The client address: the direct peer, unless that peer is a trusted proxy; then the right-most
  X-Forwarded-For address that is not itself a trusted proxy (earlier entries are whatever the
  client wrote). uvicorn's ProxyHeadersMiddleware implements exactly this with CIDR support, so it
  is used as is; without trusted proxies it is not installed and X-Forwarded-For is ignored.
- The IP allowlist (CIDR networks): any other address gets a 403 before routing.
- The request body cap, for bodies with a Content-Length *and* for chunked bodies without one:
  Starlette has no body limit and uvicorn only bounds headers, so bytes are counted here as the
  application receives them.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable

from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from app.api.errors import error_response

log = logging.getLogger("enclave.security")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Iterable[str]) -> list[Network]:
    return [ipaddress.ip_network(v, strict=False) for v in values]


def address_allowed(host: str | None, networks: list[Network]) -> bool:
    if not networks:
        return True
    try:
        ip = ipaddress.ip_address(host or "")
    except ValueError:  # a unix socket peer or an unparsable forwarded value: refused
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in networks)


class IpAllowlistMiddleware:
    def __init__(self, app, networks: list[Network]):
        self.app = app
        self.networks = networks

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket") and self.networks:
            host = scope["client"][0] if scope.get("client") else None
            if not address_allowed(host, self.networks):
                log.warning("refused a request from %s: not in server.ip_allowlist", host)
                response = error_response(403, f"your address ({host}) is not allowed here", "ip_not_allowed")
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class UntrustedProxyWarning:
    """Warns (once per peer) when a private, proxy-like address sends X-Forwarded-For without being
    in ``server.trusted_proxies``: everyone behind that proxy then shares its address (the
    allowlist entry, the failed sign-ins counted per address), which is rarely what was meant."""

    _MAX_WARNED = 1024  # peers remembered; a flood of addresses must not grow this without bound

    def __init__(self, app, trusted: list[Network]):
        self.app = app
        self.trusted = trusted
        self.warned: set[str] = set()

    def _untrusted_proxy(self, host: str | None) -> bool:
        try:
            ip = ipaddress.ip_address(host or "")
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip.is_private and not any(ip.version == net.version and ip in net for net in self.trusted)

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            host = scope["client"][0] if scope.get("client") else None
            if (host not in self.warned and len(self.warned) < self._MAX_WARNED
                    and any(name == b"x-forwarded-for" for name, _ in scope.get("headers", ()))
                    and self._untrusted_proxy(host)):
                self.warned.add(host)
                log.warning("requests from %s carry X-Forwarded-For but %s is not in server.trusted_proxies: "
                            "every client behind it is treated as %s (allowlist, failed sign-ins); list the "
                            "proxy there if it is yours", host, host, host)
        return await self.app(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


# Document uploads (multipart): their cap follows ingest.max_file_mb, the one file-size limit.
UPLOAD_ROUTE = re.compile(r"/v1/knowledge_bases/[^/]+/documents")
FORM_OVERHEAD = 1024 * 1024  # multipart boundaries and the other form fields


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int, upload_max_bytes: int | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.upload_max_bytes = upload_max_bytes if upload_max_bytes is not None else max_bytes

    def _limit(self, scope) -> int:
        if scope.get("method") == "POST" and UPLOAD_ROUTE.fullmatch(scope.get("path", "")):
            return self.upload_max_bytes
        return self.max_bytes

    def _too_large(self, limit: int):
        return error_response(413, f"request body larger than {limit / 2**20:g} MiB", "body_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self._limit(scope)
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > limit):
                return await self._too_large(limit)(scope, receive, send)
        received, exceeded, started = 0, False, False

        async def counted_receive():
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message):
            nonlocal started
            if exceeded:  # whatever the application answers to a body cut short, the client gets a 413
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await self._too_large(limit)(scope, receive, send)


def install(app, *, ip_allowlist: list[str], trusted_proxies: list[str], max_body_bytes: int,
            max_file_bytes: int | None = None) -> None:
    """Adds the guards; the last added runs first: the untrusted-proxy warning, proxy headers, then
    the allowlist, then the cap (uploads: ``max_file_bytes`` plus the form's overhead)."""
    upload = max_file_bytes + FORM_OVERHEAD if max_file_bytes is not None else None
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes, upload_max_bytes=upload)
    app.add_middleware(IpAllowlistMiddleware, networks=parse_networks(ip_allowlist))
    if trusted_proxies:
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=list(trusted_proxies))
    # Outermost: it must see the direct peer, before ProxyHeadersMiddleware rewrites it.
    app.add_middleware(UntrustedProxyWarning, trusted=parse_networks(trusted_proxies))
