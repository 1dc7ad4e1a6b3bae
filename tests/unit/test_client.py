"""service.client against a scripted server (httpx.MockTransport): splitting, retries, arrays; and no torch needed."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from service.client import AsyncClient, Client, MettaError

REPO = Path(__file__).resolve().parents[2]
MODELS = {"object": "list", "data": [{"name": "m", "fingerprint": "fp", "dim": 2,
                                      "limits": {"max_images": 2, "max_body_bytes": 1 << 20, "max_request_crops": 64,
                                                 "max_samples": 8, "default_samples": 3}}]}


class Script:
    """Replies to POST /v1/embeddings: first the scripted failures, then the embeddings of the images sent."""

    def __init__(self, *failures: httpx.Response) -> None:
        self.failures = list(failures)
        self.posts: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=MODELS)
        self.posts.append(request)
        if self.failures:
            return self.failures.pop(0)
        body = request.read()
        count = body.count(b'name="images"')
        seed = int(body.split(b'name="seed"\r\n\r\n')[1].split(b"\r\n")[0])
        firsts = [part.split(b"\r\n\r\n", 1)[1][0] for part in body.split(b'name="images"')[1:]]  # first byte
        data = [{"index": i, "embedding": base64.b64encode(np.array([firsts[i], seed], "<f4").tobytes()).decode(),
                 "variance": [0.5, 0.25], "dispersion": 0.1} for i in range(count)]
        return httpx.Response(200, json={"model": "m", "model_fingerprint": "fp", "dim": 2, "policy": "multiscale",
                                         "samples": 3, "seed": seed, "data": data,
                                         "usage": {"images": count, "crops": 3 * count}})


def test_embed_splits_to_the_servers_limits_and_returns_arrays_in_order(tmp_path: Path) -> None:
    script = Script()
    (tmp_path / "a.jpg").write_bytes(b"aaaa")
    with Client("http://metta", transport=httpx.MockTransport(script)) as client:
        result = client.embed([b"x", tmp_path / "a.jpg", str(tmp_path / "a.jpg"), b"yy", b"zzz"],
                              return_variance=True, return_dispersion=True)
    assert len(script.posts) == 3  # at most 2 images per request (the server's max_images)
    assert result.embeddings.dtype == np.float32 and result.embeddings.shape == (5, 2)
    assert result.embeddings[:, 0].tolist() == [ord(c) for c in "xaayz"]  # input order, paths read
    assert len(set(result.embeddings[:, 1].tolist())) == 1  # one seed for every part of a split call
    assert result.variances is not None and result.dispersions is not None
    assert result.variances.shape == (5, 2) and result.dispersions.tolist() == [0.1] * 5


def test_429_waits_for_retry_after_and_503_backs_off_then_succeeds() -> None:
    script = Script(httpx.Response(429, headers={"retry-after": "0"}, json={"error": {"type": "overloaded",
                                                                                      "message": "busy"}}),
                    httpx.Response(503, json={"error": {"type": "not_ready", "message": "warming"}}))
    client = AsyncClient("http://metta", transport=httpx.MockTransport(script))

    async def go():
        async with client:
            return await client.embed([b"x"], seed=3)

    assert asyncio.run(go()).seed == 3
    assert len(script.posts) == 3


def test_a_refusal_is_raised_at_once_with_its_type() -> None:
    script = Script(httpx.Response(400, json={"error": {"type": "invalid_image", "message": "images[0] is bad"}}))
    with Client("http://metta", transport=httpx.MockTransport(script)) as client, \
            pytest.raises(MettaError) as error:
        client.embed([b"x"])
    assert (error.value.status, error.value.type) == (400, "invalid_image") and len(script.posts) == 1


def test_the_client_imports_without_torch() -> None:
    code = ("import sys; sys.modules['torch'] = None\n"  # `import torch` now raises ImportError
            "import service.client\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
            "print('ok')")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_auto_samples_sizes_requests_for_samples_max_and_reports_each_images_s() -> None:
    """A request is sized for the most S it may get (samples_max, capped by the server's max_samples), so the
    server never cuts an auto range to fit the request; each image's S comes back."""

    def calls(max_samples: int, samples_max: int, given: list[int]) -> tuple[list[bytes], Any]:
        models = {"data": [{"limits": {"max_images": 4, "max_request_crops": 64, "max_samples": max_samples}}]}
        answers, posts = iter(given), []

        def server(request: httpx.Request) -> httpx.Response:
            if request.url.path == "/v1/models":
                return httpx.Response(200, json=models)
            posts.append(request.read())
            return httpx.Response(200, json={**Script()(request).json(), "samples": next(answers)})

        with Client("http://metta", transport=httpx.MockTransport(server)) as client:
            return posts, client.embed([b"a", b"b", b"c"], samples="auto", samples_max=samples_max, seed=1)

    posts, result = calls(max_samples=128, samples_max=48, given=[8, 6, 5])
    assert len(posts) == 3  # 64 crops a request / 48: one image each
    assert all(b'name="samples"\r\n\r\nauto' in body and b'name="samples_max"\r\n\r\n48' in body for body in posts)
    assert result.samples_per_image.tolist() == [8, 6, 5] and result.samples == 5
    posts, result = calls(max_samples=16, samples_max=48, given=[16, 16])
    assert len(posts) == 1  # the server caps samples_max at 16: 3 images x 16 crops fit one request
    assert result.samples_per_image.tolist() == [16, 16, 16]


def test_the_clients_auto_default_is_the_servers() -> None:
    from service.client import AUTO_SAMPLES_MAX
    from service.core.options import AUTO_SAMPLES_MAX as SERVER_DEFAULT

    assert AUTO_SAMPLES_MAX == SERVER_DEFAULT


class Picky(Script):
    """Refuses a whole request with 400 when any image in it starts with b"!" (as the server does); classifies."""

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        if request.url.path != "/v1/models" and b'\r\n\r\n!' in body:
            self.posts.append(request)
            leads = [part.split(b"\r\n\r\n", 1)[1][:1] for part in body.split(b'name="images"')[1:]]
            message = f"images[{leads.index(b'!')}] could not be decoded"  # its place in this request
            return httpx.Response(400, json={"error": {"type": "invalid_image", "message": message}})
        if request.url.path == "/v1/classify":
            self.posts.append(request)
            count = body.count(b'name="images"')
            top_k = int(body.split(b'name="top_k"\r\n\r\n')[1].split(b"\r\n")[0])
            firsts = [part.split(b"\r\n\r\n", 1)[1][0] for part in body.split(b'name="images"')[1:]]
            data = [{"index": i, "labels": [{"class_index": firsts[i] + k, "label": f"c{firsts[i] + k}",
                                             "probability": 0.5 / (k + 1)} for k in range(top_k)],
                     "uncertainty": {"max_probability": 0.5, "entropy": 1.0, "dispersion": None,
                                     "label_free_uncertainty": 2.0}} for i in range(count)]
            return httpx.Response(200, json={"model": "m", "model_fingerprint": "fp", "policy": "crop_flip",
                                             "samples": 10, "seed": 4, "temperature": 1.5, "calibrated": True,
                                             "data": data, "usage": {"images": count, "crops": 10 * count}})
        return super().__call__(request)


def test_on_error_skip_returns_the_good_images_with_each_bad_ones_error_and_raise_stays_the_default() -> None:
    script = Picky()
    images = [b"a", b"!", b"c", b"d", b"!"]
    with Client("http://metta", transport=httpx.MockTransport(script)) as client:
        result = client.embed(images, seed=1, on_error="skip")
        assert result.indices.tolist() == [0, 2, 3] and result.embeddings[:, 0].tolist() == [ord("a"), ord("c"),
                                                                                               ord("d")]
        assert sorted(result.errors) == [1, 4] and result.errors[1].type == "invalid_image"
        with pytest.raises(MettaError):
            client.embed(images)

    async def go():
        async with AsyncClient("http://metta", transport=httpx.MockTransport(Picky())) as aclient:
            return await aclient.embed(images, seed=1, on_error="skip")

    again = asyncio.run(go())
    assert again.indices.tolist() == [0, 2, 3] and sorted(again.errors) == [1, 4]
    np.testing.assert_array_equal(again.embeddings, result.embeddings)
    for skipped in (result, again):  # each error names its image as the call numbers them, not as sent alone
        assert [skipped.errors[i].message for i in (1, 4)] == [f"images[{i}] could not be decoded" for i in (1, 4)]


def test_a_refusal_names_the_bad_image_by_its_place_in_the_call_not_in_its_request() -> None:
    images = [b"a", b"b", b"c", b"!"]  # two requests of two (the server's max_images): "!" is images[1] of the second
    with Client("http://metta", transport=httpx.MockTransport(Picky())) as client, \
            pytest.raises(MettaError, match=r"images\[3\] could not be decoded"):
        client.embed(images)


def test_classify_sync_and_async_gives_labels_per_image_in_order() -> None:
    images = [b"a", b"b", b"!", b"c"]
    with Client("http://metta", transport=httpx.MockTransport(Picky())) as client:
        result = client.classify(images, top_k=2, on_error="skip")

    async def go():
        async with AsyncClient("http://metta", transport=httpx.MockTransport(Picky())) as aclient:
            return await aclient.classify(images, top_k=2, on_error="skip")

    for got in (result, asyncio.run(go())):
        assert got.indices.tolist() == [0, 1, 3] and list(got.errors) == [2]
        assert [labels[0].class_index for labels in got.labels] == [ord("a"), ord("b"), ord("c")]
        assert [label.probability for label in got.labels[0]] == [0.5, 0.25]
        assert got.temperature == 1.5 and got.calibrated and got.uncertainty[0]["entropy"] == 1.0


def test_retries_are_counted() -> None:
    script = Script(httpx.Response(503, json={"error": {"type": "not_ready", "message": "warming"}}),
                    httpx.Response(429, headers={"retry-after": "0"}, json={"error": {"type": "overloaded",
                                                                                      "message": "busy"}}))
    with Client("http://metta", transport=httpx.MockTransport(script)) as client:
        client.embed([b"x"], seed=3)
        assert client.retried == 2


def test_a_reply_that_is_not_metta_serves_names_the_url_and_asks_whether_it_is_one() -> None:
    def elsewhere(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404)  # another web server at that URL: a bare 404

    with Client("http://metta", transport=httpx.MockTransport(elsewhere)) as client, \
            pytest.raises(MettaError) as error:
        client.ready()
    assert error.value.status == 404 and error.value.type == "http_error"
    assert error.value.message == ("GET http://metta/readyz answered 404 Not Found with no body, not metta-serve's "
                                   "JSON error: is this a metta-serve URL?")
