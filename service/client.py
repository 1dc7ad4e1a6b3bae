"""A Python client for metta-serve: `Client(url).embed(images)` → numpy arrays. Needs only httpx and numpy.

Images go as multipart files (no base64 inflation) and vectors come back as base64 float32 (no float
parsing). A call with more images than one request may carry is split to fit the server's limits
(read from GET /v1/models, else the defaults below); every part uses the same seed, so the result
does not depend on the split. 429 (after its Retry-After), 503, 504 and connection errors are retried
with backoff. This module must not import torch or the service's internals: it runs where they are not
installed.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import random
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np

ImageInput = bytes | str | os.PathLike[str]  # raw bytes, or the path of an image file
Samples = int | Literal["auto"] | None  # S; "auto": the server gives each request an S from its load
MAX_SEED = 2**53 - 1
AUTO_SAMPLES_MAX = 32  # the server's samples_max when an auto request gives none (tests keep them equal)
_RETRIED_STATUS = (429, 503, 504)
CONNECT_TIMEOUT_S = 5.0  # a server that does not accept the connection within this is not there
_PART_OVERHEAD = 512  # multipart headers per image, generously
_FORM_OVERHEAD = 8_192  # the option fields and boundaries of one request


@dataclass(frozen=True)
class Limits:
    """What one request may carry; the server's own values when GET /v1/models shows them."""

    max_images: int = 64
    max_body_bytes: int = 64 * 1024 * 1024
    max_request_crops: int = 1024
    max_samples: int = 128
    default_samples: int = 3

    @classmethod
    def from_models(cls, reply: dict[str, Any]) -> Limits:
        cards = reply.get("data") or [{}]
        given = cards[0].get("limits") or {}
        return cls(**{name: int(given[name]) for name in cls.__dataclass_fields__ if name in given})


@dataclass
class Embeddings:
    """One call's result: row i belongs to images[i]."""

    embeddings: np.ndarray  # (N, dim) float32
    variances: np.ndarray | None  # (N, dim) float32, when asked
    dispersions: np.ndarray | None  # (N,) float64, when asked
    model: str
    model_fingerprint: str
    policy: str
    samples: int  # S of every image; with samples="auto", the least S any part of the call was given
    seed: int
    samples_per_image: np.ndarray  # (N,) int: the S each image got (parts of an auto call may differ)


class MettaError(Exception):
    """The server refused the request: `status` and `type` as in its error table."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(f"{status} {kind}: {message}")
        self.status = status
        self.type = kind
        self.message = message


@dataclass(frozen=True)
class _Options:
    samples: Samples
    samples_min: int | None
    samples_max: int | None
    policy: str | None
    seed: int
    return_variance: bool
    return_dispersion: bool
    normalize: bool
    model: str | None

    def form(self) -> dict[str, str]:
        fields = {"seed": str(self.seed), "encoding": "base64", "return_variance": _flag(self.return_variance),
                  "return_dispersion": _flag(self.return_dispersion), "normalize": _flag(self.normalize)}
        if self.samples is not None:
            fields["samples"] = str(self.samples)
        if self.samples_min is not None:
            fields["samples_min"] = str(self.samples_min)
        if self.samples_max is not None:
            fields["samples_max"] = str(self.samples_max)
        if self.policy is not None:
            fields["policy"] = self.policy
        if self.model is not None:
            fields["model"] = self.model
        return fields


def _flag(value: bool) -> str:
    return "true" if value else "false"


def _options(samples: Samples, samples_min: int | None, samples_max: int | None, policy: str | None,
             seed: int | None, return_variance: bool, return_dispersion: bool, normalize: bool,
             model: str | None) -> _Options:
    # One seed for every request of a split call, so each image's views do not depend on the split.
    chosen = secrets.randbelow(MAX_SEED + 1) if seed is None else seed
    return _Options(samples, samples_min, samples_max, policy, chosen, return_variance, return_dispersion,
                    normalize, model)


def _planned_samples(options: _Options, limits: Limits) -> int | None:
    """The S a request is sized for: an auto request's largest (as the server caps it), so it need not be cut."""
    if options.samples == "auto":
        return min(options.samples_max or AUTO_SAMPLES_MAX, limits.max_samples)
    return options.samples


def read_image(image: ImageInput) -> bytes:
    return image if isinstance(image, bytes) else Path(image).read_bytes()


def request_capacity(samples: int | None, limits: Limits, images_per_request: int | None = None) -> tuple[int, int]:
    """(images, bytes) one request may carry: the server's image and crop limits, and its body limit."""
    images = min(limits.max_images, images_per_request or limits.max_images,
                 max(1, limits.max_request_crops // (samples or limits.default_samples)))
    return images, limits.max_body_bytes - _FORM_OVERHEAD


def upload_size(data: bytes) -> int:
    """Bytes one image adds to a multipart request."""
    return len(data) + _PART_OVERHEAD


def plan_requests(sizes: Sequence[int], samples: int | None, limits: Limits,
                  images_per_request: int | None = None) -> list[range]:
    """Consecutive groups of images (their upload sizes) that each fit one request."""
    per_request, budget = request_capacity(samples, limits, images_per_request)
    groups: list[range] = []
    start, used = 0, 0
    for index, size in enumerate(sizes):
        if index > start and (index - start >= per_request or used + size > budget):
            groups.append(range(start, index))
            start, used = index, 0
        used += size
    if start < len(sizes):
        groups.append(range(start, len(sizes)))
    return groups


_Files = list[tuple[str, tuple[str, bytes, str]]]  # httpx's multipart `files`


def _requests(images: Sequence[ImageInput], options: _Options, limits: Limits,
              images_per_request: int | None) -> list[_Files]:
    """The multipart files of each request a call makes, in order."""
    if not images:
        raise ValueError("no images given")
    datas = [read_image(image) for image in images]
    groups = plan_requests([upload_size(d) for d in datas], _planned_samples(options, limits), limits,
                           images_per_request)
    return [[("images", (f"image-{i}", datas[i], "application/octet-stream")) for i in group] for group in groups]


def _vector(value: str | list[float]) -> np.ndarray:
    if isinstance(value, str):
        return np.frombuffer(base64.b64decode(value), dtype="<f4").astype(np.float32)
    return np.asarray(value, dtype=np.float32)


def _merge(replies: list[dict[str, Any]], options: _Options) -> Embeddings:
    entries = [entry for reply in replies for entry in sorted(reply["data"], key=lambda e: e["index"])]
    samples = np.array([reply["samples"] for reply in replies for _ in reply["data"]], dtype=np.int64)
    first = replies[0]
    return Embeddings(
        embeddings=np.stack([_vector(e["embedding"]) for e in entries]),
        variances=np.stack([_vector(e["variance"]) for e in entries]) if options.return_variance else None,
        dispersions=(np.array([e["dispersion"] for e in entries], dtype=np.float64)
                     if options.return_dispersion else None),
        model=first["model"], model_fingerprint=first["model_fingerprint"], policy=first["policy"],
        samples=int(samples.min()), seed=first["seed"], samples_per_image=samples,
    )


def _error(response: httpx.Response) -> MettaError:
    try:
        body = response.json()["error"]
        return MettaError(response.status_code, str(body["type"]), str(body["message"]))
    except (ValueError, KeyError, TypeError):
        return MettaError(response.status_code, "http_error", response.text[:200])


def _delay_or_raise(response: httpx.Response | None, attempt: int, retries: int) -> float:
    """Seconds to wait before retrying a failed attempt (no response: the connection failed), or raise.

    Retry-After when the server gives it (429), else exponential backoff with jitter, capped at 30 s.
    """
    if response is not None and (response.status_code not in _RETRIED_STATUS or attempt >= retries):
        raise _error(response)
    if response is not None and "retry-after" in response.headers:
        try:
            return max(0.0, float(response.headers["retry-after"]))
        except ValueError:
            pass
    return float(min(30.0, 0.25 * 2**attempt) * (0.5 + random.random()))


def _headers(api_key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


class Client:
    """Blocking client. `retries`: how many times one request is retried on 429/503/504 or a lost connection."""

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 300.0, retries: int = 8,
                 images_per_request: int | None = None, connect_timeout: float = CONNECT_TIMEOUT_S,
                 transport: httpx.BaseTransport | None = None) -> None:
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=_headers(api_key),
                                  timeout=httpx.Timeout(timeout, connect=connect_timeout), transport=transport)
        self.retries = retries
        self.retried = 0  # attempts retried so far (429, 503, 504, a lost connection)
        self.images_per_request = images_per_request
        self._limits: Limits | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def ready(self) -> None:
        """One GET /readyz, not retried: MettaError when the server is not ready, httpx.TransportError when
        nothing answers (within `connect_timeout`)."""
        response = self._http.get("/readyz")
        if response.status_code != 200:
            raise _error(response)

    def models(self) -> dict[str, Any]:
        reply: dict[str, Any] = self._send("GET", "/v1/models").json()
        return reply

    def limits(self) -> Limits:
        if self._limits is None:
            self._limits = Limits.from_models(self.models())
        return self._limits

    def embed(self, images: Sequence[ImageInput], *, samples: Samples = None, policy: str | None = None,
              seed: int | None = None, return_variance: bool = False, return_dispersion: bool = False,
              normalize: bool = False, model: str | None = None, samples_min: int | None = None,
              samples_max: int | None = None) -> Embeddings:
        """Mean embeddings of `images` (bytes or file paths), in order, as numpy arrays.

        `samples="auto"` (with `samples_min`, `samples_max`): the server gives each request the largest S in
        that range its load allows; see `samples_per_image`."""
        options = _options(samples, samples_min, samples_max, policy, seed, return_variance, return_dispersion,
                           normalize, model)
        requests = _requests(images, options, self.limits(), self.images_per_request)
        return _merge([self._send("POST", "/v1/embeddings", data=options.form(), files=files).json()
                       for files in requests], options)

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in itertools.count():
            try:
                response: httpx.Response | None = self._http.request(method, path, **kwargs)
            except httpx.TransportError:
                if attempt >= self.retries:
                    raise
                response = None
            if response is not None and response.status_code < 400:
                return response
            delay = _delay_or_raise(response, attempt, self.retries)
            self.retried += 1
            time.sleep(delay)
        raise AssertionError("unreachable")


class AsyncClient:
    """The asyncio twin of `Client`; the parts of a split call run `concurrency` at a time."""

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 300.0, retries: int = 8,
                 images_per_request: int | None = None, concurrency: int = 4,
                 connect_timeout: float = CONNECT_TIMEOUT_S,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._http = httpx.AsyncClient(base_url=url.rstrip("/"), headers=_headers(api_key),
                                       timeout=httpx.Timeout(timeout, connect=connect_timeout), transport=transport,
                                       limits=httpx.Limits(max_connections=max(concurrency, 1) + 2))
        self.retries = retries
        self.retried = 0  # attempts retried so far (429, 503, 504, a lost connection)
        self.images_per_request = images_per_request
        self._slots = asyncio.Semaphore(concurrency)
        self._limits: Limits | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def ready(self) -> None:
        """One GET /readyz, not retried (see `Client.ready`)."""
        response = await self._http.get("/readyz")
        if response.status_code != 200:
            raise _error(response)

    async def models(self) -> dict[str, Any]:
        reply: dict[str, Any] = (await self._send("GET", "/v1/models")).json()
        return reply

    async def limits(self) -> Limits:
        if self._limits is None:
            self._limits = Limits.from_models(await self.models())
        return self._limits

    async def embed(self, images: Sequence[ImageInput], *, samples: Samples = None, policy: str | None = None,
                    seed: int | None = None, return_variance: bool = False, return_dispersion: bool = False,
                    normalize: bool = False, model: str | None = None, samples_min: int | None = None,
                    samples_max: int | None = None) -> Embeddings:
        """Mean embeddings of `images` (bytes or file paths), in order, as numpy arrays (see `Client.embed`)."""
        options = _options(samples, samples_min, samples_max, policy, seed, return_variance, return_dispersion,
                           normalize, model)
        requests = _requests(images, options, await self.limits(), self.images_per_request)

        async def one(files: _Files) -> dict[str, Any]:
            async with self._slots:
                reply: dict[str, Any] = (await self._send("POST", "/v1/embeddings", data=options.form(),
                                                          files=files)).json()
            return reply

        return _merge(list(await asyncio.gather(*(one(files) for files in requests))), options)

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in itertools.count():
            try:
                response: httpx.Response | None = await self._http.request(method, path, **kwargs)
            except httpx.TransportError:
                if attempt >= self.retries:
                    raise
                response = None
            if response is not None and response.status_code < 400:
                return response
            delay = _delay_or_raise(response, attempt, self.retries)
            self.retried += 1
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")
