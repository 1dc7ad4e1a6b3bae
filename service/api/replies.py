"""The replies of the endpoints that compute views, built from their schemas and serialised off the event loop
(64 images with top_k 1000, or 64 variance vectors as floats, take a good part of a second to build)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable, Sequence

import numpy as np
from pydantic import BaseModel
from starlette.responses import Response

from models import LoadedModel
from models.calibration import temperature_for
from service.api.requests import ResolvedOptions
from service.api.schemas import (
    ClassifyData,
    ClassifyResponse,
    ClassifyUncertainty,
    ClassLabel,
    EmbeddingData,
    EmbeddingsResponse,
    OpenAIEmbeddingData,
    OpenAIEmbeddingsResponse,
    OpenAIUsage,
    Usage,
)
from service.core.classify import Head, predict
from service.core.embedding import EmbedOptions, ImageResult
from service.core.uncertainty import label_free_uncertainty


async def json_reply(build: Callable[[], BaseModel], *, exclude_none: bool = False) -> Response:
    """`build()`'s reply as a JSON response, built and serialised in a worker thread: the event loop keeps
    serving other connections meanwhile. `exclude_none`: leave out the fields that are None."""
    def serialised() -> bytes:
        return build().model_dump_json(exclude_none=exclude_none).encode()

    return Response(await asyncio.to_thread(serialised), media_type="application/json")


def _encode(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    values: list[float] = vector.tolist()
    return values


def embeddings_reply(reply_type: type[EmbeddingsResponse], model: LoadedModel, resolved: ResolvedOptions,
                     results: Sequence[ImageResult], samples: int) -> EmbeddingsResponse:
    """The /v1/embeddings reply (this service's shape, or OpenAI's, which extends it); fields a request did
    not ask for are None, left out of the JSON."""
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
    return reply_type.model_construct(
        model=model.name, model_fingerprint=model.fingerprint, dim=model.dim, policy=options.policy.name,
        samples=samples, seed=options.seed, data=data,
        usage=usage_type.model_construct(images=len(results), crops=len(results) * samples))


def classify_reply(model: LoadedModel, head: Head, embed: EmbedOptions, samples: int, top_k: int,
                   results: Sequence[ImageResult]) -> ClassifyResponse:
    """The /v1/classify reply: eq. 7 on each image's mean, with the shipped temperature."""
    temperature = temperature_for(model.name, model.weights_sha, embed.policy.name, samples)
    predictions = predict(head, np.stack([r.embedding for r in results]), temperature.value, top_k)
    data = []
    for index, (result, prediction) in enumerate(zip(results, predictions, strict=True)):
        labels = [ClassLabel(class_index=c, label=head.labels[c] if head.labels is not None else str(c),
                             probability=p)
                  for c, p in zip(prediction.classes, prediction.probabilities, strict=True)]
        uncertainty = ClassifyUncertainty(max_probability=prediction.max_probability, entropy=prediction.entropy,
                                          dispersion=result.dispersion,
                                          label_free_uncertainty=float(label_free_uncertainty(result.embedding)))
        data.append(ClassifyData(index=index, labels=labels, uncertainty=uncertainty))
    return ClassifyResponse(model=model.name, model_fingerprint=model.fingerprint, policy=embed.policy.name,
                            samples=samples, seed=embed.seed, temperature=temperature.value,
                            calibrated=temperature.calibrated, data=data,
                            usage=Usage(images=len(results), crops=len(results) * samples))
