"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from app.api.deps import container
from app.api.responses import Health, Readiness
from app.container import Container

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="The process is alive")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness, "description": "Not ready"}},
            summary="Model loaded, database writable and sane, index files intact")
async def readyz(c: Container = Depends(container)):
    """503 unless the database takes writes and the model is loaded; knowledge bases whose index
    files fail their sha256 are listed in `unavailable_knowledge_bases` (only they answer 503)."""
    checks = {"database": await run_in_threadpool(c.readiness.database)}
    try:
        damaged = await run_in_threadpool(c.readiness.knowledge_bases) if checks["database"] == "ok" else {}
        checks["indexes"] = "ok" if not damaged else f"degraded: {len(damaged)} knowledge base(s) unavailable"
    except Exception as exc:  # readiness reports, it does not raise
        damaged, checks["indexes"] = {}, f"error: {type(exc).__name__}"
    checks["model"] = "ok" if c.generation_ready else "loading"
    ready = all(v == "ok" for k, v in checks.items() if k != "indexes") and not checks["indexes"].startswith("error")
    return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks,
                         "unavailable_knowledge_bases": damaged}, status_code=200 if ready else 503)
