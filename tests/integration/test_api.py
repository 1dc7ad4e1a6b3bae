"""The HTTP API in-process: every option, both encodings, reply order, and every row of the error table."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from service.core.decode import decode_image
from service.core.embedding import embed
from tests.integration.conftest import png_bytes, serve

pytestmark = pytest.mark.anyio


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def files(*images: bytes) -> list:
    return [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]


def error_of(response) -> tuple[int, str, str]:
    body = response.json()
    return response.status_code, body["error"]["type"], body["error"]["message"]


async def test_both_encodings_give_the_same_reply_in_input_order() -> None:
    images = [png_bytes(seed) for seed in range(3)]
    async with serve() as client:
        multi = await client.post("/v1/embeddings", files=files(*images), data={"samples": "5", "seed": "42"})
        as_json = await client.post("/v1/embeddings", json={"images": [b64(i) for i in images], "samples": 5,
                                                              "seed": 42})
        single = await client.post("/v1/embeddings", json={"images": [b64(images[2])], "samples": 5, "seed": 42})
    assert multi.status_code == as_json.status_code == 200
    a, b = multi.json(), as_json.json()
    assert a == b
    assert [d["index"] for d in a["data"]] == [0, 1, 2]
    assert a["model"] == "dummy" and a["dim"] == 16 and len(a["model_fingerprint"]) == 16
    assert (a["policy"], a["samples"], a["seed"]) == ("crop_flip", 5, 42)
    assert a["usage"] == {"images": 3, "crops": 15}
    # Order: the third image's embedding equals that image embedded alone.
    assert np.allclose(a["data"][2]["embedding"], single.json()["data"][0]["embedding"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(a["data"][0]["embedding"], a["data"][2]["embedding"])


async def test_options_variance_normalize_encoding_and_defaults() -> None:
    image = b64(png_bytes(1))
    async with serve() as client:
        plain = (await client.post("/v1/embeddings", json={"images": [image], "seed": 3})).json()
        assert plain["samples"] == 4 and plain["policy"] == "crop_flip"  # the server's defaults
        assert "variance" not in plain["data"][0]
        drawn = (await client.post("/v1/embeddings", json={"images": [image]})).json()["seed"]
        assert 0 <= drawn <= 2**53 - 1

        full = (await client.post("/v1/embeddings", json={
            "images": [image], "seed": 3, "return_variance": True, "normalize": True, "encoding": "base64",
        })).json()
        embedding = np.frombuffer(base64.b64decode(full["data"][0]["embedding"]), dtype="<f4")
        variance = np.frombuffer(base64.b64decode(full["data"][0]["variance"]), dtype="<f4")
        assert embedding.shape == variance.shape == (16,)
        assert np.isclose(np.linalg.norm(embedding), 1.0, atol=1e-5)
        raw = np.array(plain["data"][0]["embedding"])
        assert np.allclose(embedding, raw / np.linalg.norm(raw), atol=1e-5)
        assert (variance > 0).all()

        per_view = (await client.post("/v1/embeddings", files=files(png_bytes(1)), data={
            "seed": "3", "view_normalize": "TRUE", "return_variance": "1", "model": "dummy",
        })).json()
        assert np.linalg.norm(per_view["data"][0]["embedding"]) <= 1.0 + 1e-6
        assert np.sum(per_view["data"][0]["variance"]) < variance.sum()  # unit views vary less

        center = (await client.post("/v1/embeddings", json={"images": [image], "policy": "center"})).json()
        assert center["samples"] == 1 and center["usage"]["crops"] == 1
        multi = (await client.post("/v1/embeddings", json={"images": [image], "policy": "multiscale",
                                                             "samples": 3})).json()
        assert multi["policy"] == "multiscale" and multi["usage"]["crops"] == 3


async def test_dispersion_is_the_library_value_and_only_when_asked() -> None:
    async with serve() as client:
        reply = (await client.post("/v1/embeddings", json={
            "images": [b64(png_bytes(4)), b64(png_bytes(5))], "samples": 6, "seed": 9, "return_dispersion": True,
        })).json()
        plain = (await client.post("/v1/embeddings", json={"images": [b64(png_bytes(4))], "seed": 9})).json()
        model = client.app.state.metta.model  # type: ignore[attr-defined]
    assert "dispersion" not in plain["data"][0]
    images = [decode_image(png_bytes(seed), max_pixels=10**7, max_side=10**4) for seed in (4, 5)]
    expected = embed(model, images, samples=6, policy="crop_flip", seed=9, return_dispersion=True).dispersions
    assert expected is not None
    got = [entry["dispersion"] for entry in reply["data"]]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert all(0.0 < value < 2.0 for value in got)


async def test_data_url_prefix_and_odd_images_are_accepted() -> None:
    async with serve() as client:
        url = "data:image/png;base64," + b64(png_bytes(2))
        assert (await client.post("/v1/embeddings", json={"images": [url], "samples": 2})).status_code == 200
        tiny = io.BytesIO()
        Image.new("RGB", (1, 1), (10, 20, 30)).save(tiny, "PNG")  # 1x1 is served (upsampled)
        reply = await client.post("/v1/embeddings", json={"images": [b64(tiny.getvalue())], "samples": 2})
        assert reply.status_code == 200


async def test_models_health_ready_metrics_and_openapi() -> None:
    async with serve() as client:
        models = (await client.get("/v1/models")).json()["data"]
        assert models[0]["name"] == "dummy" and models[0]["default"] is True and models[0]["dim"] == 16
        assert models[0]["preprocess"]["input_size"] == 64
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        await client.post("/v1/embeddings", json={"images": [b64(png_bytes())], "samples": 2})
        text = (await client.get("/metrics")).text
        assert 'metta_request_duration_seconds_count{endpoint="/v1/embeddings",samples="2"} 1.0' in text
        for path, code in (("/v1/embeddings", 200), ("/v1/models", 200), ("/healthz", 200), ("/readyz", 200)):
            assert f'metta_requests_total{{code="{code}",endpoint="{path}"}} 1.0' in text
        assert 'metta_model_info{device="cpu",dim="16"' in text
        spec = (await client.get("/openapi.json")).json()
        body = spec["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]
        assert set(body) == {"application/json", "multipart/form-data"}
        assert "images" in body["application/json"]["schema"]["properties"]
        assert body["multipart/form-data"]["schema"]["properties"]["images"]["items"]["format"] == "binary"


@pytest.mark.parametrize(
    ("payload", "status", "kind", "words"),
    [
        ({"images": [b64(b"not an image at all")]}, 400, "invalid_image", "images[0]"),
        ({"images": [""]}, 400, "invalid_image", "empty"),
        ({"images": [b64(b"<svg xmlns='http://www.w3.org/2000/svg'/>")]}, 400, "invalid_image", "allowed format"),
        ({"images": ["!!!not-base64!!!"]}, 400, "invalid_request", "base64"),
        ({"images": ["https://example.com/cat.jpg"]}, 400, "invalid_request", "URL"),
        ({"images": [b64(png_bytes())], "samples": 0}, 422, "invalid_option", "samples"),
        ({"images": [b64(png_bytes())], "samples": -1}, 422, "invalid_option", "samples"),
        ({"images": [b64(png_bytes())], "samples": 10**9}, 422, "invalid_option", "samples"),
        ({"images": [b64(png_bytes())], "samples": "abc"}, 422, "invalid_option", "samples"),
        ({"images": [b64(png_bytes())], "samples": 2.5}, 422, "invalid_option", "samples"),
        ({"images": [b64(png_bytes())], "seed": -1}, 422, "invalid_option", "seed"),
        ({"images": [b64(png_bytes())], "seed": 2**53}, 422, "invalid_option", "seed"),
        ({"images": [b64(png_bytes())], "seed": 2**70}, 422, "invalid_option", "seed"),
        ({"images": [b64(png_bytes())], "policy": "zoom"}, 422, "invalid_option", "policy"),
        ({"images": [b64(png_bytes())], "encoding": "hex"}, 422, "invalid_option", "encoding"),
        ({"images": [b64(png_bytes())], "model": "resnet9000"}, 422, "invalid_option", "dummy"),
        ({"images": [b64(png_bytes())], "normalize": "maybe"}, 422, "invalid_option", "normalize"),
        ({"images": [b64(png_bytes())], "samples": 1, "return_variance": True}, 422, "invalid_option", "variance"),
        ({"images": [b64(png_bytes())], "policy": "center", "return_dispersion": True}, 422, "invalid_option",
         "dispersion"),
        ({"images": [b64(png_bytes())], "policy": "center", "samples": 4}, 422, "invalid_option", "center"),
        ({"images": [b64(png_bytes())], "colour": "blue"}, 422, "invalid_option", "unknown option"),
        ({"samples": 2}, 422, "invalid_option", "images"),
        ({"images": "abc"}, 422, "invalid_option", "images"),
        ({"images": []}, 422, "invalid_option", "images"),
    ],
)
async def test_json_errors(payload: dict, status: int, kind: str, words: str) -> None:
    async with serve() as client:
        reply = await client.post("/v1/embeddings", json=payload)
        assert error_of(reply)[:2] == (status, kind)
        assert words in error_of(reply)[2]
        # The server keeps serving after every bad request.
        ok = await client.post("/v1/embeddings", json={"images": [b64(png_bytes())], "samples": 2})
        assert ok.status_code == 200


@pytest.mark.parametrize(
    ("content", "content_type", "status", "kind"),
    [
        (b"", "application/json", 400, "invalid_request"),
        (b"{not json", "application/json", 400, "invalid_request"),
        (b"[1, 2]", "application/json", 400, "invalid_request"),
        (b"hello", "text/plain", 415, "unsupported_media_type"),
        (b"hello", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
        (b"--x\r\nbroken", "multipart/form-data", 400, "invalid_request"),  # no boundary
    ],
)
async def test_body_errors(content: bytes, content_type: str, status: int, kind: str) -> None:
    async with serve() as client:
        reply = await client.post("/v1/embeddings", content=content, headers={"content-type": content_type})
        assert error_of(reply)[:2] == (status, kind)


async def test_multipart_errors() -> None:
    async with serve(max_images=2) as client:
        no_images = await client.post("/v1/embeddings", data={"samples": "2"}, files=[("other", ("a", b"x"))])
        assert error_of(no_images)[:2] == (422, "invalid_option")
        bad_bool = await client.post("/v1/embeddings", files=files(png_bytes()), data={"normalize": "maybe"})
        assert error_of(bad_bool)[:2] == (422, "invalid_option")
        bad_int = await client.post("/v1/embeddings", files=files(png_bytes()), data={"samples": "2.5"})
        assert error_of(bad_int)[:2] == (422, "invalid_option")
        url = await client.post("/v1/embeddings", data={"images": "http://example.com/a.jpg"},
                                files=[("x", ("x", b"x"))])
        assert error_of(url)[:2] == (400, "invalid_request")
        too_many = await client.post("/v1/embeddings", files=files(*[png_bytes(i) for i in range(3)]))
        assert error_of(too_many)[:2] == (413, "payload_too_large")


async def test_size_limits_give_413() -> None:
    async with serve(max_body_bytes=50_000, max_image_side=100, max_image_pixels=5_000, max_request_crops=8,
                     max_queue_crops=64) as client:
        big = await client.post("/v1/embeddings", content=b"x" * 60_000, headers={"content-type": "application/json"})
        assert error_of(big)[:2] == (413, "payload_too_large")
        side = await client.post("/v1/embeddings", json={"images": [b64(png_bytes(width=150, height=10))]})
        assert error_of(side)[:2] == (413, "payload_too_large") and "150x10" in error_of(side)[2]
        pixels = await client.post("/v1/embeddings", json={"images": [b64(png_bytes(width=90, height=90))]})
        assert error_of(pixels)[:2] == (413, "payload_too_large") and "pixels" in error_of(pixels)[2]
        crops = await client.post("/v1/embeddings", json={"images": [b64(png_bytes(width=50, height=50))] * 3,
                                                           "samples": 3})
        assert error_of(crops)[:2] == (413, "payload_too_large") and "crops" in error_of(crops)[2]


async def test_streamed_body_over_the_limit_is_cut_off() -> None:
    async def chunks():  # no Content-Length: the middleware must count as the body arrives
        for _ in range(100):
            yield b"x" * 1_000

    async with serve(max_body_bytes=10_000) as client:
        reply = await client.post("/v1/embeddings", content=chunks(), headers={"content-type": "application/json"})
        assert error_of(reply)[:2] == (413, "payload_too_large")


async def test_api_keys(tmp_path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# one key per line\nsecret-one\nsecret-two\n")
    async with serve(api_keys_file=keys) as client:
        body = {"images": [b64(png_bytes())], "samples": 2}
        assert error_of(await client.post("/v1/embeddings", json=body))[:2] == (401, "unauthorized")
        wrong = await client.post("/v1/embeddings", json=body, headers={"Authorization": "Bearer secret-three"})
        assert error_of(wrong)[:2] == (401, "unauthorized")
        assert "secret" not in wrong.text
        good = await client.post("/v1/embeddings", json=body, headers={"Authorization": "Bearer secret-two"})
        assert good.status_code == 200
        assert (await client.get("/v1/models")).status_code == 401
        for open_path in ("/healthz", "/readyz", "/metrics"):
            assert (await client.get(open_path)).status_code == 200
