"""How replies are given: large ones built off the event loop, and HEAD wherever GET works."""

from __future__ import annotations

import threading

import pytest
from pydantic import BaseModel

from models import LoadedModel
from service.api.schemas import ClassifyResponse, EmbeddingsResponse
from tests.integration.conftest import png_bytes, serve
from tests.integration.test_classify import b64, dummy_with_head  # noqa: F401  (a fixture)

pytestmark = pytest.mark.anyio


def record_serialising_threads(monkeypatch: pytest.MonkeyPatch, reply_type: type[BaseModel]) -> list[threading.Thread]:
    """The threads `reply_type`'s JSON is written in (the reply's slow part: 64 images × 1,000 labels)."""
    threads: list[threading.Thread] = []
    original = reply_type.model_dump_json

    def recorded(self, *args, **kwargs):
        threads.append(threading.current_thread())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(reply_type, "model_dump_json", recorded)
    return threads


async def test_a_large_classify_reply_is_built_off_the_event_loop(
        dummy_with_head: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    threads = record_serialising_threads(monkeypatch, ClassifyResponse)
    images = [b64(png_bytes(seed, 40, 30)) for seed in range(64)]
    async with serve(dummy_with_head, max_images=64, max_request_crops=64, max_queue_crops=64) as client:
        reply = await client.post("/v1/classify", json={"images": images, "samples": 1, "top_k": 1000})
        assert reply.status_code == 200, reply.text
        assert [len(item["labels"]) for item in reply.json()["data"]] == [1000] * 64
    assert threads and threading.main_thread() not in threads  # the loop runs in the main thread here


async def test_an_embeddings_reply_is_built_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    threads = record_serialising_threads(monkeypatch, EmbeddingsResponse)
    async with serve() as client:
        reply = await client.post("/v1/embeddings", json={"images": [b64(png_bytes(0))], "return_variance": True})
        assert reply.status_code == 200, reply.text
    assert threads and threading.main_thread() not in threads


@pytest.mark.parametrize("path", ["/readyz", "/healthz", "/metrics", "/v1/models", "/openapi.json", "/docs"])
async def test_head_is_answered_wherever_get_is(path: str) -> None:
    async with serve() as client:
        got = await client.get(path)
        head = await client.head(path)
    assert got.status_code == 200
    assert head.status_code == 200, head.text
    assert head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"]


async def test_head_on_a_post_only_route_is_405_like_get() -> None:
    async with serve() as client:
        head = await client.head("/v1/embeddings")
    assert head.status_code == 405
    assert head.headers["allow"] == "POST"
