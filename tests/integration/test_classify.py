"""POST /v1/classify in-process, and the options it shares with /v1/embeddings (auto S, timeout_ms).

The dummy backbone has no head (it answers `no_classifier`); `dummy_with_head` gives it a seeded
1,000-class linear head, so replies carry ImageNet's label names and can be checked against the library.
"""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import pytest
import torch
from torch import nn

from models import LoadedModel, ModelOptions, build_backbone, compile_backbone
from models.imagenet_labels import imagenet_labels
from service.core.decode import decode_image
from service.core.embedding import embed
from service.core.uncertainty import label_free_uncertainty
from tests.integration.conftest import ControlledModel, engine_of, png_bytes, serve
from tests.integration.test_engine import wait_until

pytestmark = pytest.mark.anyio
# Embeddings keep a retrieval default; classify has its own (the test settings make them differ).
SETTINGS = {"default_policy": "multiscale", "default_samples": 3, "classify_policy": "crop_flip",
            "classify_samples": 5}


@pytest.fixture(scope="module")
def dummy_with_head() -> LoadedModel:
    built = build_backbone("dummy", ModelOptions(mode="eager"))
    head = nn.Linear(built.spec.dim, 1000)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator))
        head.bias.copy_(torch.randn(head.bias.shape, generator=generator) * 0.1)
    built.head = head
    return compile_backbone(built, ModelOptions(mode="eager"))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def error_of(response) -> tuple[int, str, str]:
    body = response.json()
    return response.status_code, body["error"]["type"], body["error"]["message"]


def expected_probabilities(model: LoadedModel, image: bytes, samples: int, policy: str, seed: int) -> np.ndarray:
    """softmax(head(mean)) computed with the library and torch, T = 1 (the dummy is not calibrated)."""
    decoded = decode_image(image, max_pixels=10**8, max_side=10**5)
    mean = embed(model, [decoded], samples=samples, policy=policy, seed=seed).embeddings
    assert model.head is not None
    with torch.no_grad():
        logits = model.head(torch.from_numpy(mean).double().mul(1).float())
    return torch.softmax(logits.double(), dim=1).numpy()[0]


async def test_classify_reply_is_eq7_on_the_mean_in_both_encodings(dummy_with_head: LoadedModel) -> None:
    images = [png_bytes(seed) for seed in range(2)]
    async with serve(dummy_with_head, **SETTINGS) as client:
        as_json = await client.post("/v1/classify", json={"images": [b64(i) for i in images], "top_k": 3,
                                                          "seed": 11, "samples": 4})
        multi = await client.post("/v1/classify", files=[("images", (f"{i}.png", d, "image/png"))
                                                         for i, d in enumerate(images)],
                                  data={"top_k": "3", "seed": "11", "samples": "4"})
    assert as_json.status_code == multi.status_code == 200, as_json.text
    reply = as_json.json()
    assert reply == multi.json()
    assert (reply["model"], reply["policy"], reply["samples"], reply["seed"]) == ("dummy", "crop_flip", 4, 11)
    assert (reply["temperature"], reply["calibrated"]) == (1.0, False)
    assert reply["usage"] == {"images": 2, "crops": 8}
    names = imagenet_labels()
    for index, entry in enumerate(reply["data"]):
        assert entry["index"] == index
        probs = expected_probabilities(dummy_with_head, images[index], 4, "crop_flip", 11)
        top = np.argsort(-probs)[:3]
        assert [label["class_index"] for label in entry["labels"]] == top.tolist()
        assert [label["label"] for label in entry["labels"]] == [names[c] for c in top]
        assert np.allclose([label["probability"] for label in entry["labels"]], probs[top], rtol=1e-4)
        uncertainty = entry["uncertainty"]
        assert uncertainty["max_probability"] == pytest.approx(probs.max(), rel=1e-4)
        assert uncertainty["entropy"] == pytest.approx(-(probs * np.log(probs)).sum(), rel=1e-4)
        assert 0 <= uncertainty["dispersion"] <= 2
        assert uncertainty["label_free_uncertainty"] > 0


async def test_classify_defaults_are_its_own_and_center_has_no_dispersion(dummy_with_head: LoadedModel) -> None:
    image = b64(png_bytes(3))
    async with serve(dummy_with_head, **SETTINGS) as client:
        default = (await client.post("/v1/classify", json={"images": [image]})).json()
        center = (await client.post("/v1/classify", json={"images": [image], "policy": "center"})).json()
        embedded = (await client.post("/v1/embeddings", json={"images": [image]})).json()
    assert (default["policy"], default["samples"]) == ("crop_flip", 5)  # classify_policy / classify_samples
    assert len(default["data"][0]["labels"]) == 5  # top_k defaults to 5
    assert (embedded["policy"], embedded["samples"]) == ("multiscale", 3)  # the retrieval default stays
    assert (center["policy"], center["samples"]) == ("center", 1)
    assert center["data"][0]["uncertainty"]["dispersion"] is None


@pytest.mark.parametrize(("payload", "status", "kind", "words"), [
    ({"normalize": True}, 422, "invalid_option", "normalize: an embedding-only option (of /v1/embeddings)"),
    ({"return_variance": True}, 422, "invalid_option", "return_variance: an embedding-only option"),
    ({"encoding": "base64"}, 422, "invalid_option", "encoding: an embedding-only option"),
    ({"top_k": 0}, 422, "invalid_option", "top_k"),
    ({"top_k": 1001}, 422, "invalid_option", "at most the head's 1000 classes"),
    ({"samples": 0}, 422, "invalid_option", "samples"),
    ({"samples": "many"}, 422, "invalid_option", "samples"),
    ({"samples_min": 3}, 422, "invalid_option", "only with samples='auto'"),
    ({"samples": "auto", "samples_min": 9, "samples_max": 4}, 422, "invalid_option",
     "samples_min (9) is above samples_max (4)"),
    ({"samples": "auto", "samples_min": 200, "samples_max": 300}, 422, "invalid_option",
     "above the server's max_samples (128)"),
    ({"policy": "multiscale", "samples": 227}, 422, "invalid_option", "samples: at most 128, got 227"),
    ({"policy": "ten_crop", "samples": 11}, 422, "invalid_option", "ten_crop policy makes at most 10 distinct views"),
    ({"policy": "ten_crop", "samples": "auto", "samples_min": 12}, 422, "invalid_option",
     "samples_min (12) is above the 10 distinct views of the ten_crop policy"),
    ({"timeout_ms": 10**9}, 422, "invalid_option", "timeout_ms: at most"),
    ({"timeout_ms": 0}, 422, "invalid_option", "timeout_ms"),
    ({"model": "resnet50"}, 422, "invalid_option", "unknown model"),
    ({"samples": 100}, 413, "payload_too_large", "crops"),
])
async def test_classify_option_errors(dummy_with_head: LoadedModel, payload: dict, status: int, kind: str,
                                      words: str) -> None:
    image = b64(png_bytes(0))
    async with serve(dummy_with_head, max_request_crops=64, max_queue_crops=64) as client:
        response = await client.post("/v1/classify", json={"images": [image], **payload})
    got_status, got_kind, message = error_of(response)
    assert (got_status, got_kind) == (status, kind), message
    assert words in message


async def test_ten_crop_classifies_like_the_library_and_caps_auto_s(dummy_with_head: LoadedModel) -> None:
    image = png_bytes(5)
    async with serve(dummy_with_head, **SETTINGS) as client:
        fixed = (await client.post("/v1/classify", json={"images": [b64(image)], "policy": "ten_crop",
                                                         "samples": 10, "top_k": 1000})).json()
        auto = (await client.post("/v1/classify", json={"images": [b64(image)], "policy": "ten_crop",
                                                        "samples": "auto", "top_k": 1000})).json()
    assert (fixed["policy"], fixed["samples"], auto["samples"]) == ("ten_crop", 10, 10)  # auto: at most 10
    probs = expected_probabilities(dummy_with_head, image, 10, "ten_crop", 0)  # no seed in its views
    got = {label["class_index"]: label["probability"] for label in fixed["data"][0]["labels"]}
    assert np.allclose([got[c] for c in range(1000)], probs, atol=1e-6)
    assert auto["data"] == fixed["data"]


async def test_a_model_without_head_answers_no_classifier_and_auth_applies(tmp_path) -> None:
    image = b64(png_bytes(0))
    async with serve() as client:  # the plain dummy: no head
        status, kind, message = error_of(await client.post("/v1/classify", json={"images": [image]}))
    assert (status, kind) == (422, "no_classifier") and "no classifier head" in message
    async with serve(api_keys="secret") as client:
        status, kind, _ = error_of(await client.post("/v1/classify", json={"images": [image]}))
        assert (status, kind) == (401, "unauthorized")
        ok = await client.post("/v1/classify", json={"images": [image]}, headers={"authorization": "Bearer secret"})
        assert ok.json()["error"]["type"] == "no_classifier"


async def test_auto_samples_runs_samples_max_and_equals_fixed_s(dummy_with_head: LoadedModel) -> None:
    image = png_bytes(4)
    async with serve(dummy_with_head, **SETTINGS, max_samples=24) as client:
        auto = (await client.post("/v1/embeddings", json={"images": [b64(image)], "samples": "auto",
                                                          "samples_max": 6, "seed": 5})).json()
        fixed = (await client.post("/v1/embeddings", json={"images": [b64(image)], "samples": 6,
                                                           "seed": 5})).json()
        form = (await client.post("/v1/classify", files=[("images", ("a.png", image, "image/png"))],
                                  data={"samples": "auto", "samples_max": "6", "seed": "5"})).json()
        fixed_classify = (await client.post("/v1/classify", json={"images": [b64(image)], "samples": 6,
                                                                  "seed": 5})).json()
        capped = (await client.post("/v1/classify", json={"images": [b64(image)], "samples": "auto",
                                                          "samples_max": 500, "timeout_ms": 5000})).json()
        metrics = (await client.get("/metrics")).text
    assert auto["samples"] == fixed["samples"] == form["samples"] == 6
    assert auto["data"][0]["embedding"] == fixed["data"][0]["embedding"]  # prefix-stable plans
    assert form["data"] == fixed_classify["data"]
    assert capped["samples"] == 24  # samples_max is capped by the server's max_samples
    assert 'metta_samples_used_count{endpoint="/v1/classify"} 3.0' in metrics
    assert 'metta_request_duration_seconds_count{endpoint="/v1/classify",samples="8"}' in metrics
    assert "metta_samples_shrunk_total" in metrics


async def test_label_free_uncertainty_on_embeddings(dummy_with_head: LoadedModel) -> None:
    image = b64(png_bytes(2))
    async with serve(dummy_with_head, **SETTINGS) as client:
        reply = (await client.post("/v1/embeddings", json={"images": [image], "samples": 1, "policy": "center",
                                                           "return_label_free_uncertainty": True})).json()
        plain = (await client.post("/v1/embeddings", json={"images": [image], "policy": "center"})).json()
        classified = (await client.post("/v1/classify", json={"images": [image], "policy": "center"})).json()
    score = reply["data"][0]["label_free_uncertainty"]
    assert score == pytest.approx(label_free_uncertainty(np.array(reply["data"][0]["embedding"])), rel=1e-6)
    assert score == pytest.approx(classified["data"][0]["uncertainty"]["label_free_uncertainty"], rel=1e-6)
    assert "label_free_uncertainty" not in plain["data"][0]


async def test_models_lists_defaults_and_classifier(dummy_with_head: LoadedModel) -> None:
    async with serve(dummy_with_head, **SETTINGS) as client:
        card = (await client.get("/v1/models")).json()["data"][0]
        schema = (await client.get("/openapi.json")).json()
    assert card["classifier"] is True
    assert card["defaults"] == {"embeddings": {"policy": "multiscale", "samples": 3},
                                "classify": {"policy": "crop_flip", "samples": 5}}
    assert "/v1/classify" in schema["paths"]


async def test_an_auto_request_holds_only_its_working_copies_while_queued() -> None:
    """Its S is given before decoding, so its images are planned, downscaled and cut in the decode pool like a
    fixed-S request's, and its hold on the pixel budget shrinks to those copies (it held the whole decoded
    800×600 image while queued when the cut waited for admission, on the event loop)."""
    spy = ControlledModel()
    async with serve(model=spy.loaded()) as client:
        budget = client.app.state.metta.pixel_budget  # type: ignore[attr-defined]
        spy.gate.clear()
        spy.entered.clear()
        auto = asyncio.create_task(client.post("/v1/embeddings", json={
            "images": [b64(png_bytes(8, width=800, height=600))], "samples": "auto", "samples_max": 4,
            "policy": "crop_flip", "seed": 1}))
        await wait_until(spy.entered.is_set)
        held = budget.held
        spy.gate.set()
        assert (await auto).status_code == 200
    assert 0 < held < 800 * 600 // 4


async def test_auto_samples_shrink_under_load_and_equal_a_fixed_s_request() -> None:
    spy = ControlledModel()
    image = b64(png_bytes(6))
    async with serve(model=spy.loaded(), max_queue_crops=12, max_request_crops=12, max_batch_crops=4,
                     chunk_crops=4) as client:
        fixed = (await client.post("/v1/embeddings", json={"images": [image], "samples": 6, "seed": 5})).json()
        spy.gate.clear()  # hold the worker: a 6-crop request stays queued
        spy.entered.clear()
        blocker = asyncio.create_task(client.post("/v1/embeddings", json={"images": [image], "samples": 6}))
        await wait_until(spy.entered.is_set)
        auto = asyncio.create_task(client.post("/v1/embeddings", json={
            "images": [image], "samples": "auto", "samples_min": 2, "samples_max": 10, "seed": 5}))
        await wait_until(lambda: engine_of(client).pending_requests == 2)
        spy.gate.set()
        reply = (await auto).json()
        assert (await blocker).status_code == 200
        metrics = (await client.get("/metrics")).text
    assert reply["samples"] == 6  # the room left in the queue, not samples_max
    assert reply["usage"]["crops"] == 6
    assert reply["data"][0]["embedding"] == fixed["data"][0]["embedding"]  # prefix-stable: a fixed S=6 request
    assert 'metta_samples_shrunk_total{endpoint="/v1/embeddings"} 1.0' in metrics


async def test_the_python_clients_classify_matches_the_endpoint_and_skips_a_bad_image(dummy_with_head) -> None:
    from service.client import AsyncClient

    async with serve(dummy_with_head, **SETTINGS) as http:
        direct = (await http.post("/v1/classify", files=[("images", png_bytes(1))], data={"seed": "5",
                                                                                         "top_k": "3"})).json()
        client = AsyncClient("http://test", transport=http._transport)  # the same in-process app
        got = await client.classify([png_bytes(1), b"not an image", png_bytes(1)], top_k=3, seed=5,
                                    on_error="skip")
    assert got.indices.tolist() == [0, 2] and list(got.errors) == [1] and got.errors[1].status == 400
    assert [label.class_index for label in got.labels[0]] == [x["class_index"] for x in direct["data"][0]["labels"]]
    assert got.labels[0][0].probability == pytest.approx(direct["data"][0]["labels"][0]["probability"], rel=1e-5)
    assert (got.policy, got.samples, got.temperature) == (direct["policy"], direct["samples"], direct["temperature"])
