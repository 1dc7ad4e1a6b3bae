"""`metta eval`: metrics on hand-made inputs, per-view plumbing against the library, and small end-to-end
runs on a few sample photos (skipped, with the reason, when the photos are absent)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation import metrics as M
from evaluation import studies
from evaluation.data import QueryEdits, decode_file, load_samples, make_query
from evaluation.views import cached_per_view, embed_per_view
from models import ModelOptions, create_model
from service.cli import main
from service.core.embedding import embed
from service.core.policies import CenterPolicy, CropFlipPolicy, MultiscalePolicy


@pytest.fixture(scope="module")
def dummy():
    return create_model("dummy")


def random_image(seed: int, height: int = 150, width: int = 200) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


# ---- metrics on hand-made inputs --------------------------------------------------------------

def test_nll_and_topk_by_hand_on_a_toy_head() -> None:
    weight = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # 3 classes, 2-d embeddings
    bias = np.array([0.0, 0.0, -1.0])
    embedding = np.array([[2.0, 0.0]])  # logits (2, 0, 1)
    logits = embedding @ weight.T + bias
    expected = -math.log(math.exp(2) / (math.exp(2) + math.exp(0) + math.exp(1)))
    assert M.nll_of_logits(logits, np.array([0]))[0] == pytest.approx(expected)
    assert M.nll_of_logits(logits, np.array([1]))[0] == pytest.approx(expected + 2)
    assert M.nll_of_probs(M.softmax(logits), np.array([2]))[0] == pytest.approx(expected + 1)
    assert M.topk_correct(logits, np.array([0]), 1).tolist() == [True]
    assert M.topk_correct(logits, np.array([2]), 1).tolist() == [False]
    assert M.topk_correct(logits, np.array([2]), 2).tolist() == [True]


def test_mcnemar_exact_counts_only_discordant_pairs() -> None:
    a = np.array([True, True, True, False, False, False, False, False])
    b = np.array([True, False, False, True, True, True, True, True])
    result = M.mcnemar_exact(a, b)  # a only: 2, b only: 5 → p = 2·P(X ≤ 2), X ~ Bin(7, 1/2)
    assert (result["a_only"], result["b_only"]) == (2, 5)
    assert result["p"] == pytest.approx(2 * (1 + 7 + 21) / 128)
    assert M.mcnemar_exact(b, b)["p"] == 1.0
    assert M.mcnemar_exact(np.zeros(5, bool), np.ones(5, bool))["p"] == pytest.approx(2 / 32)


def test_paired_bootstrap_of_a_constant_difference_is_that_difference() -> None:
    a = np.array([0.1, 0.5, 0.9, 0.3])
    result = M.paired_bootstrap(a, a + 0.25, resamples=200)
    assert result["diff"] == pytest.approx(0.25)
    assert result["lo"] == pytest.approx(0.25) and result["hi"] == pytest.approx(0.25)


def test_auroc_on_hand_made_scores() -> None:
    positive = np.array([True, True, False, False])
    assert M.auroc(np.array([0.9, 0.8, 0.1, 0.2]), positive) == 1.0
    assert M.auroc(np.array([0.1, 0.2, 0.9, 0.8]), positive) == 0.0
    assert M.auroc(np.array([0.5, 0.5, 0.5, 0.5]), positive) == 0.5  # ties count one half
    # Pairs (pos, neg): (0.9, 0.5) ✓, (0.9, 0.7) ✓, (0.6, 0.5) ✓, (0.6, 0.7) ✗ → 3/4
    assert M.auroc(np.array([0.9, 0.6, 0.5, 0.7]), positive) == 0.75
    assert math.isnan(M.auroc(np.array([1.0, 2.0]), np.array([True, True])))


def test_recall_at_1_and_average_precision_by_hand() -> None:
    database = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    queries = np.array([[1.0, 0.1], [1.0, 0.9], [0.0, 2.0]])
    relevant = np.array([[True, False, False], [False, True, False], [False, True, True]])
    result = M.retrieval_per_query(queries, database, relevant)
    # Query 0: nearest is item 0 (relevant) → AP 1. Query 1: order 2, 0, 1 → its one hit at rank 3 → AP 1/3.
    # Query 2: order 1, 2, 0 → hits at ranks 1 and 2 → AP 1.
    assert result["hit_at_1"].tolist() == [True, False, True]
    np.testing.assert_allclose(result["ap"], [1.0, 1 / 3, 1.0])
    # Ties count against the query: an irrelevant item as similar as the hit ranks first.
    tied = M.retrieval_per_query(np.array([[1.0, 0.0]]), np.array([[2.0, 0.0], [1.0, 0.0]]),
                                 np.array([[False, True]]))
    assert tied["hit_at_1"].tolist() == [False] and tied["ap"][0] == 0.5


def test_dispersion_scores_are_zero_for_identical_views_and_grow_with_spread() -> None:
    rng = np.random.default_rng(0)
    base = rng.random((3, 1, 8)) + 1
    reference = rng.random((20, 8))
    same = studies.dispersion_scores(np.repeat(base, 4, axis=1), reference)
    spread = studies.dispersion_scores(np.repeat(base, 4, axis=1) + rng.normal(0, 0.3, (3, 4, 8)), reference)
    for name in ("var_over_sq_norm", "one_minus_cos_to_mean", "one_minus_pairwise_cos", "var_over_ref_var"):
        np.testing.assert_allclose(same[name], 0, atol=1e-6)
        assert (spread[name] > 1e-4).all(), name


def test_interpolation_ends_are_the_mean_and_the_central_crop() -> None:
    rng = np.random.default_rng(1)
    view_logits, center_logits = rng.normal(size=(5, 4, 3)), rng.normal(size=(5, 3))
    labels = np.array([0, 1, 2, 0, 1])
    out = studies.interpolate(view_logits, center_logits, labels, [0.0, 1.0])
    assert out["center"]["nll"][0] == pytest.approx(M.nll_of_logits(view_logits.mean(axis=1), labels).mean())
    assert out["center"]["nll"][1] == pytest.approx(M.nll_of_logits(center_logits, labels).mean())
    single = M.nll_of_logits(view_logits.reshape(20, 3), np.repeat(labels, 4)).mean()
    assert out["single_views"]["nll"][1] == pytest.approx(single)


# ---- per-view embeddings against the library --------------------------------------------------

@pytest.mark.parametrize("policy, samples", [(CropFlipPolicy(), 5), (MultiscalePolicy(), 8), (CenterPolicy(), 1)])
def test_per_view_means_are_what_embed_returns(dummy, policy, samples: int) -> None:
    images = [random_image(0), random_image(1, 120, 90)]
    views = embed_per_view(dummy, len(images), lambda i: images[i], policy, samples, seed=3, batch_crops=3)
    expected = embed(dummy, images, samples=samples, policy=policy, seed=3).embeddings
    np.testing.assert_allclose(views.mean(axis=1), expected, rtol=1e-5, atol=1e-5)
    if isinstance(policy, MultiscalePolicy):  # beyond six views come new sizes: no view repeats an earlier one
        for later in (6, 7):
            assert all(not np.array_equal(views[:, later], views[:, earlier]) for earlier in range(later))


def test_cache_hit_decodes_nothing(dummy, tmp_path: Path) -> None:
    images = [random_image(2)]
    first = cached_per_view(dummy, ["a"], lambda i: images[i], CropFlipPolicy(), 3, 0, tmp_path)

    def no_decoding(i: int) -> torch.Tensor:
        raise AssertionError("a cache hit must not load images")

    np.testing.assert_array_equal(cached_per_view(dummy, ["a"], no_decoding, CropFlipPolicy(), 3, 0, tmp_path), first)
    assert len(list(tmp_path.glob("*.npy"))) == 1
    # Fewer views of the same plan are the cached run's prefix; another seed is not.
    np.testing.assert_array_equal(cached_per_view(dummy, ["a"], no_decoding, CropFlipPolicy(), 2, 0, tmp_path),
                                  first[:, :2])
    with pytest.raises(AssertionError, match="cache hit"):
        cached_per_view(dummy, ["a"], no_decoding, CropFlipPolicy(), 2, 1, tmp_path)


# ---- on the sample photos ---------------------------------------------------------------------

def test_queries_are_seeded_and_edited(sample_dir: Path) -> None:
    sample = load_samples(sample_dir, limit=1)[0]
    query = make_query(sample.path, 0, 0, QueryEdits())
    assert torch.equal(query, make_query(sample.path, 0, 0, QueryEdits()))
    assert not torch.equal(query, make_query(sample.path, 0, 1, QueryEdits()))
    photo = decode_file(sample.path)
    assert query.shape[1] * query.shape[2] < 0.25 * photo.shape[1] * photo.shape[2]  # cropped and halved
    assert torch.equal(query[0], query[1]) and torch.equal(query[1], query[2])  # grayscale


def test_center_top1_matches_a_classic_pil_pipeline(sample_dir: Path) -> None:
    model = create_model("efficientnet_lite0", ModelOptions(mode="eager"))
    assert model.head is not None
    samples = load_samples(sample_dir, limit=6)
    labels = np.array([s.label for s in samples])
    weight, bias = model.head.weight.detach().numpy(), model.head.bias.detach().numpy()
    views = embed_per_view(model, len(samples), lambda i: decode_file(samples[i].path), CenterPolicy(), 1, 0)
    ours = views[:, 0] @ weight.T + bias
    # The textbook pipeline: PIL Resize(shorter side 256, bicubic) → CenterCrop(224).
    crops = []
    for sample in samples:
        with Image.open(sample.path) as opened:
            image = opened.convert("RGB")
            scale = 256 / min(image.size)
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
            left, top = (image.width - 224) // 2, (image.height - 224) // 2
            crops.append(torch.from_numpy(np.asarray(image.crop((left, top, left + 224, top + 224))).copy())
                         .permute(2, 0, 1))
    classic = model.embed_views(torch.stack(crops)).numpy() @ weight.T + bias
    assert ours.argmax(axis=1).tolist() == classic.argmax(axis=1).tolist()
    assert (ours.argmax(axis=1) == labels).tolist() == (classic.argmax(axis=1) == labels).tolist()


def test_metta_eval_end_to_end_on_a_few_photos(sample_dir: Path, tmp_path: Path) -> None:
    main(["eval", "--model", "dummy", "--data", str(sample_dir), "--limit", "4", "--out", str(tmp_path / "out"),
          "--cache-dir", str(tmp_path / "cache"), "--retrieval-samples", "1,2", "--uncertainty-samples", "2,3",
          "--classify-samples", "2,3", "--convergence-images", "3", "--convergence-reference", "4",
          "--bootstrap", "50", "--no-plots"])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["images"] == 4 and "classification" not in results  # the dummy has no head
    rows = results["retrieval"]["rows"]
    assert rows[0]["policy"] == "center" and 0 <= rows[0]["recall_at_1"] <= 1
    assert {r["S"] for r in rows if r["policy"].startswith("crop_flip")} == {1, 2}
    assert [r["S"] for r in results["convergence"]["rows"]] == [1, 2]
    assert "Near-duplicate retrieval" in (tmp_path / "out" / "tables.md").read_text()


def test_plots_are_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="plots need matplotlib (a dev dependency)")
    from evaluation.report import plot_all

    results = {"convergence": {"rows": [{"S": 1, "median": 0.9, "p5": 0.8}, {"S": 2, "median": 0.95, "p5": 0.9}],
                               "center": {"median": 0.9, "p5": 0.8}, "reference_views": 8}}
    written = plot_all(results, tmp_path)
    assert [p.name for p in written] == ["convergence.png"]
    assert written[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
