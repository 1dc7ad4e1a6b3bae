"""API keys: every /v1 route requires `Authorization: Bearer <key>` when keys are configured."""

from __future__ import annotations

import hmac

from starlette.requests import Request

from service.api.state import state_of
from service.core.errors import Unauthorized


async def authorize(request: Request) -> None:
    """A route dependency: 401 unless the request carries one of the configured keys (none configured: open)."""
    api_keys = state_of(request).api_keys
    if not api_keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    given = token.strip().encode() if scheme.lower() == "bearer" else b""
    # Compare against every key, always, so timing says nothing about which key was close.
    matched = False
    for key in api_keys:
        matched |= hmac.compare_digest(given, key)
    if not matched:
        raise Unauthorized("a valid API key is required: send 'Authorization: Bearer <key>'",
                           headers={"WWW-Authenticate": "Bearer"})
