"""Domain errors and their HTTP mapping: one class per row of the API's error table."""

from __future__ import annotations


class ServiceError(Exception):
    """An error with a fixed HTTP status and a stable `type` that clients can switch on."""

    status = 500
    type = "internal"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        message = bounded(message)
        super().__init__(message)
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict[str, dict[str, str]]:
        return {"error": {"type": self.type, "message": self.message}}


MAX_MESSAGE_CHARS = 500


def bounded(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """A message cut to `limit` characters: messages quote client values (an unknown model's name), and an
    error reply must not grow with the input (a 20 MB `model` came back in a 20 MB 422)."""
    if len(message) <= limit:
        return message
    return message[: limit - 15] + "… (truncated)"


class InvalidImage(ServiceError):
    status, type = 400, "invalid_image"


class InvalidRequest(ServiceError):
    status, type = 400, "invalid_request"


class Unauthorized(ServiceError):
    status, type = 401, "unauthorized"


class PayloadTooLarge(ServiceError):
    status, type = 413, "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status, type = 415, "unsupported_media_type"


class InvalidOption(ServiceError):
    status, type = 422, "invalid_option"


class NoClassifier(ServiceError):
    """/v1/classify on a model that has no classifier head (it can only embed)."""

    status, type = 422, "no_classifier"


class Overloaded(ServiceError):
    status, type = 429, "overloaded"


class InternalError(ServiceError):
    status, type = 500, "internal"


class NotReady(ServiceError):
    status, type = 503, "not_ready"


class DeadlineExceeded(ServiceError):
    status, type = 504, "deadline_exceeded"
