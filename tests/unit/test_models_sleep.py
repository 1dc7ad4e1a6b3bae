"""The `sleep:<µs>` test backbone: a known forward cost that leaves the CPU to everything else."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from models import ModelError, ModelOptions, create_model
from models.efficientnet import PREPROCESS


def test_it_starts_with_no_weights_and_runs_eagerly() -> None:
    model = create_model("sleep:1000")
    assert model.mode == "eager" and model.dim == 1280 and model.spec.preprocess == PREPROCESS
    with pytest.raises(ModelError, match="eagerly"):
        create_model("sleep:1000", ModelOptions(mode="openvino"))
    with pytest.raises(ModelError, match="whole number"):
        create_model("sleep:fast")


def test_a_batch_of_n_crops_takes_n_times_the_wait_while_another_thread_runs() -> None:
    model = create_model("sleep:20000")  # 20 ms a crop
    views = torch.zeros(5, 3, 224, 224, dtype=torch.uint8)
    counted = 0
    stop = threading.Event()

    def busy() -> None:
        nonlocal counted
        while not stop.is_set():
            counted += 1

    other = threading.Thread(target=busy)
    other.start()
    try:
        started = time.perf_counter()
        model.embed_views(views)
        elapsed = time.perf_counter() - started
        during = counted
    finally:
        stop.set()
        other.join()
    assert elapsed >= 5 * 0.020
    assert during > 1000  # the other thread was not held by the GIL meanwhile


def test_embeddings_are_deterministic_and_follow_the_pixels() -> None:
    model = create_model("sleep:0")
    generator = torch.Generator().manual_seed(0)
    views = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8, generator=generator)
    first, again = model.embed_views(views), create_model("sleep:0").embed_views(views)
    assert torch.equal(first, again)
    assert not torch.allclose(first[0], first[1])
    small = model.embed_views(torch.nn.functional.interpolate(views.float(), size=112).to(torch.uint8))
    assert small.shape == (2, 1280)  # any view size
