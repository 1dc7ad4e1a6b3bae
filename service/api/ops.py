"""What operators and orchestrators ask: liveness (/healthz), readiness (/readyz), Prometheus (/metrics)."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from service.api.schemas import ErrorResponse
from service.api.state import state_of
from service.core.errors import NotReady

router = APIRouter(tags=["ops"])


@router.get("/healthz", responses={503: {"description": "the inference worker has stopped"}})
async def healthz(request: Request) -> JSONResponse:
    engine = state_of(request).engine
    alive = engine is None or engine.alive
    return JSONResponse({"status": "ok" if alive else "worker_dead"}, status_code=200 if alive else 503)


@router.get("/readyz", responses={503: {"model": ErrorResponse}})
async def readyz(request: Request) -> JSONResponse:
    if (reason := state_of(request).not_ready_because()) is not None:
        raise NotReady(reason)
    return JSONResponse({"status": "ready"})


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    return Response(state_of(request).metrics.generate(), media_type="text/plain; version=0.0.4; charset=utf-8")
