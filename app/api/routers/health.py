"""Liveness and readiness."""

from __future__ import annotations

import sqlalchemy as sa
from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from app.api.deps import container
from app.container import Container

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="Model loaded, database and indexes reachable")
async def readyz(c: Container = Depends(container)):
    checks: dict[str, str] = {}

    def database() -> None:
        with c.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    for name, probe in (("database", database), ("indexes", lambda: [c.kb_store.stats(kb) for kb in c.kb_store.list_kbs()])):
        try:
            await run_in_threadpool(probe)
            checks[name] = "ok"
        except Exception as exc:  # readiness reports, it does not raise
            checks[name] = f"error: {type(exc).__name__}"
    checks["model"] = "ok" if getattr(c, "generation_ready", False) else "loading"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks}, status_code=200 if ready else 503)
