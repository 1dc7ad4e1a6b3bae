"""Every error the API answers, stated once: each class carries its HTTP status, the stable `type` that
clients switch on, and the reason `metta_rejected_total` counts it under (None: not a refusal, e.g. a
5xx or a 404, which `metta_requests_total` counts by code). `error_body` is the one place the JSON
envelope is written; the README's error table and the OpenAPI error list are checked against
`ERRORS` (tests/unit/test_errors.py).
"""

from __future__ import annotations

import json


class ServiceError(Exception):
    """An error with a fixed HTTP status and a stable `type` that clients can switch on."""

    status = 500
    type = "internal"
    reason: str | None = None  # metta_rejected_total{reason}; None: not counted as a refusal

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        message = bounded(message)
        super().__init__(message)
        self.message = message
        self.headers = headers or {}

    def body(self) -> bytes:
        return error_body(self.type, self.message)


MAX_MESSAGE_CHARS = 500


def bounded(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """A message cut to `limit` characters: messages quote client values (an unknown model's name), and an
    error reply must not grow with the input (a 20 MB `model` came back in a 20 MB 422)."""
    if len(message) <= limit:
        return message
    return message[: limit - 15] + "… (truncated)"


def error_body(type_: str, message: str) -> bytes:
    """The error envelope every error reply carries: `{"error": {"type": ..., "message": ...}}`."""
    return json.dumps({"error": {"type": type_, "message": bounded(message)}}).encode()


class InvalidImage(ServiceError):
    status, type, reason = 400, "invalid_image", "invalid"


class InvalidRequest(ServiceError):
    status, type, reason = 400, "invalid_request", "invalid"


class Unauthorized(ServiceError):
    status, type, reason = 401, "unauthorized", "unauthorized"


class NotFound(ServiceError):
    status, type = 404, "not_found"


class MethodNotAllowed(ServiceError):
    status, type = 405, "method_not_allowed"


class RequestTimeout(ServiceError):
    """The request's headers or body did not arrive in time."""

    status, type, reason = 408, "request_timeout", "invalid"


class PayloadTooLarge(ServiceError):
    status, type, reason = 413, "payload_too_large", "too_large"


class UnsupportedMediaType(ServiceError):
    status, type, reason = 415, "unsupported_media_type", "invalid"


class InvalidOption(ServiceError):
    status, type, reason = 422, "invalid_option", "invalid"


class NoClassifier(ServiceError):
    """/v1/classify on a model that has no classifier head (it can only embed)."""

    status, type, reason = 422, "no_classifier", "invalid"


class Overloaded(ServiceError):
    status, type, reason = 429, "overloaded", "overloaded"


class HeadersTooLarge(ServiceError):
    status, type, reason = 431, "headers_too_large", "too_large"


class InternalError(ServiceError):
    status, type = 500, "internal"


class NotReady(ServiceError):
    status, type = 503, "not_ready"


class TooManyConnections(ServiceError):
    """Past `max_connections` open connections: answered as the connection opens (service/api/protocol.py)."""

    status, type, reason = 503, "too_many_connections", "overloaded"


class DeadlineExceeded(ServiceError):
    status, type, reason = 504, "deadline_exceeded", "deadline"


# Every row of the error table, in status order.
ERRORS: tuple[type[ServiceError], ...] = (
    InvalidImage, InvalidRequest, Unauthorized, NotFound, MethodNotAllowed, RequestTimeout, PayloadTooLarge,
    UnsupportedMediaType, InvalidOption, NoClassifier, Overloaded, HeadersTooLarge, InternalError, NotReady,
    TooManyConnections, DeadlineExceeded)
# What metta_rejected_total counts under, besides the refusals above: requests whose client left, and
# connections dropped because their client did not take its reply within the write bound (write_timeout_s).
REJECT_REASONS: tuple[str, ...] = (
    *dict.fromkeys(error.reason for error in ERRORS if error.reason is not None), "client_gone", "write_timeout")
