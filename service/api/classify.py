"""POST /v1/classify: the model's own head on the mean embedding (eq. 7), with calibrated probabilities.

The images go through the same decode → plan → engine path as /v1/embeddings (`service.api.views`); the
head is then applied on the CPU to each image's mean, divided by the temperature shipped for (model,
weights, policy, S bucket) in `models/calibration.json`.
"""

from __future__ import annotations

import functools
import time
import weakref

from fastapi import APIRouter, Depends
from starlette.requests import Request
from starlette.responses import Response

from models import LoadedModel
from service.api.auth import authorize
from service.api.errors import ERROR_RESPONSES
from service.api.replies import classify_reply, json_reply
from service.api.requests import ViewRequest, read_embeddings_request, resolve_views
from service.api.schemas import (
    ClassifyJSONRequest,
    ClassifyOptionsIn,
    ClassifyResponse,
    openapi_request_body,
)
from service.api.state import state_of
from service.api.views import run_views
from service.core.classify import Head, head_of
from service.core.embedding import EmbedOptions
from service.core.errors import InvalidOption, NoClassifier
from service.core.policies import make_policy
from service.metrics import samples_label
from service.settings import Settings

CLASSIFY = "/v1/classify"
router = APIRouter(dependencies=[Depends(authorize)])
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


@router.post(CLASSIFY, response_model=ClassifyResponse, responses=ERROR_RESPONSES,
             openapi_extra={"requestBody": openapi_request_body(ClassifyJSONRequest, ClassifyOptionsIn)})
async def classify(request: Request) -> Response:
    started = time.perf_counter()
    state = state_of(request)
    settings = state.settings
    model = state.serving_model()
    head = cached_head(model)
    if head is None:
        raise NoClassifier(f"model {model.name!r} has no classifier head: it serves /v1/embeddings only")
    parsed = await read_embeddings_request(request, settings, ClassifyOptionsIn, ClassifyJSONRequest)
    embed, views = resolve_classify(parsed.options, settings, model, head, len(parsed.images))
    jobs, results = await run_views(request, state, parsed.images, embed, views, CLASSIFY)
    samples = len(jobs[0].views)  # auto S: what the scheduler gave this request
    reply = await json_reply(functools.partial(classify_reply, model, head, embed, samples, parsed.options.top_k,
                                               results))
    state.metrics.request_duration.labels(CLASSIFY, samples_label(samples)).observe(time.perf_counter() - started)
    return reply

