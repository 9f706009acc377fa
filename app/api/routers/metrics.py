"""GET /metrics: the Prometheus text format, for a scraper holding the metrics token or an admin key.

Why authenticated: label values name models, adapters and routes, and the counters tell how much
the service is used; operators expose the port to Prometheus, not to the world, but a leaked
internal port should still not publish them. Prometheus sends ``Authorization: Bearer <token>``
(``authorization.credentials_file`` in a scrape config, ``bearerTokenSecret`` in a ServiceMonitor).
"""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from app.api.deps import container
from app.api.errors import ApiError
from app.container import Container

router = APIRouter(tags=["operations"])


def _authorise(request: Request, c: Container) -> None:
    if not c.settings.metrics.enabled:
        raise ApiError(404, "metrics are disabled (metrics.enabled: false)", "not_found")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "missing credentials: send 'Authorization: Bearer <metrics token or admin key>'",
                       "missing_api_key", headers={"WWW-Authenticate": "Bearer"})
    configured = c.settings.metrics.bearer_token
    if configured is not None and hmac.compare_digest(token.encode(), configured.get_secret_value().encode()):
        return
    found = c.api_keys.authenticate(token)
    if found is None:
        raise ApiError(401, "invalid metrics token or API key", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    if found[0].role != "admin":
        raise ApiError(403, "metrics need the metrics token or an administrator key", "forbidden")


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, c: Container = Depends(container)) -> Response:
    await run_in_threadpool(_authorise, request, c)
    body = await run_in_threadpool(generate_latest, REGISTRY)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
