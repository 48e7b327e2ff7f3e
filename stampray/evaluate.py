"""Evaluation reports from score tables: ``stampray evaluate``.

For every score table (with labels): confusion matrix (counts and row-normalised), per-class precision,
recall and F1, accuracy; ROC curves and AUC (one-vs-rest beyond two classes); the false-positive rate at a
fixed true-positive rate and the false-negative rate at a fixed false-positive rate (the figures ZTF's
real/bogus papers quote); a threshold sweep; the notebooks' "confident subset" (p < 0.01 or p > 0.99);
probability histograms per true class; the misclassified stamps (ids, probabilities and, with the stamp
table, a picture grid); training curves from a run directory; completeness and false-positive rate against
numeric metadata (SNR), in equal-count bins with Wilson intervals. Several score tables are compared side by
side. Output: ``report.json`` with every number, PNG plots and one self-contained ``report.html`` (images
embedded), plus TensorBoard scalars when asked.

Every path may be local or a URI (``s3://bucket/prefix``). For a URI ``--out`` the report is built in a
local temporary directory and uploaded through pyarrow's filesystem when it is complete (PNGs first,
``report.json``, then ``report.html`` last); a URI ``--tensorboard`` logdir gets event files written
locally and then uploaded; ``--run`` and ``--scores`` are read through the filesystem.
"""

from __future__ import annotations

import base64
import html
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from . import table as st
from .lock import output_lock
from .classes import check_class_names, prob_column
from .progress import Progress
from .provenance import provenance
from .score import read_scores, score_manifest

SPLITS = ("test", "val", "train", "all")


@dataclass(frozen=True)
class EvaluateSettings:
    """Settings of ``stampray evaluate``; see ``stampray evaluate --help``."""

    scores: tuple[str, ...]
    out: str
    data: str | None = None
    run: str | None = None
    by: tuple[str, ...] = ()
    tensorboard: str | None = None
    split: str = "test"
    tpr: float = 0.95
    fpr: float = 0.01
    confident: float = 0.01
    misclassified_grid: int = 20
    names: tuple[str, ...] = ()
    progress: bool = True  # a line per stage on stderr (reading each table, drawing, writing)

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


# --------------------------------------------------------------------------------------------------
# Metrics (plain numpy / scikit-learn; each returns JSON-ready values)
# --------------------------------------------------------------------------------------------------
def confusion(labels: np.ndarray, pred: np.ndarray, k: int) -> dict:
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (labels, pred), 1)
    rows = cm.sum(axis=1, keepdims=True)
    return {"counts": cm.tolist(), "normalized": np.divide(cm, np.maximum(rows, 1)).round(6).tolist()}


def per_class(labels: np.ndarray, pred: np.ndarray, k: int, names) -> list[dict]:
    out = []
    for c in range(k):
        tp = int(((pred == c) & (labels == c)).sum())
        fp = int(((pred == c) & (labels != c)).sum())
        fn = int(((pred != c) & (labels == c)).sum())
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out.append({"class": names[c], "precision": precision, "recall": recall, "f1": f1,
                    "support": int((labels == c).sum())})
    return out


def roc(labels_bin: np.ndarray, score: np.ndarray, tpr_at: float, fpr_at: float) -> dict:
    """ROC curve, AUC, FPR at a fixed TPR and FNR at a fixed FPR, for one positive class."""
    from sklearn.metrics import roc_auc_score, roc_curve

    if labels_bin.all() or not labels_bin.any():
        return {"auc": None, "fpr": [], "tpr": [], "thresholds": [], "fpr_at_tpr": None, "fnr_at_fpr": None}
    fpr, tpr, thr = roc_curve(labels_bin, score)
    auc = float(roc_auc_score(labels_bin, score))
    # smallest FPR among operating points reaching the TPR; largest TPR among points within the FPR
    fpr_at_tpr = float(fpr[np.argmax(tpr >= tpr_at)])
    ok = fpr <= fpr_at
    fnr_at_fpr = float(1.0 - tpr[ok].max()) if ok.any() else 1.0
    thr = np.where(np.isfinite(thr), thr, 1.0)
    return {"auc": auc, "fpr": fpr.round(6).tolist(), "tpr": tpr.round(6).tolist(), "thresholds": thr.round(6).tolist(),
            "fpr_at_tpr": fpr_at_tpr, "fnr_at_fpr": fnr_at_fpr}


def threshold_sweep(labels_bin: np.ndarray, score: np.ndarray, steps: int = 99) -> list[dict]:
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

    Class 0 is the negative class (noise, bogus) and every other class a positive. For each positive class
    c, *completeness* is the recall ``pred == c`` among the stamps of true class c, in equal-count bins of
    that class's own values; the *false-positive rate* is the share of true class-0 stamps predicted as any
    other class, in equal-count bins of the class-0 stamps' values (for two classes, the usual FPR). Each
    curve has bins of its own population, so every point rests on the same number of stamps. Rows whose
    value is not finite are left out and counted (``missing``)."""
    ok = np.isfinite(values)
    values, labels, pred = values[ok], labels[ok], pred[ok]
    neg = labels == 0
    return {"negative_class": class_names[0], "missing": int((~ok).sum()),
            "completeness": {class_names[c]: rate_by(values[labels == c], pred[labels == c] == c, bins)
                             for c in range(1, len(class_names))},
            "false_positive_rate": rate_by(values[neg], pred[neg] != 0, bins)}


def evaluate_table(t: pa.Table, class_names: list[str], settings: EvaluateSettings) -> dict:
    """Every number of the report for one score table (rows with labels and without errors)."""
    k = len(class_names)
    probs = np.stack([t.column(prob_column(c)).to_numpy(zero_copy_only=False) for c in class_names], axis=1)
    labels = t.column(st.LABEL).to_numpy(zero_copy_only=False).astype(np.int64)
    pred = probs.argmax(axis=1)
    correct = pred == labels
    res: dict = {"n": int(len(labels)), "accuracy": float(correct.mean()) if len(labels) else None,
                 "confusion": confusion(labels, pred, k), "per_class": per_class(labels, pred, k, class_names)}
    res["macro_f1"] = float(np.mean([c["f1"] for c in res["per_class"]])) if k else None
    positive = range(1, 2) if k == 2 else range(k)
    res["roc"] = {class_names[c]: roc(labels == c, probs[:, c], settings.tpr, settings.fpr) for c in positive}
    aucs = [r["auc"] for r in res["roc"].values() if r["auc"] is not None]
    res["auc"] = float(np.mean(aucs)) if aucs else None
    lo = settings.confident
    if k == 2:
        res["threshold_sweep"] = threshold_sweep(labels == 1, probs[:, 1])
        conf = (probs[:, 1] < lo) | (probs[:, 1] > 1 - lo)
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
    score_col = probs[:, 1] if k == 2 else probs.max(axis=1)
    edges = np.linspace(0, 1, 21)
    for c in range(k):
        h, _ = np.histogram(score_col[labels == c], bins=edges)
        res["histograms"][class_names[c]] = h.tolist()
    res["by"] = {}
    for col in settings.by:
        if col in t.column_names:
            res["by"][col] = completeness_by(t.column(col).to_numpy(zero_copy_only=False).astype(float), labels,
                                             pred, class_names)
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
    ax.set_xlabel(f"p({names[1]})" if len(names) == 2 else "max probability")
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
        if not rows:
            return
        x = np.array([r["median"] for r in rows])
        y = np.array([r["rate"] for r in rows])
        ci = np.array([r["ci"] for r in rows])
        ax.errorbar(x, y, xerr=[x - [r["lo"] for r in rows], [r["hi"] for r in rows] - x],
                    yerr=[y - ci[:, 0], ci[:, 1] - y], fmt="o-", ms=3, capsize=2, lw=1, label=label)
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
    twice = [w for i, w in enumerate(whole) if w in whole[:i]]
    if twice:
        msg = f"--scores {twice[0]} is given twice"
        raise ValueError(msg)
    for k in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-k:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return whole


def evaluate(settings: EvaluateSettings) -> EvaluateResult:
    """Build the report for one or more score tables."""
    t0 = time.time()
    st.check_separate(settings.out, {"--data": settings.data, "--run": settings.run,
                                     **{f"--scores {p}": p for p in settings.scores}})
    table_labels(settings.scores, settings.names)  # two tables under one name: refused before any work
    remote = _is_uri(settings.out)
    if _is_uri(settings.tensorboard):  # fail before any work, not after it
        _check_uri_dir(settings.tensorboard, "--tensorboard")
    if remote:  # build the report here, upload it when complete
        _check_uri_dir(settings.out, "--out")
    with output_lock(settings.out, "evaluate"):
        work = tempfile.mkdtemp(prefix="stampray-report-") if remote else settings.out
        try:
            return _evaluate(settings, work, t0)
        finally:
            if remote:
                shutil.rmtree(work, ignore_errors=True)


def _evaluate(settings: EvaluateSettings, out: str, t0: float) -> EvaluateResult:
    """The report, written into the local directory ``out`` (``settings.out`` itself when it is local)."""
    labels = table_labels(settings.scores, settings.names)
    results, meta = {}, {}
    class_names = None
    progress = Progress("evaluate", len(settings.scores), settings.progress, unit="score tables")
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
        t = read_scores(path)
        _check_prob_columns(path, names, t.column_names)
        total = t.num_rows
        if st.LABEL in t.column_names:
            t = t.filter(t.column(st.LABEL).is_valid())
        if settings.split != "all" and st.SPLIT in t.column_names:
            t = t.filter(pc.equal(t.column(st.SPLIT), settings.split))
        if t.num_rows == 0:
            msg = (f"{path} has no labelled rows in split {settings.split!r} ({total} rows in all); "
                   f"try --split all, or score labelled data")
            raise ValueError(msg)
        name = labels[i]
        results[name] = evaluate_table(t, class_names, settings)
        meta[name] = {"scores": path, "model": doc.get("model_tag"), "data": doc.get("data"), "split": doc.get("split"),
                      "rows_in_table": total, "rows_evaluated": t.num_rows, "set_aside_at_scoring": doc["set_aside"]}

    plots: dict[str, str] = {}
    progress.say(f"drawing the plots of {len(results)} score table(s)")
    plots["roc"] = plot_roc(results, os.path.join(out, "roc.png"))
    for name, res in results.items():
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
        plots[f"confusion:{name}"] = plot_confusion(res["confusion"], class_names, f"{name}: confusion",
                                                    os.path.join(out, f"confusion_{safe}.png"))
        plots[f"confident:{name}"] = plot_confusion(res["confident"]["confusion"], class_names,
                                                    f"{name}: confident subset", os.path.join(out, f"confident_{safe}.png"))
        plots[f"hist:{name}"] = plot_histograms(res, class_names, f"{name}: probabilities by true class",
                                                os.path.join(out, f"histograms_{safe}.png"))
        if settings.data and res["misclassified"]["rows"]:
            rows = res["misclassified"]["rows"][:settings.misclassified_grid]
            found = _find_stamps(settings.data, [r["stamp_id"] for r in rows])
            rows = [r for r in rows if r["stamp_id"] in found]
            if rows:
                titles = [f"true {r['label']}, pred {r['pred']}\np={r['probabilities'][r['pred']]:.3f}" for r in rows]
                plots[f"misclassified:{name}"] = plot_stamps(np.stack([found[r["stamp_id"]] for r in rows]), titles,
                                                             os.path.join(out, f"misclassified_{safe}.png"))
    for col in settings.by:
        if any(col in res["by"] for res in results.values()):
            plots[f"by:{col}"] = plot_by(results, col, os.path.join(out, f"accuracy_by_{col}.png"))
        else:
            print(f"evaluate: warning: no score table has a column {col!r}; score with --keep {col}")
    history = []
    if settings.run:
        history = _read_history(settings.run)
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
    html_path = os.path.join(out, "report.html")
    with open(html_path, "w") as f:
        f.write(render_html(report, plots))
    plot_paths = list(plots.values())
    if _is_uri(settings.out):
        names = [os.path.basename(p) for p in plot_paths]
        progress.say(f"uploading the report to {settings.out}")
        _upload(out, [*names, "report.json", "report.html"], settings.out, "--out")  # report.html last
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
    detail = " ".join(str(e).split()).replace(" To create buckets, enable the allow_bucket_creation option.", "")
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
        msg = f"{flag} {path}: {' '.join(str(e).split())}; give a local path or a URI such as s3://bucket/prefix"
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
        print(f"evaluate: warning: {path} was scored before stampray recorded splits; its '{settings.split}' "
              f"rows follow the fractions score was given then, which may differ from training's (score again "
              f"to be sure)", file=sys.stderr)
        return
    if rec.get("source") != "checkpoint":
        print(f"evaluate: warning: the model behind {path} does not record its training split; its "
              f"'{settings.split}' rows may include stamps it trained on", file=sys.stderr)
    if settings.run:
        run_settings = st.join(settings.run, "settings.json")
        trained = json.loads(st.read_text(run_settings)).get("fractions") if st.exists(run_settings) else None
        if trained is not None and [round(float(f), 9) for f in trained] != \
                [round(float(f), 9) for f in rec["fractions"]]:
            msg = (f"--run {settings.run} trained with split fractions {trained}, but {path} was split with "
                   f"{rec['fractions']}: its '{settings.split}' rows are not that run's; score with the run's "
                   f"checkpoint")
            raise ValueError(msg)


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
             "<th>confident share</th><th>confident accuracy</th></tr>"]
    for name, r in res.items():
        first = next(iter(r["roc"].values()))
        parts.append(f"<tr><td>{html.escape(name)}</td><td>{_fmt(report['tables'][name]['model'])}</td>"
                     f"<td>{r['n']}</td><td>{_fmt(r['accuracy'])}</td><td>{_fmt(r['auc'])}</td>"
                     f"<td>{_fmt(first['fpr_at_tpr'])}</td><td>{_fmt(first['fnr_at_fpr'])}</td>"
                     f"<td>{_fmt(r['macro_f1'])}</td><td>{_fmt(r['confident']['share'])}</td>"
                     f"<td>{_fmt(r['confident']['accuracy'])}</td></tr>")
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
        for c in (range(1, 2) if k == 2 else range(k)):
            w.add_pr_curve(f"evaluate/pr_{class_names[c]}", arr["labels"] == c, arr["probs"][:, c], 0)
        from .train import _confusion_figure

        w.add_figure("evaluate/confusion_matrix", _confusion_figure(res["confusion"]["counts"], class_names, name), 0)
        w.close()
