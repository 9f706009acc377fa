"""The FastAPI application: OpenAI-compatible API, admin API, health, and the web pages."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path

import faiss
from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from app import metrics as app_metrics
from app.api import errors, network
from app.api.audit import record_denial
from app.api.middleware import RequestContextMiddleware, SecurityHeadersMiddleware
from app.api.routers import admin, chat, health, metrics, models, search
from app.container import Container
from app.private import use_private_umask
from app.settings import Settings
from app.uploads import Uploads
from retrieval import text_analysis

log = logging.getLogger("enclave.api")
WEB = Path(__file__).resolve().parent.parent / "web"


def finetune_job_command(settings: Settings) -> list[str]:
    """The scheduled job's command line: the server's config file goes along as --config."""
    import sys

    config = ["--config", str(settings.config_path)] if settings.config_path else []
    return [sys.executable, "-m", "app.cli.finetune_cli", *config, "run", "--trigger", "schedule"]


def start_finetune_schedule(settings: Settings):
    """The built-in scheduler: `finetune run --trigger schedule` as a child process at each due time."""
    import subprocess

    from finetune.schedule import InProcessScheduler

    command = finetune_job_command(settings)

    def job() -> None:
        # A separate process: training memory is returned when it ends and a crash cannot take the
        # API down; the job lock keeps several workers or replicas to one run.
        done = subprocess.run(command, check=False)
        log.info("scheduled fine-tuning run exited with %s", done.returncode)

    scheduler = InProcessScheduler(settings.finetune.schedule, job)
    scheduler.start()
    return scheduler


def create_app(container: Container) -> FastAPI:
    use_private_umask()  # the server's uploads, indexes and database files: 0600, folders 0700
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Requests search in parallel threads: one OpenMP thread per FAISS search avoids
        # oversubscribing the cores (measured: 16 ms vs 0.11 ms per query on a busy 2-core host).
        faiss.omp_set_num_threads(1)
        # Build the heavy parts once, before the first request: database, embedder, model, and the
        # Chinese word segmenter's dictionary.
        await run_in_threadpool(lambda: (container.engine, container.kb_store, container.embedder.model,
                                          container.embedder.prepare_queries(), text_analysis.prepare()))
        await run_in_threadpool(app.state.uploads.recover)  # what uploads killed halfway left behind
        engine = container.generation_engine
        await engine.start()
        app_metrics.ENGINE.attach(engine, engine.name)
        watcher = scheduler = None
        ft = container.settings.finetune
        if ft.hot_swap and engine.supports_adapters:
            from finetune.hotswap import AdapterWatcher

            watcher = AdapterWatcher(container.finetune_registry, engine, base_model=container.settings.generation.model,
                                     poll_seconds=ft.poll_seconds)
            try:
                await watcher.sync()  # serve the active adapter from the first request on
            except Exception:  # a broken adapter must not keep the service down: base model, and say so
                log.exception("cannot load the active LoRA adapter; serving the base model")
            watcher.start()
        if ft.schedule_in_process:
            scheduler = start_finetune_schedule(container.settings)
        container.generation_ready = True
        log.info("generation engine ready: %s (adapter %s)", engine.name, engine.adapter_version or "none")
        try:
            yield
        finally:
            container.generation_ready = False
            app_metrics.ENGINE.detach(engine)
            if scheduler is not None:
                scheduler.stop()
            if watcher is not None:
                await watcher.stop()
            await engine.close()

    app = FastAPI(
        title="Enclave", version="0.1.0", lifespan=lifespan,
        description="Self-hosted, permission-aware retrieval-augmented assistant. OpenAI-compatible.",
    )
    app.state.container = container
    app.state.uploads = Uploads(container.settings.resolved_data_dir / "uploads",
                                documents=lambda kb, root: container.kb_store.documents(kb, root=root),
                                ingest=lambda path, kb, groups: container.pipeline.run(path, kb, groups,
                                                                                   own_process=False))
    errors.install(app, on_denied=record_denial)
    server = container.settings.server
    # Built now so that a broken OIDC configuration (unreadable JWKS file) stops the start.
    _ = (container.oidc, container.rate_limiter, container.auth_failure_limiter)

    # Innermost of the middleware (added first): security headers and the request's arrival time.
    app.add_middleware(SecurityHeadersMiddleware)
    # Trusted-proxy X-Forwarded-For, the IP allowlist and the body cap (chunked bodies too).
    network.install(app, ip_allowlist=server.ip_allowlist, trusted_proxies=server.trusted_proxies,
                    max_body_bytes=int(server.max_body_mb * 1024 * 1024),
                    max_file_bytes=int(container.settings.ingest.max_file_mb * 1024 * 1024))
    # Outermost (added last): request id and metrics cover every response, 403 and 413 included.
    app.add_middleware(RequestContextMiddleware)

    for module in (health, metrics, models, search, chat, admin):
        app.include_router(module.router, responses=errors.COMMON_RESPONSES)
    if WEB.is_dir():
        app.mount("/static", StaticFiles(directory=WEB), name="static")

        @app.get("/", include_in_schema=False)
        async def index():
            return FileResponse(WEB / "index.html")

        @app.get("/admin", include_in_schema=False)
        async def admin_page():
            return FileResponse(WEB / "admin.html")

    return app
