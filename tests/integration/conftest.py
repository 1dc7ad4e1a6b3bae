"""In-process HTTP: the real app with its lifespan, through httpx's ASGI transport."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from fastapi import FastAPI
from PIL import Image

from models import LoadedModel, ModelOptions, create_model
from service.api.app import create_app
from service.settings import Settings

TEST_SETTINGS: dict[str, Any] = {"model": "dummy", "mode": "eager", "threads": 1, "decode_workers": 2,
                                 "default_samples": 4, "default_policy": "crop_flip"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def png_bytes(seed: int = 0, width: int = 120, height: int = 90, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, "PNG")
    return buffer.getvalue()


@asynccontextmanager
async def serve(model: LoadedModel | None = None, **overrides: object) -> AsyncIterator[httpx.AsyncClient]:
    """A started app (lifespan run, warmed up) and a client for it; stopped on exit."""
    settings = Settings(**{**TEST_SETTINGS, **overrides})
    app = create_app(settings, model=model)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


def engine_of(client: httpx.AsyncClient):
    return client.app.state.metta.engine  # type: ignore[attr-defined]


class ControlledModel:
    """Wraps the dummy model's forward: counts calls and crops, can block, can fail on chosen calls."""

    def __init__(self) -> None:
        self.inner = create_model("dummy", ModelOptions(mode="eager"))
        self.calls = 0
        self.crops = 0
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_on: Callable[[int], BaseException | None] = lambda call: None
        self.seconds_per_crop = 0.0  # a slower device, for deadline-aware admission

    def run(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.entered.set()
        self.gate.wait(30)
        error = self.fail_on(self.calls)
        if error is not None:
            raise error
        self.crops += x.shape[0]
        time.sleep(self.seconds_per_crop * x.shape[0])
        return self.inner._run(x)

    def loaded(self) -> LoadedModel:
        inner = self.inner
        return LoadedModel(inner.spec, self.run, device=inner.device, dtype=inner.dtype, mode=inner.mode,
                           fingerprint=inner.fingerprint)


@contextmanager
def running_server(model: LoadedModel | None = None, **overrides: object
                   ) -> Iterator[tuple[tuple[str, int], FastAPI, uvicorn.Server]]:
    """A real uvicorn server in a thread on a loopback port, with `serving_protocol` (what `metta-serve`
    runs): its address, app and server; stopped on exit."""
    from service.api.protocol import serving_protocol

    settings = Settings(**{**TEST_SETTINGS, **overrides})
    app = create_app(settings, model=model or create_model("dummy", ModelOptions(mode="eager")))
    config = uvicorn.Config(app, log_level="warning", http=serving_protocol(settings, app), lifespan="on")
    server = uvicorn.Server(config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    address = sock.getsockname()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://{address[0]}:{address[1]}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    try:
        yield address, app, server
    finally:
        server.should_exit = True
        thread.join(10)
