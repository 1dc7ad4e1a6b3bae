"""A Python client for metta-serve: `Client(url).embed(images)` → numpy arrays, `.classify(images)` → labels.
Needs only httpx and numpy.

Images go as multipart files (no base64 inflation) and vectors come back as base64 float32 (no float
parsing). A call with more images than one request may carry is split to fit the server's limits
(read from GET /v1/models, else the defaults below); every part uses the same seed, so the result
does not depend on the split. 429 (after its Retry-After), 503, 504 and connection errors are retried
with backoff. `on_error="skip"`: a request refused for a bad image (400, 413, 415) is retried image by image,
and the call returns the good images' results with each bad image's error beside them (`errors`, by input
index). This module must not import torch or the service's internals: it runs where they are not
installed.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import random
import re
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
OnError = Literal["raise", "skip"]  # a bad image fails the call, or is reported beside the others' results
_RETRIED_STATUS = (429, 503, 504)
_PER_IMAGE_STATUS = (400, 413, 415)  # a refusal caused by one image (undecodable, too large, unsupported)
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
    classify_samples: int = 32  # the S of a /v1/classify request that gives none (the settings default)

    @classmethod
    def from_models(cls, reply: dict[str, Any]) -> Limits:
        cards = reply.get("data") or [{}]
        given = dict(cards[0].get("limits") or {})
        classify = (cards[0].get("defaults") or {}).get("classify") or {}
        if "samples" in classify:
            given["classify_samples"] = classify["samples"]
        return cls(**{name: int(given[name]) for name in cls.__dataclass_fields__ if name in given})


@dataclass
class Embeddings:
    """One call's result: row i belongs to images[indices[i]] (every image, in order, unless some were skipped)."""

    embeddings: np.ndarray  # (N, dim) float32
    variances: np.ndarray | None  # (N, dim) float32, when asked
    dispersions: np.ndarray | None  # (N,) float64, when asked
    model: str
    model_fingerprint: str
    policy: str
    samples: int  # S of every image; with samples="auto", the least S any part of the call was given
    seed: int
    samples_per_image: np.ndarray  # (N,) int: the S each image got (parts of an auto call may differ)
    indices: np.ndarray  # (N,) int: the input index of each row
    errors: dict[int, MettaError]  # on_error="skip": why each skipped image was refused, by input index


@dataclass(frozen=True)
class Label:
    class_index: int
    label: str
    probability: float


@dataclass
class Classifications:
    """One classify call's result: entry i belongs to images[indices[i]]."""

    labels: list[list[Label]]  # per image, most probable first (top_k of them)
    uncertainty: list[dict[str, float | None]]  # per image: max_probability, entropy, dispersion, label_free_...
    model: str
    model_fingerprint: str
    policy: str
    samples: int
    seed: int
    temperature: float
    calibrated: bool
    indices: np.ndarray  # (N,) int: the input index of each entry
    errors: dict[int, MettaError]  # on_error="skip": why each skipped image was refused, by input index


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
_Part = tuple[list[int], _Files]  # the input indices of one request's images, and their multipart files
_Reply = tuple[list[int], dict[str, Any]]  # a request's input indices and its JSON reply


def _requests(images: Sequence[ImageInput], samples: int | None, limits: Limits,
              images_per_request: int | None) -> list[_Part]:
    """The images and multipart files of each request a call makes, in order."""
    if not images:
        raise ValueError("no images given")
    datas = [read_image(image) for image in images]
    groups = plan_requests([upload_size(d) for d in datas], samples, limits, images_per_request)
    return [(list(group), [("images", (f"image-{i}", datas[i], "application/octet-stream")) for i in group])
            for group in groups]


_REQUEST_IMAGE = re.compile(r"images\[(\d+)\]")  # how the server names an image: its place in that request


def _naming_inputs(error: MettaError, indices: list[int]) -> MettaError:
    """The refusal with the image it names numbered as in the call: the server counts a split call's images
    within each request, and a skipped image is sent alone (so it was always `images[0]`)."""
    found = _REQUEST_IMAGE.match(error.message)
    if found is None or int(found[1]) >= len(indices):
        return error
    return MettaError(error.status, error.type, f"images[{indices[int(found[1])]}]{error.message[found.end():]}")


def _split_on_refusal(error: MettaError, part: _Part, on_error: OnError) -> list[_Part] | None:
    """After a refused request: the single-image requests to try instead, or None when `part` is one image
    (its error is the image's); raises when the refusal is not an image's fault or errors are not skipped."""
    if on_error == "raise" or error.status not in _PER_IMAGE_STATUS:
        raise error from None
    indices, files = part
    if len(indices) == 1:
        return None
    return [([index], [one]) for index, one in zip(indices, files, strict=True)]


def _classify_form(top_k: int | None, samples: int | None, policy: str | None, seed: int,
                   model: str | None) -> dict[str, str]:
    given = {"top_k": top_k, "samples": samples, "policy": policy, "model": model}
    return {"seed": str(seed), **{name: str(value) for name, value in given.items() if value is not None}}


def _vector(value: str | list[float]) -> np.ndarray:
    if isinstance(value, str):
        return np.frombuffer(base64.b64decode(value), dtype="<f4").astype(np.float32)
    return np.asarray(value, dtype=np.float32)


def _entries(replies: list[_Reply]) -> tuple[list[dict[str, Any]], list[int], list[dict[str, Any]]]:
    """Every image's entry in input order, its input index, and the reply it came in."""
    rows = sorted((indices[entry["index"]], entry, reply) for indices, reply in replies for entry in reply["data"])
    return [entry for _, entry, _ in rows], [index for index, _, _ in rows], [reply for _, _, reply in rows]


def _merge(replies: list[_Reply], options: _Options, errors: dict[int, MettaError]) -> Embeddings:
    entries, indices, owners = _entries(replies)
    samples = np.array([reply["samples"] for reply in owners], dtype=np.int64)
    first: dict[str, Any] = owners[0] if owners else {"model": "", "model_fingerprint": "", "policy": "",
                                                      "seed": options.seed}

    def stack(key: str) -> np.ndarray:
        return np.stack([_vector(e[key]) for e in entries]) if entries else np.zeros((0, 0), np.float32)

    return Embeddings(
        embeddings=stack("embedding"),
        variances=stack("variance") if options.return_variance else None,
        dispersions=(np.array([e["dispersion"] for e in entries], dtype=np.float64)
                     if options.return_dispersion else None),
        model=first["model"], model_fingerprint=first["model_fingerprint"], policy=first["policy"],
        samples=int(samples.min()) if len(samples) else 0, seed=first["seed"], samples_per_image=samples,
        indices=np.array(indices, dtype=np.int64), errors=dict(sorted(errors.items())),
    )


def _merge_classify(replies: list[_Reply], seed: int, errors: dict[int, MettaError]) -> Classifications:
    entries, indices, owners = _entries(replies)
    first: dict[str, Any] = owners[0] if owners else {"model": "", "model_fingerprint": "", "policy": "",
                                                      "samples": 0, "seed": seed, "temperature": 1.0,
                                                      "calibrated": False}
    return Classifications(
        labels=[[Label(int(x["class_index"]), str(x["label"]), float(x["probability"])) for x in e["labels"]]
                for e in entries],
        uncertainty=[dict(e["uncertainty"]) for e in entries],
        model=first["model"], model_fingerprint=first["model_fingerprint"], policy=first["policy"],
        samples=int(first["samples"]), seed=int(first["seed"]), temperature=float(first["temperature"]),
        calibrated=bool(first["calibrated"]), indices=np.array(indices, dtype=np.int64),
        errors=dict(sorted(errors.items())),
    )


def _error(response: httpx.Response) -> MettaError:
    try:
        body = response.json()["error"]
        return MettaError(response.status_code, str(body["type"]), str(body["message"]))
    except (ValueError, KeyError, TypeError):  # not metta-serve's error envelope: a proxy, or another server
        body = repr(response.text[:200]) if response.text.strip() else "no body"
        return MettaError(response.status_code, "http_error",
                          f"{response.request.method} {response.request.url} answered {response.status_code} "
                          f"{response.reason_phrase} with {body}, not metta-serve's JSON error: is this a "
                          f"metta-serve URL?")


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
              samples_max: int | None = None, on_error: OnError = "raise") -> Embeddings:
        """Mean embeddings of `images` (bytes or file paths), in order, as numpy arrays.

        `samples="auto"` (with `samples_min`, `samples_max`): the server gives each request the largest S in
        that range its load allows; see `samples_per_image`. `on_error="skip"`: bad images are left out and
        their errors returned in `errors` (rows map to inputs through `indices`)."""
        options = _options(samples, samples_min, samples_max, policy, seed, return_variance, return_dispersion,
                           normalize, model)
        limits = self.limits()
        parts = _requests(images, _planned_samples(options, limits), limits, self.images_per_request)
        errors: dict[int, MettaError] = {}
        replies = self._post_all("/v1/embeddings", options.form(), parts, on_error, errors)
        return _merge(replies, options, errors)

    def classify(self, images: Sequence[ImageInput], *, top_k: int | None = None, samples: int | None = None,
                 policy: str | None = None, seed: int | None = None, model: str | None = None,
                 on_error: OnError = "raise") -> Classifications:
        """The model head's labels of `images` on the mean of their views (`POST /v1/classify`), in order."""
        chosen = secrets.randbelow(MAX_SEED + 1) if seed is None else seed
        limits = self.limits()
        parts = _requests(images, samples or limits.classify_samples, limits, self.images_per_request)
        errors: dict[int, MettaError] = {}
        replies = self._post_all("/v1/classify", _classify_form(top_k, samples, policy, chosen, model), parts,
                                 on_error, errors)
        return _merge_classify(replies, chosen, errors)

    def _post_all(self, path: str, form: dict[str, str], parts: list[_Part], on_error: OnError,
                  errors: dict[int, MettaError]) -> list[_Reply]:
        replies: list[_Reply] = []
        pending = list(reversed(parts))
        while pending:
            part = pending.pop()
            try:
                replies.append((part[0], self._send("POST", path, data=form, files=part[1]).json()))
            except MettaError as refusal:
                error = _naming_inputs(refusal, part[0])
                singles = _split_on_refusal(error, part, on_error)
                if singles is None:
                    errors[part[0][0]] = error
                else:
                    pending.extend(reversed(singles))
        return replies

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
                    samples_max: int | None = None, on_error: OnError = "raise") -> Embeddings:
        """Mean embeddings of `images` (bytes or file paths), in order, as numpy arrays (see `Client.embed`)."""
        options = _options(samples, samples_min, samples_max, policy, seed, return_variance, return_dispersion,
                           normalize, model)
        limits = await self.limits()
        parts = _requests(images, _planned_samples(options, limits), limits, self.images_per_request)
        errors: dict[int, MettaError] = {}
        replies = await self._post_all("/v1/embeddings", options.form(), parts, on_error, errors)
        return _merge(replies, options, errors)

    async def classify(self, images: Sequence[ImageInput], *, top_k: int | None = None, samples: int | None = None,
                       policy: str | None = None, seed: int | None = None, model: str | None = None,
                       on_error: OnError = "raise") -> Classifications:
        """The model head's labels of `images` (see `Client.classify`)."""
        chosen = secrets.randbelow(MAX_SEED + 1) if seed is None else seed
        limits = await self.limits()
        parts = _requests(images, samples or limits.classify_samples, limits, self.images_per_request)
        errors: dict[int, MettaError] = {}
        replies = await self._post_all("/v1/classify", _classify_form(top_k, samples, policy, chosen, model), parts,
                                       on_error, errors)
        return _merge_classify(replies, chosen, errors)

    async def _post_all(self, path: str, form: dict[str, str], parts: list[_Part], on_error: OnError,
                        errors: dict[int, MettaError]) -> list[_Reply]:
        """Every part, `concurrency` at a time; a refused part is split into its images (`_split_on_refusal`)."""
        async def one(part: _Part) -> list[_Reply]:
            try:
                async with self._slots:
                    reply: dict[str, Any] = (await self._send("POST", path, data=form, files=part[1])).json()
                return [(part[0], reply)]
            except MettaError as refusal:
                error = _naming_inputs(refusal, part[0])
                singles = _split_on_refusal(error, part, on_error)
                if singles is None:
                    errors[part[0][0]] = error
                    return []
                return [reply for done in await asyncio.gather(*(one(single) for single in singles))
                        for reply in done]

        return [reply for done in await asyncio.gather(*(one(part) for part in parts)) for reply in done]

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
