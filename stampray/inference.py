"""Model replicas in a Ray Data actor pool: the machinery ``stampray score`` and ``stampray occlude`` share.

How a job scales out
--------------------
* **Pools follow the cluster.** The pool is an autoscaling ``ActorPoolStrategy(min_size=1, max_size=M)``:
  ``M`` comes from what the cluster can grow to (the autoscaler's node types, see :mod:`stampray.capacity`),
  capped by ``--max-actors``, so a cluster that starts at zero worker nodes grows a replica per core (or
  per GPU) as the autoscaler brings nodes, instead of being sized once from the head.
* **Replicas read their own input.** On CPUs the dataset is the list of work items (a row group each, or
  a batch of rows for occlusion) and each replica reads the items it is given: no read tasks compete with
  the replicas for the cores and no decoded rows travel through the object store (on the 2-core machine
  the steady rate went from 15.6k to 23.6-28.7k stamps/s). GPU replicas keep read tasks, which
  decode beside them while the GPU computes.
* **Reads and commits always get CPU.** On a node of ``c`` CPUs, ``floor(c)`` single-thread replicas each
  ask for ``(c - r) / floor(c)`` CPUs with ``r`` = 0.5 (0.25 on a 1-CPU node): one more replica never fits,
  and the ``r`` left over runs the quarter-CPU read tasks (GPU pools) and the committer actor of score or
  occlude. (Measured on Ray 2.60: replicas
  holding every CPU leave the read tasks unscheduled and the job hangs.) A 2-CPU laptop runs two replicas
  of 0.75 CPU.
* **The workers write; the driver keeps the books.** A replica writes its results straight to the output
  filesystem (local or ``s3://``), atomically, and hands the driver only a small record per piece (which
  shard, which rows, how many, on which node). See :mod:`stampray.score` for how pieces become shards.
* **One runner.** :func:`run_pool` plans the pool, reads the stamps and streams them through the replicas
  for both verbs; each verb only says what its replica is and what to do with the records. A small job
  (``--in-process``, :func:`runs_here`) runs the same replicas on threads of the verb's own process
  instead (:func:`run_items_here`), without Ray.

How the model reaches the replicas
----------------------------------
The checkpoint is read once (:func:`open_model_for`), put in the object store once, and its ObjectRef
travels inside the replica's constructor arguments; each replica fetches the bytes once and loads them
with :func:`stampray.checkpoint.bundle_from_bytes` (``weights_only``). Ray Data 2.60 itself passes every
pool actor its ``DataContext`` and its ``map_batches`` callable as ObjectRefs and asks for restarts
(``max_restarts=-1``), so Ray core logs "has constructor arguments in the object store and max_restarts >
0" once per process for any Ray Data actor pool, whatever the callable's arguments (Ray's
``CoreWorker::CreateActor``; ray-project/ray#57733; ``max_restarts=0`` silences it but loses the replica
restarts a node loss needs). The refs live as long as the pool, so the restarts the line warns about work;
:func:`run_pool` drops that one line from the stderr of the process that creates the replicas.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import select
import sys
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import checkpoint as ck
from . import preprocess as pp
from . import table as st
from .classes import ClassMatch, check_class_names, match_classes, prob_column  # noqa: F401
from .data import READ_ERROR
from .progress import Progress  # noqa: F401 - score and occlude take it from here
from .pieces import PARTS_DIR, TMP_DIR, delete_dir, list_files, reason_counts, write_atomic  # noqa: F401

logger = logging.getLogger(__name__)

READ_CPUS = 0.25  # each read task (GPU pools); the committer actor of score or occlude
LOCAL_NODE = "local"  # the node of a replica running without Ray (a job scored in-process)
COMPILE = ("auto", "on", "off")  # --compile: torch.compile the replicas
# A compiled replica runs a part of at most 1/EAGER_PART of its one shape uncompiled rather than padded: on one
# CPU thread the compiled cnn is about 2.5x the eager forward, so the padded forward costs more from there.
EAGER_PART = 3
# A replica builds the node's compiled package (stampray.aot: 20-25 s of one core for cnn here, during which it
# scores nothing) only in a job whose other replicas have at least this many forwards each to do meanwhile
# (about 30 s of one CPU replica): in a shorter job the pool ends, and the build with it, before the package
# is complete, and every such job would lose a replica to a build that never lands.
PACKAGE_BUILD_FORWARDS = 750_000
CPU_BATCH = 4096  # stamps per forward of a CPU replica (score's default --batch-size): its compiled shape
GPU_BATCH = 16384  # stamps per forward of a GPU replica (score's default --batch-size with --use-gpu)
BLOCKS_PER_REPLICA = 4  # on an autoscaling cluster, start one replica per this many input blocks
IN_PROCESS = ("auto", "on", "off")  # --in-process of score and occlude
IN_PROCESS_FORWARDS = 200_000  # --in-process auto: jobs of fewer forward passes than this run without Ray
HERE_WORKERS = 4  # at most this many replica threads in a job run in-process (see here_workers)
UNBOUNDED_NODES = 16  # nodes planned for when an autoscaler node type has no max_workers


def check_compatible(bundle: dict, manifest: st.Manifest, data: str, rename_classes: bool = False) -> ClassMatch:
    """Catch a model/data mismatch before any work starts; return how the classes are matched.

    Input shape and class count must agree. The checkpoint's class names must each give a score column
    of their own, and they must be the table's (see :func:`stampray.classes.match_classes`): the same
    names in another order are matched by name, other names are refused unless ``rename_classes``.
    """
    c, h, w = manifest.spec.shape
    if bundle["in_channels"] != c:
        msg = (f"the model takes {bundle['in_channels']}-channel stamps, {data} holds {c}-channel stamps "
               f"{manifest.spec.shape}; score it with a model trained on this kind of data")
        raise ValueError(msg)
    if list(bundle["image_size"]) != [h, w]:
        msg = (f"the model was trained on {bundle['image_size'][0]}x{bundle['image_size'][1]} stamps, "
               f"{data} holds {h}x{w} stamps")
        raise ValueError(msg)
    k = int(bundle["num_classes"])
    labels = [int(x) for x in manifest.label_counts]
    if labels and max(labels) >= k:
        msg = (f"{data} has labels up to {max(labels)} ({manifest.spec.num_classes} classes: "
               f"{', '.join(manifest.spec.class_names)}) but the model predicts {k} classes "
               f"({', '.join(bundle['class_names'])})")
        raise ValueError(msg)
    check_class_names(bundle["class_names"], "the checkpoint's classes",
                      "it was trained on a table whose class names collide: re-ingest that table with "
                      "distinct names and train again")
    return match_classes(bundle["class_names"], manifest.spec.class_names, data, rename_classes)


def open_model_for(model: str, data: str, rename_classes: bool = False) -> tuple[st.Manifest, str, dict, bytes]:
    """The dataset's manifest, the checkpoint's path, bundle and bytes, after the compatibility check.

    The checkpoint is read once; the replicas load the same bytes (``weights_only``) from the object store.
    When the table lists the model's classes in another order, the bundle and bytes returned carry the
    table's order (``class_names``) and the model output behind each class (``class_order``), which
    :class:`ModelActor` applies: everything downstream (``pred``, ``pred_name``, the ``p_`` columns, the
    score manifest's class names) then follows the table's labels. What was matched is said on stderr.
    """
    manifest = st.read_manifest(data)
    model_path = ck.resolve_path(model)
    fs, p = st.resolve(model_path)
    with fs.open_input_stream(p) as f:
        data_bytes = f.read()
    bundle = ck.bundle_from_bytes(data_bytes, model_path)
    match = check_compatible(bundle, manifest, data, rename_classes)
    if match.order is not None:
        bundle = {**bundle, "class_names": list(match.names), "class_order": list(match.order)}
        data_bytes = ck.bundle_bytes(bundle)
    if match.note:
        logger.info(f"stampray: note: {match.note}")
    return manifest, model_path, bundle, data_bytes


# --------------------------------------------------------------------------------------------------
# The replica
# --------------------------------------------------------------------------------------------------
class ModelActor:
    """Holds one model replica; loads the checkpoint once (from bytes in the object store).

    With ``tta`` or ``mc_dropout`` K every stamp goes through the model K times
    (:func:`stampray.notebook.forward_passes`, which :func:`stampray.predict` uses too): a forward takes
    ``chunk // K`` stamps, so its K x rows variants still fill one ``chunk``, the one shape a compiled
    replica runs. MC dropout runs in eager mode: Inductor draws a compiled graph's dropout masks with its
    own random kernels, not eager torch's, so seeded passes (a block redone draws the same masks) would not
    give :func:`stampray.predict`'s numbers, and switching dropout layers between modes recompiles.
    """

    def __init__(self, model_bytes, threads: int = 1, use_gpu: bool = False, compile: bool = False,
                 chunk: int = 4096, *, tta: int = 0, mc_dropout: int = 0, features: bool = False,
                 source: dict | None = None, build_package: bool = False, use_package: bool = True):
        """``model_bytes``: the checkpoint's bytes, or the ObjectRef of them :func:`run_pool` passes.
        ``source``: ``{"root": table, "columns": [...]}`` when the replica reads its own work items (see
        :meth:`stamps`). ``build_package``: a compiling CPU replica may build the node's compiled package
        when there is none (:func:`build_packages` says when a job is long enough); without it, it loads
        one that exists and otherwise runs ``torch.compile``. ``use_package=False``: ``torch.compile`` only,
        for replicas that share a process (threads): a package's forward holds the GIL throughout (two
        threads did no more than one), ``torch.compile``'s kernels release it."""
        import torch

        from .notebook import Outputs

        ray = sys.modules.get("ray")  # not imported by a job scored in-process (see stampray.score)
        if ray is not None and isinstance(model_bytes, ray.ObjectRef):  # nested in the arguments: not resolved
            model_bytes = ray.get(model_bytes)
        torch.set_num_threads(max(1, int(threads)))
        if use_gpu:
            require_cuda("--use-gpu")
        self.device = torch.device("cuda" if use_gpu else "cpu")
        bundle = ck.bundle_from_bytes(model_bytes, "the model sent to this replica")
        self.bundle = bundle
        self.model = ck.build_model(bundle).to(self.device)
        self.preprocess = pp.get(bundle["preprocess"])
        self.preprocess_torch = pp.get_torch(bundle["preprocess"])
        self.shape = (bundle["in_channels"], *bundle["image_size"])
        self.class_names = list(bundle["class_names"])
        order = bundle.get("class_order")  # set by open_model_for: the table's label order
        self.class_order = np.asarray(order, np.int64) if order is not None else None
        self.amp = self.device.type == "cuda"
        self.chunk = int(chunk)
        self.tta, self.mc_dropout, self.features = int(tta), int(mc_dropout), bool(features)
        self.rows = max(1, self.chunk // max(self.tta, self.mc_dropout, 1))  # stamps per forward
        self.forward = self.eager = Outputs(self.model, self.features)
        self.compiled, self.compiled_how = False, "eager"
        self.source = dict(source) if source else None
        self.build_package, self.use_package = bool(build_package), bool(use_package)
        self.node_id = ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() \
            else LOCAL_NODE
        if compile and not self.mc_dropout:
            self._compile()

    def stamps(self, batch: pa.Table) -> pa.Table:
        """The stamp rows of one call: ``batch`` itself, or, for a replica that reads its own input
        (``source``), the rows of the work items it lists (:func:`stampray.data.work_items`), each tagged
        with its shard and row (a damaged row group comes as rows carrying their reason)."""
        if self.source is None or "row_group" not in batch.schema.names:
            return batch
        from .data import _read_items

        return _read_items(batch, self.source["root"], self.source["columns"], True)

    def _compile(self) -> None:
        """Compile the forward for one fixed batch shape (tails are padded), warmed up here through the very
        path real batches take (channels-last, the device copy and, on a GPU, ``autocast``), so that the
        compile time is paid once per replica and the first real batch does not recompile.

        On a CPU the compiled forward comes from the node's compiled package (:mod:`stampray.aot`: built by
        the first replica to need it, loaded in milliseconds by every later one); without one,
        ``torch.compile``; any failure of either falls back to the next, and last to eager mode.
        ``self.compiled_how``: ``"package loaded"``, ``"package built"``, ``"torch.compile"`` or ``"eager"``."""
        import torch

        from . import aot

        eager = self.eager
        # Channels-last: about 2.5x eager on one CPU thread for cnn. Inductor's ``freezing`` (weights folded
        # into the graph) is left off: measured here it gave no faster a forward (25-27k against 28-30k
        # stamps/s), and a frozen graph bypasses Inductor's FX-graph cache, so every replica compiled afresh.
        model = eager.to(memory_format=torch.channels_last)
        tries = []
        if self.device.type == "cpu" and self.use_package:
            # The one shape the compiled forward sees: a chunk of rows, times K with --tta K (pass-major).
            shape = (self.rows * (self.tta if self.tta > 1 else 1), *self.shape)
            packaged, how = aot.forward_for(model, shape, tag=f"features={self.features}",
                                            may_build=self.build_package)
            if packaged is not None:
                tries.append((packaged, f"package {how}"))
        tries.append((None, "torch.compile"))
        for forward, how in tries:
            try:
                forward = torch.compile(model, dynamic=False) if forward is None else forward
                self.forward, self.compiled, self.compiled_how = forward, True, how
                if how.startswith("package"):
                    return  # aot ran it once at this very shape when it loaded it (aot._checked)
                with torch.inference_mode():
                    self._run(np.zeros((self.rows, *self.shape), np.float32))
                return
            except Exception as e:  # noqa: BLE001 - no compiler, unsupported op, a package that fails to run
                logger.warning(f"[stampray] {how} unavailable ({type(e).__name__}: {e})")
        self.forward, self.compiled, self.compiled_how = eager, False, "eager"
        logger.warning("[stampray] scoring in eager mode")

    def _run(self, part: np.ndarray, eager: bool = False):
        """The passes over one chunk (at most ``self.rows`` preprocessed stamps), as tensors on the device;
        the only place a replica calls its model, so warm-up and real batches take the same path.
        ``eager``: through the uncompiled model (a small part, see :meth:`passes`)."""
        import torch

        xb = torch.from_numpy(part)
        if self.device.type == "cuda":
            xb = xb.pin_memory().to(self.device, non_blocking=True)
        return self._run_tensor(xb, eager)

    def _run_tensor(self, xb, eager: bool = False):
        """The passes (:func:`stampray.notebook.forward_passes`) over a preprocessed tensor already on the
        device: the model runs channels-last when compiled (``eager``: the uncompiled model, any shape) and
        under autocast on a GPU; the one place a replica calls its model, for warm-up and real batches alike."""
        import torch

        from .notebook import forward_passes

        compiled = self.compiled and not eager

        def call(x):
            if compiled:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                return (self.forward if compiled else self.eager)(x)

        return forward_passes(self.model, xb, tta=self.tta, mc_dropout=self.mc_dropout, features=self.features,
                              forward=call)

    def _seeded(self, seed: int | None):
        """MC dropout draws its masks from torch's generator seeded with ``seed`` (restored after), so a block
        redone (a rerun, a lost node) gets the same numbers; a no-op otherwise."""
        from .notebook import seeded

        return seeded(seed if self.mc_dropout else None, self.device)

    def predict(self, raw: np.ndarray, seed: int | None = None):
        """The passes over raw (decoded, not yet normalised) stamps (N, C, H, W): a
        :class:`stampray.notebook.Passes` of arrays (``probs``; ``std`` with two passes or more; ``features``
        when asked), in the table's class order. ``seed``: the MC-dropout seed (see :meth:`_seeded`).

        On the CPU: the checkpoint's numpy preprocessing, then the model. On a GPU only decoding stays on
        the CPU: raw pixels go to the device from pinned memory (``non_blocking``, the next chunk's copy on a
        stream of its own while this chunk computes) and are normalised there by the torch version of the
        same step (:func:`stampray.preprocess.get_torch`, equal within float tolerance), so one CPU core
        no longer sets the GPU's pace with per-stamp quartiles."""
        with self._seeded(seed):
            if self.device.type != "cuda" or self.preprocess_torch is None:
                return self.passes(self.preprocess(raw))
            return self._collect(self._gpu_passes(raw))

    def _gpu_passes(self, raw: np.ndarray) -> list:
        """The passes over raw stamps on the GPU, chunk by chunk, the next chunk's upload overlapping."""
        import torch

        out, chunks = [], [raw[i:i + self.rows] for i in range(0, len(raw), self.rows)]
        copy_stream = torch.cuda.Stream()

        def upload(part):
            with torch.cuda.stream(copy_stream):
                return torch.from_numpy(np.ascontiguousarray(part)).pin_memory().to(self.device, non_blocking=True)

        with torch.inference_mode():
            nxt = upload(chunks[0]) if chunks else None
            for i in range(len(chunks)):
                torch.cuda.current_stream().wait_stream(copy_stream)
                xb, n = nxt, len(chunks[i])
                xb.record_stream(torch.cuda.current_stream())
                nxt = upload(chunks[i + 1]) if i + 1 < len(chunks) else None
                xb = self.preprocess_torch(xb)
                if self.compiled and n < self.rows:  # keep the one compiled shape
                    xb = torch.cat([xb, xb.new_zeros((self.rows - n, *self.shape))])
                out.append(_host(self._run_tensor(xb), n))
        return out

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """Softmax probabilities for preprocessed stamps (N, C, H, W) (the mean of the passes)."""
        return self.passes(x).probs

    def passes(self, x: np.ndarray):
        """The passes over preprocessed stamps (N, C, H, W), as :meth:`predict` returns them.

        A compiled replica runs one shape, ``self.rows`` stamps, and pads a shorter part to it; a part of
        at most ``1 / EAGER_PART`` of that (a shard's tail, an occlusion block's unoccluded stamps) goes
        through the uncompiled model instead, which costs less than the padded forward."""
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(x), self.rows):
                part = np.ascontiguousarray(x[i:i + self.rows])
                n = len(part)
                eager = self.compiled and n * EAGER_PART <= self.rows
                if self.compiled and n < self.rows and not eager:  # keep the one compiled shape
                    part = np.concatenate([part, np.zeros((self.rows - n, *self.shape), np.float32)])
                out.append(_host(self._run(part, eager), n))
        return self._collect(out)

    def _collect(self, out: list):
        """The chunks' passes as one :class:`stampray.notebook.Passes` of arrays, in the table's class order."""
        from .notebook import Passes

        k = len(self.class_names)
        spread = max(self.tta, self.mc_dropout) > 1

        def cat(i: int, width: int, reorder: bool):
            if not out:
                return np.zeros((0, width), np.float32)
            a = np.concatenate([o[i] for o in out])
            return a[:, self.class_order] if reorder and self.class_order is not None else a

        return Passes(cat(0, k, True), cat(1, k, True) if spread else None,
                      cat(2, self.feature_width, False) if self.features else None)

    @functools.cached_property
    def feature_width(self) -> int:
        """Length of the model's forward_features vector."""
        from .notebook import feature_width

        return feature_width(self.model)

    def decode_valid(self, batch: pa.Table) -> tuple[np.ndarray, np.ndarray, list]:
        """Images of the rows that can be scored, their row indices, and (row, reason) for the others."""
        col = batch.column(st.IMAGE)
        col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        n = batch.num_rows
        width = int(np.prod(self.shape)) * 4
        reasons: dict[int, str] = {}
        if col.type != pa.binary(width):
            # Rows of shards with another image size (a batch may mix shards: Arrow then holds them as
            # variable-size binary): the rows of the right size are scored, the others set aside.
            if not (pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)
                    or pa.types.is_fixed_size_binary(col.type)):
                reason = f"shape: image column {col.type} does not hold {self.shape} float32 stamps"
                return np.zeros((0, *self.shape), np.float32), np.zeros(0, np.int64), [(i, reason) for i in range(n)]
            lengths = pc.binary_length(col).fill_null(width).to_numpy(zero_copy_only=False)
            for i in np.nonzero(lengths != width)[0]:
                reasons[int(i)] = (f"shape: image of {int(lengths[i]) // 4} float32 values, the model takes "
                                   f"{self.shape} = {width // 4}")
            if len(reasons) == n:
                return np.zeros((0, *self.shape), np.float32), np.zeros(0, np.int64), sorted(reasons.items())
            col = pc.if_else(pa.array(lengths == width), col.cast(pa.binary()), pa.scalar(b"\x00" * width, pa.binary()))
            col = col.cast(pa.binary(width))
        if READ_ERROR in batch.schema.names:  # rows of a damaged row group (see data.read_stamps)
            for i, why in enumerate(batch.column(READ_ERROR).to_pylist()):
                if why is not None:
                    reasons[i] = why
        if col.null_count:
            for i in np.nonzero(~col.is_valid().to_numpy(zero_copy_only=False))[0]:
                reasons.setdefault(int(i), "shape: no image")
            col = col.fill_null(b"\x00" * width)
        images = st.decode_images(col, self.shape)
        finite = np.isfinite(images).all(axis=(1, 2, 3))
        for i in np.nonzero(~finite)[0]:
            reasons.setdefault(int(i), f"nonfinite: {int((~np.isfinite(images[i])).sum())} non-finite pixels")
        if not reasons:
            return images, np.arange(n), []
        ok = np.ones(n, bool)
        ok[list(reasons)] = False
        good = np.nonzero(ok)[0]
        return images[good], good, sorted(reasons.items())


def _host(passes, n: int):
    """The first ``n`` stamps of a chunk's passes (the rest pads the compiled shape), as arrays on the host."""
    return type(passes)(*(None if a is None else a[:n].cpu().numpy() for a in passes))


# --------------------------------------------------------------------------------------------------
# Pool planning
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PoolPlan:
    """An autoscaling actor pool: ``min_size``..``max_size`` replicas of ``num_cpus``/``num_gpus`` each."""

    min_size: int
    initial_size: int
    max_size: int
    num_cpus: float
    num_gpus: float
    threads: int
    batch_size: int

    def strategy(self, tasks_in_flight: int | None = None):
        """The Ray Data strategy; ``tasks_in_flight`` caps the blocks queued at one replica (Ray's default
        queues several, so a job of few heavy blocks, as occlusion's, could run them all on one replica)."""
        from ray.data import ActorPoolStrategy

        return ActorPoolStrategy(min_size=self.min_size, max_size=self.max_size, initial_size=self.initial_size,
                                 max_tasks_in_flight_per_actor=tasks_in_flight)


def replica_cpus(node_cpus: float) -> tuple[int, float]:
    """Replicas per node of ``node_cpus`` CPUs and the CPUs each asks for (see the module docstring)."""
    c = max(1.0, float(node_cpus))
    per_node = max(1, int(math.floor(c)))
    reserve = 0.5 if c >= 2 else 0.25
    return per_node, round((c - reserve) / per_node, 4)


def build_packages(forwards: int | None, replicas: int) -> bool:
    """Whether a job of ``forwards`` forward passes on a pool of up to ``replicas`` CPU replicas lets one of
    them build the node's compiled package: not with a single replica (the whole job would wait for the
    build), and only when the others have ``PACKAGE_BUILD_FORWARDS`` each meanwhile."""
    replicas = int(replicas)
    return bool(forwards) and replicas >= 2 and int(forwards) >= PACKAGE_BUILD_FORWARDS * (replicas - 1)


def start_committer(cls: type, concurrency: int = 1):
    """The job's committer: an actor of ``cls`` (a quarter CPU, restarted and its calls retried up to 3 times)
    on this process's node if it has room, started at once so that its process is up by the first commit."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(num_cpus=READ_CPUS, max_restarts=3, max_task_retries=3, max_concurrency=concurrency)(
        cls).options(scheduling_strategy=here).remote()


def plan_pool(use_gpu: bool, max_actors: int | None, capacity, node_cpus_now: list[float],
              blocks: int | None = None, cpu_batch: int = CPU_BATCH, gpu_batch: int = GPU_BATCH) -> PoolPlan:
    """Size the pool from the cluster's ``capacity`` (:class:`stampray.capacity.Capacity`), the CPU
    counts of the nodes up now and the job's number of input ``blocks``.

    GPU: one replica per GPU (one CPU each), up to every GPU the autoscaler can bring. CPU: ``floor(c)``
    replicas per node of ``c`` CPUs, on the nodes up now and on every node the autoscaler can still launch.
    On an autoscaling cluster the pool starts at the size the job can use (a replica per
    ``BLOCKS_PER_REPLICA`` blocks, within the maximum), so the autoscaler sees the whole demand at once and
    launches the nodes together rather than one after another as the pool grows. Without an autoscaler it
    starts at what fits now, or at one replica per block for a job of fewer blocks (Ray Data grows it up
    to the maximum when there is more work).
    """
    want = max(1, math.ceil(blocks / BLOCKS_PER_REPLICA)) if blocks else 1
    if use_gpu:
        now = max(1, int(capacity.gpus_now))
        top = max(now, int(capacity.gpus_max) if math.isfinite(capacity.gpus_max) else now + UNBOUNDED_NODES)
        top = min(top, int(max_actors)) if max_actors else top
        start = min(top, max(now, want)) if capacity.autoscaling else min(now, top)
        return PoolPlan(1, start, top, 1.0, 1.0, 1, gpu_batch)
    c = _planned_node_cpus(capacity, node_cpus_now)
    per_node, per = replica_cpus(c)
    now = sum(_fits(n, per) for n in node_cpus_now)
    extra_cpus = max(0.0, float(capacity.cpus_max) - float(capacity.cpus_now))
    # A node type without an upper bound: plan for UNBOUNDED_NODES more nodes (--max-actors says otherwise).
    extra_nodes = int(extra_cpus // max(c, 1.0)) if math.isfinite(extra_cpus) else UNBOUNDED_NODES
    top = max(1, now + extra_nodes * per_node)
    top = min(top, int(max_actors)) if max_actors else top
    # Without an autoscaler: what fits now, but no more replicas than blocks (a small job's one block
    # would leave the others idle, each having paid its start: torch and the model, a second or more).
    start = min(top, max(now, want)) if capacity.autoscaling else min(now, top, blocks or top)
    return PoolPlan(1, max(1, start), top, per, 0.0, 1, cpu_batch)


def _planned_node_cpus(capacity, node_cpus_now: list[float]) -> float:
    """The CPU count each replica's request is planned for: the smallest CPU node that is up or can be."""
    sizes = [float(c) for c in node_cpus_now if c >= 1]
    for t in capacity.node_types.values():
        res = t.get("resources", {})
        if float(res.get("CPU", 0)) >= 1 and not res.get("GPU"):
            sizes.append(float(res["CPU"]))
    return min(sizes) if sizes else 1.0


def _fits(node_cpus: float, per: float) -> int:
    """Replicas of ``per`` CPUs that fit on a node and still leave a quarter CPU for reads."""
    if node_cpus < per + READ_CPUS:
        return 0
    return min(replica_cpus(node_cpus)[0], int((node_cpus - READ_CPUS) // per))


# --------------------------------------------------------------------------------------------------
# The runner both verbs share
# --------------------------------------------------------------------------------------------------
def run_pool(replica: type, model, data: str, shards: list[str], columns: list[str], items: list, *,
             use_gpu: bool, max_actors: int | None, actors: int | None, batch_size: int | None,
             chunk: int | None = None, tasks_in_flight: int | None = None,
             replica_kwargs: dict | None = None, read_tasks: bool | None = None,
             forwards: int | None = None) -> Iterator[pa.Table]:
    """Stream the read ``items`` of ``shards`` of ``data`` through a pool of ``replica`` (a
    :class:`ModelActor`) and yield the small record tables the replicas return, as they come.

    ``model``: the checkpoint's bytes or an ObjectRef of them. ``batch_size``: rows per replica call (None:
    a whole block). ``chunk``: stamps per forward pass (None: the plan's). ``tasks_in_flight``: blocks
    queued at one replica (None: Ray's default). ``actors``: a fixed pool of that size instead of the
    autoscaling one. ``forwards``: the job's forward passes (:func:`build_packages` decides from them
    whether a replica may build the compiled package). ``replica_kwargs``: the verb's own constructor
    arguments. ``read_tasks``: read the
    stamps in read tasks of their own (default on GPUs only; else each replica reads its items, one item
    per call). Stopping the iteration
    (``break``) ends the job and the pool.
    """
    import ray
    import ray.data

    from .capacity import cluster_capacity
    from .data import read_stamps

    plan = plan_pool(use_gpu, max_actors, cluster_capacity(), alive_node_cpus(), len(items))
    strategy = plan.strategy(tasks_in_flight) if not actors else ray.data.ActorPoolStrategy(
        size=int(actors), max_tasks_in_flight_per_actor=tasks_in_flight)
    model_ref = model if isinstance(model, ray.ObjectRef) else ray.put(model)
    kwargs = {"model_bytes": model_ref, "threads": plan.threads, "use_gpu": use_gpu,
              "chunk": int(chunk or plan.batch_size),
              "build_package": not use_gpu and build_packages(forwards, int(actors) if actors else plan.max_size),
              **(replica_kwargs or {})}
    if use_gpu if read_tasks is None else read_tasks:
        # A GPU replica keeps its one CPU for the GPU's feed: quarter-CPU read tasks decode the Parquet
        # beside it and hand it rows through the object store.
        ds = read_stamps(data, shards, columns, tag_shard=True, num_cpus=READ_CPUS, items=items)
        per_call, source = batch_size, {}
    else:
        # On CPUs each replica reads its own work items (one item per call: a row group, or a batch of rows
        # for occlusion): no read tasks competing for the cores, no hop of the decoded rows through the
        # object store; a replica spends about 1 % of its time reading.
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        per_call, source = 1, {"source": {"root": str(data), "columns": list(columns)}}
    ds = ds.map_batches(replica, batch_format="pyarrow", batch_size=per_call, compute=strategy,
                        num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, zero_copy_batch=True,
                        fn_constructor_kwargs={**kwargs, **source})
    # 2. The records, as the replicas return them; the replicas are created in this process.
    with dropped_stderr_lines(RAY_POOL_NOISE):
        yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")


# Ray core's line for every Ray Data actor pool (see the module docstring): not a problem of this job.
RAY_POOL_NOISE = (b"has constructor arguments in the object store and max_restarts > 0",)
# Lines Ray's own processes send to the driver's console on a private local Ray that a user can do nothing
# about: the pool line above from Ray Train's internal actors; Ray Data's "progress bars disabled" note from
# Train's dataset actors; a Ray Data deprecation warning (and the source line Python prints under it) raised
# inside Ray Train's own DatasetManager; the raylet's note that a task queued at a replica is retried after
# the pool was shut down by design (occlude stopping at --limit); the raylet's warning that a node runs over
# 4x as many Python workers as it has CPUs (on a 2-CPU laptop the demo's Train run, Ray Data's actors and a
# pool are 8-10 processes by design, idle ones kept a minute: runtime.PRIVATE_SYSTEM_CONFIG).
RAY_PRIVATE_NOISE = RAY_POOL_NOISE + (
    b"Progress bars disabled. To enable, set",
    b"RayDeprecationWarning: `ExecutionOptions.exclude_resources` is deprecated",
    b"  self.exclude_resources = exclude_resources",
    b"The actor is dead because it was killed by `ray.kill`",
    b"PYTHON worker processes have been started on node",
)


@contextlib.contextmanager
def dropped_stderr_lines(needles: tuple[bytes, ...], flush_s: float = 0.2, fd: int = 2) -> Iterator[None]:
    """Drop the lines holding any of ``needles`` from this process's stderr (file descriptor 2; ``fd=1``:
    its stdout) while the block runs; everything else passes through (a partial line, such as a progress
    line redrawn with ``\r``, after ``flush_s`` seconds of quiet). Ray core's C++ logs write to the
    descriptor, past Python's logging, and the lines Ray forwards from its workers reach the driver's
    descriptors too. Does nothing where the descriptor cannot be redirected (Windows, a closed stream)."""
    stream = sys.stdout if fd == 1 else sys.stderr
    try:
        if sys.platform == "win32":
            raise OSError("no select() on pipes")
        stream.flush()
        saved = os.dup(fd)
    except (OSError, ValueError, AttributeError):
        yield
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, fd)
    os.close(write_end)

    def keep(line: bytes) -> None:
        if not any(n in line for n in needles):
            os.write(saved, line)

    def pump() -> None:
        pending = b""
        while True:
            ready = select.select([read_end], [], [], flush_s)[0]
            chunk = os.read(read_end, 1 << 16) if ready else b""
            if ready and not chunk:  # every writer closed: the block is over
                break
            parts = (pending + chunk).splitlines(keepends=True)
            pending = parts.pop() if parts and not parts[-1].endswith((b"\n", b"\r")) else b""
            for line in parts:
                keep(line)
            if pending and not ready:
                keep(pending)
                pending = b""
        if pending:
            keep(pending)

    thread = threading.Thread(target=pump, name=f"stampray-fd{fd}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            stream.flush()
        os.dup2(saved, fd)  # closes this process's write end: the pump drains what is left and ends
        thread.join(timeout=5.0)
        if not thread.is_alive():  # else a child process still holds the pipe: the pump forwards its lines
            os.close(read_end)
            os.close(saved)


def require_cuda(flag: str = "--use-gpu") -> None:
    """Refuse to run on the CPU what was asked to run on a GPU: one line naming the node, the torch build
    and the fix. Runs where the work runs (a replica, a Train worker)."""
    import socket

    import torch

    if torch.cuda.is_available():
        return
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build (torch.version.cuda is None)"
    found = f"({build}; torch.cuda.device_count() = {torch.cuda.device_count()})"
    ray = sys.modules.get("ray")  # a job run in-process (--in-process) has no Ray, and imports none for this
    if ray is not None and ray.is_initialized():
        msg = (f"{flag}: node {ray.util.get_node_ip_address()} was given a GPU by Ray but its torch "
               f"{torch.__version__} cannot use CUDA {found}; install a CUDA build of torch matching the node's "
               f"driver there (see cluster.yaml), or run without {flag}")
    else:
        msg = (f"{flag}: this machine ({socket.gethostname()}) has no GPU that its torch {torch.__version__} can "
               f"use {found}; install a CUDA build of torch matching its driver, or run without {flag}")
    raise ValueError(msg)


def check_gpu_nodes(verb: str, timeout_s: float = 300.0) -> None:
    """Before any work: on every node that advertises GPUs, a 1-GPU probe task checks that torch there can
    use CUDA (a CPU torch wheel on a GPU node, a driver mismatch, a node started with ``--num-gpus`` but no
    GPU); refuses naming the node otherwise. Bounded by ``timeout_s`` (the probes wait for a free GPU)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive") and float(n.get("Resources", {}).get("GPU", 0)) >= 1]
    probe = ray.remote(num_cpus=0, num_gpus=1, max_retries=0)(require_cuda)
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
            for n in nodes]
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    for ref in ready:
        try:
            ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            raise (e.cause if isinstance(e.cause, ValueError) else e) from None
    if pending:
        msg = (f"{verb} --use-gpu: {len(pending)} GPU nodes did not run a 1-GPU check within {timeout_s:.0f} s "
               f"(their GPUs are busy?); see 'ray status'")
        raise RuntimeError(msg)


def alive_node_cpus() -> list[float]:
    """CPU count of every node that is up (a head of 0 CPUs counts as 0)."""
    import ray

    return [float(n.get("Resources", {}).get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")]


# Jobs run in this process (--in-process): the same replica classes, books and commits, without Ray.

def runs_here(does: str, choice: str, forwards: int, address: str | None, use_gpu: bool, actors) -> bool:
    """Whether a job runs in this process, without Ray (``--in-process``): ``on``; or ``auto``
    for a job of fewer than ``IN_PROCESS_FORWARDS`` forward passes that would otherwise start a private Ray
    for itself (no ``--address`` or ``RAY_ADDRESS``, no Ray already running in this process, no
    ``--use-gpu`` and no ``--actors`` pool asked for). Starting Ray and a pool costs 10-20 s on a laptop,
    more than such a job's work: on the 2-core development machine 2,000 stamps scored in 4 s wall
    in-process (19-21 s through the private Ray), 100,000 in 12 s (24 s)."""
    from .runtime import target_address

    if choice == "on" and target_address(address):
        msg = (f"--in-process on {does} without Ray, but RAY_ADDRESS names the cluster "
               f"{target_address(address)}; unset RAY_ADDRESS or use --in-process auto|off")
        raise ValueError(msg)
    if choice != "auto":
        return choice == "on"
    ray = sys.modules.get("ray")
    ray_up = ray is not None and getattr(ray, "is_initialized", lambda: False)()
    return (forwards < IN_PROCESS_FORWARDS and target_address(address) is None
            and not ray_up and not use_gpu and not actors)


def check_in_process(does: str, choice: str, address: str | None) -> None:
    """A verb's settings check of ``--in-process`` (with ``--address``); ``does``: what the verb does
    ("scores", "maps"), for the message."""
    if choice not in IN_PROCESS:
        msg = f"--in-process must be auto, on or off, got {choice!r}"
        raise ValueError(msg)
    if choice == "on" and address:
        msg = f"--in-process on {does} without Ray; it cannot run on the cluster at --address {address}"
        raise ValueError(msg)


def local_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def here_workers(cores: int, use_gpu: bool, items: int, mc_dropout: bool = False) -> tuple[int, int]:
    """(replica threads, torch threads for the process) for a job run in-process on ``cores`` cores.

    On a CPU, up to ``HERE_WORKERS`` threads with the cores shared evenly among them (torch's thread count
    is one setting for the whole process), as many as keeps most cores busy (2 cores: 2 x 1; 6: 3 x 2;
    5: 1 x 5), never more than there are work items. Threads pay because torch releases the GIL in its
    kernels: on the 2-core development machine two threads of one torch thread each ran preprocessing and
    the compiled forward at 96,700-102,200 stamps/s together, one thread 49,700-51,100. A GPU job: one
    thread, which keeps the device busy; an MC dropout job (``mc_dropout``): one thread, as its seeded
    passes draw from torch's one random generator."""
    cores = max(1, int(cores))
    if use_gpu or mc_dropout:
        return 1, cores
    most = max(1, min(cores, HERE_WORKERS, int(items)))
    workers = max(range(1, most + 1), key=lambda w: (w * (cores // w), w))
    return workers, cores // workers


@contextlib.contextmanager
def torch_threads_kept(prefix: str) -> Iterator[None]:
    """Put torch's thread count back after a job run in-process (its replicas set it for the process), once
    no thread named ``prefix...`` is left running: the count is one setting of the whole process, and a
    compiled forward is guarded on it, so changing it under a running replica (a second Ctrl-C cut the wait
    for them short) would recompile there."""
    import torch

    saved = torch.get_num_threads()
    try:
        yield
    finally:
        if not any(t.name.startswith(prefix) and t.is_alive() for t in threading.enumerate()):
            torch.set_num_threads(saved)


def run_items_here(replicas: list, items: list, account, prefix: str, verb: str, doing: str) -> bool:
    """Run the work ``items`` (one per call, as a one-row table) through ``replicas`` in this process:
    one replica in this thread, several on threads of their own (named ``prefix`` + index) taking the items
    from one queue. ``account(records)`` runs here, in this thread, as items finish; when it returns true
    the job stops after each thread's current item (``--limit`` reached) and ``run_items_here`` returns True.

    A failure in a thread, or an exception here (Ctrl-C), stops every thread after its current item; the
    items finished by then are accounted for before it is raised (score commits the shards they complete, so
    a rerun does not redo them). ``verb`` and
    ``doing`` ("score", "scoring") name the job in the line that says it is stopping."""
    import queue

    if len(replicas) == 1:
        for item in items:
            if account(replicas[0](pa.Table.from_pylist([item]))):
                return True
        return False
    work: queue.SimpleQueue = queue.SimpleQueue()
    for item in items:
        work.put(item)
    done: queue.SimpleQueue = queue.SimpleQueue()  # (records, None) per item; (None, error); None: a thread ended
    stop = threading.Event()

    def loop(replica) -> None:
        try:
            while not stop.is_set():
                try:
                    item = work.get_nowait()
                except queue.Empty:
                    return
                done.put((replica(pa.Table.from_pylist([item])), None))
        except BaseException as e:  # noqa: BLE001 - handed to the accounting thread, which raises it
            done.put((None, e))
        finally:
            done.put(None)

    pool = [threading.Thread(target=loop, args=(r,), name=f"{prefix}{i}", daemon=True)
            for i, r in enumerate(replicas)]
    for t in pool:
        t.start()
    running, error, stopped = len(pool), None, False
    try:
        while running:
            msg = done.get()
            if msg is None:
                running -= 1
            elif msg[1] is not None:
                error = msg[1]
                break
            elif account(msg[0]):
                stopped = True
                break
    finally:
        stop.set()
        if running and not stopped:  # an error, Ctrl-C: some threads may be in the middle of an item
            logger.warning(f"{verb}: stopping; waiting for {running} {doing} thread(s) to finish their current "
                           f"work item")
        for t in pool:
            t.join()
        while not done.empty():  # finished while stopping: accounted for, so their work needs no rerun
            msg = done.get()
            if msg is not None and msg[1] is None:
                account(msg[0])
    if error is not None:
        raise error
    return stopped
