"""The intervals every quality claim carries: exact binomial and McNemar intervals, paired bootstraps of
means, ECE and AUROC on small cases worked by hand, and the held-out choice of /v1/classify's default."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from evaluation import heldout
from evaluation import metrics as M
from evaluation.calibrate import ece
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def test_clopper_pearson_matches_the_closed_forms_and_tables() -> None:
    # 0 of n and n of n have closed forms: (1 − α/2)^(1/n) bounds
    assert M.clopper_pearson(0, 10) == pytest.approx((0.0, 1 - 0.025 ** (1 / 10)), abs=1e-9)
    assert M.clopper_pearson(10, 10) == pytest.approx((0.025 ** (1 / 10), 1.0), abs=1e-9)
    # 5 of 10: the tabulated exact interval [0.1871, 0.8129]
    lo, hi = M.clopper_pearson(5, 10)
    assert lo == pytest.approx(0.18709, abs=1e-4) and hi == pytest.approx(0.81291, abs=1e-4)
    # 1 of 20 (tables: 0.0013, 0.2487)
    assert M.clopper_pearson(1, 20) == pytest.approx((0.001265, 0.248733), abs=1e-5)
    with pytest.raises(ValueError, match="successes"):
        M.clopper_pearson(3, 2)


def test_mcnemar_interval_is_exact_and_agrees_with_the_test() -> None:
    n = 100
    center = np.ones(n, bool)
    other = np.ones(n, bool)
    center[:10] = False  # 10 photos only the other gets right, none the other way
    result = M.mcnemar_interval(center, other)
    assert (result["a_only"], result["b_only"]) == (0, 10) and result["diff"] == pytest.approx(0.10)
    # π's interval for 10 of 10 is [0.025^(1/10), 1]: the difference's is 10·(2π − 1)/100
    assert result["lo"] == pytest.approx(10 * (2 * 0.025 ** 0.1 - 1) / 100, abs=1e-9)
    assert result["hi"] == pytest.approx(0.10)
    assert result["p"] == pytest.approx(2 / 2**10)  # significant, and the interval excludes 0
    # 5 each way: the difference is 0 and its interval symmetric around it
    a, b = np.ones(n, bool), np.ones(n, bool)
    a[:5], b[5:10] = False, False
    tie = M.mcnemar_interval(a, b)
    assert tie["diff"] == 0.0 and tie["lo"] == pytest.approx(-tie["hi"]) and tie["lo"] < 0 < tie["hi"]
    assert tie["p"] == 1.0
    # nothing discordant: no evidence either way, an empty interval at 0
    assert M.mcnemar_interval(a, a) == {"a_only": 0, "b_only": 0, "p": 1.0, "diff": 0.0, "lo": 0.0, "hi": 0.0}


@pytest.mark.parametrize(("a_only", "b_only"), [(2, 9), (9, 2), (3, 8), (4, 4), (0, 6)])
def test_mcnemar_interval_excludes_zero_exactly_when_the_test_is_significant(a_only: int, b_only: int) -> None:
    a = np.r_[np.ones(a_only, bool), np.zeros(b_only, bool), np.ones(50, bool)]
    b = np.r_[np.zeros(a_only, bool), np.ones(b_only, bool), np.ones(50, bool)]
    result = M.mcnemar_interval(a, b)
    assert (result["lo"] > 0 or result["hi"] < 0) == (result["p"] < 0.05)


def test_bootstrap_of_a_mean_difference_covers_it_at_the_normal_width() -> None:
    rng = np.random.default_rng(3)
    a = rng.normal(size=2000)
    b = a + 0.1 + rng.normal(scale=0.5, size=2000)  # paired: the difference has sd 0.5
    result = M.paired_bootstrap(a, b, resamples=2000)
    half_width = 1.96 * 0.5 / math.sqrt(2000)
    assert result["diff"] == pytest.approx(float(np.mean(b - a)))
    assert result["lo"] == pytest.approx(result["diff"] - half_width, abs=0.004)
    assert result["hi"] == pytest.approx(result["diff"] + half_width, abs=0.004)


def test_ece_statistic_on_resamples_by_hand() -> None:
    confidence = np.array([0.95, 0.95, 0.55, 0.55])
    correct = np.array([True, False, True, True])
    everything = np.arange(4)[None, :]
    # bin 0.95: accuracy 1/2 → gap 0.45, share 1/2; bin 0.55: accuracy 1 → gap 0.45, share 1/2
    assert M.ece_statistic((confidence, correct), everything)[0] == pytest.approx(0.45)
    # resamples: only the first photo twice (gap 0.05); the two 0.55s and the wrong 0.95 (1/3·0.95 + 2/3·0.45)
    index = np.array([[0, 0], [2, 3]]), np.array([[1, 2, 3]])
    assert M.ece_statistic((confidence, correct), index[0]).tolist() == pytest.approx([0.05, 0.45])
    assert M.ece_statistic((confidence, correct), index[1])[0] == pytest.approx(0.95 / 3 + 0.45 * 2 / 3)
    assert ece(confidence, correct) == pytest.approx(0.45)  # the calibration study's ECE is the same function


def test_auroc_statistic_is_auroc_on_each_resample() -> None:
    score = np.array([0.9, 0.6, 0.5, 0.7])
    positive = np.array([True, True, False, False])
    index = np.array([[0, 1, 2, 3], [0, 0, 2, 2], [1, 1, 3, 2], [0, 1, 0, 1]])
    values = M.auroc_statistic((score, positive), index)
    assert values[:3].tolist() == [0.75, 1.0, 0.5]  # (0.6 vs 0.7 ✗, vs 0.5 ✓): 2 of 4 pairs
    assert math.isnan(values[3])  # no negative in the resample
    for rows, value in zip(index[:3], values[:3], strict=True):
        assert value == M.auroc(score[rows], positive[rows])


def test_bootstrap_difference_of_identical_methods_is_exactly_zero() -> None:
    rng = np.random.default_rng(0)
    confidence, correct = rng.uniform(0.3, 1.0, 300), rng.uniform(size=300) < 0.8
    for statistic, arrays in ((M.ece_statistic, (confidence, correct)), (M.auroc_statistic, (-confidence, ~correct))):
        result = M.bootstrap_difference(statistic, arrays, arrays, resamples=200)
        assert result == {"diff": 0.0, "lo": 0.0, "hi": 0.0}


def test_bootstrap_difference_sees_a_real_calibration_gap() -> None:
    rng = np.random.default_rng(1)
    truth = rng.uniform(0.5, 1.0, 1000)
    correct = rng.uniform(size=1000) < truth
    calibrated = M.bootstrap_difference(M.ece_statistic, (np.minimum(truth + 0.15, 1.0), correct), (truth, correct),
                                        resamples=500)
    assert calibrated["hi"] < 0  # over-confident by 0.15 vs calibrated: a significant ECE gain
    assert calibrated["diff"] == pytest.approx(-0.1, abs=0.05)


# ---- the held-out choice ---------------------------------------------------------------------------

def row(label: str, views: int, top1: tuple[float, float], nll_hi: float, ece: tuple[float, float],
        nll: float = 0.5, auroc_hi: float = 0.02) -> dict:
    """A comparison row: the top-1 interval, the NLL interval's upper end, ECE's (difference, upper end)."""
    return {"label": label, "views": views, "figures": {"nll": nll},
            "vs_center": {"top1": {"diff": 0.0, "lo": top1[0], "hi": top1[1]},
                          "nll": {"diff": nll_hi - 0.01, "lo": nll_hi - 0.02, "hi": nll_hi},
                          "ece": {"diff": ece[0], "lo": ece[0] - 0.01, "hi": ece[1]},
                          "auroc": {"diff": auroc_hi - 0.02, "lo": auroc_hi - 0.04, "hi": auroc_hi}}}


def test_choose_prefers_significant_nll_and_ece_gains_at_the_fewest_views() -> None:
    center = {"label": "center", "views": 1, "figures": {"nll": 0.6}}
    rows = [center,
            row("worse top-1", 2, (-0.05, -0.01), -0.02, (-0.02, -0.01)),
            row("worse auroc", 2, (-0.02, 0.02), -0.02, (-0.02, -0.01), auroc_hi=-0.001),
            row("nll only", 3, (-0.02, 0.02), -0.02, (0.001, 0.01)),
            row("both, 10 views", 10, (-0.02, 0.02), -0.02, (-0.02, -0.01), nll=0.45),
            row("both, 5 views", 5, (-0.02, 0.02), -0.01, (-0.02, -0.005), nll=0.48),
            row("both, 5 views, lower nll", 5, (-0.01, 0.03), -0.01, (-0.02, -0.005), nll=0.47)]
    assert heldout.choose(rows) == "both, 5 views, lower nll"
    # without a significant ECE gain: a significant NLL gain and an ECE no worse than the centre's, fewest views
    significant = [center, rows[3], row("nll, ece no worse, 8", 8, (-0.02, 0.02), -0.02, (-0.001, 0.01)),
                   row("nll, ece no worse, 4", 4, (-0.02, 0.02), -0.001, (-0.001, 0.01))]
    assert heldout.choose(significant) == "nll, ece no worse, 4"
    # nothing significant: the strongest evidence of an NLL gain, whatever its views
    weak = [center, rows[3], row("weak, 2", 2, (-0.02, 0.02), 0.02, (-0.001, 0.01)),
            row("weak, 10", 10, (-0.02, 0.02), 0.005, (-0.001, 0.01))]
    assert heldout.choose(weak) == "weak, 10"
    assert heldout.choose([center, rows[1], rows[2], rows[3]]) is None


def test_run_reports_each_half_under_the_other_halfs_temperature_and_choice() -> None:
    rng = np.random.default_rng(0)
    n, classes, dim = 400, 5, 5
    labels = rng.integers(0, classes, n)
    clean = np.eye(classes)[labels] * 3.0
    # "good" views: noisy around the truth, so their mean is better calibrated than one noisy view
    views = clean[:, None, :] + rng.normal(scale=2.0, size=(n, 4, dim))
    banks = {"one": views[:, :1], "many": views}
    candidates = (heldout.Candidate("center", "one", (0,), None), heldout.Candidate("mean of 4", "many", (0, 1, 2, 3),
                                                                                    None))
    study = heldout.run(lambda name: banks[name], labels, weight=np.eye(classes), bias=np.zeros(classes),
                        bootstrap=200, candidates=candidates)
    assert [s["chosen"] for s in study["splits"]] == ["mean of 4", "mean of 4"]
    assert study["default"] == "mean of 4"
    reported = study["splits"][0]["reported"][1]
    assert reported["vs_center"]["nll"]["hi"] < 0 and reported["vs_center"]["top1"]["diff"] > 0
    # half 1's figures under half 0's temperature: recompute the NLL by hand
    t = study["temperatures"]["mean of 4"][0]  # rounded to 4 digits in the study
    rows = np.arange(n) % 2 == 1
    logits = views[rows].mean(axis=1)
    by_hand = float(M.nll_of_logits(logits / t, labels[rows]).mean())
    assert reported["figures"]["nll"] == pytest.approx(by_hand, rel=1e-3)
    assert len(study["cross_fitted"]) == 2 and study["cross_fitted"][1]["vs_center"]["top1"]["hi"] > 0


def test_final_choice_takes_the_halves_agreement_or_the_choice_that_held_out() -> None:
    def split(chosen: str | None, nll_hi: float, views: int) -> dict:
        return {"chosen": chosen, "reported": [row(str(chosen), views, (-0.01, 0.02), nll_hi, (0.0, 0.01))]}

    assert heldout.final_choice([split("a", 0.01, 4), split("a", 0.01, 4)]) == "a"
    assert heldout.final_choice([split("few", 0.002, 16), split("many", -0.009, 32)]) == "many"
    assert heldout.final_choice([split("few", 0.002, 16), split("many", 0.001, 32)]) == "few"
    assert heldout.final_choice([split(None, 0.0, 1), split("b", 0.01, 8)]) == "b"
    assert heldout.final_choice([split(None, 0.0, 1), split(None, 0.0, 1)]) is None


def test_the_shipped_classify_default_is_the_studys_choice() -> None:
    study = json.loads((REPO / heldout.RESULTS_FILE).read_text())
    chosen = next(c for c in study["candidates"] if c["label"] == study["default"])
    defaults = Settings()
    assert chosen["request"] == {"policy": defaults.classify_policy, "samples": defaults.classify_samples}
    # ... and what the README says of it is what the study measured on the half that did not choose it
    held_out = next(split for split in study["splits"] if split["chosen"] == study["default"])
    row = next(r for r in held_out["reported"] if r["label"] == study["default"])["vs_center"]
    def number(value: float, digits: int) -> str:
        return f"{value:+.{digits}f}".replace("-", "−")

    top1, nll = row["top1"], row["nll"]
    readme = " ".join((REPO / "README.md").read_text().split())
    assert (f"top-1 {number(100 * top1['diff'], 1)} points, 95 % interval [{number(100 * top1['lo'], 1)}, "
            f"{number(100 * top1['hi'], 1)}]") in readme
    assert f"NLL {number(nll['diff'], 3)} [{number(nll['lo'], 3)}, {number(nll['hi'], 3)}]" in readme
