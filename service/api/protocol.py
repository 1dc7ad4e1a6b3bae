"""uvicorn's HTTP/1.1 protocol with the door's limits enforced while bytes arrive, and every refusal readable.

uvicorn (httptools) bounds neither header size nor the time to send them, assumes one request at a time per
connection in its timers, and closes a connection at once after a reply sent before the request's body was
read (the client, still uploading, may see a reset instead of its 429). This protocol adds, per connection:

- **head bytes**: at most `max_header_bytes` from a request's first byte (or the end of the one before it) to
  the end of its headers, else 431, without feeding the parser the rest. The parser does not say where in
  the bytes fed a message ends, so they are fed in pieces that end where a Content-Length body does; a
  head pipelined right behind a chunked body may use up to twice the limit;
- **header count**: at most `max_headers`, else 431;
- **trailers** (after a chunked body) count against the same limits: at most `max_headers` fields, and at
  most `max_header_bytes` of chunk framing in a row (trailers, chunk extensions) between two pieces of data,
  else 431; they are not passed on to the app;
- **head time**: a connection with nothing to answer must send a complete head within `header_timeout_s` of
  opening or of its last reply (a head that starts while earlier requests run: of its first byte), else 408
  (a plain close if nothing came);
- **body time**: the body must be complete within `body_timeout_s` (+1 s: the app answers 408 first where it
  reads the body) of its request starting to run, else 408. A pipelined request's body is on the clock only
  once the requests ahead of it are answered;
- **write time**: once written bytes wait for the client (in the transport's buffer, or in the kernel's send
  queue because the client's receive window is shut), the client must take some of them every
  `write_timeout_s`, else the connection is dropped: aborted with a reset, so the process's buffer and the
  kernel's copy are freed at once and the client learns of it (`close()` would wait for the buffer forever; a
  plain close of the socket leaves the kernel holding the unsent bytes with the FIN queued behind them, and the
  client never sees the end). A close with bytes still unsent waits for them under the same bound;
- **connections**: past `max_connections` open ones (lingering ones included) a new connection gets 503 at
  once and is closed;
- **pipelining**: requests are answered in order; a refusal of a later request (its 408, 431 or 400) waits
  for the replies ahead of it, and no timer of one request cuts off another's reply.

A reply sent before its request's body has arrived (413, 429, 401, 408 …, or a refusal here) is followed
by a **lingering close**: nothing more is written (FIN after the reply), the rest of the body is read and
discarded until the body has used `linger_bytes` (what was read of it before the reply counts) or for at most
`linger_s` (or until the client closes or is silent for 5 s), then the connection is closed. Nothing is kept
of the discarded bytes.

Every refusal is reported once to `on_reject(error)` (the app's `metta_rejected_total`). One that cuts short
a request the app is still reading marks it (`REFUSED`, in the request's state), so the app, which then sees
its client gone, does not count it a second time.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import http
import logging
import socket
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from service.core.errors import HeadersTooLarge, InvalidRequest, RequestTimeout, ServiceError, TooManyConnections
from service.settings import Settings

log = logging.getLogger("metta.protocol")
REFUSED = "refused_by_protocol"  # the key in a request's state (`request.state`) the app reads
LINGER_SILENCE_S = 5.0  # a lingering client silent this long is done sending (nginx's lingering_timeout)
WRITE_CHECK_S = 1.0  # how often a connection with unsent bytes is looked at (at least 4 times per write bound)
SIOCOUTQNSD = 0x894B  # Linux: bytes in a socket's send queue not yet sent (the client's window is shut)


@dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    write_timeout_s: float = 60.0
    linger_s: float = 30.0
    linger_bytes: int = 65 * 2**20
    max_connections: int = 4096

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(max_header_bytes=settings.max_header_bytes, max_headers=settings.max_headers,
                   header_timeout_s=settings.header_timeout_s, body_timeout_s=settings.body_timeout_s,
                   write_timeout_s=settings.write_timeout_s, linger_s=settings.linger_s,
                   linger_bytes=settings.lingering_bytes(), max_connections=settings.max_connections)


def guarded_protocol(limits: ConnectionLimits, on_reject: Callable[[ServiceError], None] = lambda error: None,
                     on_write_timeout: Callable[[], None] = lambda: None) -> type[HttpToolsProtocol]:
    """A protocol class for `uvicorn.run(..., http=...)` with these limits; `on_write_timeout` is told of
    each connection dropped because its client did not take its reply."""

    class Guarded(GuardedHttpProtocol):
        pass

    Guarded.limits = limits
    Guarded.on_reject = staticmethod(on_reject)
    Guarded.on_write_timeout = staticmethod(on_write_timeout)
    return Guarded


def kernel_unsent(transport: asyncio.BaseTransport) -> int:
    """Bytes the kernel holds for this socket and has not sent (0 where the OS cannot say)."""
    sock = transport.get_extra_info("socket")
    if sock is None or not sys.platform.startswith("linux"):
        return 0
    try:
        unsent: int = struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQNSD, b"\0\0\0\0"))[0]
    except (OSError, ValueError):  # closed meanwhile, or not a TCP socket
        return 0
    return unsent


def abort_with_reset(transport: asyncio.Transport) -> None:
    """Abort so that the kernel drops what it still holds for the client and sends a reset (SO_LINGER 0):
    a plain close would leave the unsent bytes, and the FIN behind them, in the kernel for minutes."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class _ReplyTransport(asyncio.Transport):
    """What a request's cycle writes its reply through. uvicorn's cycle closes the transport after a
    `Connection: close` reply; here that close is the protocol's (lingering, or bounded in write time)."""

    def __init__(self, protocol: GuardedHttpProtocol) -> None:
        super().__init__()
        self._protocol = protocol

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._protocol.write(data)

    def is_closing(self) -> bool:
        return self._protocol.transport.is_closing() or self._protocol.stopped

    def close(self) -> None:
        self._protocol.close_after_reply()


class GuardedHttpProtocol(HttpToolsProtocol):
    limits = ConnectionLimits()
    on_reject: Callable[[ServiceError], None] = staticmethod(lambda error: None)
    on_write_timeout: Callable[[], None] = staticmethod(lambda: None)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reply_transport = _ReplyTransport(self)
        self._read_timer: asyncio.TimerHandle | None = None  # head, body, idle or linger time: one at a time
        self._write_timer: asyncio.TimerHandle | None = None  # looks at unsent bytes while there are any
        self._written = 0  # bytes written to the transport, all told
        self._taken = 0  # of them, taken by the client when last looked at
        self._taken_at = 0.0  # when the client last took some
        self._draining = False  # closing once the client has taken what was written (FIN sent after it)
        self._eof_written = False
        self._head_bytes = 0  # of the head being read
        self._framing_run = 0  # chunked-body bytes since its last data: chunk lines, extensions, trailers
        self._trailers = 0
        self._body_left: int | None = None  # of a body with a Content-Length
        self._body_read = 0  # of the body being read
        self._data_seen = False  # the parser gave body data (or ended a message) in the piece just fed
        self._reading: RequestResponseCycle | None = None  # the request whose body is being read
        self._running: RequestResponseCycle | None = None  # the request whose app runs: the next reply out
        self.stopped = False  # no more requests are read here (refused, lingering, closing, shutting down)
        self._refusal: ServiceError | None = None  # a refusal waiting for the replies ahead of it
        self._lingering = False
        self._linger_until = 0.0
        self._discarded = 0

    # Timers
    def _arm_read(self, seconds: float, callback: Callable[[], None]) -> None:
        self._disarm_read()
        self._read_timer = self.loop.call_later(seconds, callback)

    def _disarm_read(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _watch_writes(self) -> None:
        """Hold the client to the write bound while written bytes wait for it (a no-op when none do)."""
        if self._write_timer is None and not self.transport.is_closing() and self._unsent():
            self._taken, self._taken_at = self._written - self._unsent(), self.loop.time()
            self._write_timer = self.loop.call_later(self._write_check_s(), self._check_writes)

    def _write_check_s(self) -> float:
        return min(WRITE_CHECK_S, self.limits.write_timeout_s / 4)

    def _disarm_write(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    # The connection
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            # Written before the request is read: nothing is unread yet, so a plain close keeps it readable.
            error = TooManyConnections(f"the server has {self.limits.max_connections} connections open; retry "
                                       "later", headers={"Retry-After": "1"})
            self.on_reject(error)
            self.write(reply_bytes(error))
            self._close()
            return
        self._arm_read(self.limits.header_timeout_s, self._head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_read()
        self._disarm_write()
        # Every request of this connection still waiting for its reply learns that its client is gone (uvicorn
        # tells only the last one parsed).
        waiting = [cycle for cycle, _ in self.pipeline]
        if self._running is not None:
            waiting.append(self._running)
        for cycle in waiting:
            if not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        self.pipeline.clear()
        super().connection_lost(exc)

    def eof_received(self) -> bool | None:  # type: ignore[override]  # asyncio.Protocol allows a bool
        if self._lingering:
            self._close()  # the client has sent all it will: the lingering is over
        # None: the transport closes itself once its buffer is out; while draining, the write bound closes it (a
        # client that half-closes and never reads would otherwise leave its bytes with the kernel).
        return True if self._draining else None

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown: no new requests; what runs finishes, then the connection closes."""
        self.stopped = True
        self._disarm_read()
        self.pipeline.clear()  # never started: their clients see the connection close and may retry
        if self._waiting_for_reply():
            assert self._running is not None
            self._running.keep_alive = False
        else:
            self._close()

    # Reading
    def data_received(self, data: bytes) -> None:
        if self.stopped:
            if self._lingering:
                self._discard(len(data))
            return
        self._unset_keepalive_if_required()
        limit = self.limits.max_header_bytes
        view = memoryview(data)
        while view and not self.stopped:
            in_head = self._reading is None
            if in_head:
                if self._read_timer is None:  # the first byte of a head that starts while others run
                    self._arm_read(self.limits.header_timeout_s, self._head_timeout)
                piece = view[: limit - self._head_bytes]
                if not piece:  # the limit reached with the head still open
                    self._refuse(HeadersTooLarge(f"the request headers are over the limit of {limit} bytes"))
                    return
                self._head_bytes += len(piece)
            elif self._body_left is not None:  # the piece ends where the body does: the next head is counted whole
                piece = view[: max(1, min(limit, self._body_left))]
            else:
                piece = view[:limit]  # bounded pieces: a run of chunk framing is measured piece by piece
            view = view[len(piece):]
            reading = self._reading
            self._data_seen = False
            super().data_received(piece)  # type: ignore[arg-type]  # httptools reads any buffer
            if self.stopped:
                return
            if in_head and self._reading is None and self._head_bytes >= limit:
                self._refuse(HeadersTooLarge(f"the request headers are over the limit of {limit} bytes"))
            elif not in_head and self._reading is reading and not self._data_seen:
                self._framing_run += len(piece)
                if self._framing_run > limit:
                    self._refuse(HeadersTooLarge(
                        f"the chunked body's trailers or chunk extensions are over the limit of {limit} bytes"))

    def on_message_begin(self) -> None:
        if self.stopped:
            return
        super().on_message_begin()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.stopped:
            return
        most = self.limits.max_headers
        if self._reading is not None:  # a trailer field, after a chunked body: counted, not passed on
            self._trailers += 1
            if self._trailers > most:
                self._refuse(HeadersTooLarge(f"the request has over {most} trailer fields; at most {most} are "
                                             "accepted"))
            return
        if len(self.headers) >= most:
            self._refuse(HeadersTooLarge(f"the request has over {most} headers; at most {most} are accepted"))
            return
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self.stopped:
            return
        self._disarm_read()
        previous = self.cycle
        super().on_headers_complete()
        if self.cycle is previous:  # an upgrade request (no cycle): uvicorn hands the connection on
            return
        self.cycle.transport = self._reply_transport
        self._reading = self.cycle
        self._framing_run = self._trailers = 0
        self._body_left = _content_length(self.headers)
        self._body_read = 0
        if self._running is self.cycle:  # it runs now (nothing ahead of it): its body is on the clock
            self._arm_read(self.limits.body_timeout_s + 1.0, self._body_timeout)

    def on_body(self, body: bytes) -> None:
        if self.stopped:
            return
        self._data_seen = True
        self._framing_run = 0
        self._body_read += len(body)
        if self._body_left is not None:
            self._body_left -= len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self.stopped:
            return
        self._data_seen = True
        super().on_message_complete()
        self._reading = None
        self._head_bytes = 0
        self._disarm_read()
        if not self._waiting_for_reply():  # answered already (a reply before the body): idle from now
            self._arm_read(self.limits.header_timeout_s, self._head_timeout)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        self._running = cycle
        super()._start_asgi_task(cycle, app)
        if cycle is self._reading:  # a pipelined request whose body is still due (not yet set for the others)
            self._arm_read(self.limits.body_timeout_s + 1.0, self._body_timeout)

    # Replies
    def _waiting_for_reply(self) -> bool:
        """A request on this connection has not had its reply yet (the running one, or pipelined ones)."""
        running = self._running
        return bool(self.pipeline) or (running is not None and not running.response_complete
                                       and not running.disconnected)

    def on_response_complete(self) -> None:
        if self.stopped:  # refused, closing or lingering: the requests pipelined behind it are not started
            self.server_state.total_requests += 1
            if not self._waiting_for_reply():
                if self._refusal is not None:
                    self._send_refusal()
                elif not self._lingering:
                    self._close()
            return
        super().on_response_complete()  # starts the next pipelined request, if any
        self._unset_keepalive_if_required()  # idle connections are on the head timer instead
        if not self._waiting_for_reply() and self._read_timer is None:
            self._arm_read(self.limits.header_timeout_s, self._head_timeout)

    def close_after_reply(self) -> None:
        """A reply that said `Connection: close` is written: linger if the client may still be sending."""
        self._refusal = None  # a refusal of a request behind it is not sent after a `Connection: close`
        if self._reading is not None or self._head_bytes:
            self._linger()
        else:
            self._close()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Every byte to the client goes through here: counted, so the write bound can tell progress."""
        self._written += len(data)
        self.transport.write(data)

    def pause_writing(self) -> None:
        super().pause_writing()
        self._watch_writes()  # the client is not keeping up: it must take some every write_timeout_s

    def _unsent(self) -> int:
        """Written bytes the client has not taken: in the transport's buffer and in the kernel's send queue."""
        return self.transport.get_write_buffer_size() + kernel_unsent(self.transport)

    def _check_writes(self) -> None:
        self._write_timer = None
        if self.transport.is_closing():
            return
        unsent = self._unsent()
        if not unsent:
            if self._draining:
                self.transport.close()  # the client has all of it: the FIN went out behind it
            return
        taken = self._written - unsent
        if taken > self._taken:
            self._taken, self._taken_at = taken, self.loop.time()
        elif self.loop.time() - self._taken_at >= self.limits.write_timeout_s:
            log.info("dropped a client that took none of its reply for %g s (%d bytes unsent)",
                     self.limits.write_timeout_s, unsent)
            self.stopped = True
            self.on_write_timeout()
            abort_with_reset(self.transport)
            return
        self._write_timer = self.loop.call_later(self._write_check_s(), self._check_writes)

    def _close(self) -> None:
        """Close once the client has taken what was written (at once if it has): FIN after the last byte,
        the write bound meanwhile."""
        self.stopped = True
        self._lingering = False
        self._disarm_read()
        if self.transport.is_closing() or self._draining:
            return
        if not self._unsent():
            self.transport.close()
            return
        self._draining = True
        self._write_eof()
        self._watch_writes()

    def _write_eof(self) -> None:
        if self.transport.can_write_eof() and not self._eof_written:
            self._eof_written = True
            self.transport.write_eof()

    # Refusals
    def send_400_response(self, msg: str) -> None:  # uvicorn's answer to a malformed request
        self._refuse(InvalidRequest("malformed HTTP request"))

    def _refuse(self, error: ServiceError) -> None:
        """Refuse the request being read: one JSON error reply, after the replies ahead of it, then a
        lingering close. No reply if that request has its reply already."""
        if self.stopped:
            return
        self.stopped = True
        self._disarm_read()
        cycle = self._reading
        if cycle is not None:
            if any(queued is cycle for queued, _ in self.pipeline):  # pipelined, never started: refused here
                self.pipeline = type(self.pipeline)(entry for entry in self.pipeline if entry[0] is not cycle)
            elif cycle.response_started:  # it has a reply (the app's, sent early): not a second one
                if not self._waiting_for_reply():
                    self._close()
                return
            else:  # the app is running it and has not answered: this is its reply; the app sees its client gone
                cycle.scope["state"][REFUSED] = True
                cycle.disconnected = True
                cycle.message_event.set()
        self._refusal = error
        if self._waiting_for_reply():
            self.flow.pause_reading()  # nothing more is read until the replies ahead are written
        else:
            self._send_refusal()

    def _send_refusal(self) -> None:
        """Write the refusal waiting for its turn (counted now, once it is sure to be sent) and linger."""
        assert self._refusal is not None
        error, self._refusal = self._refusal, None
        self.on_reject(error)
        self.write(reply_bytes(error))
        self._linger()

    def _linger(self) -> None:
        """Stop writing (FIN once the reply is out) and read and discard what the client still sends, for at
        most linger_s and linger_bytes, so that it reads its reply instead of a reset."""
        if self._lingering or self.transport.is_closing():
            return
        self.stopped = self._lingering = True
        self._disarm_read()
        self._write_eof()
        self._watch_writes()
        self.flow.resume_reading()
        # The bytes of the refused body read so far count against the bound: a whole body of max_body_bytes can
        # still be sent, one already past it is not read that far again.
        self._discarded = self._body_read if self._reading is not None else 0
        self._linger_until = self.loop.time() + self.limits.linger_s
        self._arm_read(min(LINGER_SILENCE_S, self.limits.linger_s), self._linger_check)

    def _discard(self, count: int) -> None:
        self._discarded += count
        if self._discarded > self.limits.linger_bytes:
            self._close()
        else:  # still sending: the silence is measured from now
            self._arm_read(min(LINGER_SILENCE_S, self._linger_until - self.loop.time()), self._linger_check)

    def _linger_check(self) -> None:
        self._read_timer = None
        self._close()

    # Timeouts
    def _head_timeout(self) -> None:
        self._read_timer = None
        if self.stopped or self._reading is not None:
            return
        if self._head_bytes == 0:
            if not self._waiting_for_reply():
                self._close()  # an idle connection: nothing to answer
            return
        self._refuse(RequestTimeout(f"the request headers did not arrive within {self.limits.header_timeout_s:g} s"))

    def _body_timeout(self) -> None:
        self._read_timer = None
        if self._reading is not None:
            self._refuse(RequestTimeout(f"the request body did not arrive within {self.limits.body_timeout_s:g} s"))


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """A body's declared length (None when chunked: its end is found only by parsing it)."""
    length = None
    for name, value in headers:
        if name == b"transfer-encoding":
            return None
        if name == b"content-length" and value.strip().isdigit():
            length = int(value)
    return length


def reply_bytes(error: ServiceError) -> bytes:
    """A refusal as written on the wire: the error's JSON envelope, its headers, and `Connection: close`."""
    body = error.body()
    head = [b"HTTP/1.1 %d %s\r\n" % (error.status, http.HTTPStatus(error.status).phrase.encode()),
            b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n" % len(body)]
    head += [b"%s: %s\r\n" % (name.lower().encode("latin-1"), value.encode("latin-1"))
             for name, value in error.headers.items()]
    return b"".join(head) + b"\r\n" + body


def serving_protocol(settings: Settings, app: FastAPI) -> type[HttpToolsProtocol]:
    """The protocol `metta-serve` runs: the settings' limits, refusals counted in the app's metrics."""
    metrics = app.state.metta.metrics
    return guarded_protocol(ConnectionLimits.from_settings(settings), on_reject=metrics.count_refusal,
                            on_write_timeout=lambda: metrics.rejected.labels("write_timeout").inc())
