"""Every reply counted by endpoint and status code, and every request tagged with an id for the logs."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Collection

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import Metrics

log = logging.getLogger("metta.app")


class RequestMetricsMiddleware:
    """`metta_requests_total{endpoint, code}` for every reply (paths outside `endpoints` count as "other", so
    the label stays bounded), an `x-request-id` header, and a log line for each POST and each 5xx."""

    def __init__(self, app: ASGIApp, metrics: Metrics, endpoints: Collection[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.endpoints = frozenset(endpoints)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex[:16]
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            path = scope.get("path", "")
            endpoint = path if path in self.endpoints else "other"
            self.metrics.requests.labels(endpoint, str(status)).inc()
            if status >= 500 or (scope.get("method") == "POST" and endpoint != "other"):
                log.info("request_id=%s %s %s -> %d", request_id, scope.get("method"), endpoint, status)
