"""The HTTP door, assembled: the state, the routes, the lifespan (load → start engine → warm up → serve →
drain), the error handlers and the middlewares in their order. Request logic lives in the modules named
here: `embeddings`, `classify`, `catalog` and `ops` (the endpoints), `views` (the path both view endpoints
take), `auth`, `replies`, `errors`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from models import LoadedModel
from service.api import catalog, classify, embeddings, ops
from service.api.errors import add_error_handlers
from service.api.head import HeadAsGetMiddleware
from service.api.middleware import BodyLimitMiddleware, HeaderLimitMiddleware
from service.api.request_metrics import RequestMetricsMiddleware
from service.api.state import ServiceState, decode_pool, load_model, warm_up
from service.engine.worker import Engine
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger("metta.app")


def create_app(settings: Settings | None = None, *, model: LoadedModel | None = None) -> FastAPI:
    """The app; `model` lets tests inject an already-built model (else the settings' one is loaded)."""
    settings = settings or Settings()
    metrics = Metrics()
    state = ServiceState(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # A fresh pool per lifespan: the previous one is shut down when a lifespan ends (tests restart apps).
        state.decode_pool.shutdown()
        state.decode_pool = decode_pool(settings)
        loaded = model if model is not None else await asyncio.to_thread(load_model, settings)
        state.model = loaded
        if loaded.device.type == "cuda":
            metrics.watch_cuda(str(loaded.device))
            if settings.device_jpeg_decode:
                state.jpeg_device = loaded.device
        # Decoding changes pixels too: the reported fingerprint names the decoder and colour handling chosen here.
        loaded.set_decoding(jpeg_decoder="nvjpeg" if state.jpeg_device is not None else "pillow",
                            color="icc-srgb" if settings.icc_to_srgb else "none",
                            scaling="reduced" if settings.reduced_decode else "full")
        metrics.model_info.labels(loaded.name, loaded.fingerprint, str(loaded.dim), str(loaded.device),
                                  loaded.dtype, loaded.mode).set(1)
        config = settings.batching(loaded.device.type)
        async with Engine(loaded, config, metrics, render_workers=settings.render_workers) as engine:
            state.engine = engine
            if state.decode_pool.isolation is not None:  # its decode processes started before we say ready
                await asyncio.to_thread(state.decode_pool.isolation.warm)
            await warm_up(state)
            state.ready = True
            log.info("ready: model=%s fingerprint=%s device=%s mode=%s", loaded.name, loaded.fingerprint,
                     loaded.device, loaded.mode)
            try:
                yield
            finally:
                state.ready = False
                await engine.drain(settings.shutdown_grace_s)
        state.decode_pool.shutdown()

    # redirect_slashes off: `POST /v1/embeddings/` would get a 307 whose Location comes from the client's Host.
    # FastAPIOffline: /docs and /redoc load Swagger UI and ReDoc from files installed with the package
    # (served under /static-offline-docs), not from a CDN, so they work on a machine with no network.
    app = FastAPIOffline(title="metta-serve", version="0.1.0", lifespan=lifespan, redirect_slashes=False,
                         description="Mean image embeddings over S test-time augmentations (MeTTA).")
    app.state.metta = state
    metrics.ready.set_function(lambda: 0.0 if state.not_ready_because() else 1.0)
    metrics.decode_backlog.set_function(lambda: state.decode_pool.backlog_s())
    routers = (ops, catalog, embeddings, classify)
    for endpoints in routers:
        app.include_router(endpoints.router)
    add_error_handlers(app, metrics)
    # Middlewares, innermost first: the body limit and budget, the header limits, then HEAD as GET, and the
    # request counter outermost so it sees every reply, refusals included.
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes, metrics=metrics,
                       body_budget=state.body_budget)
    app.add_middleware(HeaderLimitMiddleware, max_headers=settings.max_headers,
                       max_header_bytes=settings.max_header_bytes, metrics=metrics)
    app.add_middleware(HeadAsGetMiddleware)
    # FastAPI keeps an included router as one entry of app.routes, without a path: take the routers' own routes.
    routes = [*app.routes, *(route for endpoints in routers for route in endpoints.router.routes)]
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics,
                       endpoints=[path for route in routes if isinstance(path := getattr(route, "path", None), str)])
    return app
