"""The batching engine through HTTP: shared batches, fairness, overload, deadlines, cancellation, faults."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import pytest

from tests.integration.conftest import ControlledModel, engine_of, png_bytes, serve

pytestmark = pytest.mark.anyio


def body(seed: int, samples: int = 4, images: int = 1) -> dict:
    return {"images": [base64.b64encode(png_bytes(seed + i)).decode() for i in range(images)],
            "samples": samples, "seed": 7}


async def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def test_concurrent_requests_share_batches_and_match_their_solo_results() -> None:
    spy = ControlledModel()
    async with serve(model=spy.loaded(), max_batch_crops=16, chunk_crops=4) as client:
        engine = engine_of(client)
        solo = [(await client.post("/v1/embeddings", json=body(seed))).json() for seed in range(6)]
        spy.gate.clear()  # hold the worker so the next requests queue up together
        spy.entered.clear()
        blocker = asyncio.create_task(client.post("/v1/embeddings", json=body(100)))
        await wait_until(spy.entered.is_set)
        batches_before = len(engine.counters.batch_members)
        tasks = [asyncio.create_task(client.post("/v1/embeddings", json=body(seed))) for seed in range(6)]
        await wait_until(lambda: engine.pending_requests == 7)
        spy.gate.set()
        together = [(await task).json() for task in tasks]
        await blocker
    shared = [m for m in engine.counters.batch_members[batches_before:] if len(m) >= 2]
    assert shared, "no batch held crops of two requests"
    for alone, mixed in zip(solo, together, strict=True):
        np.testing.assert_allclose(alone["data"][0]["embedding"], mixed["data"][0]["embedding"], rtol=1e-4,
                                   atol=1e-5)


async def test_a_large_request_does_not_hold_small_ones_behind_it() -> None:
    spy = ControlledModel()
    async with serve(model=spy.loaded(), max_batch_crops=8, chunk_crops=4, max_request_crops=512,
                     max_samples=128) as client:
        engine = engine_of(client)
        spy.gate.clear()
        spy.entered.clear()
        big = asyncio.create_task(client.post("/v1/embeddings", json=body(0, samples=128, images=2)))
        await wait_until(spy.entered.is_set)
        small = asyncio.create_task(client.post("/v1/embeddings", json=body(1, samples=4)))
        await wait_until(lambda: engine.pending_requests == 2)
        spy.gate.set()
        await small
        assert not big.done(), "the small request should finish while the big one still runs"
        assert (await big).status_code == 200


async def test_overload_gives_200s_and_429s_with_retry_after_and_no_5xx() -> None:
    spy = ControlledModel()
    async with serve(model=spy.loaded(), max_queue_crops=16, max_request_crops=16, max_batch_crops=4) as client:
        spy.gate.clear()
        tasks = [asyncio.create_task(client.post("/v1/embeddings", json=body(i, samples=4))) for i in range(12)]
        await wait_until(lambda: sum(t.done() for t in tasks) >= 8)  # the ones over the bound are refused now
        spy.gate.set()
        replies = await asyncio.gather(*tasks)
        codes = sorted(r.status_code for r in replies)
        assert set(codes) == {200, 429}, codes
        for reply in replies:
            if reply.status_code == 429:
                assert reply.json()["error"]["type"] == "overloaded"
                assert int(reply.headers["retry-after"]) >= 1
        assert engine_of(client).queued_crops == 0
        after = await client.post("/v1/embeddings", json=body(50))
        assert after.status_code == 200


async def test_a_request_that_would_miss_its_deadline_is_refused_at_admission() -> None:
    """Refused for the queue ahead of it (429, retry later), not for its own size: alone it would fit."""
    spy = ControlledModel()
    spy.seconds_per_crop = 0.01
    async with serve(model=spy.loaded(), request_timeout_s=60.0, max_batch_crops=8, chunk_crops=8,
                     max_samples=512, max_request_crops=512) as client:
        for seed in range(3):  # the engine learns the speed: about 10 ms a crop (more on a busy machine)
            assert (await client.post("/v1/embeddings", json=body(seed, samples=8))).status_code == 200
        spy.gate.clear()
        spy.entered.clear()
        ahead = [asyncio.create_task(client.post("/v1/embeddings", json=body(10 + i, samples=256))) for i in range(2)]
        await wait_until(lambda: spy.entered.is_set() and engine_of(client).pending_requests == 2)
        crops_before = spy.crops
        # 50 crops: 0.5 s of its own work at 10 ms a crop (it would fit alone, up to 20 ms a crop), but with
        # a turn of 56 for each request ahead, 162 crops: 1.6 s, past its 1 s
        refused = await client.post("/v1/embeddings", json={**body(20, samples=50), "timeout_ms": 1000})
        fits = asyncio.create_task(client.post("/v1/embeddings", json=body(21, samples=8)))
        await wait_until(lambda: engine_of(client).pending_requests == 3)
        spy.seconds_per_crop = 0.0  # what is admitted now runs quickly, well within its deadline
        spy.gate.set()
        assert [(await task).status_code for task in [*ahead, fits]] == [200, 200, 200]
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert error["type"] == "overloaded" and "deadline" in error["message"]
    assert int(refused.headers["retry-after"]) >= 1
    assert spy.crops - crops_before == 2 * 256 + 8  # none of the refused request's crops ran


async def test_admission_counts_round_robin_turns_not_the_whole_queue() -> None:
    spy = ControlledModel()
    async with serve(model=spy.loaded(), request_timeout_s=2.55, max_batch_crops=8, chunk_crops=8,
                     max_samples=512, max_request_crops=512) as client:
        engine = engine_of(client)
        spy.gate.clear()
        spy.entered.clear()
        engine.scheduler.seconds_per_crop = 0.01  # pin the measured speed (no batch completes while gated)
        big = asyncio.create_task(client.post("/v1/embeddings", json=body(0, samples=250)))  # 2.5 s: admitted
        await wait_until(spy.entered.is_set)
        refused = await client.post("/v1/embeddings", json=body(1, samples=200))  # 2 s alone; 4 s behind big
        # The queue holds ~2.5 s of work, but round-robin finishes 8 crops in one turn: ~0.16 s.
        small = asyncio.create_task(client.post("/v1/embeddings", json=body(2, samples=8)))
        await wait_until(lambda: engine.pending_requests == 2)
        spy.gate.set()
        assert (await small).status_code == 200 and (await big).status_code == 200
    assert refused.status_code == 429 and "deadline" in refused.json()["error"]["message"]


async def test_deadline_gives_504_and_drops_pending_crops() -> None:
    spy = ControlledModel()
    async with serve(model=spy.loaded(), request_timeout_s=0.3, max_batch_crops=4, chunk_crops=4) as client:
        engine = engine_of(client)
        engine.scheduler.seconds_per_crop = 0.001  # pin the pace: admitted (64 ms of work), then held past 0.3 s
        spy.gate.clear()
        reply_task = asyncio.create_task(client.post("/v1/embeddings", json=body(0, samples=64)))
        reply = await reply_task
        assert reply.status_code == 504 and reply.json()["error"]["type"] == "deadline_exceeded"
        crops_before = spy.crops
        spy.gate.set()
        await wait_until(lambda: engine.pending_requests == 0)
        await asyncio.sleep(0.1)
        assert spy.crops - crops_before <= 4  # at most the batch already in the forward
        assert engine.queued_crops == 0
        assert engine.crops_dropped >= 56


async def test_cancelled_clients_remaining_crops_are_not_computed() -> None:
    spy = ControlledModel()
    async with serve(model=spy.loaded(), max_batch_crops=4, chunk_crops=4) as client:
        engine = engine_of(client)
        spy.gate.clear()
        spy.entered.clear()
        tasks = [asyncio.create_task(client.post("/v1/embeddings", json=body(i, samples=32))) for i in range(4)]
        await wait_until(spy.entered.is_set)
        await wait_until(lambda: engine.pending_requests == 4)
        crops_before = spy.crops
        for task in tasks:
            task.cancel()  # the client goes away
        await asyncio.gather(*tasks, return_exceptions=True)
        spy.gate.set()
        await wait_until(lambda: engine.pending_requests == 0)
        await asyncio.sleep(0.1)
        assert spy.crops - crops_before <= 4  # only the batch already running; 124 crops never ran
        assert engine.queued_crops == 0
        assert (await client.post("/v1/embeddings", json=body(9))).status_code == 200
        metrics = (await client.get("/metrics")).text
        # Cancelled handlers are what the server's shutdown makes (a client that leaves is noticed, not cancelled,
        # under uvicorn: test_door, test_http_conformance): their crops are dropped all the same, and nothing is
        # counted as client_gone.
        assert 'metta_rejected_total{reason="client_gone"} 0.0' in metrics


async def test_a_failing_forward_fails_exactly_the_requests_in_that_batch() -> None:
    spy = ControlledModel()
    async with serve(model=spy.loaded(), max_batch_crops=8, chunk_crops=4) as client:
        engine = engine_of(client)
        spy.gate.clear()
        spy.entered.clear()
        first = asyncio.create_task(client.post("/v1/embeddings", json=body(0, samples=4)))
        await wait_until(spy.entered.is_set)
        # While the first batch is in the forward, the next one is rendered ahead: this request's.
        ahead = asyncio.create_task(client.post("/v1/embeddings", json=body(5, samples=4)))
        await wait_until(lambda: engine.pending_requests == 2 and engine.scheduler.waiting_requests == 0)
        calls_so_far = spy.calls
        batches_before = len(engine.counters.batch_members)
        # The forward after those two (one batch holding both of the next requests) raises; later ones succeed.
        spy.fail_on = lambda call: RuntimeError("kaboom") if call == calls_so_far + 2 else None
        doomed = [asyncio.create_task(client.post("/v1/embeddings", json=body(i, samples=4))) for i in (1, 2)]
        await wait_until(lambda: engine.pending_requests == 4)
        spy.gate.set()
        assert (await first).status_code == 200 and (await ahead).status_code == 200
        failed = [await t for t in doomed]
        assert [r.status_code for r in failed] == [500, 500]
        assert all(r.json()["error"]["type"] == "internal" and "kaboom" not in r.text for r in failed)
        assert len(engine.counters.batch_members) == batches_before + 2  # the first and the one ahead; not the failed
        assert (await client.post("/v1/embeddings", json=body(3))).status_code == 200  # the worker lives on


async def test_out_of_memory_halves_the_batch_and_retries_once() -> None:
    spy = ControlledModel()
    async with serve(model=spy.loaded(), max_batch_crops=8, chunk_crops=8) as client:
        calls = spy.calls
        spy.fail_on = lambda call: RuntimeError("CUDA out of memory. Tried to allocate") if call == calls + 1 else None
        reply = await client.post("/v1/embeddings", json=body(0, samples=8))
        assert reply.status_code == 200
        assert spy.calls == calls + 3  # the failed batch of 8, then two halves of 4
        expected = (await client.post("/v1/embeddings", json=body(0, samples=8))).json()
        np.testing.assert_allclose(reply.json()["data"][0]["embedding"], expected["data"][0]["embedding"],
                                   rtol=1e-5, atol=1e-6)


class FatalDeviceError(BaseException):
    """Stands for an unrecoverable device fault: not an Exception, so it kills the worker."""


async def test_worker_death_fails_every_waiting_request_at_once_and_health_says_so() -> None:
    spy = ControlledModel()
    async with serve(model=spy.loaded(), max_batch_crops=4, chunk_crops=4) as client:
        spy.gate.clear()
        spy.entered.clear()
        calls = spy.calls
        spy.fail_on = lambda call: FatalDeviceError() if call == calls + 1 else None
        tasks = [asyncio.create_task(client.post("/v1/embeddings", json=body(i, samples=8))) for i in range(3)]
        await wait_until(spy.entered.is_set)
        await wait_until(lambda: engine_of(client).pending_requests == 3)
        spy.gate.set()
        replies = await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)
        assert [r.status_code for r in replies] == [503, 503, 503]
        assert (await client.get("/healthz")).status_code == 503
        not_ready = await client.get("/readyz")
        assert not_ready.status_code == 503 and "worker has stopped" in not_ready.json()["error"]["message"]
        assert "\nmetta_ready 0.0\n" in (await client.get("/metrics")).text  # what MettaNotReady alerts on
        late = await client.post("/v1/embeddings", json=body(5))
        assert late.status_code == 503 and late.json()["error"]["type"] == "not_ready"


async def test_an_idle_worker_does_not_wait_for_company() -> None:
    spy = ControlledModel()
    async with serve(model=spy.loaded(), max_wait_ms=5_000, max_batch_crops=64) as client:
        started = asyncio.get_running_loop().time()
        assert (await client.post("/v1/embeddings", json=body(0, samples=2))).status_code == 200
        # A lone request is dispatched at once, not after max_wait_ms (5 s): a bound, not a timing.
        assert asyncio.get_running_loop().time() - started < 4.0


async def test_under_overload_a_request_is_refused_before_its_images_are_decoded() -> None:
    spy = ControlledModel()
    async with serve(model=spy.loaded(), max_queue_crops=16, max_request_crops=16, max_batch_crops=4) as client:
        spy.gate.clear()
        spy.entered.clear()
        held = [asyncio.create_task(client.post("/v1/embeddings", json=body(i, samples=8))) for i in range(2)]
        await wait_until(lambda: engine_of(client).queued_crops == 16)
        undecodable = {"images": [base64.b64encode(b"not an image at all").decode()], "samples": 4}
        refused = await client.post("/v1/embeddings", json=undecodable)
        spy.gate.set()
        assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]
    # 429, not 400: the full queue was seen first, so the bytes were never decoded
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "overloaded"
