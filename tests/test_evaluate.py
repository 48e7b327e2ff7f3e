import json
import os
import shutil
import subprocess

import numpy as np
import pyarrow as pa
import pytest

from stampray.evaluate import EvaluateSettings, accuracy_by, evaluate, roc


SPLIT_RECORD = {"fractions": [0.7, 0.1, 0.2], "source": "checkpoint", "column": False, "trained_with_column": False}


def write_scores(path, labels, probs, class_names, extra=None, split=None, split_record=SPLIT_RECORD):
    """A score directory as 'stampray score' writes it, from literal values (``split_record=None``: as
    score wrote it before it recorded the split it used)."""
    os.makedirs(path, exist_ok=True)
    probs = np.asarray(probs, np.float32)
    n = len(labels)
    cols = {"stamp_id": [f"id{i}" for i in range(n)], "label": pa.array(labels, pa.int64()),
            "split": split or ["test"] * n, "pred": probs.argmax(1), "pred_name": [class_names[i] for i in probs.argmax(1)]}
    for j, c in enumerate(class_names):
        cols[f"p_{c}"] = probs[:, j]
    cols["model"] = ["m@000000000000"] * n
    cols.update(extra or {})
    import pyarrow.parquet as pq

    pq.write_table(pa.table(cols), os.path.join(path, "part-00000.parquet"))
    doc = {"model": "m.pt", "model_tag": "m@000000000000", "data": "d", "keep": [], "preprocess": "course",
           "class_names": list(class_names), "num_rows": n, "set_aside": 0, "errors": {},
           "shards": [{"path": "part-00000.parquet", "rows": n, "errors": 0}]}
    if split_record is not None:
        doc["split"] = split_record
    with open(os.path.join(path, "_manifest.json"), "w") as f:
        json.dump(doc, f)
    return str(path)


# 8 stamps, hand-checked: labels and p(source)
LABELS = [0, 0, 0, 0, 1, 1, 1, 1]
P1 = [0.005, 0.2, 0.6, 0.3, 0.995, 0.7, 0.4, 0.9]


def test_binary_metrics_against_hand_computed_values(tmp_path):
    probs = np.stack([1 - np.array(P1), P1], axis=1)
    s = write_scores(tmp_path / "s", LABELS, probs, ["noise", "source"], extra={"snr": [0, 0, 0, 0, 5, 10, 3, 50]})
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
    by = res["by"]["snr"]
    assert sum(b["n"] for b in by) == 8
    on_disk = json.loads(open(tmp_path / "rep" / "report.json").read())
    assert on_disk["results"]["s"]["accuracy"] == 0.75
    for name in ("roc.png", "confusion_s.png", "histograms_s.png", "accuracy_by_snr.png", "report.html"):
        assert os.path.exists(tmp_path / "rep" / name), name


def test_split_selection_and_unlabelled_rows(tmp_path):
    probs = np.stack([1 - np.array(P1), P1], axis=1)
    s = write_scores(tmp_path / "s", LABELS, probs, ["noise", "source"], split=["train"] * 4 + ["test"] * 4)
    r = evaluate(EvaluateSettings(scores=(s,), out=str(tmp_path / "rep")))
    assert r.report["results"]["s"]["n"] == 4  # the test split only, by default
    r = evaluate(EvaluateSettings(scores=(s,), out=str(tmp_path / "rep2"), split="all"))
    assert r.report["results"]["s"]["n"] == 8
    with pytest.raises(ValueError, match="no labelled rows in split 'val'"):
        evaluate(EvaluateSettings(scores=(s,), out=str(tmp_path / "rep3"), split="val"))


def test_four_classes_one_vs_rest(tmp_path):
    labels = [0, 1, 2, 3, 0, 1, 2, 3]
    probs = np.full((8, 4), 0.1)
    for i, l in enumerate(labels):
        probs[i, l] = 0.7
    probs[7] = [0.1, 0.1, 0.7, 0.1]  # a triple taken for a double
    s = write_scores(tmp_path / "s", labels, probs, ["extended", "point", "double", "triple"])
    res = evaluate(EvaluateSettings(scores=(s,), out=str(tmp_path / "rep"))).report["results"]["s"]
    assert sorted(res["roc"]) == ["double", "extended", "point", "triple"]
    assert res["roc"]["extended"]["auc"] == 1.0
    assert res["roc"]["double"]["auc"] == pytest.approx(11 / 12)  # 2 doubles vs 6 others, one tie lost
    assert res["accuracy"] == 7 / 8
    assert res["confusion"]["counts"][3] == [0, 0, 1, 1]
    assert "threshold_sweep" not in res
    assert res["confident"]["rule"] == "max p > 0.99" and res["confident"]["n"] == 0


def test_two_tables_side_by_side_and_tensorboard(tmp_path):
    probs = np.stack([1 - np.array(P1), P1], axis=1)
    a = write_scores(tmp_path / "cnn", LABELS, probs, ["noise", "source"])
    b = write_scores(tmp_path / "dense", LABELS, np.full((8, 2), 0.5), ["noise", "source"])
    r = evaluate(EvaluateSettings(scores=(a, b), out=str(tmp_path / "rep"), tensorboard=str(tmp_path / "tb")))
    assert list(r.report["results"]) == ["cnn", "dense"]
    assert r.report["results"]["dense"]["auc"] == 0.5
    assert os.listdir(tmp_path / "tb" / "evaluate" / "cnn")[0].startswith("events.out.tfevents")


def test_helpers():
    assert roc(np.array([True, True]), np.array([0.2, 0.3]), 0.9, 0.1)["auc"] is None
    rows = accuracy_by(np.array([1.0, 2, 3, 4]), np.array([True, False, True, True]), bins=2)
    assert [(r["n"], r["accuracy"]) for r in rows] == [(2, 0.5), (2, 1.0)]


def chromium():
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(chromium() is None and not os.environ.get("CI"), reason="Debian's chromium is not installed")
def test_html_report_renders_with_every_image(tno_small, tmp_path, ray_shared):
    """The report opens in headless Chromium and every <img> decodes."""
    from test_score import make_checkpoint

    from stampray.score import ScoreSettings, score

    ckpt = make_checkpoint(tmp_path / "m.pt")
    score(ScoreSettings(model=ckpt, data=tno_small, out=str(tmp_path / "s"), keep=("snr",)))
    r = evaluate(EvaluateSettings(scores=(str(tmp_path / "s"),), out=str(tmp_path / "rep"), data=tno_small,
                                  by=("snr",), split="all"))
    page = open(r.html).read()
    assert page.count("<img") >= 6 and "src=\"data:image/png;base64," in page
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", "<script>window.addEventListener('load',()=>{const b=[...document"
                                  ".images].filter(i=>!i.complete||i.naturalWidth===0).length;document.title="
                                  "'images:'+document.images.length+' broken:'+b;});</script></body>"))
    out = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
                          "--dump-dom", f"file://{probe}"], capture_output=True, text=True, timeout=120)
    title = out.stdout.split("<title>")[1].split("</title>")[0]
    n = page.count("<img")
    assert title == f"images:{n} broken:0", title


def test_scores_whose_split_is_not_known_to_be_trainings_are_evaluated_with_a_warning(tmp_path, capsys):
    probs = np.stack([1 - np.array(P1), P1], axis=1)
    old = write_scores(tmp_path / "old", LABELS, probs, ["noise", "source"], split_record=None)
    evaluate(EvaluateSettings(scores=(old,), out=str(tmp_path / "r1")))
    assert "was scored before stampray recorded splits" in capsys.readouterr().err
    assumed = write_scores(tmp_path / "assumed", LABELS, probs, ["noise", "source"],
                           split_record={"fractions": [0.7, 0.1, 0.2], "source": "assumed", "column": False})
    evaluate(EvaluateSettings(scores=(assumed,), out=str(tmp_path / "r2")))
    assert "does not record its training split" in capsys.readouterr().err
    known = write_scores(tmp_path / "known", LABELS, probs, ["noise", "source"])
    evaluate(EvaluateSettings(scores=(known,), out=str(tmp_path / "r3")))
    evaluate(EvaluateSettings(scores=(old,), out=str(tmp_path / "r4"), split="all"))
    assert capsys.readouterr().err == ""
