"""uvicorn's HTTP protocol with the door's limits enforced while bytes arrive, before any parsing cost.

uvicorn (httptools) bounds neither header size nor the time to send them: a 128 MB header line took
the parser tens of seconds (its buffers grow by concatenation), and a client trickling header bytes
held its connection forever. This protocol adds, per connection:

- **header bytes**: at most `max_header_bytes` from a request's first byte to the end of its headers;
  past that, 431 and close, without feeding the parser the rest;
- **header count**: at most `max_headers`, else 431 and close;
- **header time**: the headers must be complete within `header_timeout_s` of the request's first byte
  (or of the connection opening / the previous reply), else 408 and close (plain close if nothing came);
- **body time**: the body must be complete within `body_timeout_s` (+1 s, the app answers 408 first
  where it reads the body) of the end of the headers, else the connection is closed;
- malformed requests get the error table's JSON 400, not uvicorn's plain text.

Every refusal is reported to `on_reject(error)` (the app's `metta_rejected_total`). One that cuts short a
request the app is still reading marks it (`REFUSED`, in the request's state), so the app, which then sees
its client gone, does not count it a second time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.core.errors import HeadersTooLarge, InvalidRequest, RequestTimeout, ServiceError
from service.settings import Settings

_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}
REFUSED = "refused_by_protocol"  # the key in a request's state (`request.state`) the app reads


def guarded_protocol(*, max_header_bytes: int, max_headers: int, header_timeout_s: float, body_timeout_s: float,
                     on_reject: Callable[[ServiceError], None] = lambda error: None) -> type[HttpToolsProtocol]:
    """A protocol class for `uvicorn.run(..., http=...)` with these limits."""

    class Guarded(GuardedHttpProtocol):
        pass

    Guarded.max_header_bytes = max_header_bytes
    Guarded.max_headers = max_headers
    Guarded.header_timeout_s = header_timeout_s
    Guarded.body_timeout_s = body_timeout_s
    Guarded.on_reject = staticmethod(on_reject)
    return Guarded


class GuardedHttpProtocol(HttpToolsProtocol):
    max_header_bytes = 32 * 1024
    max_headers = 100
    header_timeout_s = 10.0
    body_timeout_s = 30.0
    on_reject: Callable[[ServiceError], None] = staticmethod(lambda error: None)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # between a request's first byte (or the connection's start) and its headers' end
        self._head_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False

    # Timers: one at a time, for whichever phase the connection is in.
    def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self._timer = asyncio.get_running_loop().call_later(seconds, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout_s, self._header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head:
            room = self.max_header_bytes - self._head_bytes
            if len(data) > room:
                # Feed only what the headers may use; if they are still not complete, refuse.
                head, rest = data[: max(room, 0)], data[max(room, 0) :]
                if head:
                    self._head_bytes += len(head)
                    super().data_received(head)
                if self._in_head and not self.transport.is_closing():
                    self._refuse(HeadersTooLarge(
                        f"the request headers are over the limit of {self.max_header_bytes} bytes"))
                    return
                data = rest
            else:
                self._head_bytes += len(data)
        if data and not self.transport.is_closing():
            super().data_received(data)

    def on_headers_complete(self) -> None:
        self._in_head = False
        if len(self.headers) > self.max_headers:
            self._refuse(HeadersTooLarge(
                f"the request has {len(self.headers)} headers; at most {self.max_headers} are accepted"))
            return
        self._arm(self.body_timeout_s + 1.0, self._body_timeout)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        self._in_head = True  # any further byte belongs to the next request's headers
        self._head_bytes = 0
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._in_head and not self.transport.is_closing():  # keep-alive: the next headers are on the clock
            self._arm(self.header_timeout_s, self._header_timeout)

    def _header_timeout(self) -> None:
        self._timer = None
        if not self._in_head or self.transport.is_closing():
            return
        if self._head_bytes == 0 and (self.cycle is None or self.cycle.response_complete):
            self.transport.close()  # an idle connection: nothing to answer
            return
        self._refuse(RequestTimeout(f"the request headers did not arrive within {self.header_timeout_s:g} s"))

    def _body_timeout(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        # No reply: the app should have answered 408 where it reads the body.
        self.on_reject(RequestTimeout(f"the request body did not arrive within {self.body_timeout_s:g} s"))
        self._cut_short_the_apps_request()
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        if self.cycle is not None and self.cycle.response_started and not self.cycle.response_complete:
            self.transport.close()  # a reply is already on the wire: no second one
            return
        self._refuse(InvalidRequest("malformed HTTP request"))

    def _refuse(self, error: ServiceError) -> None:
        """Write one JSON error reply and close; the rest of the connection's bytes are ignored."""
        self._refused = True
        self._disarm()
        self.on_reject(error)
        body = error.body()
        head = (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n" % (error.status, _REASONS[error.status], len(body)))
        self._cut_short_the_apps_request()
        self.transport.write(head + body)
        self.transport.close()

    def _cut_short_the_apps_request(self) -> None:
        """The app, if it is running this connection's request, sees its client gone; counted here already."""
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.scope["state"][REFUSED] = True
            self.cycle.disconnected = True
            self.cycle.message_event.set()


def serving_protocol(settings: Settings, app: FastAPI) -> type[HttpToolsProtocol]:
    """The protocol `metta-serve` runs: the settings' limits, refusals counted in the app's metrics."""
    metrics = app.state.metta.metrics

    return guarded_protocol(max_header_bytes=settings.max_header_bytes, max_headers=settings.max_headers,
                            header_timeout_s=settings.header_timeout_s, body_timeout_s=settings.body_timeout_s,
                            on_reject=metrics.count_refusal)
