"""Phone formats through the service: HEIC and AVIF are served like the other formats, hostile ones get a
typed 4xx without harming the good images sent alongside, and /v1/models says how images are decoded."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

from tests.integration.conftest import serve
from tests.unit.test_heif_avif import avif, heic, picture

pytestmark = pytest.mark.anyio


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def huge_header(data: bytes) -> bytes:
    """The `ispe` box rewritten to declare 60000 × 60000 pixels."""
    out = bytearray(data)
    at = out.find(b"ispe")
    out[at + 8 : at + 16] = (60_000).to_bytes(4, "big") * 2
    return bytes(out)


async def test_heic_and_avif_embed_like_the_same_png_and_hostile_ones_are_refused() -> None:
    source = picture(320, 240)
    lossless = io.BytesIO()
    source.save(lossless, "PNG")
    files = {"png": lossless.getvalue(), "heic": heic(source), "avif": avif(source)}
    async with serve() as client:
        reply = await client.post("/v1/embeddings", json={"images": [b64(files[k]) for k in ("png", "heic", "avif")],
                                                          "seed": 0, "normalize": True})
        assert reply.status_code == 200
        embeddings = np.array([entry["embedding"] for entry in reply.json()["data"]])
        assert (embeddings[1:] @ embeddings[0]).min() > 0.99
        for fmt in ("heic", "avif"):
            for bad, status in [(files[fmt][: len(files[fmt]) // 2], 400), (huge_header(files[fmt]), (400, 413))]:
                refused = await client.post("/v1/embeddings", json={"images": [b64(bad)]})
                assert refused.status_code in (status if isinstance(status, tuple) else (status,))
                assert refused.json()["error"]["type"] in ("invalid_image", "payload_too_large")
        again = await client.post("/v1/embeddings", json={"images": [b64(files["heic"])], "seed": 0,
                                                          "normalize": True})
        assert np.allclose(again.json()["data"][0]["embedding"], embeddings[1], atol=1e-6)
        card = (await client.get("/v1/models")).json()["data"][0]
        assert card["decoding"] == {"jpeg_decoder": "pillow", "color": "icc-srgb", "scaling": "reduced"}
