"""OpenAI's request and reply shape on POST /v1/embeddings, and OpenAI's fields on GET /v1/models."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from tests.integration.conftest import png_bytes, serve

pytestmark = pytest.mark.anyio


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def test_input_gets_openais_reply_with_the_same_numbers_as_images() -> None:
    images = [png_bytes(1), png_bytes(2)]
    async with serve() as client:
        native = (await client.post("/v1/embeddings", json={"images": [b64(i) for i in images], "seed": 5})).json()
        reply = await client.post("/v1/embeddings", json={
            "model": "dummy", "input": ["data:image/png;base64," + b64(images[0]), b64(images[1])], "seed": 5,
            "user": "someone"})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["object"] == "list" and body["model"] == "dummy"
        assert [(d["object"], d["index"]) for d in body["data"]] == [("embedding", 0), ("embedding", 1)]
        assert body["usage"] == {"images": 2, "crops": 8, "prompt_tokens": 0, "total_tokens": 0}
        assert body["model_fingerprint"] == native["model_fingerprint"] and body["seed"] == 5
        for ours, theirs in zip(native["data"], body["data"], strict=True):
            assert ours["embedding"] == theirs["embedding"]  # float by default, as OpenAI's API

        one = (await client.post("/v1/embeddings", json={"input": b64(images[0]), "seed": 5,
                                                         "encoding_format": "base64", "samples": 2})).json()
        vector = np.frombuffer(base64.b64decode(one["data"][0]["embedding"]), "<f4")
        assert vector.shape == (16,) and one["samples"] == 2  # a bare string; MeTTA options ride along


@pytest.mark.parametrize(("extra", "status", "kind", "words"), [
    ({"dimensions": 8}, 422, "invalid_option", "dimensions"),
    ({"input": [[101, 102]]}, 422, "invalid_option", "token arrays"),
    ({"input": [101, 102]}, 422, "invalid_option", "token arrays"),
    ({"encoding": "float", "encoding_format": "base64"}, 422, "invalid_option", "encoding_format"),
    ({"model": "text-embedding-3-small"}, 422, "invalid_option", "unknown model"),
    ({"input": ["https://example.com/cat.jpg"]}, 400, "invalid_request", "URL"),
    ({"input": []}, 422, "invalid_option", "input"),
    ({"images": ["AAAA"]}, 422, "invalid_option", "either images"),
    ({"temperature": 1}, 422, "invalid_option", "unknown option"),
    ({"input": "hello world"}, 400, "invalid_request", "input[0] is not valid base64"),  # text, not an image
    ({"input": [b64(png_bytes(0)), b64(b"not an image")]}, 400, "invalid_image", "input[1]"),
    ({"input": ["data:text/plain;base64,aGVsbG8="]}, 400, "invalid_image", "input[0] is a data: URL of 'text/plain'"),
])
async def test_what_openais_shape_cannot_mean_here_is_refused(extra, status, kind, words) -> None:
    async with serve() as client:
        reply = await client.post("/v1/embeddings", json={"input": [b64(png_bytes(0))], **extra})
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["type"] == kind and words in error["message"]


async def test_models_list_has_openais_fields_and_the_request_limits() -> None:
    async with serve(max_images=7) as client:
        body = (await client.get("/v1/models")).json()
    card = body["data"][0]
    assert body["object"] == "list"
    assert (card["id"], card["object"], card["owned_by"]) == ("dummy", "model", "metta-serve")
    assert isinstance(card["created"], int) and card["created"] > 1_600_000_000
    assert card["limits"]["max_images"] == 7 and card["limits"]["max_body_bytes"] > 0


async def test_the_served_model_is_retrieved_by_its_id_as_openais_client_asks() -> None:
    async with serve() as client:
        listed = (await client.get("/v1/models")).json()["data"][0]
        one = await client.get("/v1/models/dummy")
        other = await client.get("/v1/models/resnet50")
    assert one.status_code == 200 and one.json() == listed
    assert other.status_code == 404 and other.json()["error"]["type"] == "not_found"
    assert "resnet50" in other.json()["error"]["message"] and "dummy" in other.json()["error"]["message"]
