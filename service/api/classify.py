"""POST /v1/classify: the model's own head on the mean embedding (eq. 7), with calibrated probabilities.

The images go through the same decode → plan → engine path as /v1/embeddings (the runner is passed in
by the app); the head is then applied on the CPU to each image's mean, divided by the temperature
shipped for (model, weights, policy, S bucket) in `models/calibration.json`.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from models import LoadedModel
from models.calibration import temperature_for
from models.policy_quality import policy_figures
from service.api.requests import ViewRequest, read_embeddings_request, resolve_views
from service.api.schemas import (
    ClassifyData,
    ClassifyJSONRequest,
    ClassifyOptionsIn,
    ClassifyResponse,
    ClassifyUncertainty,
    ClassLabel,
    EndpointDefault,
    PolicyFigures,
    Usage,
)
from service.core.classify import Head, head_of, predict
from service.core.embedding import EmbedOptions, ImageJob, ImageResult
from service.core.errors import InvalidOption, NoClassifier
from service.core.policies import make_policy
from service.core.uncertainty import label_free_uncertainty
from service.metrics import samples_label
from service.settings import Settings

if TYPE_CHECKING:
    from service.api.app import ServiceState

CLASSIFY = "/v1/classify"
# (request, state, images, options, view request, endpoint) → each image's job and result, in input order
RunViews = Callable[[Request, "ServiceState", list[bytes], EmbedOptions, ViewRequest, str],
                    Awaitable[tuple[list[ImageJob], list[ImageResult]]]]
_heads: weakref.WeakKeyDictionary[LoadedModel, Head | None] = weakref.WeakKeyDictionary()


def cached_head(model: LoadedModel) -> Head | None:
    """The model's head as float64 arrays, extracted once per loaded model."""
    if model not in _heads:
        _heads[model] = head_of(model)
    return _heads[model]


def resolve_classify(options: ClassifyOptionsIn, settings: Settings, model: LoadedModel, head: Head,
                     n_images: int) -> tuple[EmbedOptions, ViewRequest]:
    """The classify defaults (`classify_policy`, `classify_samples`) and the same rules as /v1/embeddings."""
    views = resolve_views(options, settings, model.name, n_images, [model.name],
                          default_policy=settings.classify_policy, default_samples=settings.classify_samples,
                          input_size=model.spec.preprocess.input_size)
    if options.top_k > head.classes:
        raise InvalidOption(f"top_k: at most the head's {head.classes} classes, got {options.top_k}")
    # dispersion compares views: none for S = 1 (auto S: none unless samples_min >= 2)
    embed = EmbedOptions(views.samples, make_policy(views.policy), views.seed,
                         return_dispersion=views.least_samples >= 2)
    return embed, views


async def classify(request: Request, state: ServiceState, model: LoadedModel, run_views: RunViews) -> Response:
    started = time.perf_counter()
    settings = state.settings
    head = cached_head(model)
    if head is None:
        raise NoClassifier(f"model {model.name!r} has no classifier head: it serves /v1/embeddings only")
    parsed = await read_embeddings_request(request, settings, ClassifyOptionsIn, ClassifyJSONRequest)
    embed, views = resolve_classify(parsed.options, settings, model, head, len(parsed.images))
    jobs, results = await run_views(request, state, parsed.images, embed, views, CLASSIFY)
    samples = len(jobs[0].views)  # auto S: what the scheduler gave this request
    reply = classify_reply(model, head, embed, samples, parsed.options.top_k, results)
    state.metrics.request_duration.labels(CLASSIFY, samples_label(samples)).observe(time.perf_counter() - started)
    return Response(reply.model_dump_json(), media_type="application/json")


def classify_reply(model: LoadedModel, head: Head, embed: EmbedOptions, samples: int, top_k: int,
                   results: Sequence[ImageResult]) -> ClassifyResponse:
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


def task_card(model: LoadedModel, settings: Settings) -> dict[str, object]:
    """The /v1/models fields about tasks: can it classify, each endpoint's defaults, the study's figures."""
    defaults = {"embeddings": EndpointDefault(policy=settings.default_policy, samples=settings.default_samples),
                "classify": EndpointDefault(policy=settings.classify_policy, samples=settings.classify_samples)}
    figures = [PolicyFigures.model_validate(row) for row in policy_figures(model.name, model.weights_sha)]
    return {"classifier": model.head is not None, "defaults": defaults, "policies": figures}
