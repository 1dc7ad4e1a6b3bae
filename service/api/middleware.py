"""ASGI middlewares at the door: header limits, the body limit and the in-flight body budget.

Each refusal here is a reply in the error table's JSON shape, counted in `metta_rejected_total`, and says
`Connection: close` when the request's body was left unread (the HTTP protocol then reads and discards the
rest for a bounded time, so the client reads its refusal, and closes).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import error_response
from service.core.errors import HeadersTooLarge, PayloadTooLarge, ServiceError
from service.engine.budget import Budget, Reservation
from service.metrics import Metrics


class HeaderLimitMiddleware:
    """431 when a request carries more than `max_headers` headers or more than `max_header_bytes` of them.

    The uvicorn protocol (`service.api.protocol`) enforces the same bounds while the bytes arrive, before
    parsing; this is the check for any other server (and for in-process tests).
    """

    def __init__(self, app: ASGIApp, max_headers: int, max_header_bytes: int, metrics: Metrics) -> None:
        self.app = app
        self.max_headers = max_headers
        self.max_header_bytes = max_header_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = scope.get("headers", [])
            size = sum(len(name) + len(value) + 4 for name, value in headers)  # "name: value\r\n"
            if len(headers) > self.max_headers or size > self.max_header_bytes:
                error = HeadersTooLarge(f"the request has {len(headers)} headers, {size} bytes; at most "
                                        f"{self.max_headers} headers and {self.max_header_bytes} bytes are accepted")
                self.metrics.count_refusal(error)
                await error_response(error)(scope, receive, closing(send))
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuse bodies over max_body_bytes with 413 — by Content-Length at once, else while streaming — and
    hold every body in flight against the server-wide `body_budget` (429 with Retry-After when it is full).

    A body is charged to the budget as its bytes arrive, not by what its Content-Length declares: sockets
    that send headers declaring large bodies and then nothing hold none of it (they had held the whole budget
    for the body timeout, and refused everyone else). A request whose declared body cannot fit beside what
    is held now is refused at the door; one that outgrows the budget while arriving gets its 429 then.
    Streaming bodies are counted as they arrive and reading stops at the limit, so an oversized body is
    never buffered whole. A reply sent before its request's body was read to the end (413, 408, 401, 415,
    429, ...) says `Connection: close`; the HTTP protocol then reads and discards the rest for a bounded time
    (a lingering close), so the client reads its reply instead of a reset, and closes.
    The body's bytes stay charged until the request's reply is sent: its images are held until then.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, metrics: Metrics, body_budget: Budget | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.body_budget = body_budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        headers = dict(scope.get("headers", []))
        length = headers.get(b"content-length", b"")
        known = int(length) if length.isdigit() else None
        if known is not None and known > limit:
            await self._refuse(too_large(limit), scope, receive, send)
            return
        body_pending = (known is not None and known > 0) or b"transfer-encoding" in headers
        reservation: Reservation | None = None
        if self.body_budget is not None and body_pending:
            try:
                self.body_budget.check_room(known or 0)
                reservation = self.body_budget.reserve(0)
            except ServiceError as error:
                await self._refuse(error, scope, receive, send)
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received, body_pending
            message = await receive()
            if message["type"] == "http.request":
                chunk = len(message.get("body", b""))
                received += chunk
                if not message.get("more_body", False):
                    body_pending = False
                if received > limit:
                    raise too_large(limit)
                if reservation is not None and received > reservation.amount:
                    # Charged as it arrives. Raised inside the app's read of the body, so the app's error
                    # handler answers (and counts) the 429 or 413.
                    reservation.grow(received - reservation.amount)
            return message

        async def send_closing_if_unread(message: Message) -> None:
            if message["type"] == "http.response.start" and body_pending:
                message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
            await send(message)

        try:
            await self.app(scope, limited_receive, send_closing_if_unread)
        finally:
            if reservation is not None:
                reservation.release()

    async def _refuse(self, error: ServiceError, scope: Scope, receive: Receive, send: Send) -> None:
        self.metrics.count_refusal(error)
        await error_response(error)(scope, receive, closing(send))


def closing(send: Send) -> Send:
    async def send_closing(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
        await send(message)

    return send_closing


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the request body is over the limit of {limit} bytes")

