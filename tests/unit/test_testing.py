"""service.testing, the helpers tests and benchmarks share: photos with a synthetic fallback, memory, ports."""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from PIL import Image

from service import testing


def test_without_sample_photos_synthetic_jpegs_of_their_sizes_stand_in_and_say_so(tmp_path: Path) -> None:
    pictures = testing.photos(10, directory=tmp_path / "absent")
    assert pictures.source == "synthetic" and len(pictures) == 10
    opened = [Image.open(io.BytesIO(data)) for data in pictures.images]
    assert {image.format for image in opened} == {"JPEG"}
    assert [image.size for image in opened[:8]] == list(testing.SYNTHETIC_SIZES)
    assert pictures.images == testing.photos(10, directory=tmp_path).images, "deterministic"
    assert len(set(pictures.images)) == 10
    none = testing.photos(10, allow_synthetic=False, directory=tmp_path)
    assert none.source == "absent" and not none


def test_sample_photos_and_labels_come_from_the_folder_in_name_order(tmp_path: Path) -> None:
    for name in ("b.JPEG", "a.JPEG"):
        Image.new("RGB", (8, 6)).save(tmp_path / name, "JPEG")
    (tmp_path / "labels.tsv").write_text("file\tclass_index\twnid\tname\na.JPEG\t3\tn1\tx\nb.JPEG\t7\tn2\ty\n")
    pictures = testing.photos(1, directory=tmp_path)
    assert pictures.source == "sample" and pictures.images == [(tmp_path / "a.JPEG").read_bytes()]
    assert testing.sample_labels(tmp_path) == [(tmp_path / "a.JPEG", 3), (tmp_path / "b.JPEG", 7)]
    assert testing.sample_labels(tmp_path / "absent") == []


def test_memory_of_a_process_and_of_its_tree() -> None:
    assert testing.rss_bytes(os.getpid()) > 10 * 2**20
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in testing.descendants(os.getpid())
        tree = testing.tree_memory(os.getpid())
        assert 0 < tree.own_rss < tree.rss, "the child's pages count in the tree"
        assert tree.pss > 0
    finally:
        child.kill()
        child.wait()
    assert testing.rss_bytes(child.pid) == 0, "gone"


def test_free_port_can_be_bound() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", testing.free_port()))


def test_metta_samples_dir_points_tests_bench_and_eval_at_the_photos(tmp_path: Path) -> None:
    code = ("import sys; from service import testing; from evaluation import cli; from bench import icc_top1\n"
            "print(testing.SAMPLE_DIR); print(cli.DEFAULT_DATA)\n"
            "print(icc_top1.parse_args([]).data)")
    env = {**os.environ, "METTA_SAMPLES_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], cwd=testing.REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(tmp_path)] * 3


def test_only_service_testing_names_the_sample_photos_folder() -> None:
    """Every other module takes the folder from `service.testing` (so $METTA_SAMPLES_DIR reaches it)."""
    naming = [str(path.relative_to(testing.REPO)) for folder in ("service", "models", "evaluation", "tests", "bench")
              for path in (testing.REPO / folder).rglob("*.py")
              if re.search(r"[\"'/]imagenet-sample[\"'/]", path.read_text()) and path != Path(testing.__file__)]
    assert naming == []
