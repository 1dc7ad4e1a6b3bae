"""HEAD wherever GET works (RFC 9110 §9.3.2): load balancers and uptime checks probe /readyz, /healthz and
/metrics with HEAD. FastAPI's routes answer only the methods they list, so HEAD is served here as the GET
it stands for, with the GET's headers and no body."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HeadAsGetMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_head(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return  # the GET's body, left out
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        # A copy: the server's own scope keeps saying HEAD, so it writes no body either.
        await self.app({**scope, "method": "GET"}, receive, send_head)
