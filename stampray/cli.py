"""Command line: parses arguments and dispatches to the verb functions; holds no logic of its own.

Flags fill each verb's frozen settings dataclass; ``--config FILE`` (JSON or TOML) fills it first, and only
flags given on the command line override it (unset flags never override defaults or the file).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields

from . import cutout as _cutout
from . import vet as _vet

S = argparse.SUPPRESS


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _shape(text: str) -> tuple[int, int, int]:
    parts = _csv(text)
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"--shape wants C,H,W such as 1,21,21, got {text!r}")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def _fractions(text: str) -> tuple[float, float, float]:
    parts = _csv(text)
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"--fractions wants TRAIN,VAL,TEST such as 0.7,0.1,0.2, got {text!r}")
    return values  # type: ignore[return-value]


def _class_file(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--class wants NAME=FILE (e.g. noise=stamps_noise.npy), got {text!r}")
    name, path = text.split("=", 1)
    return name.strip(), path.strip()


def _settings(cls, ns: argparse.Namespace, **fixed):
    """Build a settings dataclass: config file, then the flags the user actually gave; every value is
    checked against its field's declared type (:mod:`stampray.settings`)."""
    from .settings import coerce, load_config

    path = getattr(ns, "config", None)
    values = coerce(cls, load_config(path), f"--config {path}") if path else {}
    names = {f.name for f in fields(cls)}
    values.update(coerce(cls, {k: v for k, v in vars(ns).items() if k in names}, "command line"))
    values.update(fixed)
    return cls(**values)


def _common(p: argparse.ArgumentParser, ray: bool = True) -> None:
    """``--config`` for every verb; ``--address`` for the verbs that run on Ray (not ``evaluate``)."""
    if ray:
        p.add_argument("--address", default=S, help="Ray cluster to connect to (default: a private local Ray; "
                                                    "RAY_ADDRESS is honoured)")
    p.add_argument("--config", default=None, help="JSON or TOML file of settings; flags override it")


def _pool_flags(p: argparse.ArgumentParser) -> None:
    """The model-replica pool of score and occlude (see stampray/inference.py)."""
    p.add_argument("--use-gpu", dest="use_gpu", action="store_true", default=S,
                   help="one GPU per model replica; on an autoscaling cluster whose GPU nodes are not up yet, "
                        "ask the autoscaler for them and wait (see --wait-gpu)")
    p.add_argument("--max-actors", dest="max_actors", type=int, default=S,
                   help="most model replicas of the autoscaling pool (default: one per CPU core, or per GPU, "
                        "of every node the cluster has or its autoscaler can launch)")
    p.add_argument("--actors", type=int, default=S, help="a fixed pool of exactly N replicas instead")
    p.add_argument("--wait-gpu", dest="wait_gpu", type=float, default=S, metavar="SECONDS",
                   help="with --use-gpu, how long to wait for the autoscaler's GPU nodes (default 1800)")


def _class_flags(p: argparse.ArgumentParser) -> None:
    """How a model's classes meet the table's, for score and occlude (see stampray/classes.py)."""
    p.add_argument("--rename-classes", dest="rename_classes", action="store_true", default=S,
                   help="the table names its classes otherwise than the model (e.g. 0,1 against noise,source): "
                        "take the model's class names by position instead of refusing")


def _version_line() -> str:
    """``stampray 0.1.0 (ray 2.60.0, torch 2.13.0+cpu, python 3.11.7, commit abc123...)``."""
    from .provenance import provenance

    p = provenance()
    commit = f", commit {p['git_commit']}" if p["git_commit"] else ""
    return f"stampray {p['stampray']} (ray {p['ray']}, torch {p['torch']}, python {p['python']}{commit})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stampray",
        description="Train CNNs on image stamps and score millions of them with Ray.",
    )
    parser.add_argument("--version", action="version", version=_version_line())
    sub = parser.add_subparsers(dest="verb", metavar="VERB")

    p = sub.add_parser("synth", help="write a reproducible synthetic survey as a stamp table")
    p.add_argument("--kind", choices=["tno", "radio"], default=S, help="tno: 21x21 point sources vs noise "
                   "(default); radio: 64x64 four morphologies")
    p.add_argument("-n", type=int, default=S, help="number of stamps (default 20000)")
    p.add_argument("--seed", type=int, default=S, help="random seed (default 0)")
    p.add_argument("--out", required=True, help="output dataset directory (local path or URI)")
    p.add_argument("--shard-rows", dest="shard_rows", type=int, default=S, help="rows per shard (default 50000)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=S, help="no progress line")
    p.add_argument("--append", action="store_true", default=S,
                   help="add the stamps to the table at --out (use another --seed: the same seed repeats ids, "
                        "which are set aside)")
    p.add_argument("--positive-fraction", dest="positive_fraction", type=float, default=S,
                   help="tno: fraction of stamps holding a source (default 0.45, as the course data)")
    p.add_argument("--max-offset", dest="max_offset", type=float, default=S, metavar="PX",
                   help="tno: sources lie within PX of the centre (default 0.75: sub-pixel, as the course data; "
                        "4 for trial orbits that only nearly match)")
    p.add_argument("--trail", type=float, default=S, metavar="PX",
                   help="tno: smear each source by up to PX along a random direction (default 0)")
    _common(p)

    p = sub.add_parser("ingest", help="convert npy/npz, HDF5, FITS or pickle stamps into a stamp table")
    p.add_argument("--out", required=True, help="output dataset directory")
    src = p.add_argument_group("source (exactly one form)")
    src.add_argument("--class", dest="class_files", action="append", type=_class_file, default=S,
                     metavar="NAME=FILE", help="one array file per class, repeated (label = order given)")
    src.add_argument("--images", default=S, help="images array (.npy, or .npz with --images-key)")
    src.add_argument("--labels", default=S, help="labels array (.npy, or key of --images .npz)")
    src.add_argument("--hdf5", default=S, help="HDF5 file with --images-key and --labels-key datasets")
    src.add_argument("--fits", default=S, metavar="DIR", help="directory of FITS cutouts (needs --catalog)")
    src.add_argument("--catalog", default=S, metavar="CSV",
                     help="CSV: file,label[,id,metadata...]; without an id column a cutout's id is its file name "
                          "less the FITS extension (J123456.78+012345.6_r.fits -> J123456.78+012345.6_r)")
    src.add_argument("--size", type=int, default=S, help="FITS: centre-crop or pad every cutout to N x N")
    src.add_argument("--hdu", default=S, metavar="N|NAME[,NAME...]",
                     help="FITS: the HDU to read, by index or EXTNAME (default: the first HDU holding an image, so "
                          "an empty primary HDU is skipped); a comma list such as SCI,TEMPLATE,DIFF stacks those "
                          "HDUs as channels (each a 2-D image of one shape). A file without a named HDU is set "
                          "aside")
    src.add_argument("--header-keys", dest="header_keys", type=_csv, default=S, metavar="KEY,KEY",
                     help="FITS: copy these header values (from the first --hdu, else the primary header) into "
                          "columns named by the key in lower case (EXPTIME -> exptime): numbers as float64, other "
                          "values as strings, null where a file lacks the key. Cutouts with a celestial WCS also "
                          "get ra and dec (degrees, of the stamp centre; null without a WCS) unless the catalogue "
                          "or --header-keys already gives an ra or dec column, which is kept instead")
    src.add_argument("--pickle", default=S, help="pickled images (needs --allow-pickle)")
    p.add_argument("--images-key", dest="images_key", default=S, help="array/dataset name of the images "
                   "(default 'images')")
    p.add_argument("--labels-key", dest="labels_key", default=S, help="array/dataset name of the labels "
                   "(default 'labels' when the file has it, else the images are unlabelled; a key given here "
                   "must exist)")
    p.add_argument("--ids-key", dest="ids_key", default=S, help="array/dataset of stamp ids (default: "
                   "FILESTEM-ROW)")
    p.add_argument("--classes", type=_csv, default=S, help="class names in label order, e.g. noise,source")
    p.add_argument("--split", choices=["train", "val", "test"], default=S,
                   help="the whole input belongs to this fixed split (overrides the id hash)")
    p.add_argument("--layout", choices=["auto", "nchw", "nhwc", "nhw", "flat"], default=S,
                   help="image axis order (default auto; auto refuses an array that looks like one image "
                        "saved without its N axis, such as (21,21) or (21,21,3))")
    p.add_argument("--nonfinite", choices=["set-aside", "fail"], default=S,
                   help="rows with NaN/inf pixels: set aside in _errors (default) or fail")
    p.add_argument("--allow-pickle", dest="allow_pickle", action="store_true", default=S,
                   help="allow unpickling (runs code from the file: only for trusted sources)")
    p.add_argument("--shard-rows", dest="shard_rows", type=int, default=S, help="rows per shard (default 50000)")
    p.add_argument("--id-prefix", dest="id_prefix", default=S, help="prefix for generated stamp ids")
    p.add_argument("--parallel", choices=["auto", "on", "off"], default=S,
                   help="read the inputs with Ray tasks: auto (when the input makes more than one unit), on, off "
                        "(default auto); on a remote cluster inputs must be URIs or on a shared filesystem")
    p.add_argument("--unit-files", dest="unit_files", type=int, default=S, help="FITS cutouts per Ray task (default 500)")
    p.add_argument("--unit-rows", dest="unit_rows", type=int, default=S, help="array rows per Ray task (default 200000)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=S, help="no progress line")
    p.add_argument("--append", action="store_true", default=S,
                   help="add the stamps to the table at --out (same shape, classes and columns; a repeated id "
                        "is set aside); the manifest is replaced in one step, so readers see the table "
                        "before or after")
    _common(p)

    _cutout.add_parser(sub, _common)

    p = sub.add_parser("models", help="list the registered models with parameters and FLOPs")
    p.add_argument("--shape", type=_shape, default=(1, 21, 21), help="C,H,W (default 1,21,21)")
    p.add_argument("--classes", type=int, default=2, help="number of classes (default 2)")

    p = sub.add_parser("train", help="train a registered model with Ray Train (data-parallel)")
    p.add_argument("--model", required=True, help="registered model name (see 'stampray models')")
    p.add_argument("--data", required=True, help="stamp dataset to train on (its train/val/test splits)")
    p.add_argument("--out", required=True, help="directory holding runs (RUNDIR); the run goes to RUNDIR/NAME")
    p.add_argument("--name", default=S, help="run name (default: the model name); rerun a name to resume it")
    p.add_argument("--workers", type=int, default=S, help="data-parallel Train workers (default 1)")
    p.add_argument("--use-gpu", dest="use_gpu", action="store_true", default=S,
                   help="one GPU per worker, NCCL, mixed precision; on an autoscaling cluster whose GPU nodes "
                        "are not up yet, ask the autoscaler for them and wait (see --wait-gpu)")
    p.add_argument("--wait-gpu", dest="wait_gpu", type=float, default=S, metavar="SECONDS",
                   help="with --use-gpu, how long to wait for the GPU nodes (default 1800)")
    p.add_argument("--no-amp", dest="amp", action="store_false", default=S, help="no mixed precision on GPU")
    p.add_argument("--epochs", type=int, default=S, help="epochs (default 10)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=S,
                   help="global batch size, split across workers (default: 128 on CPUs, 512 with --use-gpu, "
                        "where a batch of 128 small stamps leaves a GPU mostly idle)")
    p.add_argument("--lr", type=float, default=S, help="learning rate (default 1e-3)")
    p.add_argument("--weight-decay", dest="weight_decay", type=float, default=S, help="weight decay (default 0.01)")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default=S, help="optimizer (default adamw)")
    p.add_argument("--schedule", choices=["constant", "cosine"], default=S,
                   help="learning-rate schedule (default constant; cosine warms up for --warmup-epochs)")
    p.add_argument("--warmup-epochs", dest="warmup_epochs", type=float, default=S, help="cosine warm-up (default 1)")
    p.add_argument("--class-weights", dest="class_weights", choices=["auto", "none"], default=S,
                   help="auto: weight the loss by inverse class frequency")
    p.add_argument("--augment", action="store_true", default=S,
                   help="random flips, 90-degree rotations, small shifts and zooms (training only)")
    p.add_argument("--early-stopping", dest="early_stopping", type=int, default=S, metavar="PATIENCE",
                   help="stop after PATIENCE epochs without improvement of --monitor")
    p.add_argument("--monitor", choices=["val_loss", "val_acc", "val_auc"], default=S,
                   help="validation metric for the best epoch and early stopping (default val_loss)")
    p.add_argument("--max-failures", dest="max_failures", type=int, default=S,
                   help="restart failed workers from the last checkpoint up to K times (default 0)")
    p.add_argument("--seed", type=int, default=S, help="random seed (default 0)")
    p.add_argument("--preprocess", default=S, help="named preprocessing: course_scaled (default), course, standardize, none")
    p.add_argument("--fractions", type=_fractions, default=S, metavar="TRAIN,VAL,TEST",
                   help="split fractions of the id hash (default 0.7,0.1,0.2; a 'split' column wins); recorded "
                        "in the checkpoint, so score and evaluate use the same split")
    p.add_argument("--preprocess-on", dest="preprocess_on", choices=["auto", "reads", "device"], default=S,
                   help="where batches are normalised: in the CPU read tasks, or on the worker's device (raw "
                        "pixels are copied); auto (default): device with --use-gpu, reads otherwise")
    p.add_argument("--keep-checkpoints", dest="keep_checkpoints", type=int, default=S,
                   help="checkpoints Ray keeps besides the latest: the most recent epochs that were a new best, "
                        "the best among them (default 2); best.pt and last.pt are written at the end")
    p.add_argument("--cpus-per-worker", dest="cpus_per_worker", type=float, default=S,
                   help="override the CPU share of each worker (default: leave a CPU for reading)")
    p.add_argument("--placement", choices=["PACK", "SPREAD"], default=S,
                   help="pack workers on few nodes (default) or spread them across nodes")
    _common(p)

    p = sub.add_parser("score", help="score stamp shards with a checkpoint (Ray Data, exactly once, resumable)")
    p.add_argument("--model", required=True, help="checkpoint: model.pt, a checkpoint dir, or a run dir (best.pt)")
    p.add_argument("--data", required=True, help="stamp dataset to score")
    p.add_argument("--out", required=True, help="result directory (one Parquet file per input shard)")
    p.add_argument("--keep", type=_csv, default=S, help="metadata columns to pass through, e.g. snr,ra,dec")
    p.add_argument("--fractions", type=_fractions, default=S, metavar="TRAIN,VAL,TEST",
                   help="split fractions for the 'split' column (default: those the checkpoint was trained with; "
                        "others are refused, as they would test the model on stamps it trained on)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=S,
                   help="stamps per model call (default 4096 on CPU, 16384 on GPU)")
    _pool_flags(p)
    p.add_argument("--overwrite", action="store_true", default=S, help="discard earlier results in --out")
    _class_flags(p)
    p.add_argument("--compile", choices=["auto", "on", "off"], default=S,
                   help="torch.compile the model in each replica (auto: for jobs of 200,000 stamps or more)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=S, help="no progress line")
    _common(p)

    p = sub.add_parser("occlude", help="occlusion maps: where does the network look?")
    p.add_argument("--model", required=True, help="checkpoint: model.pt, a checkpoint dir, or a run dir")
    p.add_argument("--data", required=True, help="stamp dataset")
    p.add_argument("--out", required=True, help="output directory for the maps (Parquet)")
    p.add_argument("--kernel", type=int, default=S, help="occluding square size in pixels (default 5)")
    p.add_argument("--stride", type=int, default=S, help="step between occluding positions (default 1)")
    p.add_argument("--ids", type=_csv, default=S, help="comma-separated stamp ids to map")
    p.add_argument("--where", choices=["misclassified"], default=S, help="map only misclassified stamps")
    p.add_argument("--limit", type=int, default=S, help="map at most N stamps")
    p.add_argument("--chunk", type=int, default=S,
                   help="occluded variants built and scored per forward pass (default: 1 Mi pixels' worth, "
                        "e.g. 2,377 at 21x21, 46 at 150x150), so memory does not grow with stamp size or "
                        "--batch-size")
    p.add_argument("--png", default=S, metavar="DIR", help="write stamp+heatmap overlays here")
    p.add_argument("--compile", choices=["auto", "on", "off"], default=S,
                   help="torch.compile the replicas (a few seconds each, about 1.6x the forward rate on a CPU): "
                        "auto (default) for jobs of 2M occluded variants or more")
    _class_flags(p)
    p.add_argument("--png-limit", dest="png_limit", type=int, default=S, help="overlays to draw (default 20)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=S,
                   help="stamps per actor call (each expands to one model batch of all its occlusions)")
    _pool_flags(p)
    p.add_argument("--no-progress", dest="progress", action="store_false", default=S, help="no progress line")
    _common(p)

    p = sub.add_parser("evaluate", help="confusion matrices, ROC, thresholds and an HTML report from scores")
    p.add_argument("--scores", action="append", required=True, help="score directory; repeat to compare models")
    p.add_argument("--out", required=True, help="report directory (report.html, report.json, PNGs)")
    p.add_argument("--data", default=S, help="the stamp table, to draw the misclassified stamps")
    p.add_argument("--run", default=S, help="training run directory, for the training curves")
    p.add_argument("--by", type=_csv, default=S,
                   help="numeric columns for completeness and false-positive-rate curves (equal-count bins, "
                        "Wilson 95%% intervals), e.g. snr")
    p.add_argument("--tensorboard", default=S, metavar="LOGDIR", help="also write the numbers to TensorBoard")
    p.add_argument("--split", choices=["test", "val", "train", "all"], default=S,
                   help="which rows to evaluate (default test: the held-out split)")
    p.add_argument("--tpr", type=float, default=S, help="report the FPR at this TPR (default 0.95)")
    p.add_argument("--fpr", type=float, default=S, help="report the FNR at this FPR (default 0.01)")
    p.add_argument("--names", type=_csv, default=S, help="names of the score tables in the report")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=S, help="no stage lines")
    _common(p, ray=False)

    _vet.add_parser(sub, _common)

    p = sub.add_parser("export", help="write a checkpoint as an ONNX model (dynamic batch axis, metadata)")
    p.add_argument("--model", required=True, help="checkpoint: model.pt, a checkpoint dir, or a run dir")
    p.add_argument("--onnx", required=True, metavar="FILE",
                   help="the ONNX file to write (replaced only once the new one is written and checked)")
    _common(p, ray=False)

    p = sub.add_parser("demo", help="the whole pipeline on a small synthetic survey")
    p.add_argument("--out", default=S, help="working directory (default ./stampray-demo)")
    p.add_argument("-n", type=int, default=S, help="number of stamps (default 20000)")
    p.add_argument("--seed", type=int, default=S, help="random seed (default 0)")
    p.add_argument("--epochs", type=int, default=S, help="training epochs (default 4)")
    p.add_argument("--workers", type=int, default=S, help="Ray Train workers (default 2)")
    _common(p)
    return parser


def _cmd_synth(ns):
    from .synth import SynthSettings, synth

    t0 = time.time()
    settings = _settings(SynthSettings, ns)
    m = synth(settings)
    dt = time.time() - t0
    made = m.settings["appends"][-1]["stamps"] if settings.append else m.num_rows
    where = f"appended to {settings.out} (now {m.num_rows} stamps)" if settings.append else f"to {settings.out}"
    print(f"synth: wrote {made} {settings.kind} stamps {m.spec.shape} in {len(m.shards)} shards {where}; "
          f"classes {dict(zip(m.spec.class_names, m.label_counts.values()))}; "
          f"{dt:.1f} s ({made / max(dt, 1e-9):,.0f} stamps/s)")


def _cmd_ingest(ns):
    from .ingest import IngestSettings, ingest

    settings = _settings(IngestSettings, ns)
    r = ingest(settings)
    counts = r.appended_aside if r.appended is not None else r.set_aside
    aside = sum(counts.values())
    detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"
    if r.appended is not None:
        new = len(r.manifest.settings["appends"][-1]["shards"])
        what = (f"appended {r.appended} stamps {r.manifest.spec.shape} in {new} new shards to {settings.out} "
                f"(now {r.ingested} stamps in {len(r.manifest.shards)} shards)")
    else:
        what = f"ingested {r.ingested} stamps {r.manifest.spec.shape} into {len(r.manifest.shards)} shards at {settings.out}"
    print(f"ingest: read {r.rows_in} rows; {what}; set aside {aside} ({detail})"
          + (f", listed in {settings.out}/_errors" if aside else "")
          + f"; classes {list(r.manifest.spec.class_names)}; {r.seconds:.1f} s")


def _cmd_models(ns):
    from .models import describe

    rows = describe(ns.shape, ns.classes)
    c, h, w = ns.shape
    print(f"models at {c}x{h}x{w}, {ns.classes} classes:")
    print(f"{'model':<10} {'parameters':>12} {'MFLOPs/stamp':>13}  source")
    for r in rows:
        if r["params"] is None:
            print(f"{r['model']:<10} {'-':>12} {'-':>13}  {r['note']}")
        else:
            print(f"{r['model']:<10} {r['params']:>12,} {r['flops'] / 1e6:>13.3f}  {r['note']}")


def _cmd_train(ns):
    from .train import TrainSettings, fit

    settings = _settings(TrainSettings, ns)
    r = fit(settings)
    m = r.metrics
    print(f"train: {settings.model} on {settings.data}: {m.get('epochs_done')} epochs, best epoch "
          f"{m.get('best_epoch')}; test accuracy {m.get('test_acc', float('nan')):.4f}, test AUC "
          f"{m.get('test_auc', float('nan')):.4f} on {m.get('test_n')} stamps; "
          f"{m.get('stamps_per_s', 0):,.0f} stamps/s; {m.get('wall_seconds')} s")
    aside = m.get("set_aside") or {}
    if sum(aside.values()):
        n = sum(aside.values())
        print(f"train: set aside {n} stamp{'s' if n != 1 else ''} with non-finite pixels, not trained on "
              f"({', '.join(f'{k} {v}' for k, v in aside.items())}); listed in {r.run_dir}/_errors")
    print(f"train: best checkpoint {r.best}; TensorBoard: tensorboard --logdir {r.run_dir}/tensorboard")


def _cmd_score(ns):
    from .score import ScoreSettings, score

    settings = _settings(ScoreSettings, ns)
    r = score(settings)
    if r.nothing_to_do:
        print(f"score: {settings.out} is already complete ({r.scored} stamps scored, {r.set_aside} set aside); "
              f"nothing to do")
        return
    detail = ", ".join(f"{k} {v}" for k, v in sorted(r.errors.items())) or "none"
    where = f" on {len(r.nodes)} nodes" if len(r.nodes) > 1 else ""
    before = (f"; {r.skipped_shards} shards were already done ({r.scored + r.set_aside - r.scored_now} stamps), "
              f"{r.scored_now} stamps scored now{where}") if r.skipped_shards else where
    print(f"score: {r.scored} stamps scored into {settings.out}; set aside {r.set_aside} ({detail})"
          + (f", listed in {settings.out}/_errors" if r.set_aside else "")
          + before + f"; {r.seconds:.1f} s, {r.rows_per_s:,.0f} stamps/s")


def _cmd_occlude(ns):
    from .occlusion import OccludeSettings, occlude

    settings = _settings(OccludeSettings, ns)
    r = occlude(settings)
    print(f"occlude: {r.rows} occlusion maps (kernel {settings.kernel}, stride {settings.stride}) written to "
          f"{settings.out}" + (f"; {len(r.pngs)} PNGs in {settings.png}" if r.pngs else "") + f"; {r.seconds:.1f} s")


def _cmd_evaluate(ns):
    from .evaluate import EvaluateSettings, evaluate

    ns.scores = tuple(ns.scores)
    settings = _settings(EvaluateSettings, ns)
    r = evaluate(settings)
    for name, res in r.report["results"].items():
        print(f"evaluate: {name}: {res['n']} stamps ({settings.split} split), accuracy {res['accuracy']:.4f}, "
              f"AUC {res['auc'] if res['auc'] is None else round(res['auc'], 4)}, "
              f"{res['misclassified']['n']} misclassified")
    print(f"evaluate: report {r.html} ({len(r.plots)} plots), numbers in {settings.out}/report.json")


def _cmd_export(ns):
    from .export import main as export_main

    export_main(ns)


def _cmd_demo(ns):
    from .demo import DemoSettings, demo

    demo(_settings(DemoSettings, ns))


COMMANDS = {"synth": _cmd_synth, "ingest": _cmd_ingest, "cutout": _cutout.main, "models": _cmd_models,
            "train": _cmd_train,
            "score": _cmd_score, "occlude": _cmd_occlude, "evaluate": _cmd_evaluate,
            "vet": _vet.main, "export": _cmd_export, "demo": _cmd_demo}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not ns.verb:
        parser.print_help()
        return 2
    try:
        COMMANDS[ns.verb](ns)
    except KeyboardInterrupt:
        print(f"stampray {ns.verb}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every error ends in one line; see _report
        return _report(ns.verb, e)
    return 0


USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, NotImplementedError)


def _report(verb: str, e: BaseException) -> int:
    """One line on stderr for any error, and the exit status.

    A mistake of the user's (a ValueError and the like, raised with a message naming the flag or file and
    the fix) exits 2; a run that stopped for a reason it states (RuntimeError) exits 1; anything else is an
    internal error: its full traceback is saved to a file named in the line, and the exit status is 1.
    Errors raised inside Ray tasks are unwrapped to their cause first.
    """
    import traceback

    cause, seen = e, set()
    while id(cause) not in seen:  # RayTaskError(...).cause, and Ray Data's UserCodeException's __cause__
        seen.add(id(cause))
        inner = getattr(cause, "cause", None) or (cause.__cause__ if type(cause).__name__ == "UserCodeException"
                                                  else None)
        if not isinstance(inner, BaseException):
            break
        cause = inner
    if isinstance(cause, USER_ERRORS):
        print(f"stampray {verb}: error: {cause}", file=sys.stderr)
        return 2
    if isinstance(cause, RuntimeError) and type(cause) is RuntimeError:
        print(f"stampray {verb}: error: {cause}", file=sys.stderr)
        return 1
    import os
    import tempfile

    fd, path = tempfile.mkstemp(prefix=f"stampray-{verb}-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write(f"stampray {' '.join(sys.argv[1:])}\n\n")
        traceback.print_exception(type(e), e, e.__traceback__, file=f)
    line = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    print(f"stampray {verb}: internal error: {type(cause).__name__}: {line[:300]}; the full traceback is in "
          f"{path} (please include it when you report this)", file=sys.stderr)
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
