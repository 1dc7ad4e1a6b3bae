"""OpenAI's /v1/embeddings shape on this service's route, so existing OpenAI client code works unchanged.

A JSON body with `input` (instead of `images`) is OpenAI's: it is checked against `OpenAIEmbeddingsRequest`
and rewritten into this service's own JSON body, which then takes the usual path (same limits, same
errors); the reply is this service's, with OpenAI's fields added (`OpenAIEmbeddingsResponse`).
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import ValidationError

from service.api.schemas import (
    OpenAIEmbeddingsRequest,
    RequestLimits,
    describe_validation_error,
)
from service.core.errors import InvalidOption
from service.settings import Settings

SERVED_SINCE = int(time.time())  # `created` of GET /v1/models: when this server process started
_OPENAI_ONLY = {"input", "encoding_format", "user", "dimensions"}


def is_openai_body(data: dict[str, Any]) -> bool:
    return "input" in data


def from_openai(data: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI body as this service's JSON body (`images`, `encoding`); what it cannot honour is a 422."""
    if "images" in data:
        raise InvalidOption("send either images (this service's shape) or input (OpenAI's), not both")
    if data.get("dimensions") is not None:
        raise InvalidOption("dimensions: not supported; this backbone's embedding has no trained truncation, "
                            "so a shortened one would not be meaningful: leave dimensions out")
    if "encoding" in data and "encoding_format" in data:
        raise InvalidOption("encoding and encoding_format: give one of them (encoding_format is OpenAI's name)")
    given = data["input"]
    if isinstance(given, list) and any(not isinstance(item, str) for item in given):
        raise InvalidOption("input: token arrays are not supported; each input is an image as a "
                            "data:image/...;base64, URL or bare base64")
    try:
        request = OpenAIEmbeddingsRequest.model_validate(data)
    except ValidationError as exc:
        raise InvalidOption(describe_validation_error(exc)) from None
    native = request.model_dump(exclude=_OPENAI_ONLY, exclude_unset=True)
    native["images"] = [request.input] if isinstance(request.input, str) else request.input
    if request.encoding_format is not None:
        native["encoding"] = request.encoding_format
    return native


def request_limits(settings: Settings) -> RequestLimits:
    """What one request may carry, for GET /v1/models (clients split their work to fit)."""
    return RequestLimits(max_images=settings.max_images, max_body_bytes=settings.max_body_bytes,
                         max_request_crops=settings.max_request_crops, max_samples=settings.max_samples,
                         default_samples=settings.default_samples)
