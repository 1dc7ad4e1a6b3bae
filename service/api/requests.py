"""The door's paperwork: an HTTP request → image bytes + resolved, validated options.

Everything here runs before anything is queued; every problem becomes a ServiceError naming it.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import json
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import pybase64
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect, Request

from service.api.limits import check_json_size
from service.api.openai_compat import from_openai, is_openai_body
from service.api.schemas import (
    EmbeddingsJSONRequest,
    EmbedOptionsIn,
    OptionsT,
    ViewOptionsIn,
    describe_validation_error,
    parse_form_options,
)
from service.core.embedding import EmbedOptions
from service.core.errors import (
    InvalidImage,
    InvalidOption,
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
    ServiceError,
    UnsupportedMediaType,
)
from service.core.options import MAX_SEED, PolicyError, auto_samples_range, samples_for
from service.core.policies import check_samples, make_policy
from service.settings import Settings

_DATA_URL = re.compile(r"data:image/[a-zA-Z0-9.+-]+;base64,", re.ASCII)
_OTHER_DATA_URL = re.compile(r"data:([^,;]*)[^,]*,", re.ASCII)  # any other data: URL, named in the error
_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://")
T = TypeVar("T")


@dataclass
class ParsedRequest(Generic[OptionsT]):
    images: list[bytes]
    options: OptionsT
    openai: bool = False  # OpenAI's request shape: the reply takes OpenAI's shape too


def image_field(openai: bool) -> str:
    """The field a client sends its images in (OpenAI's shape: `input`): errors about one image name it."""
    return "input" if openai else "images"


@dataclass(frozen=True)
class ViewRequest:
    """The view options every endpoint resolves alike (see `resolve_views`)."""

    policy: str
    samples: int  # S asked for; for auto S, samples_max (the scheduler gives the S once decoded)
    auto: tuple[int, int] | None  # (samples_min, samples_max) of a samples='auto' request
    seed: int
    timeout_s: float  # this request's deadline

    @property
    def least_samples(self) -> int:
        return self.auto[0] if self.auto is not None else self.samples


@dataclass(frozen=True)
class ResolvedOptions:
    embed: EmbedOptions
    encoding: str
    views: ViewRequest | None = None
    label_free_uncertainty: bool = False


async def read_embeddings_request(request: Request, settings: Settings,
                                  schema: type[OptionsT] = EmbedOptionsIn,  # type: ignore[assignment]
                                  json_schema: type[BaseModel] = EmbeddingsJSONRequest) -> ParsedRequest[OptionsT]:
    """Read the body (bounded in time; the size is bounded by the body-limit middleware) and parse it.

    `schema` is the endpoint's options model and `json_schema` the same with `images` (default: /v1/embeddings).
    """
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in ("application/json", "multipart/form-data"):
        raise UnsupportedMediaType(
            f"content type {media_type or '(none)'!r} is not supported; "
            "send application/json or multipart/form-data")
    try:
        async with asyncio.timeout(settings.body_timeout_s):
            if media_type == "application/json":
                body = await request.body()
            else:
                return await _parse_multipart(request, settings, schema)
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {settings.body_timeout_s:g} s") from None
    # Parsing and base64-decoding up to max_body_bytes takes a while: off the event loop, and after the body
    # timeout (the client's clock runs while its bytes arrive, not while we parse them).
    return await to_thread_to_the_end(_parse_json, body, settings, schema, json_schema)


async def to_thread_to_the_end(function: Callable[..., T], *args: object) -> T:
    """`function(*args)` in a thread, awaited to its end even when the awaiting request is cancelled (a
    shutdown): what the thread holds stays charged to the request's budgets, released only when the request
    settles, until the thread lets go of it."""
    work = asyncio.ensure_future(asyncio.to_thread(function, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await work
        raise


def _parse_json(body: bytes, settings: Settings, schema: type[OptionsT],
                json_schema: type[BaseModel]) -> ParsedRequest[OptionsT]:
    if not body:
        raise InvalidRequest("the request body is empty")
    check_json_size(body, settings.max_json_elements)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: "[[[[…" nested too deep
        raise InvalidRequest("the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the JSON body must be an object with an 'images' list")
    openai = json_schema is EmbeddingsJSONRequest and is_openai_body(data)
    if openai:
        data = from_openai(data)
    images = data.get("images")
    if images is None:
        raise InvalidOption("images: field required (a list of base64-encoded images)")
    if not isinstance(images, list):
        raise InvalidOption("images: must be a list of base64 strings")
    if len(images) > settings.max_images:
        raise PayloadTooLarge(f"{len(images)} images sent; at most {settings.max_images} per request")
    try:
        parsed = json_schema.model_validate(data)
    except ValidationError as exc:
        raise InvalidOption(describe_validation_error(exc, json_schema)) from None
    options = schema.model_validate(parsed.model_dump(exclude={"images"}, exclude_unset=True))
    texts: list[str] = parsed.images  # type: ignore[attr-defined]
    field = image_field(openai)
    return ParsedRequest([decode_base64(text, f"{field}[{i}]") for i, text in enumerate(texts)], options, openai)


def decode_base64(text: str, label: str) -> bytes:
    """One image sent as bare base64 or a data:image/...;base64, URL; `label` names it in errors."""
    if _URL.match(text):
        raise InvalidRequest(f"{label} looks like a URL; URLs are not fetched: send the image bytes")
    match = _DATA_URL.match(text)
    if match:
        text = text[match.end() :]
    elif other := _OTHER_DATA_URL.match(text):
        raise InvalidImage(f"{label} is a data: URL of {other.group(1) or 'text'!r}, not a base64 image "
                           "(data:image/...;base64,)")
    if not text:
        raise InvalidImage(f"{label} is empty")
    try:
        # pybase64 (SIMD): a 12 MP photo's 5 MB of base64 in 0.3 ms, against 15 ms for the standard library,
        # which holds the GIL all that time; the same strict alphabet and padding rules.
        return pybase64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{label} is not valid base64 (standard alphabet, with padding): send each image as "
                             "bare base64 or a data:image/...;base64, URL") from None


async def _parse_multipart(request: Request, settings: Settings, schema: type[OptionsT]) -> ParsedRequest[OptionsT]:
    if request.headers.get("content-length") == "0":  # as for JSON: an empty body is a bad request, not a form
        raise InvalidRequest("the request body is empty")
    try:
        form = await request.form(
            max_files=settings.max_images + 1, max_fields=64, max_part_size=settings.max_body_bytes)
    except (ServiceError, ClientDisconnect):  # a client gone mid-body is not a malformed body (499, as for JSON)
        raise
    except Exception as exc:  # starlette raises its own HTTPException / MultiPartException on bad bodies
        detail = getattr(exc, "detail", None) or getattr(exc, "message", None) or "malformed multipart body"
        if "too many files" in str(detail).lower():
            raise PayloadTooLarge(f"too many files; at most {settings.max_images} images per request") from None
        raise InvalidRequest(f"could not parse the multipart body: {detail}") from None
    try:
        images: list[bytes] = []
        fields: dict[str, str] = {}
        for key, value in form.multi_items():
            if key == "images":
                if isinstance(value, UploadFile):
                    images.append(await value.read())
                elif _URL.match(value):
                    raise InvalidRequest("images: URLs are not fetched; upload the image bytes as a file")
                else:
                    raise InvalidRequest("images: each must be an uploaded file")
            elif isinstance(value, UploadFile):
                raise InvalidOption(f"{key}: expected a form field, got a file; send image files in the 'images' "
                                    "field (-F images=@photo.jpg)")
            elif key in fields:
                raise InvalidOption(f"{key}: given more than once")
            else:
                fields[key] = value
    finally:
        await form.close()
    if not images:
        raise InvalidOption("images: field required (one or more files in the 'images' field)")
    if len(images) > settings.max_images:
        raise PayloadTooLarge(f"{len(images)} images sent; at most {settings.max_images} per request")
    return ParsedRequest(images, parse_form_options(fields, schema))


def resolve_options(options: EmbedOptionsIn, settings: Settings, model_name: str, n_images: int,
                    known_models: list[str], *, input_size: int | None = None) -> ResolvedOptions:
    """Fill defaults from the settings and check the rules that span several options."""
    views = resolve_views(options, settings, model_name, n_images, known_models, default_policy=settings.default_policy,
                          default_samples=settings.default_samples, input_size=input_size)
    least = views.least_samples
    if options.return_variance and least < 2:
        raise InvalidOption("return_variance: needs samples >= 2 (variance of one view is undefined)")
    if options.return_dispersion and least < 2:
        raise InvalidOption("return_dispersion: needs samples >= 2 (one view has no dispersion)")
    embed = EmbedOptions(views.samples, make_policy(views.policy), views.seed, options.return_variance,
                         options.normalize, options.view_normalize, options.return_dispersion)
    return ResolvedOptions(embed, options.encoding, views, options.return_label_free_uncertainty)


def resolve_views(options: ViewOptionsIn, settings: Settings, model_name: str, n_images: int,
                  known_models: list[str], *, default_policy: str, default_samples: int,
                  input_size: int | None = None) -> ViewRequest:
    """The rules of the options every view endpoint shares: model, policy, S or auto S, limits, deadline, seed."""
    if options.model is not None and options.model != model_name:
        raise InvalidOption(
            f"model: unknown model {options.model!r}; this server serves: {', '.join(known_models)}")
    policy_name = options.policy or default_policy
    auto: tuple[int, int] | None = None
    try:
        if options.samples == "auto":
            low, high = auto_samples_range(policy_name, options.samples_min, options.samples_max, settings.max_samples)
            high = min(high, max(low, settings.max_request_crops // n_images))  # no more crops than a request may bring
            auto = (low, high)
            # The scheduler gives the S it can serve in time once the images are decoded, and they are planned
            # at it (`_decode_all` in service/api/views.py). Replies and metrics report len(job.views).
            samples = high
        else:
            if {"samples_min", "samples_max"} & options.model_fields_set:
                raise InvalidOption("samples_min, samples_max: only with samples='auto'")
            samples = samples_for(policy_name, options.samples, default_samples)
        check_samples(policy_name, samples, max_samples=settings.max_samples, input_size=input_size)
    except PolicyError as exc:
        raise InvalidOption(f"samples: {exc}") from None
    least = auto[0] if auto is not None else samples
    if n_images * least > settings.max_request_crops:
        raise PayloadTooLarge(
            f"{n_images} images x {least} samples = {n_images * least} crops; "
            f"at most {settings.max_request_crops} per request")
    timeout_s = settings.request_timeout_s
    if options.timeout_ms is not None:
        if options.timeout_ms > settings.request_timeout_s * 1000:
            raise InvalidOption(
                f"timeout_ms: at most the server's request timeout, {settings.request_timeout_s * 1000:g}")
        timeout_s = options.timeout_ms / 1000
    seed = options.seed if options.seed is not None else secrets.randbelow(MAX_SEED + 1)
    return ViewRequest(policy_name, samples, auto, seed, timeout_s)
