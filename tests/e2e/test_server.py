"""A real `metta-serve` process with the default model, real photos, real sockets and signals."""

from __future__ import annotations

import base64
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.testing import ServerProcess, start_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start_server(tmp_path_factory.mktemp("server"), "--model", "efficientnet_lite0")
    yield proc
    assert proc.terminate() == 0, proc.log()


@pytest.fixture(scope="module")
def photos(sample_labels: list) -> list[bytes]:
    return [path.read_bytes() for path, _ in sample_labels[:3]]


def embed_json(server: ServerProcess, photos: list[bytes], **options: object) -> dict:
    body = {"images": [base64.b64encode(p).decode() for p in photos], **options}
    reply = httpx.post(f"{server.url}/v1/embeddings", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()


def cosine(a: list[float], b: list[float]) -> float:
    x, y = np.asarray(a), np.asarray(b)
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def counter(metrics: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", metrics, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def test_real_photos_both_encodings_seeds_and_metta_vs_center(server: ServerProcess, photos: list[bytes]) -> None:
    files = [("images", (f"{i}.jpg", p, "image/jpeg")) for i, p in enumerate(photos)]
    multipart = httpx.post(f"{server.url}/v1/embeddings", files=files,
                           data={"samples": "8", "seed": "1", "policy": "crop_flip"}, timeout=120)
    assert multipart.status_code == 200, multipart.text
    a = multipart.json()
    assert a["model"] == "efficientnet_lite0" and a["dim"] == 1280
    assert [len(d["embedding"]) for d in a["data"]] == [1280] * 3

    same = embed_json(server, photos, samples=8, seed=1, policy="crop_flip")
    assert same["data"] == a["data"]  # same seed, other encoding: the same reply
    other = embed_json(server, photos, samples=8, seed=2, policy="crop_flip")
    assert all(cosine(x["embedding"], y["embedding"]) < 0.9999 for x, y in zip(a["data"], other["data"], strict=True))

    # The default (docs/quality.md): multi-resolution, S=3 — a fixed set of views, so the seed does not matter.
    default = embed_json(server, photos, seed=1)
    assert (default["policy"], default["samples"]) == ("multiscale", 3)
    assert embed_json(server, photos, seed=2)["data"] == default["data"]

    metta = embed_json(server, photos, samples=16, seed=3, policy="crop_flip")
    center = embed_json(server, photos, policy="center")
    for m, c in zip(metta["data"], center["data"], strict=True):
        assert 0.8 <= cosine(m["embedding"], c["embedding"]) <= 0.999


def test_a_disconnected_clients_remaining_crops_are_not_computed(server: ServerProcess, photos: list[bytes]) -> None:
    before = httpx.get(f"{server.url}/metrics").text
    crops_before = counter(before, "metta_crops_total")
    gone_before = counter(before, 'metta_rejected_total{reason="client_gone"}')
    body = ('{"images": [' + ",".join(f'"{base64.b64encode(photos[0]).decode()}"' for _ in range(8))
            + '], "samples": 128, "seed": 1}').encode()  # 1,024 crops: seconds of work on this CPU
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.5)  # let it be admitted and start
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = httpx.get(f"{server.url}/metrics").text
        if counter(after, 'metta_rejected_total{reason="client_gone"}') > gone_before:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the disconnect was never noticed")
    time.sleep(1.0)
    computed = counter(httpx.get(f"{server.url}/metrics").text, "metta_crops_total") - crops_before
    assert computed < 1024 / 2, f"{computed} of 1024 crops ran for a client that had gone"
    assert counter(after, "metta_queue_crops") == 0 or counter(httpx.get(f"{server.url}/metrics").text,
                                                               "metta_queue_crops") == 0


def test_sigterm_drains_in_flight_requests_then_exits_zero(tmp_path: Path, photos: list[bytes]) -> None:
    proc = start_server(tmp_path, "--model", "efficientnet_lite0", "--shutdown-grace-s", "60")
    replies: list[httpx.Response | BaseException] = []

    def post(seed: int) -> None:
        try:
            body = {"images": [base64.b64encode(photos[seed % 3]).decode()], "samples": 64, "seed": seed}
            replies.append(httpx.post(f"{proc.url}/v1/embeddings", json=body, timeout=120))
        except BaseException as exc:  # recorded, asserted below
            replies.append(exc)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while counter(httpx.get(f"{proc.url}/metrics").text, "metta_inflight_requests") < 4:
        assert time.monotonic() < deadline, "requests never got in flight"
        time.sleep(0.05)
    exit_code = proc.terminate(timeout=120)
    for thread in threads:
        thread.join(60)
    assert exit_code == 0, proc.log()
    assert len(replies) == 4
    assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in replies), replies
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{proc.url}/healthz", timeout=2)  # nobody listens any more
