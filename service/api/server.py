"""The app under uvicorn, with a lame-duck period on SIGTERM.

SIGTERM → /readyz answers 503 at once while the port stays open `shutdown_delay_s` longer, so a load
balancer's health check takes the replica out before any new request meets a closed port → uvicorn's
drain: stop accepting, finish what was admitted (up to `shutdown_grace_s`), lifespan shutdown → exit 0.
On Kubernetes the preStop sleep plays the delay's part (the pod leaves the endpoints before SIGTERM).
"""

from __future__ import annotations

import logging
import resource
import signal
import threading
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from service.api.protocol import serving_protocol
from service.settings import Settings

log = logging.getLogger("metta.server")
SPARE_DESCRIPTORS = 64  # model files, the log, the decode and render pools: what the server needs besides sockets


class LameDuckServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, delay_s: float) -> None:
        super().__init__(config)
        self._app = app
        self._delay_s = delay_s
        self._lame_duck = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A plain attribute write: safe in a signal handler (no locks taken here).
        self._app.state.metta.draining = True
        if sig == signal.SIGTERM and self._delay_s > 0 and not self._lame_duck:
            self._lame_duck = True  # a second SIGTERM, or SIGINT, stops at once
            threading.Thread(target=self._exit_later, args=(sig, frame), name="metta-lame-duck", daemon=True).start()
            return
        super().handle_exit(sig, frame)

    def _exit_later(self, sig: int, frame: FrameType | None) -> None:
        time.sleep(self._delay_s)
        super().handle_exit(sig, frame)


def descriptors_for_connections(wanted: int) -> int:
    """Raise the soft descriptor limit to the hard one (as far as `wanted` needs) and return how many
    connections fit under it. Past the limit, accept() fails and the kernel resets new connections with
    nothing logged or counted; under it, the connection cap answers 503 instead."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = wanted + SPARE_DESCRIPTORS
    if soft != resource.RLIM_INFINITY and soft < needed:
        raised = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
        soft = raised
    if soft == resource.RLIM_INFINITY:
        return wanted
    fits = max(1, soft - SPARE_DESCRIPTORS)
    if fits < wanted:
        log.warning("max_connections %d lowered to %d: the descriptor limit is %d", wanted, fits, soft)
    return min(wanted, fits)


def serve(app: FastAPI, settings: Settings) -> None:
    # uvicorn drains on SIGTERM, then re-raises the signal under the handler that was there before
    # it started; with the default one the process would die by the signal (exit -15) after a clean
    # drain. A no-op handler lets the drained server exit 0, as orchestrators expect.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    connections = descriptors_for_connections(settings.max_connections)
    if connections != settings.max_connections:
        settings = settings.model_copy(update={"max_connections": connections})
    # One process owns the device and its metrics: more uvicorn workers would load the model again
    # per worker and split the metrics, so scale with more containers instead.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, workers=1, log_level=settings.log_level,
                            access_log=False, http=serving_protocol(settings, app))  # the door's limits
    # The drain's bound, whatever its value (uvicorn waits with asyncio.wait_for, which takes a float; its
    # annotation says int, and `int(0.5) or None` had made any grace under 1 s an unbounded wait).
    config.timeout_graceful_shutdown = settings.shutdown_grace_s  # type: ignore[assignment]
    LameDuckServer(config, app, settings.shutdown_delay_s).run()
