"""Calibration in ``stampray evaluate``: the reliability diagram, the expected calibration error (ECE) and
accuracy against the spread over --tta / --mc-dropout passes (issue #16 item 2).

Probabilities are multiples of 1/16 or 1/64, exact in the float32 of a score table, so the expected numbers
are exact."""

import json
import os

import numpy as np
import pytest

from stampray.evaluate import EvaluateSettings, calibration, evaluate, reliability_bins, uncertainty


def wilson_formula(k, n, z=1.959963984540054):
    """The Wilson score interval written out: (p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)."""
    p = k / n
    centre, half = p + z * z / (2 * n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [(centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)]


# Six binary stamps: p(source), true label, and what follows (predicted class, its probability = confidence).
SIX_P = [0.875, 0.875, 0.625, 0.25, 0.0625, 0.3125]
SIX_LABELS = [1, 0, 1, 0, 0, 1]
# pred 1 (0.875) right; 1 (0.875) wrong; 1 (0.625) right; 0 (0.75) right; 0 (0.9375) right; 0 (0.6875) wrong


def six(tmp_path, score_table, **kw):
    p = np.array(SIX_P)
    return score_table(tmp_path / "s", SIX_LABELS, np.stack([1 - p, p], axis=1), ["noise", "source"], **kw)


def test_ece_of_a_hand_built_table(tmp_path, score_table):
    r = evaluate(EvaluateSettings(scores=(six(tmp_path, score_table),), out=str(tmp_path / "rep")))
    cal = r.report["results"]["s"]["calibration"]
    # bins (0.6, 0.7]: confidences 0.625 (right) and 0.6875 (wrong); (0.7, 0.8]: 0.75 (right);
    # (0.8, 0.9]: 0.875 twice (one right); (0.9, 1]: 0.9375 (right)
    expected = (2 / 6 * abs(1 / 2 - (0.625 + 0.6875) / 2) + 1 / 6 * abs(1 - 0.75) + 2 / 6 * abs(1 / 2 - 0.875)
                + 1 / 6 * abs(1 - 0.9375))
    assert cal["ece"] == pytest.approx(expected, abs=1e-12)
    assert cal["n"] == 6 and len(cal["bins"]) == 10
    assert [b["n"] for b in cal["bins"]] == [0, 0, 0, 0, 0, 0, 2, 1, 2, 1]
    assert cal["bins"][6] == {"lo": 0.6, "hi": 0.7, "n": 2, "confidence": (0.625 + 0.6875) / 2, "accuracy": 0.5}
    assert cal["bins"][8] == {"lo": 0.8, "hi": 0.9, "n": 2, "confidence": 0.875, "accuracy": 0.5}
    assert cal["bins"][0] == {"lo": 0.0, "hi": 0.1, "n": 0, "confidence": None, "accuracy": None}
    # binary: the diagram bins p(source) against how often the stamp is a source
    pos = cal["positive"]
    assert pos["class"] == "source"
    assert [b["n"] for b in pos["bins"]] == [1, 0, 1, 1, 0, 0, 1, 0, 2, 0]
    assert [(b["mean_p"], b["frequency"]) for b in pos["bins"] if b["n"]] == [
        (0.0625, 0.0), (0.25, 0.0), (0.3125, 1.0), (0.625, 1.0), (0.875, 0.5)]
    on_disk = json.loads(open(tmp_path / "rep" / "report.json").read())["results"]["s"]
    assert on_disk["calibration"]["ece"] == pytest.approx(expected, abs=1e-12)
    assert "uncertainty" not in on_disk  # no p_<class>_std columns: no such entry
    assert os.path.getsize(tmp_path / "rep" / "calibration_s.png") > 0
    assert not os.path.exists(tmp_path / "rep" / "uncertainty_s.png")
    page = open(r.html).read()
    assert "expected calibration error" in page and "no p_&lt;class&gt;_std columns" in page
    assert page.count("<img") == len(r.plots)  # every plot, the reliability diagram among them, is on the page


def test_a_perfectly_calibrated_table_has_ece_zero(tmp_path, score_table):
    # three classes; in each confidence bin the share right equals the confidence: 3 of 4 at 0.75, 1 of 2 at
    # 0.5, 7 of 8 at 0.875
    probs = [[0.75, 0.125, 0.125]] * 4 + [[0.25, 0.25, 0.5]] * 2 + [[0.0625, 0.875, 0.0625]] * 8
    labels = [0, 0, 0, 1] + [2, 0] + [1] * 7 + [2]
    s = score_table(tmp_path / "s", labels, probs, ["a", "b", "c"])
    cal = evaluate(EvaluateSettings(scores=(s,), out=str(tmp_path / "rep"))).report["results"]["s"]["calibration"]
    assert cal["ece"] == pytest.approx(0, abs=1e-12)
    assert [(b["n"], b["confidence"], b["accuracy"]) for b in cal["bins"] if b["n"]] == [
        (2, 0.5, 0.5), (4, 0.75, 0.75), (8, 0.875, 0.875)]
    assert "positive" not in cal  # beyond two classes the diagram is the top label's


def test_an_overconfident_model_and_the_bin_edges():
    # always 100% sure, right half the time: ECE 1/2
    cal = calibration(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]), np.array([0, 1, 1, 0]), ["n", "p"])
    assert cal["ece"] == 0.5 and cal["bins"][9]["n"] == 4
    # bins are (lo, hi], the first holding 0 too (as scikit-learn's calibration_curve)
    rows = reliability_bins(np.array([0.0, 0.1, 0.5, 0.50001, 1.0]), np.array([1, 0, 1, 1, 0]), bins=10)
    assert [r["n"] for r in rows] == [2, 0, 0, 0, 1, 1, 0, 0, 0, 1]
    assert (rows[0]["mean"], rows[0]["share"]) == (0.05, 0.5)


def uncertainty_table(tmp_path, score_table):
    """Ten stamps of three classes. Stamp i predicts class i % 3 with p 0.5 (0.25 for the others); the std
    of its predicted class is (i + 1) / 64 and of the other classes 0.25 (a decoy: taking the wrong column
    puts every stamp in one bin). Right: stamps 0-4 and 6; wrong: 5, 7, 8, 9."""
    names = ["a", "b", "c"]
    right = [1, 1, 1, 1, 1, 0, 1, 0, 0, 0]
    probs, std, labels = np.full((10, 3), 0.25), np.full((10, 3), 0.25), []
    for i in range(10):
        pred = i % 3
        probs[i, pred], std[i, pred] = 0.5, (i + 1) / 64
        labels.append(pred if right[i] else (pred + 1) % 3)
    extra = {f"p_{c}_std": std[:, j].astype(np.float32) for j, c in enumerate(names)}
    return score_table(tmp_path / "s", labels, probs, names, extra=extra)


def test_accuracy_against_uncertainty(tmp_path, score_table):
    r = evaluate(EvaluateSettings(scores=(uncertainty_table(tmp_path, score_table),), out=str(tmp_path / "rep")))
    unc = r.report["results"]["s"]["uncertainty"]
    # five equal-count bins of the ten stds (1..10)/64: two each, holding 2, 2, 1, 1 and 0 right predictions
    assert [(b["n"], b["correct"], b["accuracy"]) for b in unc["bins"]] == [
        (2, 2, 1.0), (2, 2, 1.0), (2, 1, 0.5), (2, 1, 0.5), (2, 0, 0.0)]
    assert [b["ci"] for b in unc["bins"]] == [pytest.approx(wilson_formula(k, 2)) for k in (2, 2, 1, 1, 0)]
    assert [b["median"] for b in unc["bins"]] == [1.5 / 64, 3.5 / 64, 5.5 / 64, 7.5 / 64, 9.5 / 64]
    assert unc["bins"][0]["lo"] == 1 / 64 and unc["bins"][-1]["hi"] == 10 / 64
    # wrong stds 6, 8, 9, 10 against right 1-5, 7: 23 of the 24 pairs rank the wrong one higher (6 < 7 fails)
    assert unc["error_auc"] == pytest.approx(23 / 24)
    assert unc["mean_std_correct"] == pytest.approx(22 / 6 / 64) and unc["mean_std_wrong"] == pytest.approx(33 / 4 / 64)
    assert (unc["n"], unc["missing"]) == (10, 0)
    assert os.path.getsize(tmp_path / "rep" / "uncertainty_s.png") > 0
    assert os.path.getsize(tmp_path / "rep" / "calibration_s.png") > 0
    page = open(r.html).read()
    assert "Accuracy against uncertainty" in page and "no p_&lt;class&gt;_std columns" not in page
    assert page.count("<img") == len(r.plots)


def test_uncertainty_leaves_out_and_counts_stds_that_are_not_finite():
    unc = uncertainty(np.array([0.1, np.nan, 0.2, 0.3]), np.array([True, True, False, True]), bins=1)
    assert (unc["n"], unc["missing"]) == (3, 1)
    assert [(b["n"], b["correct"]) for b in unc["bins"]] == [(3, 2)]
    assert unc["error_auc"] == 0.5  # the wrong one (0.2) sits between the right ones
    assert uncertainty(np.array([0.1, 0.2]), np.array([True, True]))["error_auc"] is None  # nothing wrong to find
