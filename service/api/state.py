"""What one app holds while it serves: settings, metrics, the model and engine, the budgets and the decode
pool; whether it is ready; and the warm-up that runs before it says so."""

from __future__ import annotations

import torch
from starlette.requests import Request

from models import LoadedModel, create_model
from service.api.decoding import DecodePool
from service.core.embedding import EmbedOptions, ImageJob
from service.core.errors import NotReady
from service.core.policies import make_policy
from service.engine.budget import Budget
from service.engine.worker import Engine
from service.metrics import Metrics
from service.settings import Settings


class ServiceState:
    """What the lifespan builds and the routes use; one per app (`app.state.metta`)."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.model: LoadedModel | None = None
        self.engine: Engine | None = None
        self.ready = False
        self.draining = False  # SIGTERM seen (service/api/server.py): /readyz says 503, admitted work goes on
        self.api_keys = [key.encode() for key in settings.load_api_keys()]
        self.decode_pool = decode_pool(settings)
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
        if self.decode_pool.backlog_s() > self.decode_pool.stall_s:
            return "the decodes waiting would keep every decode worker busy for a while; retry elsewhere"
        return None

    def serving_model(self) -> LoadedModel:
        """The model, once loaded and warmed up (503 before)."""
        if self.model is None or not self.ready:
            raise NotReady("the model is not loaded yet")
        return self.model


def decode_pool(settings: Settings) -> DecodePool:
    """The decode pool, with its time budget (isolated decodes) unless --decode-time-budget-s is 0."""
    return DecodePool(settings.decode_workers, time_budget_s=settings.decode_time_budget_s or None)


def state_of(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.metta
    return state


def load_model(settings: Settings) -> LoadedModel:
    return create_model(settings.model, settings.model_options())


async def warm_up(state: ServiceState) -> None:
    """One real batch through the engine before /readyz says yes (compiles, allocates, caches)."""
    assert state.engine is not None and state.model is not None
    size = state.model.spec.preprocess.resize_size
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, size, size + size // 3), dtype=torch.uint8, generator=generator)
    samples = min(state.engine.config.max_batch_crops, state.settings.max_queue_crops, state.settings.max_samples)
    options = EmbedOptions(samples, make_policy("crop_flip"), 0)
    await state.engine.submit([ImageJob(image, options, state.model)], timeout_s=600)
