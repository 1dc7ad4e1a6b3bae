"""Every refusal is counted exactly once in `metta_rejected_total`, under the reason its status means.

Whoever sends a refusal counts it (the app's error handler, or the door when it answers itself); this checks
that from outside, one refused request at a time: the counter of its reason moves by one, every other by none.
The refusals the HTTP protocol sends itself are checked the same way on a real server over loopback, each
read to its end by a client that sends all it meant to.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import httpx
import pytest
from PIL import Image

from service.core.errors import REJECT_REASONS
from tests.integration.conftest import ControlledModel, png_bytes, running_server, serve

pytestmark = pytest.mark.anyio
GOOD = base64.b64encode(png_bytes(0)).decode()
NOT_AN_IMAGE = base64.b64encode(b"this is not an image at all").decode()

Send = Callable[[httpx.AsyncClient], Coroutine[Any, Any, httpx.Response]]


def counts(client: httpx.AsyncClient) -> dict[str, float]:
    metrics = client.app.state.metta.metrics  # type: ignore[attr-defined]
    return {reason: metrics.rejected.labels(reason)._value.get() for reason in REJECT_REASONS}


async def refused_once(client: httpx.AsyncClient, send: Send, status: int, reason: str) -> None:
    before = counts(client)
    reply = await send(client)
    assert reply.status_code == status, reply.text
    await asyncio.sleep(0.05)  # a count made after the reply (none should be) would show up here
    moved = {name: value - before[name] for name, value in counts(client).items() if value != before[name]}
    assert moved == {reason: 1}, (status, reply.text, moved)


async def chunks(count: int, size: int) -> AsyncIterator[bytes]:
    """A body with no content-length: its size is known only as it arrives."""
    for _ in range(count):
        yield b"x" * size


def post_json(path: str, body: dict[str, object]) -> Send:
    return lambda client: client.post(path, json=body)


REQUEST_ERRORS = [
    pytest.param(post_json("/v1/embeddings", {"images": [NOT_AN_IMAGE]}), 400, "invalid", id="not-an-image"),
    pytest.param(lambda c: c.post("/v1/embeddings", files=[("images", ("a.png", b"nope", "image/png"))]),
                 400, "invalid", id="multipart-not-an-image"),
    pytest.param(post_json("/v1/embeddings", {"images": [GOOD], "colour": "red"}), 422, "invalid",
                 id="unknown-option"),
    pytest.param(post_json("/v1/embeddings", {"images": [GOOD], "samples": 100_000}), 422, "invalid",
                 id="samples-too-large"),
    pytest.param(post_json("/v1/embeddings", {"input": 42}), 422, "invalid", id="openai-input-not-images"),
    pytest.param(post_json("/v1/classify", {"images": [GOOD], "normalize": True}), 422, "invalid",
                 id="classify-embedding-only-option"),
    pytest.param(lambda c: c.post("/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"}),
                 400, "invalid", id="malformed-json"),
    pytest.param(lambda c: c.post("/v1/embeddings", content=b"x", headers={"content-type": "text/plain"}),
                 415, "invalid", id="wrong-content-type"),
    pytest.param(lambda c: c.post("/v1/embeddings", content=b"x" * 300_001,
                                  headers={"content-type": "application/json"}),
                 413, "too_large", id="body-too-large"),
    pytest.param(lambda c: c.post("/v1/embeddings", content=chunks(40, 10_000),
                                  headers={"content-type": "application/json"}),
                 413, "too_large", id="chunked-body-too-large"),
    pytest.param(lambda c: c.post("/v1/embeddings", json={"images": [GOOD], "junk": [{}] * 2_000}), 413, "too_large",
                 id="too-many-json-values"),
    pytest.param(lambda c: c.get("/healthz", headers={f"x-h{i}": "1" for i in range(30)}), 431, "too_large",
                 id="too-many-headers"),
]


@pytest.mark.parametrize(("send", "status", "reason"), REQUEST_ERRORS)
async def test_a_bad_request_is_counted_once_as_its_reason(send: Send, status: int, reason: str) -> None:
    async with serve(max_body_bytes=300_000, max_json_elements=1_000, max_headers=20) as client:
        await refused_once(client, send, status, reason)


async def test_a_wrong_api_key_is_counted_once_as_unauthorized() -> None:
    async with serve(api_keys="secret") as client:
        await refused_once(client, post_json("/v1/embeddings", {"images": [GOOD]}), 401, "unauthorized")
        await refused_once(client, post_json("/v1/classify", {"images": [GOOD]}), 401, "unauthorized")


async def test_a_full_queue_and_a_missed_deadline_are_counted_once() -> None:
    spy = ControlledModel()
    async with serve(model=spy.loaded(), max_queue_crops=8, max_request_crops=8, max_batch_crops=4) as client:
        spy.gate.clear()  # the device holds its first batch: the queue stays as filled
        spy.entered.clear()
        ahead = asyncio.create_task(client.post("/v1/embeddings", json={"images": [GOOD], "samples": 8}))
        await asyncio.to_thread(spy.entered.wait, 10)
        await refused_once(client, post_json("/v1/embeddings", {"images": [GOOD], "samples": 8}), 429, "overloaded")
        await refused_once(client, post_json("/v1/embeddings", {"images": [GOOD], "samples": "auto", "samples_min": 8,
                                                                "samples_max": 8}), 429, "overloaded")
        spy.gate.set()
        assert (await ahead).status_code == 200
    async with serve(model=spy.loaded(), max_batch_crops=4) as client:
        spy.gate.clear()
        await refused_once(client, post_json("/v1/embeddings", {"images": [GOOD], "samples": 4, "timeout_ms": 300}),
                           504, "deadline")
        spy.gate.set()



def post_bytes(body: bytes | AsyncIterator[bytes]) -> Send:
    return lambda client: client.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})


async def test_the_pixel_and_body_budgets_refusals_are_counted_once() -> None:
    """A request held in the device holds its decoded pixels and its body; others meet the two budgets."""
    spy = ControlledModel()
    body = json.dumps({"images": [GOOD], "samples": 4}).encode()
    for budget, send in [({"max_queue_pixels": 5_000}, post_bytes(body)),  # the held image: 10,800 pixels
                         ({"max_inflight_body_bytes": len(body) + 1_000}, post_bytes(body)),  # at the door
                         ({"max_inflight_body_bytes": len(body) + 1_000}, post_bytes(chunks(3, 1_000)))]:  # chunked
        async with serve(model=spy.loaded(), **budget) as client:
            spy.gate.clear()
            spy.entered.clear()
            held = asyncio.create_task(post_bytes(body)(client))
            await asyncio.to_thread(spy.entered.wait, 10)
            await refused_once(client, send, 429, "overloaded")
            spy.gate.set()
            assert (await held).status_code == 200


def flat_jpeg(width: int, height: int) -> str:
    """A flat picture: a few KB of JPEG, width × height pixels once decoded."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 90, 60)).save(buffer, "JPEG", quality=75)
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("samples", [4, "auto"])
async def test_one_request_larger_than_the_pixel_budget_does_not_starve_the_others(samples: int | str) -> None:
    """64 flat 2 MP images (128 MP) against a 6 MP budget: served, but its images reserve as they decode (at most
    the decode pool's share of them at once), so the small requests sent meanwhile are served too. Reserving
    every header at once, it held 128 MP for its whole decode and every other request was refused."""
    big = {"images": [flat_jpeg(1600, 1250)] * 64, "samples": samples, "samples_min": 2, "samples_max": 4}
    if samples != "auto":
        del big["samples_min"], big["samples_max"]
    async with serve(max_queue_pixels=6_000_000) as client:
        budget = client.app.state.metta.pixel_budget  # type: ignore[attr-defined]
        hog = asyncio.create_task(client.post("/v1/embeddings", json=big))
        while budget.held == 0 and not hog.done():
            await asyncio.sleep(0.001)
        during: list[int] = []
        while not hog.done():
            reply = await client.post("/v1/embeddings", json={"images": [GOOD], "samples": 2})
            during.append(reply.status_code)
            assert budget.held <= 6_000_000
        assert (await hog).status_code == 200  # and the big one, alone at first, is served
    assert len(during) >= 3 and during.count(200) == len(during), during


# Refusals the HTTP protocol sends itself, and early ones read to the end, on a real server over loopback.
RAW_BODY = json.dumps({"images": [GOOD], "samples": 1}).encode()


def raw_post(body: bytes, *extra: bytes) -> bytes:
    return (b"POST /v1/embeddings HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n" + b"".join(extra)
            + b"content-length: %d\r\n\r\n" % len(body) + body)


CHUNKED_HEAD = (b"POST /v1/embeddings HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
                b"transfer-encoding: chunked\r\n\r\n")
RAW_REFUSALS = [
    pytest.param([b"GET /healthz HTTP/1.1\r\nhost: t\r\n" + b"".join(b"x-%d: 1\r\n" % i for i in range(30)) + b"\r\n"],
                 431, "too_large", id="too-many-headers-at-the-protocol"),
    pytest.param([CHUNKED_HEAD + b"%x\r\n%s\r\n0\r\n" % (len(RAW_BODY), RAW_BODY) + b"x-t: " + b"a" * 100_000],
                 431, "too_large", id="trailers-too-large"),
    pytest.param([CHUNKED_HEAD + b"%x\r\n%s\r\n0\r\n" % (len(RAW_BODY), RAW_BODY), 0.3,
                  b"".join(b"x-t%d: 1\r\n" % i for i in range(30)) + b"\r\n"], 431, "too_large",
                 id="too-many-trailers"),
    pytest.param([raw_post(RAW_BODY, b"x-pad: " + b"p" * 3000 + b"\r\n") + b"GET /healthz HTTP/1.1\r\nhost: t\r\n"
                  + b"x-pad: " + b"p" * 9000], 431, "too_large", id="pipelined-head-too-large"),
    pytest.param([raw_post(b"x" * 600_000)], 413, "too_large", id="early-413-body-sent-anyway"),
]


@pytest.fixture(scope="module")
def real_server():
    with running_server(max_headers=20, header_timeout_s=0.5, max_header_bytes=8192, max_body_bytes=300_000) as (
            address, app, _):
        yield address, app


@pytest.mark.parametrize(("steps", "status", "reason"), RAW_REFUSALS)
def test_a_refusal_on_the_wire_is_read_in_full_and_counted_once(real_server, steps: list[bytes | float],
                                                                status: int, reason: str) -> None:
    address, app = real_server
    metrics = app.state.metta.metrics

    def now() -> dict[str, float]:
        return {name: metrics.rejected.labels(name)._value.get() for name in REJECT_REASONS}

    before = now()
    with socket.create_connection(address, timeout=10) as sock:
        for step in steps:
            if isinstance(step, float):
                time.sleep(step)
            else:
                sock.sendall(step)  # no reset while the client still sends: the server reads to the end
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    replies = [part for part in raw.split(b"HTTP/1.1 ")[1:]]
    assert int(replies[-1].split()[0]) == status, raw[:300]
    assert all(int(reply.split()[0]) == 200 for reply in replies[:-1]), raw[:300]
    time.sleep(0.3)
    moved = {name: value - before[name] for name, value in now().items() if value != before[name]}
    assert moved == {reason: 1}, moved


async def test_a_request_the_server_cancels_is_not_counted_as_client_gone() -> None:
    """uvicorn cancels the handlers still running when the shutdown grace runs out: their clients did not
    leave, so nothing is counted (they were counted as client_gone)."""
    spy = ControlledModel()
    async with serve(model=spy.loaded()) as client:
        spy.gate.clear()
        spy.entered.clear()
        running = asyncio.create_task(post_json("/v1/embeddings", {"images": [GOOD], "samples": 4})(client))
        await asyncio.to_thread(spy.entered.wait, 10)
        before = counts(client)
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        spy.gate.set()
        await asyncio.sleep(0.05)
        assert counts(client) == before
