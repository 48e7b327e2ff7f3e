"""Data-parallel training with Ray Train, fed by Ray Data: ``stampray train``.

The driver reads the dataset's manifest (and, on a Ray of the machine's own, for a table of up to
``COUNT_HERE_ROWS`` rows, its id, label and split columns to count the splits); Ray Data streams the shards, keeps each split's rows (the hash split
of :mod:`stampray.splits`), decodes and preprocesses them in read tasks (:mod:`stampray.batches`, which
does not import torch), and Ray Train's
``TorchTrainer`` runs the same loop on every worker (DDP: gloo on CPU, NCCL on GPU).

Resource rule (so readers never starve): Train workers together reserve at most the cluster's CPUs
minus :func:`read_reserve` (one CPU, or a quarter of them on large clusters, or half of a 1-CPU Ray), and
Ray Data's read and prepare tasks ask for half a CPU each, so they fit on any node whose other CPUs hold
Train workers; on a 2-CPU laptop two workers take 0.5 CPU each and the readers keep a whole CPU. A worker
gets at least a quarter of a CPU: more workers than that allows (``--workers 8`` on 2 CPUs: they would take
every CPU and the reads would wait forever) are refused before anything starts, with the numbers.
With ``use_gpu`` each worker takes one GPU and one CPU (``cpus_per_worker`` to change it; the same rule holds).

Before any worker starts, the labelled stamps of each split are counted (reading only the id, label and
split columns: in the driver, or on a cluster or for a bigger table one small task per shard); an empty
train or validation split is refused, naming the counts.

Rows whose pixels are not finite (NaN or inf: a table written by another tool) are set aside by the read
tasks, as ``score`` and ``occlude`` do, with the same reason; they never reach the workers, so every worker's
shard still holds the same number of rows and DDP's steps stay in step. They are counted in the metrics and
listed in ``OUT/NAME/_errors/``. The last batch of an epoch is left out (and counted, ``train_dropped``) when
it holds one stamp: BatchNorm cannot train on one. So are (and counted likewise) the rows that splitting the
train split into equal shards leaves over, at most ``workers - 1`` an epoch.

A run lives in ``OUT/NAME/``: Ray's per-epoch checkpoints (``epoch-0001/model.pt``, each with its own
epoch's weights; Ray keeps the latest and the ``keep_checkpoints`` most recent epochs that were a new best,
so the best epoch's checkpoint is always there), ``best.pt`` (the best epoch by the monitored validation
metric), ``last.pt``, ``metrics.jsonl``, ``tensorboard/``, ``settings.json`` and ``summary.json``. Rerunning
with the same name continues from the latest checkpoint; with ``max_failures`` a worker that dies is
restarted from it. The final numbers (test split with the best weights) ride on the last checkpoint's
report and reach the driver as Ray's ``Result.metrics``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import posixpath
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from . import checkpoint as ck
from . import preprocess as pp
from . import splits
from . import table as st
from .batches import SetAside, count_splits, prepare_batch
from .classes import check_class_names, positive_classes
from .lock import output_lock
from .models import create_model, list_models
from .provenance import provenance

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "cosine")
MONITORS = {"val_loss": "min", "val_acc": "max", "val_auc": "max"}


BATCH_CPU = 128  # default global batch on CPU workers
BATCH_GPU = 512  # default global batch with --use-gpu
PREPROCESS_ON = ("auto", "reads", "device")
PLACEMENTS = ("PACK", "SPREAD")


@dataclass(frozen=True)
class TrainSettings:
    """Settings of ``stampray train``.

    Args:
        model: registered model name (see 'stampray models').
        data: stamp table to train on (its train/val/test splits).
        out: directory holding runs (RUNDIR); the run goes to RUNDIR/NAME.
        name: run name (default: the model name); rerun a name to resume it.
        workers: data-parallel Ray Train workers.
        use_gpu: one GPU per worker, NCCL, mixed precision; on an autoscaling cluster whose GPU nodes are not
            up yet, ask the autoscaler for them and wait (see --wait-gpu).
        wait_gpu: with --use-gpu, how long to wait for the GPU nodes, in seconds.
        epochs: training epochs.
        batch_size: global batch size, split across workers (default: 128 on CPUs, 512 with --use-gpu, where a
            batch of 128 small stamps leaves a GPU mostly idle).
        lr: learning rate.
        weight_decay: weight decay.
        optimizer: the optimiser.
        momentum: SGD momentum (with --optimizer sgd).
        schedule: learning-rate schedule; cosine warms up for --warmup-epochs, then decays to zero.
        warmup_epochs: cosine warm-up, in epochs.
        class_weights: auto: weight the loss by inverse class frequency (default: none).
        augment: random flips, 90-degree rotations, small shifts and zooms (training only).
        early_stopping: stop after PATIENCE epochs without improvement of --monitor.
        monitor: validation metric for the best epoch and early stopping.
        max_failures: restart failed workers from the last checkpoint up to K times (-1: without limit).
        seed: random seed.
        preprocess: named preprocessing, recorded in the checkpoint so score applies the same.
        preprocess_on: where batches are normalised: in the CPU read tasks, or on the worker's device (raw
            pixels are copied); auto: device with --use-gpu, reads otherwise.
        fractions: split fractions of the id hash (a 'split' column wins); recorded in the checkpoint, so score
            and evaluate use the same split.
        amp: mixed precision on GPU.
        keep_checkpoints: checkpoints Ray keeps besides the latest: the most recent epochs that were a new best,
            the best among them; best.pt and last.pt are written at the end.
        cpus_per_worker: override the CPU share of each worker (default: leave a CPU for reading).
        placement: pack workers on few nodes or spread them across nodes.
        address: Ray cluster to connect to (default: a private local Ray; RAY_ADDRESS is honoured).
    """

    model: str
    data: str = field(metadata={"path": True})
    out: str = field(metadata={"path": True})
    name: str | None = None
    workers: int = 1
    use_gpu: bool = False
    wait_gpu: float = field(default=1800.0, metadata={"metavar": "SECONDS"})
    epochs: int = 10
    batch_size: int | None = None  # None: BATCH_CPU, or BATCH_GPU with use_gpu
    lr: float = 1e-3
    weight_decay: float = 1e-2
    optimizer: str = field(default="adamw", metadata={"choices": OPTIMIZERS})
    momentum: float = 0.9
    schedule: str = field(default="constant", metadata={"choices": SCHEDULES})
    warmup_epochs: float = 1.0
    class_weights: str | None = field(default=None, metadata={"choices": ("auto", "none")})
    augment: bool = False
    early_stopping: int | None = field(default=None, metadata={"metavar": "PATIENCE"})
    monitor: str = field(default="val_loss", metadata={"choices": tuple(MONITORS)})
    max_failures: int = 0
    seed: int = 0
    preprocess: str = field(default="course_scaled", metadata={"choices": tuple(pp.names())})
    preprocess_on: str = field(default="auto", metadata={"choices": PREPROCESS_ON})
    fractions: tuple[float, float, float] = field(default=splits.DEFAULT_FRACTIONS,
                                                  metadata={"metavar": "TRAIN,VAL,TEST"})
    amp: bool = True
    keep_checkpoints: int = 2
    cpus_per_worker: float | None = None
    placement: str = field(default="PACK", metadata={"choices": PLACEMENTS})
    address: str | None = None

    def __post_init__(self):
        # A tuple however the settings arrived (a JSON config, a dict rebuilt on a worker give lists).
        object.__setattr__(self, "fractions", tuple(self.fractions))
        if self.batch_size is None:  # a batch that keeps a CPU busy leaves a GPU mostly idle
            object.__setattr__(self, "batch_size", BATCH_GPU if self.use_gpu else BATCH_CPU)
        if self.model not in list_models():
            msg = f"unknown model {self.model!r}; known models: {', '.join(list_models())}"
            raise ValueError(msg)
        checks = [
            (int(self.workers) >= 1, f"--workers must be a positive integer, got {self.workers!r}"),
            (int(self.epochs) >= 1, f"--epochs must be a positive integer, got {self.epochs!r}"),
            (int(self.batch_size) >= 2 * int(self.workers),
             f"--batch-size ({self.batch_size}) must be at least twice the number of workers ({self.workers}): "
             f"each worker's batch needs two stamps or more (BatchNorm cannot train on one)"),
            (float(self.lr) > 0, f"--lr must be positive, got {self.lr!r}"),
            (float(self.weight_decay) >= 0, f"--weight-decay must be zero or more, got {self.weight_decay!r}"),
            (float(self.momentum) >= 0, f"--momentum must be zero or more, got {self.momentum!r}"),
            (float(self.warmup_epochs) >= 0, f"--warmup-epochs must be zero or more, got {self.warmup_epochs!r}"),
            (float(self.wait_gpu) >= 0, f"--wait-gpu must be a number of seconds >= 0, got {self.wait_gpu!r}"),
            (self.cpus_per_worker is None or float(self.cpus_per_worker) > 0,
             f"--cpus-per-worker must be positive, got {self.cpus_per_worker!r}"),
            (int(self.seed) >= 0, f"--seed must be an integer >= 0, got {self.seed!r}"),
            (self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}"),
            (self.class_weights in (None, "auto", "none"), "--class-weights takes 'auto' (or 'none')"),
            (self.monitor in MONITORS, f"--monitor must be one of {', '.join(MONITORS)}"),
            (self.early_stopping is None or int(self.early_stopping) >= 1,
             f"--early-stopping PATIENCE must be a positive integer, got {self.early_stopping!r}"),
            (int(self.keep_checkpoints) >= 1, "--keep-checkpoints must be at least 1"),
            (int(self.max_failures) >= -1, "--max-failures must be -1 (unlimited) or more"),
            (self.placement in PLACEMENTS, "--placement must be PACK or SPREAD"),
            (self.preprocess_on in PREPROCESS_ON, f"--preprocess-on must be one of {', '.join(PREPROCESS_ON)}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        pp.get(self.preprocess)
        splits.check_fractions(self.fractions)

    @property
    def run_name(self) -> str:
        return self.name or self.model

    @property
    def device_preprocess(self) -> bool:
        """Normalise on the worker's device (raw pixels travel from the read tasks): the default with
        ``--use-gpu``, where one CPU per GPU could not keep up; on CPU workers the read tasks normalise, in
        parallel with training."""
        if self.preprocess_on == "auto":
            return bool(self.use_gpu)
        return self.preprocess_on == "device"


# --------------------------------------------------------------------------------------------------
# Pieces used on the workers
# --------------------------------------------------------------------------------------------------
class Augment(nn.Module):
    """Sky-respecting augmentation of a batch: random flips, 90° rotations (square stamps), shifts of up
    to ``shift`` pixels and zooms of up to ``zoom`` (bilinear, edge pixels repeated). Identity in eval
    mode, so validation, test and scoring never see it. Labels are untouched: every transform preserves
    the class of a stamp."""

    def __init__(self, shift: float = 1.0, zoom: float = 0.1, seed: int = 0):
        super().__init__()
        self.shift, self.zoom = float(shift), float(zoom)
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.shape[0] == 0:
            return x
        n, _, h, w = x.shape
        g = self.generator
        r = torch.rand(n, 3, generator=g)
        x = torch.where((r[:, 0] < 0.5).to(x.device)[:, None, None, None], x.flip(-1), x)
        x = torch.where((r[:, 1] < 0.5).to(x.device)[:, None, None, None], x.flip(-2), x)
        if h == w:
            turns = torch.randint(0, 4, (n,), generator=g)
            out = x.clone()
            for quarter in (1, 2, 3):
                sel = (turns == quarter).to(x.device)
                if sel.any():
                    out[sel] = torch.rot90(x[sel], quarter, dims=(-2, -1))
            x = out
        if self.shift == 0 and self.zoom == 0:
            return x
        scale = 1.0 + (torch.rand(n, generator=g) * 2 - 1) * self.zoom
        shifts = (torch.rand(n, 2, generator=g) * 2 - 1) * self.shift
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = 1.0 / scale
        theta[:, 1, 1] = 1.0 / scale
        theta[:, 0, 2] = shifts[:, 0] * 2.0 / w
        theta[:, 1, 2] = shifts[:, 1] * 2.0 / h
        grid = torch.nn.functional.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
        return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def class_weights_from_counts(label_counts: dict, num_classes: int) -> list[float]:
    """Inverse-frequency weights ``N / (K n_k)`` (scikit-learn's "balanced"); absent classes get 0."""
    counts = np.array([float(label_counts.get(str(k), 0)) for k in range(num_classes)])
    total = counts.sum()
    if total == 0:
        msg = "--class-weights auto needs labelled stamps; this dataset has none"
        raise ValueError(msg)
    return [float(total / (num_classes * c)) if c > 0 else 0.0 for c in counts]


def make_scheduler(optimizer: torch.optim.Optimizer, settings: TrainSettings, steps_per_epoch: int,
                   start_step: int = 0) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule, stepped once per optimiser step: constant, or a linear warm-up over
    ``warmup_epochs`` (``(step + 1) / warm`` of the rate) then a cosine to zero at the end of the last epoch.

    Built from torch's schedulers (``LinearLR`` then ``CosineAnnealingLR``, joined by ``SequentialLR``) and
    advanced to ``start_step`` when a run resumes. The schedule is rebuilt from the current settings rather
    than loaded from torch's state dict, which carries the cosine's old length: a run resumed with more
    ``--epochs`` stretches its cosine over the new total instead of climbing back up after the old one.
    """
    from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, SequentialLR

    if settings.schedule == "constant":
        scheduler = ConstantLR(optimizer, factor=1.0, total_iters=0)
    else:
        total = max(1, steps_per_epoch * int(settings.epochs))
        warm = int(round(float(settings.warmup_epochs) * steps_per_epoch))
        cosine = CosineAnnealingLR(optimizer, T_max=max(1, total - warm), eta_min=0.0)
        if warm == 0:
            scheduler = cosine
        else:
            warmup = LinearLR(optimizer, start_factor=1.0 / warm, end_factor=1.0, total_iters=max(1, warm - 1))
            scheduler = SequentialLR(optimizer, [warmup, cosine], milestones=[warm])
    with warnings.catch_warnings():
        # Fast-forwarding steps no optimiser: torch's reminder to step the optimiser first does not apply.
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        for _ in range(int(start_step)):
            scheduler.step()
    return scheduler


PROB_FLOOR = 1e-12  # the least probability the log loss takes for the true class (log(1e-12) = -27.6)


def classification_metrics(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """Log loss, accuracy, ROC AUC (one-vs-rest macro average beyond two classes; NaN when a class is absent
    from the split) and the confusion matrix, from scikit-learn.

    The log loss is the mean of ``-log(max(p_true, 1e-12))``: the probabilities are taken in float64, each
    row renormalised (float32 softmax rows miss 1 by ~1e-7, which scikit-learn warns about at float64) and
    floored at ``PROB_FLOOR``, so scikit-learn's own clip (at float64's eps) never binds."""
    from sklearn.metrics import accuracy_score, confusion_matrix, log_loss, roc_auc_score

    classes = list(range(num_classes))
    if len(labels) == 0:
        return {"loss": float("nan"), "acc": float("nan"), "auc": float("nan"), "n": 0,
                "confusion": [[0] * num_classes for _ in range(num_classes)]}
    p = np.asarray(probs, dtype=np.float64)
    p = np.clip(p / p.sum(axis=1, keepdims=True), PROB_FLOOR, 1.0)
    auc = float("nan")  # undefined unless every class is in the split (one-vs-rest needs each class's positives)
    if len(np.unique(labels)) == num_classes:
        # The positive-class rule (stampray.classes): class 1 of two; else the mean one-vs-rest AUC.
        auc = float(np.mean([roc_auc_score(labels == c, p[:, c]) for c in positive_classes(num_classes)]))
    pred = p.argmax(axis=1)
    return {"loss": float(log_loss(labels, p, labels=classes)), "acc": float(accuracy_score(labels, pred)),
            "auc": auc, "n": int(len(labels)), "confusion": confusion_matrix(labels, pred, labels=classes).tolist()}


def predict_dataset(model: nn.Module, it, device, batch_size: int = 1024, prep=None) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities and labels over a Ray Data iterator (or dataset); ``prep`` normalises each
    batch on the device first (raw pixels from the read tasks)."""
    model.eval()
    probs, labels = [], []
    with torch.no_grad():
        for batch in it.iter_torch_batches(batch_size=batch_size, dtypes={"x": torch.float32, "y": torch.int64},
                                           device=device):
            x = prep(batch["x"]) if prep is not None else batch["x"]
            probs.append(torch.softmax(model(x).float(), dim=1).cpu().numpy())
            labels.append(batch["y"].cpu().numpy())
    if not probs:
        return np.zeros((0, getattr(model, "num_classes", 2)), np.float32), np.zeros(0, np.int64)
    return np.concatenate(probs), np.concatenate(labels)


class _Cached:
    """The validation split held in memory by rank 0 after its first pass (when it is small enough), so
    later epochs do not re-read every shard to find it; larger splits stream every epoch."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    @classmethod
    def collect(cls, it, max_rows: int):
        xs, ys, rows = [], [], 0
        for batch in it.iter_torch_batches(batch_size=4096, dtypes={"x": torch.float32, "y": torch.int64}):
            xs.append(batch["x"])
            ys.append(batch["y"])
            rows += len(batch["y"])
            if rows > max_rows:
                return it
        if not xs:
            return cls(torch.zeros(0), torch.zeros(0, dtype=torch.int64))
        return cls(torch.cat(xs), torch.cat(ys))

    def iter_torch_batches(self, batch_size: int, dtypes=None, device="cpu"):
        for i in range(0, len(self.y), batch_size):
            yield {"x": self.x[i:i + batch_size].to(device), "y": self.y[i:i + batch_size].to(device)}


def _confusion_figure(cm, class_names, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm, dtype=float)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(3 + 0.4 * len(class_names), 2.6 + 0.4 * len(class_names)))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{int(cm[i, j])}\n{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title(title)
    fig.tight_layout()
    return fig


class _RunLog:
    """Rank 0's TensorBoard events and metrics file, written locally and copied to the run directory."""

    def __init__(self, run_dir: str, class_names, history: list[dict]):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir, self.class_names, self.history = run_dir, list(class_names), list(history)
        self.local = tempfile.mkdtemp(prefix="stampray-tb-")
        self.writer = SummaryWriter(os.path.join(self.local, "tensorboard"))

    def epoch(self, metrics: dict, val_probs: np.ndarray, val_labels: np.ndarray, confusion) -> None:
        e = metrics["epoch"]
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "val_auc", "lr", "stamps_per_s"):
            if key in metrics and metrics[key] == metrics[key]:
                group = key.split("_", 1)
                self.writer.add_scalar(f"{group[0]}/{group[1]}" if len(group) == 2 else key, metrics[key], e)
        if len(val_labels):
            n_classes = val_probs.shape[1]
            for c in range(1, n_classes) if n_classes == 2 else range(n_classes):
                tag = "val/pr_curve" if n_classes == 2 else f"val/pr_curve_{self.class_names[c]}"
                self.writer.add_pr_curve(tag, val_labels == c, val_probs[:, c], e)
            self.writer.add_figure("val/confusion_matrix",
                                   _confusion_figure(confusion, self.class_names, f"validation, epoch {e}"), e)
        self.history.append(metrics)
        with open(os.path.join(self.local, "metrics.jsonl"), "w") as f:
            for row in self.history:
                f.write(json.dumps(row) + "\n")
        self.sync()

    def hparams(self, hparams: dict, final: dict) -> None:
        clean = {name: (v if isinstance(v, (int, float, str, bool)) else str(v)) for name, v in hparams.items()}
        self.writer.add_hparams(clean, {f"hparam/{name}": v for name, v in final.items()
                                        if isinstance(v, (int, float)) and v == v}, run_name="hparams")
        self.sync()

    def sync(self) -> None:
        import pyarrow.fs as pafs

        self.writer.flush()
        fs, dest = st.resolve(self.run_dir)
        fs.create_dir(dest, recursive=True)
        pafs.copy_files(self.local, dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)

    def close(self) -> None:
        self.writer.close()
        self.sync()
        shutil.rmtree(self.local, ignore_errors=True)


def epoch_sums(device):
    """An epoch's running sums (loss x stamps, correct, stamps, stamps left out), on ``device``: under NCCL a
    collective takes CUDA tensors only."""
    import torch

    return torch.zeros(4, dtype=torch.float64, device=device)


def to_cpu(obj):
    """``obj`` with every tensor in it (nested dicts, lists, tuples) moved to the CPU: a checkpoint written
    on a GPU loads on a laptop without CUDA."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


# --------------------------------------------------------------------------------------------------
# The training loop on each worker: build or restore, then per epoch train, validate, track the best
# epoch, checkpoint and report; the test split once, on the last epoch.
# --------------------------------------------------------------------------------------------------
@dataclass
class RunState:
    """Where a run stands, carried in every checkpoint as plain values (``to_dict``), so a checkpoint
    still loads with ``torch.load(weights_only=True)`` and a restarted worker continues from it.

    Args:
        epoch: epochs done.
        step: optimiser steps done (the learning-rate schedule's position).
        history: each epoch's metrics, in order.
        best_value: the monitored metric at the best epoch (None before any finite value).
        best_epoch: the best epoch so far (0: none yet); its checkpoint is kept by Ray (see ``_trainer``).
        best_metrics: that epoch's metrics.
        since_best: epochs since the best one (early stopping's count).
        stopped_early: early stopping ended the run.
        resumes: the epochs that restarts (a resumed run, a restarted worker) began from.
    """

    epoch: int = 0
    step: int = 0
    history: list = field(default_factory=list)
    best_value: float | None = None
    best_epoch: int = 0
    best_metrics: dict = field(default_factory=dict)
    since_best: int = 0
    stopped_early: bool = False
    resumes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunState:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def checkpoint_dir_name(epoch: int) -> str:
    """The directory of epoch ``epoch``'s checkpoint in the run directory (``epoch-0001``)."""
    return f"epoch-{int(epoch):04d}"


@dataclass
class _Worker:
    """What one Train worker holds for the run: who it is, its model and optimiser, its data preparation."""

    settings: TrainSettings
    cfg: dict
    rank: int
    world: int
    device: torch.device
    node_ids: list
    pids: list
    model: nn.Module  # as prepared by Ray Train (DDP across workers)
    core: nn.Module  # the model itself, unwrapped
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    use_amp: bool
    loss_fn: nn.Module
    augment: Augment | None
    prep: object  # None, or the device normalisation of raw pixels from the read tasks
    log: _RunLog | None  # rank 0 only

    @property
    def class_names(self) -> list:
        return self.cfg["class_names"]


def _where_workers(world: int) -> tuple[list, list]:
    """Every rank's node id and process id: recorded per epoch, so a person (or a fault test) can tell which
    node and process holds which rank."""
    import ray
    import torch.distributed as dist

    here = (ray.get_runtime_context().get_node_id(), os.getpid())
    where = [here]
    if world > 1:
        where = [None] * world
        dist.all_gather_object(where, here)
    return [w[0] for w in where], [int(w[1]) for w in where]


def _optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay,
                               momentum=settings.momentum)
    return torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)


def build_worker(cfg: dict) -> tuple[_Worker, RunState]:
    """1. Build the model, optimiser, schedule and AMP scaler; restore them and the run state from the
    latest checkpoint when there is one (a resumed run, a restarted worker)."""
    import ray.train
    import ray.train.torch

    settings = TrainSettings(**cfg["settings"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    node_ids, pids = _where_workers(world)
    torch.set_num_threads(int(cfg["threads"]))
    torch.manual_seed(settings.seed)
    device = ray.train.torch.get_device()
    use_amp = settings.amp and device.type == "cuda"
    shape = tuple(cfg["shape"])
    model = create_model(settings.model, shape[0], shape[1:], len(cfg["class_names"]))
    optimizer = _optimizer(model, settings)
    bundle, state = None, RunState()
    restored = ray.train.get_checkpoint()
    if restored:
        with restored.as_directory() as d:
            bundle = ck.load_bundle(os.path.join(d, ck.FILE_NAME))  # weights_only, every tensor on the CPU
        model.load_state_dict(bundle["state_dict"])
    model = ray.train.torch.prepare_model(model)  # DDP across workers (and the device move)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    if bundle is not None:
        # After the device move: load_state_dict puts the optimizer's moments where the parameters now are
        # (restored before the move, AdamW's state stayed on the CPU and the first GPU step failed).
        optimizer.load_state_dict(bundle["optimizer"])
        if bundle.get("scaler") and use_amp:
            scaler.load_state_dict(bundle["scaler"])
        state = RunState.from_dict(bundle["train_state"])
        state.resumes.append(state.epoch)
        if rank == 0:
            log.info(f"[stampray] resuming {settings.model} from epoch {state.epoch}")
    weights = cfg["class_weights"]
    return _Worker(
        settings=settings, cfg=cfg, rank=rank, world=world, device=device, node_ids=node_ids, pids=pids,
        model=model, core=model.module if hasattr(model, "module") else model, optimizer=optimizer,
        scheduler=make_scheduler(optimizer, settings, int(cfg["steps_per_epoch"]), start_step=state.step),
        scaler=scaler, use_amp=use_amp,
        loss_fn=nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32, device=device)
                                    if weights else None),
        augment=Augment(seed=settings.seed * 1000 + rank + 7919 * state.epoch) if settings.augment else None,
        # Raw pixels from the read tasks are normalised here, on the device (see TrainSettings.device_preprocess).
        prep=pp.get_torch(settings.preprocess) if cfg["device_preprocess"] else None,
        log=_RunLog(cfg["run_dir"], cfg["class_names"], state.history) if rank == 0 else None,
    ), state


def train_epoch(w: _Worker, shard, epoch: int) -> tuple[dict, int]:
    """2. One pass over this worker's train shard; returns the epoch's training numbers, summed over the
    workers, and the optimiser steps taken."""
    import torch.distributed as dist

    s = w.settings
    w.model.train()
    if w.augment is not None:
        w.augment.train()
    per_worker = max(1, s.batch_size // w.world)
    t0, steps = time.time(), 0
    sums = epoch_sums(w.device)  # loss x stamps, correct, stamps, stamps left out: on the device (NCCL)
    for batch in shard.iter_torch_batches(
            batch_size=per_worker, dtypes={"x": torch.float32, "y": torch.int64}, device=w.device,
            local_shuffle_buffer_size=min(10_000, 20 * per_worker),
            local_shuffle_seed=s.seed * 100_003 + epoch * 101 + w.rank,
            pin_memory=w.device.type == "cuda", prefetch_batches=2):
        x, y = batch["x"], batch["y"]
        if w.prep is not None:
            x = w.prep(x)
        if len(y) < 2:
            # An epoch's last batch can hold one stamp, on which BatchNorm cannot train: leave it out.
            # Every worker's shard has the same rows (streaming_split(equal=True)), so all leave it out
            # together and DDP's collectives stay in step.
            sums[3] += len(y)
            continue
        if w.augment is not None:
            x = w.augment(x)
        with torch.autocast(w.device.type, dtype=torch.float16, enabled=w.use_amp):
            logits = w.model(x)
            loss = w.loss_fn(logits.float(), y)
        w.optimizer.zero_grad(set_to_none=True)
        w.scaler.scale(loss).backward()
        w.scaler.step(w.optimizer)
        w.scaler.update()
        w.scheduler.step()
        steps += 1
        # Accumulated on the device: no host sync per step, and all_reduce under NCCL needs CUDA tensors.
        sums[0] += loss.detach().double() * len(y)
        sums[1] += (logits.argmax(1) == y).sum()
        sums[2] += len(y)
    if w.world > 1:
        dist.all_reduce(sums)
    seconds = time.time() - t0
    n_train = max(1.0, float(sums[2]))
    return {"train_loss": float(sums[0]) / n_train, "train_acc": float(sums[1]) / n_train,
            "lr": float(w.optimizer.param_groups[0]["lr"]), "stamps_per_s": float(sums[2]) / max(seconds, 1e-9),
            "train_n": int(sums[2]), "train_dropped": int(sums[3]), "seconds": seconds}, steps


def _predict_split(w: _Worker, model: nn.Module, source) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and labels of a split shared out by id: this worker predicts its own part (so the time
    falls as workers are added) and every worker receives all the parts, joined (they are disjoint)."""
    import torch.distributed as dist

    probs, labels = predict_dataset(model, source, w.device, prep=w.prep)
    if w.world == 1:
        return probs, labels
    parts = [None] * w.world
    dist.all_gather_object(parts, (probs, labels))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def validate(w: _Worker, source) -> tuple[dict, dict, np.ndarray, np.ndarray]:
    """3. The validation metrics (rank 0 computes them and shares them, so every worker takes the same
    decisions), the counts set aside so far, and the joined probabilities and labels."""
    import ray
    import torch.distributed as dist

    if w.world > 1:  # each worker updated BatchNorm's running stats on its own last batch: use rank 0's
        with torch.no_grad():
            for buf in w.core.buffers():
                dist.broadcast(buf, src=0)
    probs, labels = _predict_split(w, w.core, source)
    payload = [None]
    if w.rank == 0:
        # Every worker has read its train shard (train_epoch's all_reduce) and its validation part (the
        # gather), so the set-aside rows of both splits are all in the ledger.
        payload = [(classification_metrics(probs, labels, len(w.class_names)),
                    ray.get(w.cfg["ledger"].counts.remote()))]
    if w.world > 1:
        dist.broadcast_object_list(payload, src=0)
    val, aside = payload[0]
    return val, aside, probs, labels


def epoch_metrics(w: _Worker, epoch: int, train: dict, val: dict, aside: dict) -> dict:
    """The row of ``metrics.jsonl`` (and of the run's history) for one epoch. ``train_dropped`` counts the
    training stamps the epoch left out: a last batch of one stamp, and the rows that splitting the train split
    into equal shards among the workers leaves over (at most workers - 1; ``streaming_split(equal=True)``)."""
    splits = (w.cfg.get("data_info") or {}).get("splits") or {}
    if "train" in splits:
        over = int(splits["train"]) - int(aside["train"]) - train["train_n"] - train["train_dropped"]
        train = {**train, "train_dropped": train["train_dropped"] + max(0, over)}
    return {
        "epoch": epoch, "train_loss": train["train_loss"], "train_acc": train["train_acc"],
        "val_loss": val["loss"], "val_acc": val["acc"], "val_auc": val["auc"], "val_n": val["n"],
        "lr": train["lr"], "stamps_per_s": train["stamps_per_s"], "train_n": train["train_n"],
        "train_dropped": train["train_dropped"], "train_set_aside": aside["train"], "val_set_aside": aside["val"],
        "seconds": train["seconds"], "node_ids": list(w.node_ids), "worker_pids": list(w.pids),
    }


def track_best(state: RunState, metrics: dict, settings: TrainSettings) -> tuple[bool, bool]:
    """4. Record the epoch in ``state``: is it the best so far by ``settings.monitor`` (a NaN never is), and
    does early stopping end the run now? The same on every worker (they share the metrics)."""
    value = metrics[settings.monitor]
    best = state.best_value
    if MONITORS[settings.monitor] == "min":
        better = value == value and (best is None or value < best)
    else:
        better = value == value and (best is None or value > best)
    if better:
        state.best_value, state.best_epoch, state.best_metrics = value, metrics["epoch"], dict(metrics)
        state.since_best = 0
    else:
        state.since_best += 1
    patience = settings.early_stopping
    state.stopped_early = patience is not None and state.since_best >= int(patience)
    state.epoch = metrics["epoch"]
    state.history = state.history + [metrics]
    return better, state.stopped_early


def final_metrics(w: _Worker, state: RunState) -> dict | None:
    """6. The test split with the best epoch's weights (each worker its part, as validation); rank 0
    returns the run's final numbers, the other ranks None."""
    model = w.core
    if state.best_epoch not in (0, state.epoch):  # an earlier epoch: its checkpoint, which Ray keeps
        path = st.join(w.cfg["run_dir"], checkpoint_dir_name(state.best_epoch), ck.FILE_NAME)
        model = ck.build_model(ck.load_bundle(path)).to(w.device)
    import ray.train

    probs, labels = _predict_split(w, model, ray.train.get_dataset_shard(f"test_{w.rank}"))
    if w.rank != 0:
        return None
    test = classification_metrics(probs, labels, len(w.class_names))
    return {"test_loss": test["loss"], "test_acc": test["acc"], "test_auc": test["auc"], "test_n": test["n"],
            "test_confusion": test["confusion"], "best_epoch": state.best_epoch, "epochs_done": state.epoch,
            "stopped_early": state.stopped_early, "workers": w.world, "nodes": len(set(w.node_ids)),
            "resumed_from": list(state.resumes)}


def checkpoint_and_report(w: _Worker, state: RunState, metrics: dict, better: bool, final: dict | None) -> None:
    """5. Rank 0 writes the epoch's checkpoint (this epoch's weights only) and reports it with the epoch's
    metrics, plus the run's final numbers on the last epoch (``final``): Train V2's ``Result.metrics`` holds
    the metrics of the last *checkpoint* reported, so the final numbers ride on the last checkpoint rather
    than on a report of their own. ``new_best_epoch`` is the score by which Ray keeps checkpoints."""
    import ray.train

    report = {**metrics, "new_best_epoch": metrics["epoch"] if better else 0}
    if final is not None:
        report["final"] = final
    if w.rank != 0:
        ray.train.report(report)  # every worker reports (a barrier); Ray keeps rank 0's
        return
    s = w.settings
    bundle = ck.make_bundle(w.core, class_names=w.class_names, preprocess=s.preprocess, config=asdict(s),
                            metrics=metrics, epoch=metrics["epoch"], extra={
                                "optimizer": to_cpu(w.optimizer.state_dict()), "scaler": w.scaler.state_dict(),
                                "train_state": state.to_dict(), "data": w.cfg["data_info"], "split": w.cfg["split"]})
    with tempfile.TemporaryDirectory(prefix="stampray-ckpt-") as tmp:
        torch.save(bundle, os.path.join(tmp, ck.FILE_NAME))
        # Persisted to the run directory before report returns (Ray's default, synchronous upload).
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=checkpoint_dir_name(metrics["epoch"]))


def _log_epoch(w: _Worker, metrics: dict, val: dict, probs: np.ndarray, labels: np.ndarray, better: bool) -> None:
    """Rank 0's TensorBoard and metrics.jsonl rows and its one console line per epoch."""
    w.log.epoch(metrics, probs, labels, val["confusion"])
    log.info(f"[stampray] epoch {metrics['epoch']}/{w.settings.epochs}  train loss {metrics['train_loss']:.4f} "
          f"acc {metrics['train_acc']:.4f} | val loss {metrics['val_loss']:.4f} acc {metrics['val_acc']:.4f} "
          f"auc {metrics['val_auc']:.4f} | {metrics['stamps_per_s']:,.0f} stamps/s" + (" *" if better else ""))


def _worker_console() -> None:
    """On a Train worker, stampray's log lines (the epoch line, resuming, early stopping) go to stdout, once."""
    import sys

    root = logging.getLogger("stampray")
    if not any(getattr(h, "stampray_worker", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.stampray_worker = True
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False


def train_loop(cfg: dict) -> None:
    """The per-worker training function handed to ``TorchTrainer`` (settings arrive as a plain dict)."""
    import ray.train

    # Ray Train logs every report at INFO through a logger outside its own filter; keep the worker's
    # console to stampray's one line per epoch, which goes to the worker's stdout (Ray shows it on the
    # driver's console).
    logging.getLogger().setLevel(logging.WARNING)
    _worker_console()
    w, state = build_worker(cfg)
    s = w.settings
    train_shard = ray.train.get_dataset_shard("train")
    val_source = None
    final = None
    for epoch in range(state.epoch, state.epoch if state.stopped_early else s.epochs):
        train, steps = train_epoch(w, train_shard, epoch)
        state.step += steps
        if val_source is None:
            val_source = _Cached.collect(ray.train.get_dataset_shard(f"val_{w.rank}"), cfg["val_cache_rows"])
        val, aside, probs, labels = validate(w, val_source)
        metrics = epoch_metrics(w, epoch + 1, train, val, aside)
        better, stop = track_best(state, metrics, s)
        if stop or state.epoch == s.epochs:
            final = final_metrics(w, state)
        if w.rank == 0:
            _log_epoch(w, metrics, val, probs, labels, better)
        checkpoint_and_report(w, state, metrics, better, final)
        if stop:
            if w.rank == 0:
                log.info(f"[stampray] early stopping: {s.monitor} has not improved for {s.early_stopping} "
                         f"epochs (best {state.best_value:.4f} at epoch {state.best_epoch})")
            break
    if w.log is not None:
        if final is not None:
            w.log.hparams({name: getattr(s, name) for name in ("model", "epochs", "batch_size", "lr", "optimizer",
                                                               "schedule", "weight_decay", "augment", "workers",
                                                               "seed")},
                          {"test_acc": final["test_acc"], "test_auc": final["test_auc"],
                           "best_val": state.best_value or 0.0})
        w.log.close()


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------
READ_TASK_CPUS = 0.5  # each Ray Data read-and-prepare task of training (see _datasets)
COUNT_HERE_ROWS = 2_000_000  # split_counts reads tables of up to this many rows in the driver (a private Ray)
MIN_WORKER_CPUS = 0.25  # the smallest CPU share a Train worker is given by default


def read_reserve(cpus: float) -> float:
    """CPUs the Train workers leave to Ray Data's read tasks on a cluster of ``cpus``: a quarter of them, at
    least one (two read tasks), at most half (a 1-CPU Ray keeps half a CPU), never less than one read task."""
    return max(READ_TASK_CPUS, min(max(1.0, 0.25 * cpus), 0.5 * cpus))


def resources(workers: int, use_gpu: bool, cpus: float, cpus_per_worker: float | None = None) -> dict:
    """Per-worker resources that leave :func:`read_reserve` CPUs to Ray Data's readers, so reading never starves.

    Raises ``ValueError`` naming the numbers when ``workers`` cannot fit beside the readers on ``cpus`` CPUs
    (the default share would fall below ``MIN_WORKER_CPUS``, or ``cpus_per_worker`` asks for too much).
    """
    budget = cpus - read_reserve(cpus)
    explicit = bool(use_gpu or cpus_per_worker)
    if explicit:
        per = float(cpus_per_worker or 1.0)
    else:
        per = min(8.0, budget / workers)
        per = float(per if per < 1 else math.floor(per))
    share = per if explicit else MIN_WORKER_CPUS
    if workers * share > budget + 1e-9 or per < share:
        need = math.ceil(workers * share + READ_TASK_CPUS)
        while need - read_reserve(need) < workers * share - 1e-9:
            need += 1
        most = int(max(0.0, budget) / share + 1e-9)
        flag = f"--workers {workers}" + (f" with --cpus-per-worker {share:g}" if cpus_per_worker else
                                         " with --use-gpu" if use_gpu else "")
        fixes = [f"use at most --workers {most}"] if most else []
        if explicit and budget > 0:
            fixes.append(f"lower --cpus-per-worker (at most {budget / workers:.2f} for {workers} workers)")
        fixes.append("connect (--address) to a cluster with more CPUs")
        msg = (f"{flag} needs at least {need} CPU{'s' if need != 1 else ''} ({share:g} CPU per Train worker, plus "
               f"{read_reserve(need):g} left to Ray Data's half-CPU read tasks so that reading never starves); "
               f"this Ray has {cpus:g}. Fix: {', or '.join(fixes)}")
        raise ValueError(msg)
    return {"CPU": per, "GPU": 1.0} if use_gpu else {"CPU": per}


def _worker_resources(settings: "TrainSettings") -> dict:
    """:func:`resources` for the cluster now; where it is too small but an autoscaler can grow it, the
    smallest share for the cluster it can become (the placement group waits for the nodes)."""
    from .capacity import cluster_capacity
    from .runtime import cluster_cpus

    cpus = cluster_cpus()
    try:
        return resources(settings.workers, settings.use_gpu, cpus, settings.cpus_per_worker)
    except ValueError:
        cap = cluster_capacity()
        if not cap.autoscaling or cap.cpus_max <= cpus:
            raise
        share = settings.cpus_per_worker or (1.0 if settings.use_gpu else MIN_WORKER_CPUS)
        return resources(settings.workers, settings.use_gpu, min(cap.cpus_max, 1e9), share)


def split_counts(data: str, manifest: st.Manifest, fractions, here: bool = True) -> dict[str, int]:
    """Labelled stamps in each split of ``data``, from the id, label and split columns. With ``here`` (a
    Ray of this machine's own: the driver sees the files its read tasks will) a table of up to
    ``COUNT_HERE_ROWS`` rows is read in the driver (1,000,000 rows took 0.22 s on the 2-core development
    machine, where three Ray tasks in fresh worker processes took 3.7 s for 600); otherwise one small Ray
    task per shard, which also shows at once that a cluster's nodes can read the table."""
    shards = [s["path"] for s in manifest.shards]
    columns = [st.ID, st.LABEL] + ([st.SPLIT] if st.SPLIT in manifest.columns else [])
    if here and manifest.num_rows <= COUNT_HERE_ROWS:
        parts = [count_splits(data, shard, tuple(fractions), columns) for shard in shards]
    else:
        import ray

        task = ray.remote(num_cpus=READ_TASK_CPUS)(count_splits)
        parts = ray.get([task.remote(data, shard, tuple(fractions), columns) for shard in shards])
    totals = dict.fromkeys(st.SPLIT_NAMES, 0)
    for counts in parts:
        for name, n in counts.items():
            totals[name] += n
    return totals


def _check_splits(settings: "TrainSettings", manifest: st.Manifest, counts: dict[str, int]) -> None:
    """Refuse an empty train or validation split (nothing to learn from, no best epoch to choose)."""
    shown = ", ".join(f"{k} {v}" for k, v in counts.items())
    for name in ("train", "val"):
        if counts[name]:
            continue
        fractions = ",".join(f"{f:g}" for f in settings.fractions)
        if st.SPLIT in manifest.columns:
            why = ("the table's split column (recorded by 'stampray ingest --split') puts none of its labelled "
                   "stamps there")
            fix = (f"train on a table ingested without --split, which the id hash splits by the fractions "
                   f"({fractions}); a published test set is for 'stampray score' and 'stampray evaluate'")
        else:
            why = f"the split fractions ({fractions}) give it none of {sum(counts.values())} labelled stamps"
            fix = 'give the train and val splits a share ("fractions" in --config; default 0.7,0.1,0.2)'
        msg = f"the {name} split of {settings.data} holds 0 stamps ({shown}): {why}; fix: {fix}"
        raise ValueError(msg)
    if not counts["test"]:
        log.warning(f"train: the test split of {settings.data} holds 0 stamps ({shown}); the run will have no "
                    f"test accuracy")


@dataclass
class TrainResult:
    run_dir: str
    best: str
    metrics: dict
    history: list = field(default_factory=list)


def _datasets(settings: TrainSettings, manifest: st.Manifest, ledger):
    import ray.data

    from .data import read_stamps, work_items

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # bars from inside Train workers arrive as blank log lines
    columns = [st.ID, st.IMAGE, st.LABEL] + ([st.SPLIT] if st.SPLIT in manifest.columns else [])
    items = work_items(settings.data, [s["path"] for s in manifest.shards])
    # A seeded row-group order for training; every epoch re-reads through a local shuffle buffer.
    order = np.random.default_rng(settings.seed).permutation(len(items)).tolist()
    out = {}
    world = int(settings.workers)
    # train is split between the workers by Ray Train (equal parts); validation and test are shared out
    # by id (part_mask), one dataset per worker, so no row is dropped to even them out.
    wanted = [("train", "train", None)] + [(f"{split}_{r}", split, (r, world))
                                           for split in ("val", "test") for r in range(world)]
    for name, split, part in wanted:
        ds = read_stamps(settings.data, columns=columns,
                         items=[items[i] for i in order] if split == "train" else items)
        # Half-CPU tasks: they fit on a node whose other CPUs hold Train workers.
        out[name] = ds.map_batches(prepare_batch, batch_format="pyarrow", batch_size=4096, num_cpus=READ_TASK_CPUS,
                                   fn_kwargs={"split": split, "fractions": tuple(settings.fractions),
                                              "shape": manifest.spec.shape, "preprocess": settings.preprocess,
                                              "ledger": ledger, "part": part, "raw": settings.device_preprocess})
    return out


def _check_resume(run_dir: str, settings: TrainSettings) -> None:
    path = st.join(run_dir, "settings.json")
    if not st.exists(path):
        return
    before = json.loads(st.read_text(path))
    # What makes the resumed run another experiment: the model, its inputs, and the split (other fractions
    # would put stamps the first epochs trained on into the test split).
    # And how it learns: the optimizer (whose restored state belongs to the one it was started with), its rate,
    # schedule and batch, the loss's class weights and the augmentation. --epochs may grow; --workers may change
    # (the batch is the global one).
    number = lambda v: round(float(v), 12) if v is not None else None  # noqa: E731
    same = {"model": str, "data": lambda p: st.canonical(str(p)), "preprocess": str,
            "fractions": lambda f: [round(float(x), 12) for x in f] if f is not None else None,
            "optimizer": str, "lr": number, "momentum": number, "weight_decay": number, "schedule": str,
            "warmup_epochs": number, "batch_size": int, "class_weights": str, "augment": bool}
    for key, norm in same.items():
        if key not in before or (before.get(key) is None and key == "fractions"):
            continue  # a run of an earlier stampray that did not record it
        was, now = before.get(key), getattr(settings, key)
        if (norm(was) if was is not None else None) != (norm(now) if now is not None else None):
            shown = ",".join(map(str, was)) if key == "fractions" else was
            now = ",".join(map(str, now)) if key == "fractions" else now
            msg = (f"run {run_dir} was started with --{key.replace('_', '-')} {shown}, not {now}; rerun with the same "
                   f"settings to resume it, or choose another --name")
            raise ValueError(msg)


def _trainer(settings: TrainSettings, cfg: dict, res: dict, out: str, datasets: dict):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        train_loop,
        train_loop_config=cfg,
        torch_config=TorchConfig(backend="nccl" if settings.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=settings.workers, use_gpu=settings.use_gpu,
                                               resources_per_worker=res, placement_strategy=settings.placement),
        run_config=ray.train.RunConfig(
            name=settings.run_name, storage_path=out,
            # The best epoch's weights live in its own checkpoint, which Ray keeps: checkpoints are scored by
            # new_best_epoch (the epoch's number when it is a new best, else 0), so Ray keeps the
            # keep_checkpoints most recent new bests, the latest of them the best epoch, and always the
            # latest checkpoint (resumes start there). One copy of the weights per checkpoint, and a
            # resumed or restarted run still finds the best weights: the checkpoint names best_epoch.
            # (Rank 0 writing best.pt itself could not tell whether the checkpoint naming it was
            # registered before a failure: a restart from the one before would find best.pt ahead of it.)
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=settings.keep_checkpoints,
                                                         checkpoint_score_attribute="new_best_epoch",
                                                         checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=settings.max_failures),
            # One console line per epoch from rank 0, not Ray Train's per-report logging; print() is
            # left alone so each line appears once.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                                              "RAY_DATA_LOG_LEVEL": "WARNING"}}),
        datasets=datasets,
        # Split train only, and equally (Ray's default): every worker then runs the same batches.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


def _write_set_aside(run_dir: str, data: str, rows: list[dict]) -> dict:
    """List the stamps the read tasks set aside in ``RUNDIR/NAME/_errors/`` (the one ``_errors`` schema;
    ``source`` names the table and split) and return their counts for the metrics."""
    counts = st.write_errors(run_dir, st.shard_name(0), [
        {"stamp_id": r["stamp_id"], "source": f"{data} ({r['split']} split)", "row": None, "reason": r["reason"]}
        for r in rows])
    by_split = dict.fromkeys(st.SPLIT_NAMES, 0)
    for r in rows:
        by_split[r["split"]] += 1
    return {"set_aside": by_split, "set_aside_reasons": counts}


TRAINING_ONLY = ("optimizer", "scheduler", "scaler", "train_state")  # bundle keys that best.pt and last.pt leave out


def _write_best_and_last(result, run_dir: str) -> tuple[str, list]:
    """Write ``best.pt`` (the best epoch's checkpoint, kept by Ray: see ``_trainer``) and ``last.pt`` (the
    latest) without their training state; return best.pt's path and the run's history."""
    def load(checkpoint) -> dict:
        with checkpoint.as_directory() as d:
            return ck.load_bundle(os.path.join(d, ck.FILE_NAME))

    latest = load(result.checkpoint)
    state = RunState.from_dict(latest["train_state"])
    last = {k: v for k, v in latest.items() if k not in TRAINING_ONLY}
    ck.save(last, st.join(run_dir, "last.pt"))
    if state.best_epoch == 0:  # no epoch had a finite monitored value: the last weights stand in
        best = dict(last, epoch=0, metrics={})
    else:
        found = [c for c, m in result.best_checkpoints if int(m["epoch"]) == state.best_epoch]
        if not found:
            msg = (f"the checkpoint of the best epoch ({state.best_epoch}) is missing from {run_dir}; "
                   f"Ray kept: {sorted(int(m['epoch']) for _, m in result.best_checkpoints)}")
            raise RuntimeError(msg)
        best = {k: v for k, v in load(found[0]).items() if k not in TRAINING_ONLY}
    best_path = st.join(run_dir, "best.pt")
    ck.save(best, best_path)
    return best_path, state.history


def _check_inputs(settings: TrainSettings) -> tuple[st.Manifest, int]:
    """Refuse, before Ray starts, what cannot train: an --out that is a file, data without two classes or
    labels, a model too large for the stamps, damaged shards. Returns the manifest and its labelled rows."""
    st.check_separate(settings.out, {"--data": settings.data})
    fs, p = st.resolve(settings.out)
    if fs.get_file_info(p).type == st.pafs.FileType.File:
        msg = f"--out {settings.out} is a file; give a directory for the runs"
        raise ValueError(msg)
    _check_runs_dir(settings)
    manifest = st.read_manifest(settings.data)
    spec = manifest.spec
    if spec.num_classes < 2:
        msg = (f"{settings.data} declares {spec.num_classes} classes; training needs labelled data with at least "
               f"two classes (ingest with --classes)")
        raise ValueError(msg)
    check_class_names(spec.class_names, settings.data, "re-ingest the table with distinct class names")
    create_model(settings.model, spec.shape[0], spec.shape[1:], spec.num_classes)  # fail fast on size mismatch
    st.inspect_shards(settings.data, manifest)  # missing, truncated or replaced shards: refused now
    labelled = sum(int(v) for v in manifest.label_counts.values())
    if labelled == 0:
        msg = f"{settings.data} holds no labelled stamps; training needs labels"
        raise ValueError(msg)
    counts = {k: int(manifest.label_counts.get(str(k), 0)) for k in range(spec.num_classes)}
    empty = [spec.class_names[k] for k, n in counts.items() if n == 0]
    if len(empty) > spec.num_classes - 2:
        msg = (f"{settings.data} has labelled stamps of {spec.num_classes - len(empty)} class(es) only; classes "
               f"{', '.join(empty)} have none, and a classifier needs examples of at least two: ingest stamps of "
               f"those classes, or declare only the classes the table holds (--classes)")
        raise ValueError(msg)
    if empty:
        log.warning(f"train: warning: classes {', '.join(empty)} of {settings.data} have no labelled stamps; the "
                    f"model will never learn them")
    return manifest, labelled


def _run_of(path: str) -> str | None:
    """The model of the run whose directory ``path`` is (its ``settings.json`` as train writes it), or None."""
    try:
        doc = json.loads(st.read_text(st.join(path, "settings.json")))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return str(doc["model"]) if isinstance(doc, dict) and {"model", "data"} <= set(doc) else None


def _check_runs_dir(settings: TrainSettings) -> None:
    """Refuse an ``--out`` that is, or lies directly inside, a run's own directory, or that is a stamp table
    or score output: ``--out`` holds runs, each in a directory of its own (``--name``), so
    ``--out runs/cnn --model jet_cnn`` would put a run inside the cnn run."""
    out = settings.out
    for where, d in (("is", out), ("lies inside", _parent(out))):
        model = _run_of(d) if d else None
        if model:
            msg = (f"--out {out} {where} the directory of a {model} run ({d}); --out is where runs go, each in a "
                   f"directory of its own named by --name (default: the model): give the directory that holds "
                   f"the runs ({_parent(d)})")
            raise ValueError(msg)
    if st.exists(st.join(out, st.MANIFEST_NAME)):
        msg = (f"--out {out} holds a {st.MANIFEST_NAME} (a stamp table, or score output); give a directory for "
               f"the runs")
        raise ValueError(msg)


def _parent(path: str) -> str:
    """The directory above ``path`` (a local path, made absolute, or a URI)."""
    if "://" in path:
        return posixpath.dirname(path.rstrip("/"))
    return os.path.dirname(os.path.abspath(path))


def fit(settings: TrainSettings) -> TrainResult:
    """Train ``settings.model`` on ``settings.data`` with Ray Train; returns where the run lives and its
    final metrics (test accuracy of the best epoch among them)."""
    import ray

    from .inference import check_gpu_nodes
    from .runtime import ensure_gpus, ray_session, target_address

    t0 = time.time()
    manifest, labelled = _check_inputs(settings)
    spec = manifest.spec
    out = settings.out if "://" in settings.out else os.path.abspath(settings.out)
    run_dir = st.join(out, settings.run_name)
    _check_resume(run_dir, settings)
    summary_path = st.join(run_dir, "summary.json")
    if st.exists(summary_path):
        done = json.loads(st.read_text(summary_path))
        if int(done["metrics"].get("epochs_done", 0)) >= settings.epochs or done["metrics"].get("stopped_early"):
            log.info(f"train: run {run_dir} is already complete ({done['metrics']['epochs_done']} epochs); "
                     f"nothing to do. Raise --epochs to continue it.")
            return TrainResult(run_dir, done["best"], done["metrics"], done.get("history", []))

    weights = class_weights_from_counts(manifest.label_counts, spec.num_classes) \
        if settings.class_weights == "auto" else None
    settings_dict = asdict(settings)
    unlabelled = manifest.num_rows - labelled
    if unlabelled:
        log.info(f"train: {unlabelled} unlabelled stamps of {settings.data} are not used for training")

    with contextlib.ExitStack() as held, ray_session(settings.address):
        if settings.use_gpu:  # an autoscaler brings GPU nodes on request; a cluster that cannot refuses now
            ensure_gpus("train", int(settings.workers), float(settings.wait_gpu))
            check_gpu_nodes("train")  # a GPU node whose torch cannot use CUDA: one line, before any worker
        # Refusals come before anything is written or started: workers that would starve the reads, an
        # empty split.
        res = _worker_resources(settings)
        counts = split_counts(settings.data, manifest, settings.fractions,
                              here=target_address(settings.address) is None)
        _check_splits(settings, manifest, counts)
        held.enter_context(output_lock(run_dir, "train"))  # one run at a time in RUNDIR/NAME, to the end
        st.make_dirs(run_dir)
        st.write_text(st.join(run_dir, "settings.json"),
                      json.dumps({**settings_dict, "provenance": provenance()}, indent=2))
        per_worker = settings.batch_size // settings.workers
        # On the driver's node: a worker node lost mid-run must not take the ledger (and the run) with it.
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        ledger = ray.remote(num_cpus=0)(SetAside).options(scheduling_strategy=here).remote()
        cfg = {
            "settings": settings_dict, "shape": list(spec.shape), "class_names": list(spec.class_names),
            "class_weights": weights, "run_dir": run_dir, "threads": max(1, int(res["CPU"])),
            "steps_per_epoch": max(1, math.ceil(counts["train"] / settings.workers / per_worker)),
            "val_cache_rows": int(2**29 // (4 * int(np.prod(spec.shape)))),  # about 512 MiB of stamps
            "data_info": {"path": settings.data, "rows": manifest.num_rows, "shape": list(spec.shape),
                          "splits": counts},
            "ledger": ledger, "device_preprocess": settings.device_preprocess,
            # The split definition travels with every checkpoint: score and evaluate use the same one.
            "split": {"fractions": list(settings.fractions), "column": st.SPLIT in manifest.columns},
        }
        try:
            result = _trainer(settings, cfg, res, out, _datasets(settings, manifest, ledger)).fit()
            aside = _write_set_aside(run_dir, settings.data, ray.get(ledger.listing.remote()))
        finally:
            ray.kill(ledger)

        # 7. best.pt and last.pt beside Ray's checkpoints; the final numbers from the last checkpoint's report.
        if not result.metrics or "final" not in result.metrics:
            msg = (f"the last checkpoint of {run_dir} carries no final metrics (a run begun by an older stampray?); "
                   f"train it under another --name")
            raise RuntimeError(msg)
        best_path, history = _write_best_and_last(result, run_dir)
        metrics = dict(result.metrics["final"])
        metrics["wall_seconds"] = round(time.time() - t0, 1)
        metrics["stamps_per_s"] = float(np.mean([h["stamps_per_s"] for h in history])) if history else 0.0
        metrics.update(aside)
        st.write_text(summary_path, json.dumps({"best": best_path, "metrics": metrics, "history": history}, indent=2))
        return TrainResult(run_dir, best_path, metrics, history)
