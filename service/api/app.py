"""The HTTP door: routes, lifespan (load → start engine → warm up → serve → drain), error handlers."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any, TypeVar

import numpy as np
import torch
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models import LoadedModel, create_model
from service.api.classify import CLASSIFY, classify, task_card
from service.api.decoding import DecodePool, all_or_nothing
from service.api.middleware import BodyLimitMiddleware, HeaderLimitMiddleware, error_response
from service.api.openai_compat import SERVED_SINCE, request_limits
from service.api.protocol import REFUSED
from service.api.requests import (
    ResolvedOptions,
    ViewRequest,
    image_field,
    read_embeddings_request,
    resolve_options,
)
from service.api.schemas import (
    ClassifyJSONRequest,
    ClassifyOptionsIn,
    ClassifyResponse,
    EmbeddingData,
    EmbeddingsResponse,
    EmbedOptionsIn,
    ErrorResponse,
    ModelCard,
    ModelsResponse,
    OpenAIEmbeddingData,
    OpenAIEmbeddingsResponse,
    OpenAIUsage,
    Usage,
    openapi_request_body,
)
from service.core.decode import OpenedImage, open_image
from service.core.embedding import EmbedOptions, ImageJob, ImageResult, decode_reduction
from service.core.errors import DeadlineExceeded, InvalidOption, NotReady, ServiceError, Unauthorized
from service.core.policies import make_policy
from service.core.uncertainty import label_free_uncertainty
from service.engine.budget import Budget, Reservation
from service.engine.scheduler import SamplesRange
from service.engine.worker import Engine
from service.metrics import Metrics, samples_label
from service.settings import Settings

log = logging.getLogger("metta.app")
T = TypeVar("T")
EMBEDDINGS = "/v1/embeddings"
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 408, 413, 415, 422, 429, 500, 503, 504)}


class ServiceState:
    """What the lifespan builds and the routes use; one per app."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.model: LoadedModel | None = None
        self.engine: Engine | None = None
        self.ready = False
        self.draining = False  # SIGTERM seen (service/api/server.py): /readyz says 503, admitted work goes on
        self.api_keys = [key.encode() for key in settings.load_api_keys()]
        self.decode_pool = DecodePool(settings.decode_workers)
        self.body_budget = Budget(settings.max_inflight_body_bytes, "request-body bytes")
        # Decoded pixels held by requests: each image's header size while it decodes, then its working copy's.
        self.pixel_budget = Budget(settings.max_queue_pixels, "decoded pixels")
        self.jpeg_device: torch.device | None = None  # set when JPEGs are decoded on the model's GPU

    def not_ready_because(self) -> str | None:
        """Why this server should get no new requests now (None: it should). /readyz answers it, and
        `metta_ready` reads it at every scrape."""
        if self.draining:
            return "the server is shutting down"
        if not self.ready or self.engine is None:
            return "the model is not loaded and warmed up yet"
        if not self.engine.alive:
            return "the inference worker has stopped"
        if self.decode_pool.stalled():
            return "every decode worker has been busy on one image for a while; retry elsewhere"
        return None


def load_model(settings: Settings) -> LoadedModel:
    return create_model(settings.model, settings.model_options())


def create_app(settings: Settings | None = None, *, model: LoadedModel | None = None) -> FastAPI:
    """The app; `model` lets tests inject an already-built model (else the settings' one is loaded)."""
    settings = settings or Settings()
    metrics = Metrics()
    state = ServiceState(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # A fresh pool per lifespan: the previous one is shut down when a lifespan ends (tests restart apps).
        state.decode_pool = DecodePool(settings.decode_workers)
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
            await _warm_up(state)
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
    app = FastAPI(title="metta-serve", version="0.1.0", lifespan=lifespan, redirect_slashes=False,
                  description="Mean image embeddings over S test-time augmentations (MeTTA).")
    app.state.metta = state
    metrics.ready.set_function(lambda: 0.0 if state.not_ready_because() else 1.0)
    _add_error_handlers(app, metrics)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes, metrics=metrics,
                       body_budget=state.body_budget)
    app.add_middleware(HeaderLimitMiddleware, max_headers=settings.max_headers,
                       max_header_bytes=settings.max_header_bytes, metrics=metrics)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)

    @app.get("/healthz", tags=["ops"], responses={503: {"description": "the inference worker has stopped"}})
    async def healthz() -> JSONResponse:
        alive = state.engine is None or state.engine.alive
        return JSONResponse({"status": "ok" if alive else "worker_dead"}, status_code=200 if alive else 503)

    @app.get("/readyz", tags=["ops"], responses={503: {"model": ErrorResponse}})
    async def readyz() -> JSONResponse:
        if (reason := state.not_ready_because()) is not None:
            raise NotReady(reason)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    async def metrics_endpoint() -> Response:
        return Response(metrics.generate(), media_type="text/plain; version=0.0.4; charset=utf-8")

    api = APIRouter(prefix="/v1", dependencies=[Depends(_authorize)])

    @api.get("/models", response_model=ModelsResponse, responses=_ERROR_RESPONSES)
    async def list_models() -> ModelsResponse:
        loaded = _require_model(state)
        card = ModelCard(name=loaded.name, dim=loaded.dim, default=True, fingerprint=loaded.fingerprint,
                         device=str(loaded.device), dtype=loaded.dtype, mode=loaded.mode,
                         preprocess=asdict(loaded.spec.preprocess), decoding=loaded.decoding, id=loaded.name,
                         created=SERVED_SINCE, limits=request_limits(settings), **task_card(loaded, settings))
        return ModelsResponse(data=[card])

    @api.post("/embeddings", response_model=EmbeddingsResponse, responses=_ERROR_RESPONSES,
              openapi_extra={"requestBody": openapi_request_body()})
    async def embeddings(request: Request) -> Response:
        return await _embeddings(request, state)

    @api.post("/classify", response_model=ClassifyResponse, responses=_ERROR_RESPONSES,
              openapi_extra={"requestBody": openapi_request_body(ClassifyJSONRequest, ClassifyOptionsIn)})
    async def classify_images(request: Request) -> Response:
        return await classify(request, state, _require_model(state), _run_views)

    app.include_router(api)
    return app


async def _authorize(request: Request) -> None:
    state: ServiceState = request.app.state.metta
    if not state.api_keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    given = token.strip().encode() if scheme.lower() == "bearer" else b""
    # Compare against every key, always, so timing says nothing about which key was close.
    matched = False
    for key in state.api_keys:
        matched |= hmac.compare_digest(given, key)
    if not matched:
        raise Unauthorized("a valid API key is required: send 'Authorization: Bearer <key>'",
                           headers={"WWW-Authenticate": "Bearer"})


def _require_model(state: ServiceState) -> LoadedModel:
    if state.model is None or not state.ready:
        raise NotReady("the model is not loaded yet")
    return state.model


async def _embeddings(request: Request, state: ServiceState) -> Response:
    started = time.perf_counter()
    settings, metrics = state.settings, state.metrics
    model = _require_model(state)
    assert state.engine is not None
    parsed = await read_embeddings_request(request, settings, EmbedOptionsIn)
    resolved = resolve_options(parsed.options, settings, model.name, len(parsed.images), [model.name],
                               input_size=model.spec.preprocess.input_size)
    assert resolved.views is not None
    jobs, results = await _run_views(request, state, parsed.images, resolved.embed, resolved.views, EMBEDDINGS,
                                     field=image_field(parsed.openai))
    samples = len(jobs[0].views)  # auto S: what the scheduler gave this request
    reply_type = OpenAIEmbeddingsResponse if parsed.openai else EmbeddingsResponse
    body = _reply(reply_type, model, resolved, results, samples)
    metrics.request_duration.labels(EMBEDDINGS, samples_label(samples)).observe(time.perf_counter() - started)
    return Response(body, media_type="application/json")


async def _run_views(request: Request, state: ServiceState, images: list[bytes], options: EmbedOptions,
                     views: ViewRequest, endpoint: str, *, field: str = "images"
                     ) -> tuple[list[ImageJob], list[ImageResult]]:
    """Decode and plan every image, run them through the engine, and wait (dropping them if the client leaves).

    Shared by every endpoint that computes views, so they have the same limits, deadlines and metrics.
    `field`: the request field the images came in, which errors about one image name.
    """
    metrics = state.metrics
    assert state.engine is not None
    auto = None if views.auto is None else SamplesRange(*views.auto)
    samples = state.engine.check_room(len(images), options.samples, views.timeout_s, auto)  # 429 before decoding
    pixels = _pixel_reservation(state)  # the request's decoded pixels, held until it settles
    metrics.inflight_requests.inc()
    try:
        # One deadline for the whole request: what decoding used is not given again to the queue and forward.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + views.timeout_s
        decoding = _decode_all(state, images, dataclasses.replace(options, samples=samples), pixels, field)
        jobs = await _decoded_in_time(request, state, decoding, views.timeout_s)
        left_s = deadline - loop.time()
        if left_s <= 0:
            raise DeadlineExceeded(f"decoding the images used the request's whole deadline ({views.timeout_s:g} s)")
        engine = state.engine
        pending = engine.admit(jobs, left_s, requested_crops=None if auto is None else auto.high * len(jobs))
        try:
            results = await _wait_unless_disconnected(request, engine.result(pending, left_s))
        except (asyncio.CancelledError, ClientGone):
            engine.abandon(pending, "client_gone")  # at once, before the worker forms its next batch
            count_client_gone(request, metrics)
            raise
    finally:
        metrics.inflight_requests.dec()
        pixels.release()
    metrics.images.inc(len(jobs))
    samples = len(jobs[0].views)  # auto S: what the scheduler gave it
    metrics.samples_used.labels(endpoint).observe(samples)
    if views.auto is not None and samples < views.auto[1]:
        metrics.samples_shrunk.labels(endpoint).inc()
    return list(jobs), results


async def _decode_all(state: ServiceState, images: list[bytes], options: EmbedOptions, pixels: Reservation,
                      field: str) -> list[ImageJob]:
    """Each image's header read (once) and the reduced decode its views allow chosen, then the pixels that decode
    will hold reserved against the pixel budget just before it decodes (429 when full), the image decoded and
    planned in the decode pool, and the hold shrunk to the working copy it keeps.

    A request holds at most its decode share of decodes at once plus its working copies: one request of many
    large images cannot take the whole budget from everyone else while it decodes (reserving every header at
    once, 64 × 40 MP held 2.4 G pixels of a 256 M budget for the 20 s of its decode).
    """
    settings, model = state.settings, state.model
    assert model is not None
    pool = state.decode_pool
    share = pool.request_share()
    # The request's decode slots, held from the header check to the working copy, so that no more than the
    # pool's share of its decodes is reserved at a time (the pool's own share is released between the two trips).
    slots = asyncio.Semaphore(pool.share)

    def opened(data: bytes, index: int) -> tuple[OpenedImage, int]:
        """The header, read once, and the reduced decode the views allow."""
        image = open_image(data, max_pixels=settings.max_image_pixels, max_side=settings.max_image_side,
                           label=f"{field}[{index}]")
        if not settings.reduced_decode or state.jpeg_device is not None:
            return image, 1
        return image, decode_reduction(image, options, model)

    def decode_and_plan(image: OpenedImage, reduction: int) -> ImageJob:
        started = time.perf_counter()
        decoded = image.decode(reduction, jpeg_device=state.jpeg_device, icc_to_srgb=settings.icc_to_srgb)
        state.metrics.decode_duration.observe(time.perf_counter() - started)
        return ImageJob(decoded, options, model, planned=(image.height, image.width))

    async def one(data: bytes, index: int) -> ImageJob:
        async with slots:
            image, reduction = await pool.run(share, functools.partial(opened, data, index))
            upper = image.decoded_pixels(reduction)  # what the decode will hold
            pixels.grow(upper)
            job = await pool.run(share, functools.partial(decode_and_plan, image, reduction))
            pixels.shrink(max(0, upper - job.pixels))  # the decoded size was the upper bound; the copy is less
            return job

    return await all_or_nothing([one(data, i) for i, data in enumerate(images)])


def _pixel_reservation(state: ServiceState) -> Reservation:
    """An empty hold on the pixel budget for one request; 429 at once while the budget is over its bound."""
    return state.pixel_budget.reserve(0)


class ClientGone(Exception):
    """The client disconnected before its reply was ready."""


def count_client_gone(request: Request, metrics: Metrics) -> None:
    """A request that gets no reply because its client left: counted once, unless the HTTP protocol cut it
    short with a refusal of its own (which it counted)."""
    if not getattr(request.state, REFUSED, False):
        metrics.rejected.labels("client_gone").inc()


async def _decoded_in_time(request: Request, state: ServiceState, decoding: Awaitable[list[ImageJob]],
                           timeout_s: float) -> list[ImageJob]:
    """The decoded jobs, unless the client leaves (ClientGone) or the deadline passes first (504); either
    way the images not yet decoding never start."""
    try:
        async with asyncio.timeout(timeout_s):
            return await _wait_unless_disconnected(request, decoding)
    except TimeoutError:
        raise DeadlineExceeded(f"the images were not decoded within the request's deadline ({timeout_s:g} s)") from None
    except ClientGone:
        count_client_gone(request, state.metrics)
        raise


async def _wait_unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await the engine's result; if the client disconnects first, cancel it (its crops are dropped)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the handler itself was cancelled (server-side disconnect handling)
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, ServiceError):
        await task
    raise ClientGone()


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _encode(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    values: list[float] = vector.tolist()
    return values


def _reply(reply_type: type[EmbeddingsResponse], model: LoadedModel, resolved: ResolvedOptions,
           results: list[ImageResult], samples: int) -> bytes:
    """The reply, built from its schema (this service's shape, or OpenAI's, which extends it); fields a
    request did not ask for are left out."""
    data_type = OpenAIEmbeddingData if reply_type is OpenAIEmbeddingsResponse else EmbeddingData
    usage_type = OpenAIUsage if reply_type is OpenAIEmbeddingsResponse else Usage
    data = [data_type.model_construct(
        index=index, embedding=_encode(result.embedding, resolved.encoding),
        variance=None if result.variance is None else _encode(result.variance, resolved.encoding),
        dispersion=result.dispersion,
        label_free_uncertainty=float(label_free_uncertainty(result.embedding))
        if resolved.label_free_uncertainty else None,
    ) for index, result in enumerate(results)]
    options = resolved.embed
    reply = reply_type.model_construct(
        model=model.name, model_fingerprint=model.fingerprint, dim=model.dim, policy=options.policy.name,
        samples=samples, seed=options.seed, data=data,
        usage=usage_type.model_construct(images=len(results), crops=len(results) * samples))
    return reply.model_dump_json(exclude_none=True).encode()


async def _warm_up(state: ServiceState) -> None:
    """One real batch through the engine before /readyz says yes (compiles, allocates, caches)."""
    assert state.engine is not None and state.model is not None
    size = state.model.spec.preprocess.resize_size
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, size, size + size // 3), dtype=torch.uint8, generator=generator)
    samples = min(state.engine.config.max_batch_crops, state.settings.max_queue_crops, state.settings.max_samples)
    options = EmbedOptions(samples, make_policy("crop_flip"), 0)
    await state.engine.submit([ImageJob(image, options, state.model)], timeout_s=600)


def _add_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    async def service_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServiceError)
        metrics.count_refusal(exc.status)  # every refusal the app answers, wherever it was raised
        return error_response(exc)

    async def client_gone(request: Request, exc: Exception) -> Response:
        return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"

    async def client_disconnected(request: Request, exc: Exception) -> Response:
        count_client_gone(request, metrics)  # left mid-body (or sent a broken one): not our 500
        return Response(status_code=499)

    async def validation_error(request: Request, exc: Exception) -> Response:
        message = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())  # type: ignore[attr-defined]
        return await service_error(request, InvalidOption(message))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        return JSONResponse({"error": {"type": kind, "message": str(exc.detail)}}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"error": {"type": "internal", "message": "internal error"}}, status_code=500)

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(ClientGone, client_gone)
    app.add_exception_handler(ClientDisconnect, client_disconnected)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


class RequestMetricsMiddleware:
    """Counts every reply by endpoint and status code, and tags each request with an id for the logs."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex[:16]
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            path = scope.get("path", "")
            endpoint = path if path in _KNOWN_ENDPOINTS else "other"
            self.metrics.requests.labels(endpoint, str(status)).inc()
            if status >= 500 or endpoint in (EMBEDDINGS, CLASSIFY):
                log.info("request_id=%s %s %s -> %d", request_id, scope.get("method"), endpoint, status)


_KNOWN_ENDPOINTS = {EMBEDDINGS, CLASSIFY, "/v1/models", "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"}
