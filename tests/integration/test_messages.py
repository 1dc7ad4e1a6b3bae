"""Refusals that name the fix, as a newcomer meets them."""

from __future__ import annotations

import pytest

from models import LoadedModel
from tests.integration.conftest import ControlledModel, png_bytes, serve
from tests.integration.test_classify import b64, dummy_with_head, error_of  # noqa: F401  (a fixture)

pytestmark = pytest.mark.anyio


async def test_a_file_under_another_field_says_to_send_files_as_images() -> None:
    async with serve() as client:
        reply = await client.post("/v1/embeddings", files=[("image", ("cat.png", png_bytes(0), "image/png"))])
    status, kind, message = error_of(reply)
    assert (status, kind) == (422, "invalid_option")
    assert message.startswith("image: ") and "'images' field" in message, message


@pytest.mark.parametrize(("path", "option", "words"), [
    ("/v1/classify", {"normalize": "true"}, "normalize: an embedding-only option (of /v1/embeddings)"),
    ("/v1/embeddings", {"top_k": "3"}, "top_k: a classify-only option (of /v1/classify)"),
    ("/v1/embeddings", {"colour": "red"}, "colour: unknown option"),
])
@pytest.mark.parametrize("encoding", ["json", "multipart"])
async def test_an_option_of_the_other_endpoint_names_its_endpoint(
        dummy_with_head: LoadedModel, path: str, option: dict[str, str], words: str, encoding: str) -> None:  # noqa: F811
    async with serve(dummy_with_head) as client:
        if encoding == "json":
            value = {"true": True, "3": 3}.get(next(iter(option.values())), next(iter(option.values())))
            reply = await client.post(path, json={"images": [b64(png_bytes(0))], next(iter(option)): value})
        else:
            reply = await client.post(path, files=[("images", ("a.png", png_bytes(0), "image/png"))], data=option)
    status, kind, message = error_of(reply)
    assert (status, kind) == (422, "invalid_option")
    assert message.startswith(words), message


async def test_a_deadline_no_idle_server_can_meet_is_a_422_about_the_deadline_not_a_429() -> None:
    slow = ControlledModel()
    slow.seconds_per_crop = 0.02  # measured at warm-up: 8 crops take ≈ 0.16 s with nothing queued
    async with serve(model=slow.loaded()) as client:
        reply = await client.post("/v1/embeddings", json={"images": [b64(png_bytes(0))], "samples": 8,
                                                         "timeout_ms": 20})
        status, kind, message = error_of(reply)
        assert (status, kind) == (422, "invalid_option"), message
        assert "deadline (timeout_ms) is too short for it even on an idle server" in message
        assert "retry" not in message and "retry-after" not in reply.headers
        fits = await client.post("/v1/embeddings", json={"images": [b64(png_bytes(0))], "samples": 8,
                                                        "timeout_ms": 10_000})
        assert fits.status_code == 200, fits.text
