import json
import logging
import os

import numpy as np
import pytest

from stampray.evaluate import EvaluateSettings, completeness_by, confusion, evaluate, per_class, roc, wilson


def test_binary_metrics_against_hand_computed_values(tmp_path, score_table, eight_stamps):
    s = score_table(tmp_path / "s", eight_stamps.labels, eight_stamps.probs, eight_stamps.class_names,
                    extra={"snr": [0, 0, 0, 0, 5, 10, 3, 50]})
    r = evaluate(EvaluateSettings(scores=(s,), out=str(tmp_path / "rep"), by=("snr",), tpr=0.9, fpr=0.1))
    res = r.report["results"]["s"]
    # predictions: [0,0,1,0,1,1,0,1] -> TN=3 FP=1 FN=1 TP=3
    assert res["confusion"]["counts"] == [[3, 1], [1, 3]]
    assert res["confusion"]["normalized"] == [[0.75, 0.25], [0.25, 0.75]]
    assert res["accuracy"] == 0.75
    src = res["per_class"][1]
    assert (src["precision"], src["recall"], src["f1"], src["support"]) == (0.75, 0.75, 0.75, 4)
    # AUC: of the 16 (positive, negative) pairs the positive scores higher in 15 (0.4 < 0.6 is the one lost)
    assert res["auc"] == pytest.approx(15 / 16)
    rc = res["roc"]["source"]
    assert rc["fpr_at_tpr"] == pytest.approx(0.25)  # TPR >= 0.9 needs the 0.4 source, and lets the 0.6 noise in
    assert rc["fnr_at_fpr"] == pytest.approx(0.25)  # FPR <= 0.1 keeps the threshold above 0.6: the 0.4 source lost
    # confident subset: p < 0.01 or p > 0.99 -> stamps 0 and 4, both right
    assert res["confident"]["n"] == 2 and res["confident"]["share"] == 0.25 and res["confident"]["accuracy"] == 1.0
    assert res["confident"]["confusion"]["counts"] == [[1, 0], [0, 1]]
    wrong = res["misclassified"]
    assert wrong["n"] == 2 and [w["stamp_id"] for w in wrong["rows"]] == ["id2", "id6"]  # most confident first
    assert wrong["rows"][0]["probabilities"] == {"noise": pytest.approx(0.4), "source": pytest.approx(0.6)}
    sweep = {round(x["threshold"], 2): x for x in res["threshold_sweep"]}
    assert sweep[0.5]["tpr"] == 0.75 and sweep[0.5]["fpr"] == 0.25 and sweep[0.5]["accuracy"] == 0.75
    assert sum(res["histograms"]["noise"]) == 4 and sum(res["histograms"]["source"]) == 4
    # completeness: sources at snr 5, 10, 3, 50 predicted 1, 1, 0, 1; false positives: the four noise stamps
    # (all at snr 0) predicted 0, 0, 1, 0; four stamps a population: one bin each
    by = res["by"]["snr"]
    assert by["negative_class"] == "noise" and by["missing"] == 0
    assert by["completeness"]["source"] == [{"lo": 3.0, "hi": 50.0, "median": 7.5, "n": 4, "k": 3, "rate": 0.75,
                                             "ci": pytest.approx(wilson_formula(3, 4))}]
    assert by["false_positive_rate"] == [{"lo": 0.0, "hi": 0.0, "median": 0.0, "n": 4, "k": 1, "rate": 0.25,
                                          "ci": pytest.approx(wilson_formula(1, 4))}]
    on_disk = json.loads(open(tmp_path / "rep" / "report.json").read())
    assert on_disk["results"]["s"]["accuracy"] == 0.75
    for name in ("roc.png", "confusion_s.png", "histograms_s.png", "accuracy_by_snr.png", "report.html"):
        assert os.path.exists(tmp_path / "rep" / name), name


def test_split_selection_and_unlabelled_rows(tmp_path, score_table, eight_stamps):
    s = score_table(tmp_path / "s", eight_stamps.labels, eight_stamps.probs, eight_stamps.class_names,
                    split=["train"] * 4 + ["test"] * 4)
    r = evaluate(EvaluateSettings(scores=(s,), out=str(tmp_path / "rep")))
    assert r.report["results"]["s"]["n"] == 4  # the test split only, by default
    r = evaluate(EvaluateSettings(scores=(s,), out=str(tmp_path / "rep2"), split="all"))
    assert r.report["results"]["s"]["n"] == 8
    with pytest.raises(ValueError, match="no labelled rows in split 'val'"):
        evaluate(EvaluateSettings(scores=(s,), out=str(tmp_path / "rep3"), split="val"))


def test_four_classes_one_vs_rest(tmp_path, score_table):
    labels = [0, 1, 2, 3, 0, 1, 2, 3]
    probs = np.full((8, 4), 0.1)
    for i, l in enumerate(labels):
        probs[i, l] = 0.7
    probs[7] = [0.1, 0.1, 0.7, 0.1]  # a triple taken for a double
    s = score_table(tmp_path / "s", labels, probs, ["extended", "point", "double", "triple"])
    res = evaluate(EvaluateSettings(scores=(s,), out=str(tmp_path / "rep"))).report["results"]["s"]
    assert sorted(res["roc"]) == ["double", "extended", "point", "triple"]
    assert res["roc"]["extended"]["auc"] == 1.0
    assert res["roc"]["double"]["auc"] == pytest.approx(11 / 12)  # 2 doubles vs 6 others, one tie lost
    assert res["accuracy"] == 7 / 8
    assert res["confusion"]["counts"][3] == [0, 0, 1, 1]
    assert "threshold_sweep" not in res
    assert res["confident"]["rule"] == "max p > 0.99" and res["confident"]["n"] == 0


@pytest.mark.slow
def test_two_tables_side_by_side_and_tensorboard(tmp_path, score_table, eight_stamps):
    a = score_table(tmp_path / "cnn", eight_stamps.labels, eight_stamps.probs, eight_stamps.class_names)
    b = score_table(tmp_path / "dense", eight_stamps.labels, np.full((8, 2), 0.5), eight_stamps.class_names)
    r = evaluate(EvaluateSettings(scores=(a, b), out=str(tmp_path / "rep"), tensorboard=str(tmp_path / "tb")))
    assert list(r.report["results"]) == ["cnn", "dense"]
    assert r.report["results"]["dense"]["auc"] == 0.5
    assert os.listdir(tmp_path / "tb" / "evaluate" / "cnn")[0].startswith("events.out.tfevents")


def test_helpers():
    assert roc(np.array([True, True]), np.array([0.2, 0.3]), 0.9, 0.1)["auc"] is None


def wilson_formula(k, n, z=1.959963984540054):
    """The Wilson score interval written out: (p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)."""
    p = k / n
    centre, half = p + z * z / (2 * n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [(centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)]


def test_wilson_interval_matches_the_formula():
    assert wilson(3, 4) == pytest.approx(wilson_formula(3, 4), abs=1e-12)
    assert wilson(3, 4) == pytest.approx([0.3006418, 0.9544127], abs=1e-6)
    assert wilson(0, 10) == pytest.approx([0.0, 0.2775328], abs=1e-6)  # stays inside [0, 1] at 0/n
    assert wilson(10, 10)[1] == pytest.approx(1.0) and wilson(0, 0) is None


def test_completeness_and_false_positives_in_equal_count_bins():
    # sources at snr 1..8, found at 2 and 5..8; noise at snr 10..15, called a source at 14 and 15; one NaN snr
    values = np.array([1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 15, np.nan])
    labels = np.array([1] * 8 + [0] * 6 + [1])
    pred = np.array([0, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1])
    by = completeness_by(values, labels, pred, ["noise", "source"], bins=2)
    assert by["missing"] == 1
    comp = by["completeness"]["source"]
    assert [(b["lo"], b["hi"], b["n"], b["k"], b["rate"]) for b in comp] == [(1, 4.5, 4, 1, 0.25), (4.5, 8, 4, 4, 1.0)]
    fpr = by["false_positive_rate"]
    assert [(b["lo"], b["hi"], b["n"], b["k"]) for b in fpr] == [(10, 12.5, 3, 0), (12.5, 15, 3, 2)]
    assert [b["rate"] for b in fpr] == pytest.approx([0, 2 / 3])
    assert comp[0]["ci"] == pytest.approx(wilson_formula(1, 4)) and fpr[1]["ci"] == pytest.approx(wilson_formula(2, 3))
    assert [b["median"] for b in comp] == [2.5, 6.5]


def test_completeness_per_positive_class_and_any_positive_call_as_false_positive():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 2, 0, 1, 2, 2, 2])  # noise called 'real' once, 'variable' once: both false positives
    by = completeness_by(np.arange(8.0), labels, pred, ["bogus", "real", "variable"])
    assert sorted(by["completeness"]) == ["real", "variable"]
    assert [(b["n"], b["k"]) for b in by["completeness"]["real"]] == [(2, 1)]
    assert [(b["n"], b["k"]) for b in by["completeness"]["variable"]] == [(2, 2)]
    assert [(b["n"], b["k"], b["rate"]) for b in by["false_positive_rate"]] == [(4, 2, 0.5)]
    many = completeness_by(np.arange(1.0, 26), np.ones(25, int), np.ones(25, int), ["n", "p"])
    assert [b["n"] for b in many["completeness"]["p"]] == [12, 13]  # 25 stamps: two bins of about 10 or more


@pytest.mark.slow
def test_html_report_renders_with_every_image(tno_small, tmp_path, score_table, images_in_chromium):
    """The report, with every kind of plot (the misclassified stamps' images read from the survey among them),
    opens in headless Chromium and every <img> decodes."""
    from stampray import table as st

    # Scores for the survey's stamps as 'stampray score' would write them: no model or Ray needed for a report.
    survey = st.read_table(tno_small, columns=["stamp_id", "label", "snr"])
    labels = survey.column("label").to_numpy()
    p_source = np.clip(0.2 + 0.6 * labels + np.random.default_rng(0).normal(0, 0.25, len(labels)), 0, 1)
    s = score_table(tmp_path / "s", labels.tolist(), np.stack([1 - p_source, p_source], axis=1), ["noise", "source"],
                    extra={"snr": survey.column("snr")}, ids=survey.column("stamp_id").to_pylist())
    r = evaluate(EvaluateSettings(scores=(s,), out=str(tmp_path / "rep"), data=tno_small, by=("snr",), split="all"))
    assert "misclassified_s.png" in {os.path.basename(p) for p in r.plots}
    page = open(r.html).read()
    assert page.count("<img") >= 6 and "src=\"data:image/png;base64," in page
    images, broken = images_in_chromium(page)
    n = page.count("<img")
    assert (images, broken) == (n, 0)


@pytest.fixture
def evaluate_log(caplog, monkeypatch):
    """caplog holding stampray.evaluate's warnings, also after the CLI (run earlier in this process) has
    turned off the "stampray" logger's propagation to the root, where caplog listens."""
    monkeypatch.setattr(logging.getLogger("stampray"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="stampray.evaluate")
    return caplog


@pytest.mark.slow
def test_scores_whose_split_is_not_known_to_be_trainings_are_evaluated_with_a_warning(tmp_path, evaluate_log,
                                                                                   score_table, eight_stamps):
    labels, probs, names = eight_stamps.labels, eight_stamps.probs, eight_stamps.class_names
    old = score_table(tmp_path / "old", labels, probs, names, split_record=None)
    evaluate(EvaluateSettings(scores=(old,), out=str(tmp_path / "r1")))
    assert [r.levelname for r in evaluate_log.records] == ["WARNING"]
    assert "was scored before stampray recorded splits" in evaluate_log.text
    evaluate_log.clear()
    assumed = score_table(tmp_path / "assumed", labels, probs, names,
                          split_record={"fractions": [0.7, 0.1, 0.2], "source": "assumed", "column": False})
    evaluate(EvaluateSettings(scores=(assumed,), out=str(tmp_path / "r2")))
    assert "does not record its training split" in evaluate_log.text
    evaluate_log.clear()
    known = score_table(tmp_path / "known", labels, probs, names)
    evaluate(EvaluateSettings(scores=(known,), out=str(tmp_path / "r3")))
    evaluate(EvaluateSettings(scores=(old,), out=str(tmp_path / "r4"), split="all"))
    assert evaluate_log.records == []


def test_a_run_of_another_model_is_refused_and_one_of_other_weights_warned_of(tmp_path, evaluate_log, score_table,
                                                                             eight_stamps):
    """--run's training curves go beside the scores' metrics: they must be the scoring model's."""
    import json

    import torch

    from stampray import checkpoint as ck
    from stampray.models import create_model

    torch.manual_seed(0)
    bundle = ck.make_bundle(create_model("cnn", 1, 21, 2), class_names=("noise", "source"), preprocess="course")
    tag = f"cnn@{ck.weights_hash(bundle)}"
    run = tmp_path / "runs" / "cnn"
    run.mkdir(parents=True)
    (run / "settings.json").write_text(json.dumps({"model": "cnn", "data": "d"}))
    epoch = {"epoch": 1, "train_loss": 0.5, "val_loss": 0.6, "train_acc": 0.7, "val_acc": 0.6}
    (run / "metrics.jsonl").write_text(json.dumps(epoch) + "\n")
    ck.save(bundle, str(run / "best.pt"))
    s = score_table(tmp_path / "s", eight_stamps.labels, eight_stamps.probs, eight_stamps.class_names)
    manifest = tmp_path / "s" / "_manifest.json"
    doc = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**doc, "model_tag": "vgg6@0123456789ab"}))  # the scores of a vgg6
    with pytest.raises(ValueError, match=rf"^--run {run} trained a cnn, but the scores come from another model \({s} "
                                         r"by vgg6@0123456789ab\): its training curves are not theirs; give the run "
                                         r"that trained the scoring checkpoint$"):
        evaluate(EvaluateSettings(scores=(s,), out=str(tmp_path / "rep"), run=str(run)))
    assert not (tmp_path / "rep").exists()
    manifest.write_text(json.dumps({**doc, "model_tag": "cnn@0123456789ab"}))  # another cnn
    evaluate(EvaluateSettings(scores=(s,), out=str(tmp_path / "rep"), run=str(run)))
    assert evaluate_log.messages == [f"evaluate: warning: the weights behind {s} (cnn@0123456789ab) are neither "
                                     f"{run}'s best.pt nor its last.pt ({tag}): its training curves may be another "
                                     f"run's"]
    evaluate_log.clear()
    manifest.write_text(json.dumps({**doc, "model_tag": tag}))  # scored by the run's best.pt
    r = evaluate(EvaluateSettings(scores=(s,), out=str(tmp_path / "rep2"), run=str(run)))
    assert evaluate_log.messages == [] and r.report["training"] == [epoch]


def test_a_by_column_no_table_has_or_that_is_not_numeric_is_refused(tmp_path, score_table, eight_stamps):
    s = score_table(tmp_path / "s", eight_stamps.labels, eight_stamps.probs, eight_stamps.class_names,
                    extra={"artifact": ["star"] * 8})
    with pytest.raises(ValueError, match=r"^--by snr: no score table has that column; score with --keep snr to "
                                         r"carry it from the stamp table$"):
        evaluate(EvaluateSettings(scores=(s,), out=str(tmp_path / "rep"), by=("snr",)))
    with pytest.raises(ValueError, match=rf"^--by artifact: that column of {s} holds string values; --by takes "
                                         r"numeric columns"):
        evaluate(EvaluateSettings(scores=(s,), out=str(tmp_path / "rep"), by=("artifact",)))
    assert not (tmp_path / "rep").exists()


# --------------------------------------------------------------------------------------------------
# scikit-learn metrics (issue #13 item 4)
# --------------------------------------------------------------------------------------------------
def test_operating_points_are_read_off_every_threshold():
    # sources 0.9, 0.8, 0.7 tie with noise 0.9, 0.8, 0.7; one more noise at 0.1. Thresholds 0.9, 0.8, 0.7 are
    # equal diagonal steps (TPR 1/3, 2/3, 1 at FPR 1/4, 2/4, 3/4): the drawn curve drops the middle one, but
    # it is a threshold one can choose. TPR >= 0.6 first at 0.8: FPR 1/2 (the thinned curve gave 3/4); within
    # FPR <= 0.6 the best TPR is 2/3: FNR 1/3 (the thinned curve gave 2/3).
    labels = np.array([1, 1, 1, 0, 0, 0, 0], bool)
    score = np.array([0.9, 0.8, 0.7, 0.9, 0.8, 0.7, 0.1])
    r = roc(labels, score, tpr_at=0.6, fpr_at=0.6)
    assert r["fpr_at_tpr"] == 0.5
    assert r["fnr_at_fpr"] == pytest.approx(1 / 3)
    assert r["auc"] == pytest.approx((3.5 + 2.5 + 1.5) / 12)  # of the 12 (source, noise) pairs; ties count half


def test_confusion_and_per_class_with_an_empty_subset_and_an_absent_class():
    assert confusion(np.array([], np.int64), np.array([], np.int64), 3) == {"counts": [[0] * 3] * 3,
                                                                           "normalized": [[0.0] * 3] * 3}
    labels, pred = np.array([0, 0, 0, 1, 1]), np.array([0, 0, 1, 1, 0])  # class 2: never true, never predicted
    c = confusion(labels, pred, 3)
    assert c["counts"] == [[2, 1, 0], [1, 1, 0], [0, 0, 0]]
    assert c["normalized"] == [[0.666667, 0.333333, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]
    rows = per_class(labels, pred, 3, ["a", "b", "c"])
    assert [(r["class"], r["support"]) for r in rows] == [("a", 3), ("b", 2), ("c", 0)]
    assert [r["precision"] for r in rows] == pytest.approx([2 / 3, 1 / 2, 0])
    assert [r["recall"] for r in rows] == pytest.approx([2 / 3, 1 / 2, 0])
    assert [r["f1"] for r in rows] == pytest.approx([2 / 3, 1 / 2, 0])
    assert all(type(r[key]) is float for r in rows for key in ("precision", "recall", "f1"))  # JSON-ready


def test_labels_outside_the_classes_are_refused(tmp_path, score_table, eight_stamps):
    s = score_table(tmp_path / "s", [0, 1, 2, 1, 0, 0, 1, 1], eight_stamps.probs, eight_stamps.class_names)
    with pytest.raises(ValueError, match=r"1 row labelled 2, outside 0..1 for its 2 classes \(noise, source\)"):
        evaluate(EvaluateSettings(scores=(s,), out=str(tmp_path / "rep")))


def test_partial_std_columns_are_a_warning_and_no_uncertainty(tmp_path, evaluate_log, score_table, eight_stamps):
    s = score_table(tmp_path / "s", eight_stamps.labels, eight_stamps.probs, eight_stamps.class_names,
                    extra={"p_source_std": np.full(8, 0.1, np.float32)})
    r = evaluate(EvaluateSettings(scores=(s,), out=str(tmp_path / "rep")))
    assert "uncertainty" not in r.report["results"]["s"]
    assert evaluate_log.messages == [f"evaluate: warning: {s} has p_source_std but not p_noise_std: no accuracy "
                                     f"against uncertainty for it; score again with --tta K or --mc-dropout K"]


# --------------------------------------------------------------------------------------------------
# Settings: documented once, flags generated (issue #13)
# --------------------------------------------------------------------------------------------------
def test_every_setting_is_documented_and_becomes_a_flag():
    import argparse
    from dataclasses import fields

    from stampray.settings import add_arguments, field_help

    assert sorted(field_help(EvaluateSettings)) == sorted(f.name for f in fields(EvaluateSettings))
    p = argparse.ArgumentParser()
    add_arguments(p, EvaluateSettings)
    ns = p.parse_args(["--scores", "a", "--scores", "s3://b/c", "--out", "o", "--by", "snr,mag", "--split", "val",
                       "--tensorboard", "tb", "--no-progress"])
    assert vars(ns) == {"scores": ["a", "s3://b/c"], "out": "o", "by": ("snr", "mag"), "split": "val",
                        "tensorboard": "tb", "progress": False}
    assert vars(p.parse_args(["--scores", "a", "--out", "o"])) == {"scores": ["a"], "out": "o"}  # unset: absent
    with pytest.raises(SystemExit):
        p.parse_args(["--scores", "a", "--out", "o", "--split", "holdout"])
    text = p.format_help()
    assert "--tensorboard LOGDIR" in text and "{test,val,train,all}" in text and "(default 0.95)" in text
