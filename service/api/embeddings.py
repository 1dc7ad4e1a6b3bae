"""POST /v1/embeddings: parse, run the views, reply (this service's shape, or OpenAI's)."""

from __future__ import annotations

import functools
import time

from fastapi import APIRouter, Depends
from starlette.requests import Request
from starlette.responses import Response

from service.api.auth import authorize
from service.api.errors import ERROR_RESPONSES
from service.api.replies import embeddings_reply, json_reply
from service.api.requests import image_field, read_embeddings_request, resolve_options
from service.api.schemas import (
    EmbeddingsResponse,
    EmbedOptionsIn,
    OpenAIEmbeddingsResponse,
    openapi_request_body,
)
from service.api.state import state_of
from service.api.views import run_views
from service.metrics import samples_label

EMBEDDINGS = "/v1/embeddings"
router = APIRouter(dependencies=[Depends(authorize)])


@router.post(EMBEDDINGS, response_model=EmbeddingsResponse, responses=ERROR_RESPONSES,
             openapi_extra={"requestBody": openapi_request_body()})
async def embeddings(request: Request) -> Response:
    started = time.perf_counter()
    state = state_of(request)
    settings = state.settings
    model = state.serving_model()
    parsed = await read_embeddings_request(request, settings, EmbedOptionsIn)
    resolved = resolve_options(parsed.options, settings, model.name, len(parsed.images), [model.name],
                               input_size=model.spec.preprocess.input_size)
    assert resolved.views is not None
    jobs, results = await run_views(request, state, parsed.images, resolved.embed, resolved.views, EMBEDDINGS,
                                    field=image_field(parsed.openai))
    samples = len(jobs[0].views)  # auto S: what the scheduler gave this request
    reply_type = OpenAIEmbeddingsResponse if parsed.openai else EmbeddingsResponse
    reply = await json_reply(functools.partial(embeddings_reply, reply_type, model, resolved, results, samples),
                             exclude_none=True)
    state.metrics.request_duration.labels(EMBEDDINGS, samples_label(samples)).observe(time.perf_counter() - started)
    return reply
