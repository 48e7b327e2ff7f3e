"""Evaluation reports from score tables: ``stampray evaluate``.

For every score table (with labels): confusion matrix (counts and row-normalised), per-class precision,
recall and F1, accuracy; ROC curves and AUC (one-vs-rest beyond two classes); the false-positive rate at a
fixed true-positive rate and the false-negative rate at a fixed false-positive rate (the figures ZTF's
real/bogus papers quote); a threshold sweep; the notebooks' "confident subset" (p < 0.01 or p > 0.99);
probability histograms per true class; calibration (a reliability diagram and the top-label expected
calibration error in 10 equal-width bins) and, for scores with ``p_<class>_std`` columns (``score --tta K``,
``--mc-dropout K``), accuracy against that spread in equal-count bins; the misclassified stamps (ids,
probabilities and, with the stamp table, a picture grid); training curves from a run directory;
completeness and false-positive rate against numeric metadata (SNR), in equal-count bins with Wilson
intervals. Several score tables are compared side by side. Which classes are positive follows
:func:`stampray.classes.positive_classes`: class 1 of two, every class one-vs-rest beyond two; class 0 is
the negative of the completeness curves. The metrics are scikit-learn's. Output: ``report.json`` with every
number, PNG plots and one self-contained ``report.html`` (images embedded), plus TensorBoard scalars when
asked.

Every path may be local or a URI (``s3://bucket/prefix``). The report is built in a local temporary
directory and put in ``--out`` when it is complete (PNGs first, ``report.json``, then ``report.html``
last), replacing only files an earlier ``evaluate`` wrote there (:mod:`stampray.outfiles`); a URI
``--tensorboard`` logdir gets event files written locally and then uploaded; ``--run`` and ``--scores``
are read through the filesystem.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from . import outfiles
from . import table as st
from .lock import output_lock
from .classes import NEGATIVE, check_class_names, positive_classes, prob_column, std_column
from .progress import Progress
from .provenance import provenance
from .score import FEATURES, read_scores, score_manifest

logger = logging.getLogger(__name__)

SPLITS = ("test", "val", "train", "all")


@dataclass(frozen=True)
class EvaluateSettings:
    """Settings of ``stampray evaluate``.

    Args:
        scores: score directories written by 'stampray score' (local paths or URIs); repeat the flag to
            compare models side by side.
        out: report directory for report.html, report.json and the PNGs (local path or URI).
        data: the stamp table, to draw the misclassified stamps (None: no picture grid).
        run: training run directory, for the training curves (None: no curves).
        by: numeric columns for completeness and false-positive-rate curves (equal-count bins, Wilson 95%
            intervals), e.g. snr; each must be in the score table (score with --keep COLUMN).
        tensorboard: also write the numbers to TensorBoard under this logdir, local or a URI (None: no
            TensorBoard events).
        split: which rows to evaluate: test (the held-out split), val, train, or all rows.
        tpr: report the false-positive rate at this true-positive rate.
        fpr: report the false-negative rate at this false-positive rate.
        confident: bound of the confident subset: p < c or p > 1 - c of the positive class for two
            classes, the top probability above 1 - c beyond two.
        misclassified_grid: misclassified stamps drawn in the picture grid (with --data), most confident
            first.
        names: names of the score tables in the report, one per --scores (empty: the shortest trailing
            part of each path that tells them apart).
        progress: a line per stage on stderr (reading each table, drawing, writing).
    """

    scores: tuple[str, ...] = field(metadata={"path": True, "append": True, "parse": str})
    out: str = field(metadata={"path": True})
    data: str | None = field(default=None, metadata={"path": True})
    run: str | None = field(default=None, metadata={"path": True})
    by: tuple[str, ...] = ()
    tensorboard: str | None = field(default=None, metadata={"path": True, "metavar": "LOGDIR"})
    split: str = field(default="test", metadata={"choices": SPLITS})
    tpr: float = 0.95
    fpr: float = 0.01
    confident: float = 0.01
    misclassified_grid: int = 20
    names: tuple[str, ...] = ()
    progress: bool = True

    def __post_init__(self):
        if not self.scores:
            msg = "give at least one --scores directory"
            raise ValueError(msg)
        if self.split not in SPLITS:
            msg = f"--split must be one of {', '.join(SPLITS)}, got {self.split!r}"
            raise ValueError(msg)
        for name, v in (("--tpr", self.tpr), ("--fpr", self.fpr)):
            if not 0 < float(v) < 1:
                msg = f"{name} must lie strictly between 0 and 1, got {v!r}"
                raise ValueError(msg)
        if not 0 < float(self.confident) < 0.5:
            msg = f"--confident must lie in (0, 0.5), got {self.confident!r}"
            raise ValueError(msg)
        if self.names and len(self.names) != len(self.scores):
            msg = f"--names gives {len(self.names)} names for {len(self.scores)} score tables"
            raise ValueError(msg)
        if isinstance(self.misclassified_grid, bool) or int(self.misclassified_grid) < 0:
            msg = f"--misclassified-grid must be an integer >= 0, got {self.misclassified_grid!r}"
            raise ValueError(msg)


# --------------------------------------------------------------------------------------------------
# Metrics (plain numpy / scikit-learn; each returns JSON-ready values)
# --------------------------------------------------------------------------------------------------
def confusion(labels: np.ndarray, pred: np.ndarray, k: int) -> dict:
    """Confusion matrix (rows: true class, columns: predicted), counts and row-normalised (an empty row stays
    zeros)."""
    from sklearn.metrics import confusion_matrix

    # scikit-learn refuses empty input; an empty subset (no confident stamps) is a matrix of zeros
    cm = confusion_matrix(labels, pred, labels=range(k)) if len(labels) else np.zeros((k, k), np.int64)
    rows = cm.sum(axis=1, keepdims=True)
    return {"counts": cm.tolist(), "normalized": np.divide(cm, np.maximum(rows, 1)).round(6).tolist()}


def per_class(labels: np.ndarray, pred: np.ndarray, k: int, names) -> list[dict]:
    """Precision, recall, F1 and support of each class (0 where a ratio is undefined: no stamp predicted as,
    or none of, the class)."""
    from sklearn.metrics import precision_recall_fscore_support

    precision, recall, f1, support = precision_recall_fscore_support(labels, pred, labels=range(k), zero_division=0)
    return [{"class": names[c], "precision": float(precision[c]), "recall": float(recall[c]), "f1": float(f1[c]),
             "support": int(support[c])} for c in range(k)]


def roc(labels_bin: np.ndarray, score: np.ndarray, tpr_at: float, fpr_at: float) -> dict:
    """ROC curve, AUC, FPR at a fixed TPR and FNR at a fixed FPR, for one positive class.

    The curve in the report is scikit-learn's, without the points that lie on a straight segment; the two
    operating points are read off every threshold (``drop_intermediate=False``), because a dropped point is
    still a threshold one can choose: tied scores make equal diagonal steps, and the middle ones are
    dropped from the drawn curve."""
    from sklearn.metrics import roc_auc_score, roc_curve

    if labels_bin.all() or not labels_bin.any():
        return {"auc": None, "fpr": [], "tpr": [], "thresholds": [], "fpr_at_tpr": None, "fnr_at_fpr": None}
    fpr, tpr, thr = roc_curve(labels_bin, score)
    auc = float(roc_auc_score(labels_bin, score))
    every_fpr, every_tpr, _ = roc_curve(labels_bin, score, drop_intermediate=False)
    # smallest FPR among operating points reaching the TPR; largest TPR among points within the FPR
    fpr_at_tpr = float(every_fpr[np.argmax(every_tpr >= tpr_at)])
    ok = every_fpr <= fpr_at
    fnr_at_fpr = float(1.0 - every_tpr[ok].max()) if ok.any() else 1.0
    thr = np.where(np.isfinite(thr), thr, 1.0)
    return {"auc": auc, "fpr": fpr.round(6).tolist(), "tpr": tpr.round(6).tolist(), "thresholds": thr.round(6).tolist(),
            "fpr_at_tpr": fpr_at_tpr, "fnr_at_fpr": fnr_at_fpr}


def threshold_sweep(labels_bin: np.ndarray, score: np.ndarray, steps: int = 99) -> list[dict]:
    """TPR, FPR, precision and accuracy at the fixed thresholds 0.01, 0.02, ..., 0.99 (``score >= t`` is
    positive): a table at round numbers, which scikit-learn's curves (a point per distinct score) are not."""
    out = []
    pos, neg = labels_bin.sum(), (~labels_bin).sum()
    for t in np.linspace(0.01, 0.99, steps):
        p = score >= t
        tp, fp = int((p & labels_bin).sum()), int((p & ~labels_bin).sum())
        out.append({"threshold": round(float(t), 4), "tpr": tp / pos if pos else None, "fpr": fp / neg if neg else None,
                    "precision": tp / (tp + fp) if tp + fp else None,
                    "accuracy": float((p == labels_bin).mean()) if len(p) else None})
    return out


BY_BINS = 10  # --by: at most this many equal-count bins per curve ...
BY_MIN_PER_BIN = 10  # ... and at least this many stamps in each (a small sample gets fewer, wider bins)
CONFIDENCE = 0.95  # of the Wilson intervals drawn as error bars


def wilson(k: int, n: int, confidence: float = CONFIDENCE) -> list[float] | None:
    """The Wilson score interval ``[low, high]`` of a binomial proportion ``k/n`` (None when ``n == 0``):
    unlike the normal approximation it stays inside [0, 1] and is honest at 0/n and n/n, the usual case
    for completeness in the brightest bins."""
    from scipy.stats import binomtest

    if n == 0:
        return None
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return [float(ci.low), float(ci.high)]


def rate_by(values: np.ndarray, hit: np.ndarray, bins: int | None = None) -> list[dict]:
    """The share of ``hit`` in bins of ``values`` holding equal counts (quantile bins; tied values stay in
    one bin, so ties can make bins unequal). ``bins`` None: ``n // BY_MIN_PER_BIN`` bins, 1 to ``BY_BINS``.
    One dict per non-empty bin: ``lo``, ``hi`` (the last bin includes ``hi``), ``median``, ``n``, ``k``
    (hits), ``rate`` and its Wilson interval ``ci``."""
    if len(values) == 0:
        return []
    bins = int(bins) if bins is not None else max(1, min(BY_BINS, len(values) // BY_MIN_PER_BIN))
    edges = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)))
    if len(edges) < 2:
        edges = np.array([values.min(), values.max()])
    idx = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)
    out = []
    for b in range(len(edges) - 1):
        sel = idx == b
        if sel.any():
            n, k = int(sel.sum()), int(hit[sel].sum())
            out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "median": float(np.median(values[sel])),
                        "n": n, "k": k, "rate": k / n, "ci": wilson(k, n)})
    return out


def completeness_by(values: np.ndarray, labels: np.ndarray, pred: np.ndarray, class_names,
                    bins: int | None = None) -> dict:
    """Completeness and false-positive rate against a numeric column (``evaluate --by snr``).

    Class 0 (:data:`stampray.classes.NEGATIVE`) is the negative class (noise, bogus) and every other class a
    detection. For each detection class c, *completeness* is the recall ``pred == c`` among the stamps of
    true class c, in equal-count bins of that class's own values; the *false-positive rate* is the share of
    true class-0 stamps predicted as any other class, in equal-count bins of the class-0 stamps' values (for
    two classes, the usual FPR). Each curve has bins of its own population, so every point rests on the same
    number of stamps. Rows whose value is not finite are left out and counted (``missing``)."""
    ok = np.isfinite(values)
    values, labels, pred = values[ok], labels[ok], pred[ok]
    neg = labels == NEGATIVE
    return {"negative_class": class_names[NEGATIVE], "missing": int((~ok).sum()),
            "completeness": {class_names[c]: rate_by(values[labels == c], pred[labels == c] == c, bins)
                             for c in range(len(class_names)) if c != NEGATIVE},
            "false_positive_rate": rate_by(values[neg], pred[neg] != NEGATIVE, bins)}


CALIBRATION_BINS = 10  # equal-width bins of the reliability diagram and the ECE (Guo et al. 2017 use 15)
UNCERTAINTY_BINS = 5  # equal-count bins of the accuracy against the spread over --tta/--mc-dropout passes


def reliability_bins(values: np.ndarray, hits: np.ndarray, bins: int = CALIBRATION_BINS) -> list[dict]:
    """``bins`` equal-width bins of [0, 1], each ``(lo, hi]`` (the first also holds 0, as scikit-learn's
    ``calibration_curve`` bins): ``lo``, ``hi``, ``n``, the mean of ``values`` (``mean``) and the share of
    ``hits`` (``share``) in the bin, None for both in an empty bin. Every bin is listed, empty ones too.

    scikit-learn's ``calibration_curve`` bins the same way but returns neither the counts nor empty bins,
    and takes one class's probability, not the top label's."""
    values = np.asarray(values, np.float64)
    edges = np.arange(bins + 1) / bins
    idx = np.searchsorted(edges[1:-1], values, side="left")
    n = np.bincount(idx, minlength=bins)
    total = np.bincount(idx, weights=values, minlength=bins)
    hit = np.bincount(idx, weights=np.asarray(hits, np.float64), minlength=bins)
    return [{"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int(n[b]),
             "mean": float(total[b] / n[b]) if n[b] else None, "share": float(hit[b] / n[b]) if n[b] else None}
            for b in range(bins)]


def calibration(probs: np.ndarray, labels: np.ndarray, class_names, bins: int = CALIBRATION_BINS) -> dict:
    """Top-label calibration and the expected calibration error (ECE).

    The confidence of a stamp is its top probability, the one of its predicted class; in ``bins``
    equal-width bins of confidence (see :func:`reliability_bins`), ``confidence`` is the bin's mean
    confidence and ``accuracy`` the share of its stamps predicted right. ECE is the sum over bins of
    ``n_bin / N * |accuracy - confidence|``: 0 for a model whose confidence is its hit rate, up to 1.

    For two classes, ``positive`` also bins p of the positive class (:func:`stampray.classes.positive_classes`)
    against the observed frequency of that class (``mean_p``, ``frequency``): the reliability diagram
    drawn for binary scores, the one scikit-learn's ``calibration_curve`` gives."""
    probs = np.asarray(probs, np.float64)
    k = len(class_names)
    correct = probs.argmax(axis=1) == labels
    top = reliability_bins(probs.max(axis=1), correct, bins)
    n = len(labels)
    out = {"rule": f"top label, {bins} equal-width bins (lo, hi]", "n": int(n),
           "ece": float(sum(b["n"] / n * abs(b["share"] - b["mean"]) for b in top if b["n"])) if n else None,
           "bins": [{"lo": b["lo"], "hi": b["hi"], "n": b["n"], "confidence": b["mean"], "accuracy": b["share"]}
                    for b in top]}
    if k == 2:
        (pos,) = positive_classes(k)
        out["positive"] = {"class": class_names[pos], "bins": [
            {"lo": b["lo"], "hi": b["hi"], "n": b["n"], "mean_p": b["mean"], "frequency": b["share"]}
            for b in reliability_bins(probs[:, pos], labels == pos, bins)]}
    return out


def uncertainty(std: np.ndarray, correct: np.ndarray, bins: int = UNCERTAINTY_BINS) -> dict:
    """Accuracy against the spread of the predicted class's probability over the passes of ``score --tta K``
    or ``--mc-dropout K`` (``std``, one per stamp): does the model know when it is wrong?

    ``bins``: equal-count bins of ``std`` (:func:`rate_by`: ``lo``, ``hi``, ``median``, ``n``, ``correct``,
    ``accuracy`` and its Wilson interval ``ci``); ``error_auc``: the ROC AUC of ``std`` as a score for
    "this prediction is wrong" (0.5: the spread says nothing; 1: every wrong stamp spreads more than every
    right one; None when all are right or all wrong). Stamps whose std is not finite are left out and
    counted (``missing``)."""
    from sklearn.metrics import roc_auc_score

    ok = np.isfinite(std)
    std, correct = np.asarray(std, np.float64)[ok], np.asarray(correct, bool)[ok]
    rows = [{"lo": r["lo"], "hi": r["hi"], "median": r["median"], "n": r["n"], "correct": r["k"],
             "accuracy": r["rate"], "ci": r["ci"]} for r in rate_by(std, correct, bins)]
    wrong = ~correct
    return {"measure": "std of p(predicted class) over the passes", "n": int(ok.sum()), "missing": int((~ok).sum()),
            "bins": rows, "error_auc": float(roc_auc_score(wrong, std)) if wrong.any() and correct.any() else None,
            "mean_std_correct": float(std[correct].mean()) if correct.any() else None,
            "mean_std_wrong": float(std[wrong].mean()) if wrong.any() else None}


def evaluate_table(t: pa.Table, class_names: list[str], settings: EvaluateSettings) -> dict:
    """Every number of the report for one score table (rows with labels and without errors)."""
    k = len(class_names)
    probs = np.stack([t.column(prob_column(c)).to_numpy(zero_copy_only=False) for c in class_names], axis=1)
    labels = t.column(st.LABEL).to_numpy(zero_copy_only=False).astype(np.int64)
    pred = probs.argmax(axis=1)
    correct = pred == labels
    positives = positive_classes(k)
    res: dict = {"n": int(len(labels)), "accuracy": float(correct.mean()) if len(labels) else None,
                 "confusion": confusion(labels, pred, k), "per_class": per_class(labels, pred, k, class_names)}
    res["macro_f1"] = float(np.mean([c["f1"] for c in res["per_class"]])) if k else None
    res["roc"] = {class_names[c]: roc(labels == c, probs[:, c], settings.tpr, settings.fpr) for c in positives}
    aucs = [r["auc"] for r in res["roc"].values() if r["auc"] is not None]
    res["auc"] = float(np.mean(aucs)) if aucs else None
    lo = settings.confident
    if k == 2:
        (pos,) = positives
        res["threshold_sweep"] = threshold_sweep(labels == pos, probs[:, pos])
        conf = (probs[:, pos] < lo) | (probs[:, pos] > 1 - lo)
    else:
        conf = probs.max(axis=1) > 1 - lo
    res["confident"] = {"rule": f"p < {lo} or p > {1 - lo}" if k == 2 else f"max p > {1 - lo}",
                        "share": float(conf.mean()) if len(conf) else None, "n": int(conf.sum()),
                        "accuracy": float(correct[conf].mean()) if conf.any() else None,
                        "confusion": confusion(labels[conf], pred[conf], k)}
    wrong = np.nonzero(~correct)[0]
    order = wrong[np.argsort(-probs[wrong, pred[wrong]])] if len(wrong) else wrong
    ids = t.column(st.ID).to_pylist()
    res["misclassified"] = {"n": int(len(wrong)), "rows": [
        {"stamp_id": ids[i], "label": class_names[labels[i]], "pred": class_names[pred[i]],
         "probabilities": {c: round(float(probs[i, j]), 6) for j, c in enumerate(class_names)}} for i in order]}
    res["histograms"] = {}
    score_col = probs[:, positives[0]] if k == 2 else probs.max(axis=1)
    edges = np.linspace(0, 1, 21)
    for c in range(k):
        h, _ = np.histogram(score_col[labels == c], bins=edges)
        res["histograms"][class_names[c]] = h.tolist()
    res["by"] = {}
    for col in settings.by:
        if col in t.column_names:
            res["by"][col] = completeness_by(t.column(col).to_numpy(zero_copy_only=False).astype(float), labels,
                                             pred, class_names)
    res["calibration"] = calibration(probs, labels, class_names)
    stds = [std_column(c) for c in class_names]
    if all(c in t.column_names for c in stds):
        spread = np.stack([t.column(c).to_numpy(zero_copy_only=False) for c in stds], axis=1)
        res["uncertainty"] = uncertainty(spread[np.arange(len(pred)), pred], correct)
    res["_arrays"] = {"probs": probs, "labels": labels, "pred": pred, "ids": ids}
    return res


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    fig.savefig(path, dpi=90, bbox_inches="tight")
    _plt().close(fig)
    return path


def plot_confusion(cm: dict, names, title, path):
    from .train import _confusion_figure

    fig = _confusion_figure(cm["counts"], names, title)
    return _save(fig, path)


def plot_roc(results: dict[str, dict], path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for run, res in results.items():
        for cls, r in res["roc"].items():
            if r["auc"] is not None:
                label = f"{run}" + (f" [{cls}]" if len(res["roc"]) > 1 else "") + f" AUC {r['auc']:.4f}"
                ax.plot(r["fpr"], r["tpr"], label=label)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_title("ROC")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    else:  # every run's labels hold a single class: no ROC to draw
        ax.text(0.5, 0.5, "ROC undefined: the labels hold one class", ha="center", va="center",
                transform=ax.transAxes, fontsize=8)
    return _save(fig, path)


def plot_histograms(res: dict, names, title, path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    centers = np.linspace(0.025, 0.975, 20)
    for cls, h in res["histograms"].items():
        ax.step(centers, np.maximum(h, 0.8), where="mid", label=f"true {cls}")
    ax.set_yscale("log")
    ax.set_xlabel(f"p({names[positive_classes(2)[0]]})" if len(names) == 2 else "max probability")
    ax.set_ylabel("stamps")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_by(results: dict[str, dict], col: str, path):
    """Completeness of each positive class (left) and the false-positive rate (right) against ``col``, one
    point per equal-count bin at its median, the bin's extent as the horizontal bar and the Wilson interval
    as the vertical one."""
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.4, 3.4), layout="constrained")
    los = []

    def draw(ax, rows, label):
        _draw_binned_rates(ax, rows, "rate", label)
        los.extend(r["lo"] for r in rows)

    negative = None
    for run, res in results.items():
        by = res["by"].get(col)
        if not by:
            continue
        negative = by["negative_class"]
        for cls, rows in by["completeness"].items():
            draw(left, rows, run + (f" [{cls}]" if len(by["completeness"]) > 1 else ""))
        draw(right, by["false_positive_rate"], run)
    left.set_ylabel("completeness (recall)")
    left.set_title(f"completeness against {col}")
    right.set_ylabel(f"false-positive rate (true {negative} called positive)")
    right.set_title(f"false positives against {col}")
    left.set_ylim(-0.02, 1.02)
    right.set_ylim(bottom=0)  # false-positive rates are small: let the axis follow them
    for ax in (left, right):
        ax.set_xlabel(col)
        if los and min(los) > 0:
            ax.set_xscale("log")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _save(fig, path)


def _draw_binned_rates(ax, rows: list[dict], key: str, label: str) -> None:
    """One point per bin at its median, the bin's extent as the horizontal bar and the Wilson interval as
    the vertical one (rows of :func:`rate_by`, the rate under ``key``)."""
    if not rows:
        return
    x = np.array([r["median"] for r in rows])
    y = np.array([r[key] for r in rows])
    ci = np.array([r["ci"] for r in rows])
    ax.errorbar(x, y, xerr=[x - [r["lo"] for r in rows], [r["hi"] for r in rows] - x],
                yerr=[y - ci[:, 0], ci[:, 1] - y], fmt="o-", ms=3, capsize=2, lw=1, label=label)


def plot_calibration(cal: dict, title: str, path):
    """Reliability diagram: observed frequency against predicted probability in equal-width bins (bars
    spanning each bin, a dot at its mean prediction, the diagonal of perfect calibration), and the bin
    counts below. Two classes: p of the positive class against how often it is the true class; more: the
    top probability against the accuracy."""
    plt = _plt()
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(4.6, 5.0), sharex=True, height_ratios=(3, 1),
                                   layout="constrained")
    if "positive" in cal:
        cls = cal["positive"]["class"]
        rows = [(b["lo"], b["hi"], b["n"], b["mean_p"], b["frequency"]) for b in cal["positive"]["bins"]]
        xlabel, ylabel = f"predicted p({cls})", f"observed frequency of {cls}"
    else:
        rows = [(b["lo"], b["hi"], b["n"], b["confidence"], b["accuracy"]) for b in cal["bins"]]
        xlabel, ylabel = "confidence (top probability)", "accuracy"
    full = [r for r in rows if r[2]]
    ax.plot([0, 1], [0, 1], "k:", lw=0.8, label="perfectly calibrated")
    if full:
        ax.bar([r[0] for r in full], [r[4] for r in full], width=[r[1] - r[0] for r in full], align="edge",
               color="tab:blue", alpha=0.35, edgecolor="tab:blue", label="observed")
        ax.plot([r[3] for r in full], [r[4] for r in full], "o-", color="tab:blue", ms=3, lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title}\nECE {cal['ece']:.4f} (top label, {len(cal['bins'])} bins)" if cal["ece"] is not None
                 else title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    hist.bar([r[0] for r in rows], [r[2] for r in rows], width=[r[1] - r[0] for r in rows], align="edge",
             color="0.6", edgecolor="0.3")
    for lo, hi, n, _, _ in rows:
        hist.text((lo + hi) / 2, n, str(n), ha="center", va="bottom", fontsize=6)
    hist.set_ylim(0, 1.25 * max([r[2] for r in rows] + [1]))
    hist.set_ylabel("stamps")
    hist.set_xlabel(xlabel)
    return _save(fig, path)


def plot_uncertainty(unc: dict, accuracy: float | None, title: str, path):
    """Accuracy against the spread of the predicted class's probability over the passes, in equal-count
    bins with Wilson intervals; the dashed line is the overall accuracy."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 3.4), layout="constrained")
    _draw_binned_rates(ax, unc["bins"], "accuracy", "accuracy in the bin")
    if accuracy is not None:
        ax.axhline(accuracy, color="k", ls="--", lw=0.8, label=f"overall {accuracy:.3f}")
    ax.set_xlabel("std of p(predicted class) over the passes")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    auc = unc["error_auc"]
    ax.set_title(title + (f"\nAUC of the std in finding the wrong ones: {auc:.3f}" if auc is not None else ""), fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_curves(history: list[dict], path):
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    e = [h["epoch"] for h in history]
    axes[0].plot(e, [h["train_loss"] for h in history], label="training")
    axes[0].plot(e, [h["val_loss"] for h in history], label="validation")
    axes[0].set_title("loss")
    axes[1].plot(e, [h["train_acc"] for h in history], label="training")
    axes[1].plot(e, [h["val_acc"] for h in history], label="validation")
    axes[1].set_title("accuracy")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_stamps(images: np.ndarray, titles: list[str], path, cols: int = 5):
    plt = _plt()
    rows = max(1, (len(images) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if k < len(images):
            ax.imshow(images[k][0], cmap="gray", origin="lower")
            ax.set_title(titles[k], fontsize=6, color="tab:blue")
        else:
            ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def _find_stamps(data: str, ids: list[str]) -> dict[str, np.ndarray]:
    """Images of a few stamps by id, streaming the dataset once."""
    m = st.read_manifest(data)
    want = pa.array(ids, pa.string())
    found = {}
    for batch in st.iter_batches(data, columns=[st.ID, st.IMAGE]):
        tbl = pa.Table.from_batches([batch])
        hit = tbl.filter(pc.is_in(tbl.column(st.ID), value_set=want))
        if hit.num_rows:
            imgs = st.decode_images(hit.column(st.IMAGE), m.spec.shape)
            for sid, img in zip(hit.column(st.ID).to_pylist(), imgs):
                found[sid] = np.array(img)
        if len(found) == len(ids):
            break
    return found


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
@dataclass
class EvaluateResult:
    out: str
    report: dict
    html: str
    plots: list = field(default_factory=list)


def _check_prob_columns(path: str, class_names: list[str], columns: list[str]) -> None:
    """Each class must have its own ``p_<class>`` column (tables scored before names were checked may not)."""
    check_class_names(class_names, f"{path} (its classes)", "score the table again with this stampray")
    missing = [f"{prob_column(c)} ({c})" for c in class_names if prob_column(c) not in columns]
    if missing:
        msg = (f"{path} has no probability column for {', '.join(missing)}; it was scored by an older stampray "
               f"or another tool: score the table again")
        raise ValueError(msg)


def _check_std_columns(path: str, class_names: list[str], columns: list[str]) -> None:
    """Accuracy against uncertainty needs the ``p_<class>_std`` column of every class, or of none."""
    have = [std_column(c) for c in class_names if std_column(c) in columns]
    if have and len(have) < len(class_names):
        missing = [std_column(c) for c in class_names if std_column(c) not in columns]
        logger.warning("evaluate: warning: %s has %s but not %s: no accuracy against uncertainty for it; score "
                       "again with --tta K or --mc-dropout K", path, ", ".join(have), ", ".join(missing))


def _check_labels(path: str, t: pa.Table, class_names: list[str]) -> None:
    """Labels must index the classes (scikit-learn's metrics would leave other values out silently)."""
    if st.LABEL not in t.column_names:
        msg = f"{path} has no {st.LABEL} column: it scored unlabelled stamps; evaluate needs labelled scores"
        raise ValueError(msg)
    lab = t.column(st.LABEL)
    bad = pc.or_(pc.less(lab, 0), pc.greater_equal(lab, len(class_names)))
    n = pc.sum(bad).as_py() or 0
    if n:
        values = sorted(set(lab.filter(bad).to_pylist()))
        shown = ", ".join(map(str, values[:5])) + (", ..." if len(values) > 5 else "")
        msg = (f"{path} has {n} {'row' if n == 1 else 'rows'} labelled {shown}, outside 0..{len(class_names) - 1} "
               f"for its {len(class_names)} classes ({', '.join(class_names)}); score a stamp table whose labels "
               f"match the model's classes")
        raise ValueError(msg)


def table_labels(paths, names=()) -> list[str]:
    """One label per score table: ``--names`` when given, else the shortest trailing part of each path that
    tells them apart (``a/cnn/scores`` and ``b/cnn/scores`` become ``a/cnn/scores`` and ``b/cnn/scores``,
    ``s1`` and ``s2`` stay ``s1`` and ``s2``). Refuses a table given twice and repeated names."""
    if names:
        seen = [n for i, n in enumerate(names) if n in names[:i]]
        if seen:
            msg = f"--names gives {seen[0]!r} twice; give each score table a name of its own"
            raise ValueError(msg)
        return list(names)
    norm = [str(p) if "://" in str(p) else os.path.normpath(str(p)) for p in paths]
    parts = [[p for p in path.replace("://", "/").split("/") if p] or [path] for path in norm]
    whole = ["/".join(p) for p in parts]
    twice = [i for i, w in enumerate(whole) if w in whole[:i]]
    if twice:
        msg = f"--scores {paths[whole.index(whole[twice[0]])]} is given twice"
        raise ValueError(msg)
    for k in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-k:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return whole


def evaluate(settings: EvaluateSettings) -> EvaluateResult:
    """Build the report for one or more score tables."""
    t0 = time.time()
    inputs = [("--data", settings.data), ("--run", settings.run), *(("--scores", p) for p in settings.scores)]
    st.check_separate(settings.out, inputs)
    if settings.tensorboard:  # inside --run is fine: training's own TensorBoard logs are there
        st.check_separate(settings.tensorboard, [i for i in inputs if i[0] != "--run"], flag="--tensorboard")
    table_labels(settings.scores, settings.names)  # two tables under one name: refused before any work
    if _is_uri(settings.tensorboard):  # fail before any work, not after it
        _check_uri_dir(settings.tensorboard, "--tensorboard")
    if _is_uri(settings.out):
        _check_uri_dir(settings.out, "--out")
    outfiles.check(settings.out, REPORT_FILES)
    with output_lock(settings.out, "evaluate"):
        work = tempfile.mkdtemp(prefix="stampray-report-")  # the report is built here, put in place when complete
        try:
            return _evaluate(settings, work, t0)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _legacy_report(out: str) -> set[str]:
    """The files of a report written before the outfiles marker: those its report.json lists."""
    try:
        doc = json.loads(st.read_text(st.join(out, "report.json")))
    except (OSError, ValueError, UnicodeDecodeError):
        return set()
    if not (isinstance(doc, dict) and {"settings", "provenance", "class_names", "tables", "results", "plots"} <= set(doc)
            and isinstance(doc["plots"], dict)):
        return set()
    return {"report.json", "report.html", *(str(v) for v in doc["plots"].values())}


REPORT_FILES = outfiles.Files("evaluate", "--out", ("report.html", "report.json", "roc.png"), ".png", _legacy_report)


def _read_and_score(settings: EvaluateSettings, progress: Progress) -> tuple[dict, dict, list[str]]:
    """Each score table read, checked and evaluated: (results by table name, table facts, class names)."""
    labels = table_labels(settings.scores, settings.names)
    results, meta = {}, {}
    class_names = None
    seen_by: set[str] = set()
    for i, path in enumerate(settings.scores):
        progress.say(f"reading {path} ({i + 1}/{len(settings.scores)})")
        doc = score_manifest(path)
        names = list(doc["class_names"])
        if class_names is None:
            class_names = names
        elif names != class_names:
            msg = f"{path} scores classes {names}, the first table {class_names}; compare like with like"
            raise ValueError(msg)
        _check_split(path, doc, settings)
        t = read_scores(path, skip=(FEATURES,))
        _check_prob_columns(path, names, t.column_names)
        _check_std_columns(path, names, t.column_names)
        total = t.num_rows
        if st.LABEL in t.column_names:
            t = t.filter(t.column(st.LABEL).is_valid())
        if settings.split != "all" and st.SPLIT in t.column_names:
            t = t.filter(pc.equal(t.column(st.SPLIT), settings.split))
        if t.num_rows == 0:
            msg = (f"{path} has no labelled rows in split {settings.split!r} ({total} rows in all); "
                   f"try --split all, or score labelled data")
            raise ValueError(msg)
        _check_labels(path, t, class_names)
        for col in settings.by:
            if col in t.column_names:
                typ = t.schema.field(col).type
                if not (pa.types.is_integer(typ) or pa.types.is_floating(typ)):
                    msg = (f"--by {col}: that column of {path} holds {typ} values; --by takes numeric columns "
                           f"(an SNR, a magnitude), kept with 'score --keep'")
                    raise ValueError(msg)
                seen_by.add(col)
        name = labels[i]
        results[name] = evaluate_table(t, class_names, settings)
        meta[name] = {"scores": path, "model": doc.get("model_tag"), "data": doc.get("data"), "split": doc.get("split"),
                      "rows_in_table": total, "rows_evaluated": t.num_rows, "set_aside_at_scoring": doc["set_aside"]}
    missing = [c for c in settings.by if c not in seen_by]
    if missing:
        msg = (f"--by {', '.join(missing)}: no score table has {'that column' if len(missing) == 1 else 'those columns'}"
               f"; score with --keep {','.join(missing)} to carry it from the stamp table")
        raise ValueError(msg)
    return results, meta, class_names


def _file_safe(name: str) -> str:
    """A table or column name as part of a plot's file name: letters, digits, - and _ only."""
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def _draw(settings: EvaluateSettings, results: dict, class_names: list[str], out: str) -> dict[str, str]:
    """Every plot of the report, as PNGs in ``out``: {key: path}."""
    plots: dict[str, str] = {"roc": plot_roc(results, os.path.join(out, "roc.png"))}
    for name, res in results.items():
        safe = _file_safe(name)
        plots[f"confusion:{name}"] = plot_confusion(res["confusion"], class_names, f"{name}: confusion",
                                                    os.path.join(out, f"confusion_{safe}.png"))
        plots[f"confident:{name}"] = plot_confusion(res["confident"]["confusion"], class_names,
                                                    f"{name}: confident subset", os.path.join(out, f"confident_{safe}.png"))
        plots[f"calibration:{name}"] = plot_calibration(res["calibration"], f"{name}: reliability",
                                                        os.path.join(out, f"calibration_{safe}.png"))
        if "uncertainty" in res:
            plots[f"uncertainty:{name}"] = plot_uncertainty(res["uncertainty"], res["accuracy"],
                                                            f"{name}: accuracy against uncertainty",
                                                            os.path.join(out, f"uncertainty_{safe}.png"))
        plots[f"hist:{name}"] = plot_histograms(res, class_names, f"{name}: probabilities by true class",
                                                os.path.join(out, f"histograms_{safe}.png"))
        if settings.data and res["misclassified"]["rows"]:
            rows = res["misclassified"]["rows"][:settings.misclassified_grid]
            found = _find_stamps(settings.data, [r["stamp_id"] for r in rows])
            lost = [r["stamp_id"] for r in rows if r["stamp_id"] not in found]
            if len(lost) == len(rows):
                msg = (f"--data {settings.data} holds none of the {len(rows)} misclassified stamps of {name} "
                       f"({', '.join(lost[:3])}{' ...' if len(lost) > 3 else ''}); give the stamp table these "
                       f"scores came from, or leave --data out")
                raise ValueError(msg)
            if lost:
                logger.warning("evaluate: warning: %d of the %d misclassified stamps of %s are not in --data %s "
                               "(%s); the grid shows the others", len(lost), len(rows), name, settings.data,
                               ", ".join(lost[:5]))
            rows = [r for r in rows if r["stamp_id"] in found]
            if rows:
                titles = [f"true {r['label']}, pred {r['pred']}\np={r['probabilities'][r['pred']]:.3f}" for r in rows]
                plots[f"misclassified:{name}"] = plot_stamps(np.stack([found[r["stamp_id"]] for r in rows]), titles,
                                                             os.path.join(out, f"misclassified_{safe}.png"))
    for col in settings.by:  # every one is in some table (_read_and_score)
        plots[f"by:{col}"] = plot_by(results, col, os.path.join(out, f"accuracy_by_{_file_safe(col)}.png"))
    return plots


def _evaluate(settings: EvaluateSettings, out: str, t0: float) -> EvaluateResult:
    """The report, written into the local directory ``out`` (``settings.out`` itself when it is local)."""
    progress = Progress("evaluate", len(settings.scores), settings.progress, unit="score tables")
    history = _read_history(settings.run) if settings.run else []  # every input checked before the work
    if settings.data:
        st.read_manifest(settings.data)
    results, meta, class_names = _read_and_score(settings, progress)
    if settings.run:
        _check_run_model(settings.run, {m["scores"]: m["model"] for m in meta.values()})
    progress.say(f"drawing the plots of {len(results)} score table(s)")
    plots = _draw(settings, results, class_names, out)
    if history:
        plots["curves"] = plot_curves(history, os.path.join(out, "training_curves.png"))

    report = {"settings": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()},
              "provenance": provenance(),
              "class_names": class_names, "tables": meta,
              "results": {n: {k: v for k, v in r.items() if k != "_arrays"} for n, r in results.items()},
              "training": history, "plots": {k: os.path.basename(v) for k, v in plots.items()},
              "seconds": round(time.time() - t0, 2)}
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, "report.html"), "w") as f:
        f.write(render_html(report, plots))
    names = [os.path.basename(p) for p in plots.values()]
    if _is_uri(settings.out):
        progress.say(f"uploading the report to {settings.out}")
    try:
        outfiles.publish(out, [*names, "report.json", "report.html"], settings.out, REPORT_FILES)  # the page last
    except OSError as e:
        raise _storage_error("--out", settings.out, e, "write") from None
    html_path = st.join(settings.out, "report.html")
    plot_paths = [st.join(settings.out, n) for n in names]
    if settings.tensorboard:
        progress.say(f"writing TensorBoard events to {settings.tensorboard}")
        if _is_uri(settings.tensorboard):
            tb = tempfile.mkdtemp(prefix="stampray-report-tb-")
            try:
                to_tensorboard(tb, results, class_names, plots)
                _upload(tb, None, settings.tensorboard, "--tensorboard")
            finally:
                shutil.rmtree(tb, ignore_errors=True)
        else:
            to_tensorboard(settings.tensorboard, results, class_names, plots)
    progress.close()
    return EvaluateResult(settings.out, report, html_path, plot_paths)


# --------------------------------------------------------------------------------------------------
# Object storage: URIs go through pyarrow's filesystems
# --------------------------------------------------------------------------------------------------
def _is_uri(path: str | None) -> bool:
    return path is not None and "://" in str(path)


def _storage_error(flag: str, path: str, e: Exception, doing: str) -> OSError:
    """A one-line error naming the path and what to check (the CLI prints these without a traceback)."""
    detail = st.one_line(e).replace(" To create buckets, enable the allow_bucket_creation option.", "")
    msg = (f"{flag} {path}: cannot {doing} ({detail}); check that the bucket exists and that the AWS "
           f"credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, and AWS_ENDPOINT_URL for an "
           f"S3-compatible store) allow it")
    low = detail.lower()
    if isinstance(e, FileNotFoundError) or "not found" in low or "does not exist" in low or "no_such" in low:
        return FileNotFoundError(msg)
    return PermissionError(msg)


def _resolve(path: str, flag: str) -> tuple[pafs.FileSystem, str]:
    try:
        return st.resolve(path)
    except (ValueError, pa.ArrowException) as e:  # an unknown scheme, a malformed URI
        msg = f"{flag} {path}: {st.one_line(e)}; give a local path or a URI such as s3://bucket/prefix"
        raise ValueError(msg) from None


def _check_uri_dir(path: str, flag: str) -> None:
    """Before any work: the URI opens, is not a file, and its directory can be created."""
    fs, p = _resolve(path, flag)
    try:
        info = fs.get_file_info(p)
    except OSError as e:
        raise _storage_error(flag, path, e, "read") from None
    if info.type == pafs.FileType.File:
        msg = f"{flag} {path} is a file; give a directory (a prefix) for the output"
        raise ValueError(msg)
    try:
        fs.create_dir(p, recursive=True)
    except OSError as e:
        raise _storage_error(flag, path, e, "create the directory") from None


def _upload(local_dir: str, names: list[str] | None, dest: str, flag: str) -> None:
    """Copy ``names`` (in this order) from ``local_dir`` to the URI ``dest``; every file when ``names`` is None."""
    fs, p = _resolve(dest, flag)
    local = pafs.LocalFileSystem()
    try:
        fs.create_dir(p, recursive=True)
        if names is None:
            pafs.copy_files(local_dir, p, source_filesystem=local, destination_filesystem=fs)
            return
        for name in dict.fromkeys(names):
            pafs.copy_files(os.path.join(local_dir, name), f"{p.rstrip('/')}/{name}", source_filesystem=local,
                            destination_filesystem=fs)
    except OSError as e:
        raise _storage_error(flag, dest, e, "write") from None


def _check_split(path: str, doc: dict, settings: EvaluateSettings) -> None:
    """The ``split`` column of the scores must be the split the model was trained with (``score`` takes it
    from the checkpoint and records it). Scores whose split is not known to be the training's are
    evaluated with a warning; a ``--run`` trained with other fractions is refused."""
    if settings.split == "all":
        return
    rec = doc.get("split")
    if rec is None:
        logger.warning("evaluate: warning: %s was scored before stampray recorded splits; its '%s' rows follow the "
                       "fractions score was given then, which may differ from training's (score again to be sure)",
                       path, settings.split)
        return
    if rec.get("source") != "checkpoint":
        logger.warning("evaluate: warning: the model behind %s does not record its training split; its '%s' rows "
                       "may include stamps it trained on", path, settings.split)
    if settings.run:
        trained = _run_settings(settings.run).get("fractions")
        if trained is not None and [round(float(f), 9) for f in trained] != \
                [round(float(f), 9) for f in rec["fractions"]]:
            msg = (f"--run {settings.run} trained with split fractions {trained}, but {path} was split with "
                   f"{rec['fractions']}: its '{settings.split}' rows are not that run's; score with the run's "
                   f"checkpoint")
            raise ValueError(msg)


def _run_settings(run: str) -> dict:
    """A run's ``settings.json`` as train wrote it ({} for a run without one)."""
    path = st.join(run, "settings.json")
    return json.loads(st.read_text(path)) if st.exists(path) else {}


def _check_run_model(run: str, tags: dict[str, str | None]) -> None:
    """``--run``'s training curves go beside the scores' metrics: refuse a run that trained another model
    than every score table's (``tags``: table -> its ``model@weights`` tag), and warn when the weights of
    none of them are the run's best.pt or last.pt (another run of the same model, say)."""
    trained = _run_settings(run).get("model")
    known = {t: tag for t, tag in tags.items() if tag}
    if not trained or not known:  # a run or scores of an earlier stampray: nothing to compare
        return
    same = {t: tag for t, tag in known.items() if tag.split("@")[0] == trained}
    if not same:
        shown = ", ".join(f"{t} by {tag}" for t, tag in known.items())
        msg = (f"--run {run} trained a {trained}, but the scores come from another model ({shown}): its training "
               f"curves are not theirs; give the run that trained the scoring checkpoint")
        raise ValueError(msg)
    from . import checkpoint as ck

    ours = set()
    for name in ("best.pt", "last.pt"):
        if st.exists(st.join(run, name)):
            try:
                bundle = ck.load_bundle(st.join(run, name))
            except ValueError:  # not a checkpoint (damaged, say): nothing to compare with
                continue
            ours.add(f"{bundle['model']}@{ck.weights_hash(bundle)}")
    if ours and not ours & set(same.values()):
        logger.warning("evaluate: warning: the weights behind %s (%s) are neither %s's best.pt nor its last.pt "
                       "(%s): its training curves may be another run's", ", ".join(same), ", ".join(
                           sorted(set(same.values()))), run, ", ".join(sorted(ours)))


def _read_history(run: str) -> list[dict]:
    """The epochs of ``RUNDIR/metrics.jsonl`` (local or a URI)."""
    if _is_uri(run):
        _resolve(run, "--run")
    path = st.join(run, "metrics.jsonl")
    try:
        found = st.exists(path)
        text = st.read_text(path) if found else ""
    except OSError as e:
        if not _is_uri(run):
            raise
        raise _storage_error("--run", run, e, "read metrics.jsonl") from None
    if not found:
        msg = f"--run {run} holds no metrics.jsonl; give a run directory written by 'stampray train'"
        raise FileNotFoundError(msg)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _img(path: str, alt: str) -> str:
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _fmt(v, digits=4):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def _calibration_html(name: str, r: dict, plots: dict[str, str]) -> str:
    """The calibration paragraph of one score table: ECE, the reliability diagram, and accuracy against
    uncertainty when the table has ``p_<class>_std`` columns (a note when it has not)."""
    cal = r["calibration"]
    parts = [f"<h3>Calibration</h3><p>expected calibration error (ECE, {html.escape(cal['rule'])}): "
             f"<b>{_fmt(cal['ece'])}</b></p>"]
    if f"calibration:{name}" in plots:
        parts.append(_img(plots[f"calibration:{name}"], f"reliability diagram {name}"))
    unc = r.get("uncertainty")
    if unc is None:
        parts.append("<p>No accuracy against uncertainty: the scores have no p_&lt;class&gt;_std columns "
                     "(score with --tta K or --mc-dropout K).</p>")
        return "".join(parts)
    parts.append(f"<h3>Accuracy against uncertainty</h3><p>AUC of the std in telling wrong predictions from right "
                 f"ones: <b>{_fmt(unc['error_auc'])}</b> (0.5: the spread says nothing); mean std "
                 f"{_fmt(unc['mean_std_correct'])} when right, {_fmt(unc['mean_std_wrong'])} when wrong.</p>"
                 "<table><tr><th>std from</th><th>to</th><th>stamps</th><th>accuracy</th><th>95% interval</th></tr>")
    for b in unc["bins"]:
        ci = f"{b['ci'][0]:.3f} – {b['ci'][1]:.3f}" if b["ci"] else "–"
        parts.append(f"<tr><td>{_fmt(b['lo'], 5)}</td><td>{_fmt(b['hi'], 5)}</td><td>{b['n']}</td>"
                     f"<td>{_fmt(b['accuracy'])}</td><td>{ci}</td></tr>")
    parts.append("</table>")
    if f"uncertainty:{name}" in plots:
        parts.append(_img(plots[f"uncertainty:{name}"], f"accuracy against uncertainty {name}"))
    return "".join(parts)


def render_html(report: dict, plots: dict[str, str]) -> str:
    """One self-contained page: every plot embedded as a data URI."""
    names = report["class_names"]
    res = report["results"]
    s = report["settings"]
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>stampray report</title><style>",
             "body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;"
             "margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}"
             "img{max-width:100%;margin:.3em}h2{border-bottom:1px solid #ddd}</style></head><body>",
             "<h1>stampray evaluation</h1>",
             f"<p>split: <b>{html.escape(s['split'])}</b>; classes: {html.escape(', '.join(names))}</p>",
             "<h2>Summary</h2><table><tr><th>scores</th><th>model</th><th>stamps</th><th>accuracy</th><th>AUC</th>"
             f"<th>FPR at TPR={s['tpr']}</th><th>FNR at FPR={s['fpr']}</th><th>macro F1</th>"
             "<th>confident share</th><th>confident accuracy</th><th>ECE</th></tr>"]
    for name, r in res.items():
        first = next(iter(r["roc"].values()))
        parts.append(f"<tr><td>{html.escape(name)}</td><td>{_fmt(report['tables'][name]['model'])}</td>"
                     f"<td>{r['n']}</td><td>{_fmt(r['accuracy'])}</td><td>{_fmt(r['auc'])}</td>"
                     f"<td>{_fmt(first['fpr_at_tpr'])}</td><td>{_fmt(first['fnr_at_fpr'])}</td>"
                     f"<td>{_fmt(r['macro_f1'])}</td><td>{_fmt(r['confident']['share'])}</td>"
                     f"<td>{_fmt(r['confident']['accuracy'])}</td><td>{_fmt(r['calibration']['ece'])}</td></tr>")
    parts.append("</table>")
    if "roc" in plots:
        parts.append(_img(plots["roc"], "ROC curves"))
    for name, r in res.items():
        parts.append(f"<h2>{html.escape(name)}</h2><table><tr><th>class</th><th>precision</th><th>recall</th>"
                     "<th>F1</th><th>support</th></tr>")
        for c in r["per_class"]:
            parts.append(f"<tr><td>{html.escape(c['class'])}</td><td>{_fmt(c['precision'])}</td>"
                         f"<td>{_fmt(c['recall'])}</td><td>{_fmt(c['f1'])}</td><td>{c['support']}</td></tr>")
        parts.append("</table>")
        for key in ("confusion", "confident", "hist", "misclassified"):
            if f"{key}:{name}" in plots:
                parts.append(_img(plots[f"{key}:{name}"], f"{key} {name}"))
        parts.append(_calibration_html(name, r, plots))
        wrong = r["misclassified"]
        parts.append(f"<p>{wrong['n']} misclassified stamps (most confident first; all in report.json):</p>"
                     "<table><tr><th>stamp_id</th><th>true</th><th>predicted</th>"
                     + "".join(f"<th>p({html.escape(c)})</th>" for c in names) + "</tr>")
        for row in wrong["rows"][:25]:
            parts.append(f"<tr><td>{html.escape(row['stamp_id'])}</td><td>{html.escape(row['label'])}</td>"
                         f"<td>{html.escape(row['pred'])}</td>"
                         + "".join(f"<td>{row['probabilities'][c]:.4f}</td>" for c in names) + "</tr>")
        parts.append("</table>")
    for key, path in plots.items():
        if key.startswith("by:"):
            parts.append(f"<h2>Completeness and false positives against {html.escape(key[3:])}</h2>"
                         + _img(path, key))
    if "curves" in plots:
        parts.append("<h2>Training</h2>" + _img(plots["curves"], "training curves"))
    parts.append(f"<p style='color:#888'>made by stampray in {report['seconds']} s</p></body></html>")
    return "".join(parts)


def to_tensorboard(logdir: str, results: dict, class_names, plots: dict[str, str]) -> None:
    """The report's headline numbers, PR curves and confusion images as TensorBoard summaries."""
    from torch.utils.tensorboard import SummaryWriter

    for name, res in results.items():
        w = SummaryWriter(os.path.join(logdir, "evaluate", name))
        for key in ("accuracy", "auc", "macro_f1"):
            if res[key] is not None:
                w.add_scalar(f"evaluate/{key}", res[key], 0)
        first = next(iter(res["roc"].values()))
        for key in ("fpr_at_tpr", "fnr_at_fpr"):
            if first[key] is not None:
                w.add_scalar(f"evaluate/{key}", first[key], 0)
        if res["confident"]["share"] is not None:
            w.add_scalar("evaluate/confident_share", res["confident"]["share"], 0)
        arr = res["_arrays"]
        k = len(class_names)
        if res["calibration"]["ece"] is not None:
            w.add_scalar("evaluate/ece", res["calibration"]["ece"], 0)
        for c in positive_classes(k):
            w.add_pr_curve(f"evaluate/pr_{class_names[c]}", arr["labels"] == c, arr["probs"][:, c], 0)
        from .train import _confusion_figure

        w.add_figure("evaluate/confusion_matrix", _confusion_figure(res["confusion"]["counts"], class_names, name), 0)
        w.close()
