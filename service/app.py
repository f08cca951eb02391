"""`create_app(settings, repository)`: the FastAPI application around a model repository."""

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from engines.models.repository import ModelRepository
from engines.runtime.memory import MemoryBudget
from service.auth import ApiKeyMiddleware
from service.errors import install_error_handlers
from service.explaining import image_limits, work_limits
from service.lifecycle import Drain, drain_on_sigterm
from service.logs import configure_logging
from service.metrics import ServiceMetrics
from service.metrics import router as metrics_router
from service.middleware import BodyLimitMiddleware
from service.observability import RequestContextMiddleware
from service.routes import explain, health, insight, kserve, labelstudio, models, oip
from service.routes import maximize as maximize_routes
from service.settings import Settings
from service.state import ServiceState

DESCRIPTION = """\
Explains what an image-classification CNN looked at, for any ONNX model.

Every error answers `{"error": {"code": "...", "message": "..."}}`.
"""

# The web page: plain HTML/JS/CSS shipped as package data (`[tool.setuptools.package-data]`).
STATIC_DIR = Path(__file__).resolve().parent / "static"


def build_repository(settings: Settings) -> ModelRepository:
    return ModelRepository(
        settings.model_repository,
        settings.runtime_options(),
        cache_dir=settings.cache_dir,
        batch_policy=settings.batch_policy(),
        budget=MemoryBudget(
            settings.memory_budget_bytes or None, settings.max_graph_builds, measure_process=True
        ),
        warm=settings.warm_graphs,
    )


def create_app(settings: Settings, repository: ModelRepository | None = None) -> FastAPI:
    repo = repository if repository is not None else build_repository(settings)
    metrics = ServiceMetrics()  # a registry per app, not prometheus_client's global one
    drain = Drain()
    if repo.on_batch is None:
        repo.on_batch = metrics.on_batch
    metrics.watch_budget(repo.budget)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if not repo.loaded:
            # Load in the background so /healthz answers and /readyz says 503 meanwhile.
            threading.Thread(target=repo.load_all, name="model-loader", daemon=True).start()
        # SIGTERM: readiness 503 at once, then uvicorn's graceful shutdown.
        with drain_on_sigterm(drain, settings.shutdown_delay_seconds):
            yield

    app = FastAPI(
        title="onnx-explain",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.service = ServiceState(
        settings=settings,
        repository=repo,
        image_limits=image_limits(settings),
        work_limits=work_limits(settings),
        inference_limiter=anyio.CapacityLimiter(settings.max_in_flight),
    )
    app.state.metrics = metrics
    app.state.drain = drain
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    # Added last = outermost: the request id and the log line cover the 401s and 413s too.
    app.add_middleware(ApiKeyMiddleware, api_keys=settings.api_key_list)
    app.add_middleware(RequestContextMiddleware, metrics=metrics, drain=drain, repository=repo)
    app.include_router(health.router)
    app.include_router(metrics_router)
    app.include_router(kserve.router)
    app.include_router(models.router)
    app.include_router(explain.router)
    app.include_router(insight.router)
    app.include_router(maximize_routes.router)
    app.include_router(oip.router)
    app.include_router(labelstudio.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    return app


def app_from_environment() -> FastAPI:
    """The factory uvicorn calls: settings from `ONNX_EXPLAIN_*` variables."""
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    return create_app(settings)
