"""GET /v1/models and /v1/models/{id}: the model served, its fingerprint, what it can do and the limits."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Depends
from starlette.requests import Request

from models import LoadedModel
from models.policy_quality import policy_figures
from service.api.auth import authorize
from service.api.errors import ERROR_RESPONSES
from service.api.openai_compat import SERVED_SINCE, request_limits
from service.api.schemas import EndpointDefault, ModelCard, ModelsResponse, PolicyFigures
from service.api.state import state_of
from service.core.errors import NotFound
from service.settings import Settings

router = APIRouter(dependencies=[Depends(authorize)])


@router.get("/v1/models", response_model=ModelsResponse, responses=ERROR_RESPONSES)
async def list_models(request: Request) -> ModelsResponse:
    return ModelsResponse(data=[model_card(request)])


@router.get("/v1/models/{model_id}", response_model=ModelCard, responses=ERROR_RESPONSES)
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    """The served model's card by its id (OpenAI's `client.models.retrieve(id)`); 404 for any other id."""
    card = model_card(request)
    if model_id != card.id:
        raise NotFound(f"model {model_id!r}: this server serves {card.id!r} only (GET /v1/models)")
    return card


def model_card(request: Request) -> ModelCard:
    state = state_of(request)
    loaded, settings = state.serving_model(), state.settings
    return ModelCard(name=loaded.name, dim=loaded.dim, default=True, fingerprint=loaded.fingerprint,
                     device=str(loaded.device), dtype=loaded.dtype, mode=loaded.mode,
                     preprocess=asdict(loaded.spec.preprocess), decoding=loaded.decoding, id=loaded.name,
                     created=SERVED_SINCE, limits=request_limits(settings), **task_card(loaded, settings))


def task_card(model: LoadedModel, settings: Settings) -> dict[str, object]:
    """The /v1/models fields about tasks: can it classify, each endpoint's defaults, the study's figures."""
    defaults = {"embeddings": EndpointDefault(policy=settings.default_policy, samples=settings.default_samples),
                "classify": EndpointDefault(policy=settings.classify_policy, samples=settings.classify_samples)}
    figures = [PolicyFigures.model_validate(row) for row in policy_figures(model.name, model.weights_sha)]
    return {"classifier": model.head is not None, "defaults": defaults, "policies": figures}
