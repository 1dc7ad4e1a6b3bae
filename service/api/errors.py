"""Errors at the door: every exception a request can end in becomes one reply in the error envelope
(`service.core.errors.error_body`), and every refusal is counted once, under its class's reason.

The OpenAPI document's error list (`ERROR_RESPONSES`) is derived from the same classes.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from service.api.schemas import ErrorResponse
from service.api.views import ClientGone, count_client_gone
from service.core.errors import (
    ERRORS,
    InternalError,
    InvalidOption,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    ServiceError,
)
from service.metrics import Metrics

log = logging.getLogger("metta.app")
CLIENT_CLOSED = 499  # nginx's code for "client closed request": nobody reads it

# Every status the error table has, with the types it may carry, for each route's OpenAPI `responses`.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse,
             "description": ", ".join(f"`{error.type}`" for error in ERRORS if error.status == status)}
    for status in sorted({error.status for error in ERRORS})}


def error_response(error: ServiceError) -> Response:
    return Response(error.body(), status_code=error.status, headers=error.headers, media_type="application/json")


def add_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    async def service_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServiceError)
        metrics.count_refusal(exc)  # every refusal the app answers, wherever it was raised
        return error_response(exc)

    async def client_gone(request: Request, exc: Exception) -> Response:
        return Response(status_code=CLIENT_CLOSED)  # counted where it was noticed

    async def client_disconnected(request: Request, exc: Exception) -> Response:
        count_client_gone(request, metrics)  # left mid-body (or sent a broken one): not our 500
        return Response(status_code=CLIENT_CLOSED)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        message = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return await service_error(request, InvalidOption(message))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        kind = {404: NotFound, 405: MethodNotAllowed}.get(exc.status_code, InvalidRequest)
        error = kind(str(exc.detail), headers=dict(exc.headers or {}))
        error.status = exc.status_code  # the router's status stands, whatever the type
        return await service_error(request, error)

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(InternalError("internal error"))

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(ClientGone, client_gone)
    app.add_exception_handler(ClientDisconnect, client_disconnected)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
