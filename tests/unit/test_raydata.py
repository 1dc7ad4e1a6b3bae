"""The Ray runner's pieces without a cluster: the actor's batch function (given bytes, or reading files itself),
the driver's commit."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from models import ModelOptions, create_model
from service.bulk.dataset import Dataset, ErrorLog, RunSettings
from service.bulk.progress import Progress
from service.core.decode import decode_image
from service.core.embedding import embed
from tests.e2e.object_storage import require_module

require_module("ray", "pip install 'metta-serve[ray]'; requirements-dev.lock pins it")
from service.bulk.raydata import EmbedSpec, ImageEmbedder, commit  # noqa: E402

DUMMY = ModelOptions(mode="eager")


def jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40 + seed, 50, 3), dtype=np.uint8)).save(buffer,
                                                                                                          "JPEG")
    return buffer.getvalue()


def test_the_actor_adds_the_librarys_embeddings_and_says_which_images_it_refused() -> None:
    spec = EmbedSpec("dummy", DUMMY, "crop_flip", 3, seed=5, variance=True)
    embedder = ImageEmbedder(spec, column="image", label_column="name")
    images = [jpeg(0), b"not an image", None, jpeg(1)]
    table = pa.table({"name": ["a", "b", "c", "d"], "image": pa.array(images, pa.binary())})
    out = embedder(table)
    assert out.column_names == ["name", "image", "embedding", "variance", "error_type", "error"]
    assert out.column("embedding").null_count == 2  # the bad image and the row without bytes
    assert out.column("error_type").to_pylist() == [None, "invalid_image", None, None]
    assert "b" in out.column("error").to_pylist()[1]  # named by its label
    model = create_model("dummy", DUMMY)
    library = embed(model, [decode_image(images[i], max_pixels=10**8, max_side=10**5) for i in (0, 3)],  # type: ignore[arg-type]
                    samples=3, policy="crop_flip", seed=5, return_variance=True)
    vectors = out.column("embedding").to_pylist()
    assert library.variances is not None
    np.testing.assert_allclose([vectors[0], vectors[3]], library.embeddings, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([out.column("variance").to_pylist()[i] for i in (0, 3)], library.variances,
                               rtol=1e-4, atol=1e-6)


def test_a_row_delivered_twice_is_committed_once_and_actors_reading_files_skip_what_is_there(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"p{i}.jpg").write_bytes(jpeg(i))
    paths = [str(tmp_path / f"p{i}.jpg") for i in range(3)] + [str(tmp_path / "gone.jpg")]
    names = [path.encode() for path in paths]
    actor = ImageEmbedder(EmbedSpec("dummy", DUMMY, "center", 1), column="path", reads_files=True)
    embedded = actor(pa.table({"path": names, "have_sha256": ["", "", "", ""]}))
    assert embedded.column("error_type").to_pylist() == [None, None, None, "unreadable"]
    assert "gone.jpg could not be read" in embedded.column("error").to_pylist()[3]
    sha = embedded.column("sha256").to_pylist()
    assert sha[:3] == [hashlib.sha256(jpeg(i)).hexdigest() for i in range(3)]
    again = actor(pa.table({"path": names[:2], "have_sha256": [sha[0], "stale"]}))
    assert again.column("embedding").to_pylist()[0] is None and again.column("error_type").to_pylist()[0] is None
    assert again.column("embedding").to_pylist()[1] is not None

    model = create_model("dummy", DUMMY)
    run = RunSettings(model.name, model.fingerprint, "center", 1, 0)
    dataset = Dataset(tmp_path / "out.parquet", run, model.dim, part_rows=2)
    dataset.open(overwrite=False)
    errors, progress, seen = ErrorLog(tmp_path / "errors.jsonl"), Progress(4), set[str]()
    commit(embedded, seen, dataset, errors, progress)
    commit(embedded.slice(1, 2), seen, dataset, errors, progress)  # a retried task's output, delivered again
    dataset.flush()
    errors.close()
    assert (progress.embedded, progress.bad, progress.already) == (3, 1, 0)
    assert dataset.written == 3 and len(seen) == 4
