"""Occlusion maps with Ray Data: ``stampray occlude``.

The notebooks' occlusion test: set a ``kernel``×``kernel`` square of the (preprocessed) stamp to zero at
every position, preprocess again, predict, and map the probability of the true class (the predicted
class when the stamp is unlabelled) at each position; the map is padded back to the stamp size
(``(kernel-1)//2`` before, ``kernel//2`` after, with the map's minimum as the notebooks do), so odd and
even kernels both give an H×W map. All occluded variants of a batch of stamps go through the model as
one large batch, on the same actor-pool machinery as ``stampray score``
(:mod:`stampray.inference`): the replicas write their maps straight to ``MAPS/_parts/`` and return one
small record per piece; once enough stamps are mapped (``--limit``) or the data is exhausted, the job's
committer (an actor started with the pool) joins the accepted pieces into ``MAPS/part-NNNNN.parquet`` (and
``MAPS/_errors/``) and removes the pieces, so no map passes through the driver and a new output replaces
an old one only once complete. A small job (``--in-process``, :func:`stampray.inference.runs_here`) runs the
same replica class on threads, the books and the commit in this process, without Ray (:func:`_run_here`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import heapq
import itertools
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import outfiles
from . import table as st
from .data import ROW, SHARD
from .lock import output_lock
from .provenance import provenance
from .settings import non_negative, positive
from .inference import (IN_PROCESS, LOCAL_NODE, ModelActor, Progress, check_in_process, here_workers, local_cores,
                        open_model_for, run_items_here, runs_here, torch_threads_kept)
from .pieces import (ERROR, MAP_FILE_ROWS, PARTS_DIR, TMP_DIR, MapsCommitter, commit_maps,  # noqa: F401
                     delete_dir, list_files, write_atomic)

log = logging.getLogger(__name__)
WHERE = ("misclassified",)
COMPILE = ("auto", "on", "off")  # --compile
MAPS_FILE = "_maps.json"  # what an occlude run wrote in --out: only these files are ever replaced


@dataclass(frozen=True)
class OccludeSettings:
    """Settings of ``stampray occlude``.

    Args:
        model: checkpoint: model.pt, a checkpoint dir, or a run dir (its best.pt).
        data: stamp table to map.
        out: output directory for the maps (Parquet).
        kernel: occluding square size in pixels.
        stride: step between occluding positions.
        ids: comma-separated stamp ids to map.
        where: map only the misclassified stamps.
        limit: map at most N stamps.
        png: write stamp+heatmap overlays into this directory.
        png_limit: overlays to draw.
        chunk: occluded variants built and scored per forward pass (default: on CPUs scoring's 4,096 where
            that is at most 2 Mi pixels, as at 21x21 and 20x20, so a compiled package of the checkpoint's
            scoring is loaded, not compiled; else about 1 Mi pixels' worth, in whole stamps' windows: e.g.
            240 at 64x64 with --kernel 5, 46 at 150x150), so memory does not grow with stamp size or
            --batch-size.
        batch_size: stamps per actor call (default: from 64, from 512 with --use-gpu, sized so that a
            block's forwards are full: whole forwards, or a last one nearly full).
        actors: a fixed pool of exactly N model replicas instead of an autoscaling one.
        use_gpu: one GPU per model replica; on an autoscaling cluster whose GPU nodes are not up yet, ask the
            autoscaler for them and wait (see --wait-gpu).
        max_actors: most model replicas of the autoscaling pool (default: one per CPU core, or per GPU, of
            every node the cluster has or its autoscaler can launch).
        wait_gpu: with --use-gpu, how long to wait for the autoscaler's GPU nodes, in seconds.
        progress: the progress line on stderr.
        address: Ray cluster to connect to (default: a private local Ray; RAY_ADDRESS is honoured).
        rename_classes: the table names its classes otherwise than the model (e.g. 0,1 against
            noise,source): take the model's class names by position instead of refusing.
        compile: torch.compile the replicas (a few seconds each, about 2x the forward rate on a CPU): auto
            for jobs of 200,000 occluded variants or more.
        in_process: map in this process, without Ray (up to 4 threads sharing its cores): auto for jobs of
            under 200,000 occluded variants (the stamps to map times the window positions) that would
            otherwise start a private Ray of their own (no --address or RAY_ADDRESS, no --use-gpu or --actors,
            no Ray running in this Python process); on: always; off: never. The maps are the same either way.
    """

    model: str = field(metadata={"path": True})
    data: str = field(metadata={"path": True})
    out: str = field(metadata={"path": True})
    kernel: int = 5
    stride: int = 1
    ids: tuple[str, ...] = ()
    where: str | None = field(default=None, metadata={"choices": WHERE})
    limit: int | None = None
    png: str | None = field(default=None, metadata={"path": True, "metavar": "DIR"})
    png_limit: int = 20
    chunk: int | None = None  # (stamp, window) pairs scored per forward; default: 1 Mi pixels' worth
    batch_size: int | None = None
    actors: int | None = None
    use_gpu: bool = False
    max_actors: int | None = None
    wait_gpu: float = field(default=1800.0, metadata={"metavar": "SECONDS"})
    progress: bool = True
    address: str | None = None
    rename_classes: bool = False
    compile: str = field(default="auto", metadata={"choices": COMPILE})
    in_process: str = field(default="auto", metadata={"choices": IN_PROCESS})

    def __post_init__(self):
        check_in_process("maps", self.in_process, self.address)
        if self.compile not in COMPILE:
            msg = f"--compile must be auto, on or off, got {self.compile!r}"
            raise ValueError(msg)
        if int(self.kernel) < 1 or int(self.stride) < 1:
            msg = f"--kernel and --stride must be positive integers, got {self.kernel!r} and {self.stride!r}"
            raise ValueError(msg)
        if self.where is not None and self.where not in WHERE:
            msg = f"--where must be one of {', '.join(WHERE)}, got {self.where!r}"
            raise ValueError(msg)
        if self.ids and self.where:
            msg = "give either --ids or --where, not both"
            raise ValueError(msg)
        positive(self, "limit", "batch_size", "actors", "max_actors", "png_limit", "chunk")
        non_negative(self, "wait_gpu")


def occlusion_grid(shape, kernel: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corners (ys, xs) of every window position, row by row; refuses a kernel that does not fit."""
    _, h, w = shape
    ys, xs = np.arange(0, h - kernel + 1, stride), np.arange(0, w - kernel + 1, stride)
    if not len(ys) or not len(xs):
        msg = f"--kernel {kernel} does not fit in stamps of {h}x{w}"
        raise ValueError(msg)
    return ys, xs


# --compile auto: compile for jobs of this many occluded variants or more. A compile costs a replica about 5 s
# here (Inductor's imports and tracing), or milliseconds once the node has the compiled package
# (stampray.aot), and doubles its rate (11k -> 24k variants/s for cnn on one thread).
COMPILE_VARIANTS = 200_000
# Blocks of at most this many occluded variants (a second or two of one CPU replica) are queued two at a time.
QUEUE_VARIANTS = 50_000
OCCLUDE_PIXELS = 1 << 20  # occluded variants are built and scored this many pixels at a time (4 MiB float32)
# On CPUs, where a forward of scoring's shape (inference.CPU_BATCH stamps) is at most this many pixels (21x21
# and 20x20 stamps: 1.72 and 1.56 Mi; not 64x64), occlusion forwards take that shape, so that the node's
# compiled package of a checkpoint that has scored there (stampray.aot) is loaded by occlusion's replicas too:
# milliseconds, against 4-5 s of torch.compile per replica here; and a package built by a big occlusion job
# serves scoring.
SHARED_SHAPE_PIXELS = 1 << 21


class BlocksInOrder:
    """The driver's books of an occlusion job: the replicas' records (one per block, in the order blocks
    finish) against the table's order, so that ``--limit N`` keeps the first N selected stamps of the table
    whichever replica finishes first (a replica that is slow, compiling on a loaded machine, must not let a
    later block's maps in before its own).

    ``mapped``: the maps of the blocks that are in and have no block missing before them; ``pieces()``: their
    pieces in table order (``complete``: every piece in, for a job read to its end); ``nodes``: those maps per
    node, at most ``limit`` in all (what the commit keeps)."""

    def __init__(self, items: list[dict], limit: int | None = None):
        self.start: dict[str, int] = {}  # shard -> the position of its first row in the table
        n = 0
        for it in items:
            self.start.setdefault(it["shard"], n - int(it["row0"]) - int(it.get("offset", 0)))
            n = self.start[it["shard"]] + int(it["row0"]) + int(it.get("offset", 0)) + int(it.get("length", 0))
        self.limit = limit
        self.waiting: list[tuple] = []  # heap: (start, end, arrival, maps, piece, node)
        self.done = 0  # every row before this position is in
        self.mapped = 0
        self.nodes: dict = {}
        self._pieces: dict[str, int] = {}  # piece -> its start: each once, however often its block ran
        self._in_order: list[str] = []
        self._arrival = itertools.count()  # ties in the heap never compare pieces

    def add(self, r: dict) -> None:
        if not r["length"] or (r["piece"] is not None and r["piece"] in self._pieces):
            return  # an empty block, or a block redone (it rewrote the same piece)
        start = self.start[r["shard"]] + int(r["row"])
        if r["piece"] is not None:
            self._pieces[r["piece"]] = start
        heapq.heappush(self.waiting, (start, start + int(r["length"]), next(self._arrival), int(r["rows"]),
                                      r["piece"], r["node"]))
        while self.waiting and self.waiting[0][0] <= self.done:
            _, end, _, rows, piece, node = heapq.heappop(self.waiting)
            if end <= self.done:
                continue
            self.done = end
            kept = rows if self.limit is None else max(0, min(rows, self.limit - self.mapped))
            self.mapped += rows
            if piece is not None:
                self._in_order.append(piece)
                if kept:
                    self.nodes[node] = self.nodes.get(node, 0) + kept

    def pieces(self, complete: bool = False) -> list[str]:
        if not complete:
            return list(self._in_order)
        return sorted(self._pieces, key=self._pieces.get)


def blocks_in_flight(rows: int, windows: int, limited: bool = False) -> int:
    """Blocks queued at a replica: one when a block is long (big stamps: minutes of work each; a second block
    queued at a busy replica could leave a replica that starts later idle as long) or the job stops at
    ``--limit`` (blocks start in table order, one per replica, and the job waits for the earlier ones:
    :class:`BlocksInOrder`); two when it is short (``QUEUE_VARIANTS`` occluded variants or
    fewer), so that a replica starts its next block without waiting a round trip to the executor (21x21,
    kernel 5: 64 stamps x 289 windows, under a second each; 2,000 maps in 34.9 s -> 33.1 s here), at the cost
    of at most one short block of imbalance at the end."""
    return 2 if not limited and int(rows) * int(windows) <= QUEUE_VARIANTS else 1


def forward_shape(pixels: int, windows: int, chunk: int | None = None) -> tuple[int, int]:
    """(stamp, window) pairs per forward, and whole stamps per forward (1 when a stamp takes several).

    ``chunk`` (``--chunk``) is taken as given; by default about ``OCCLUDE_PIXELS`` pixels' worth, rounded so
    that forwards hold whole stamps' windows (or split one stamp's windows evenly): a block of whole stamps
    then fills its compiled forwards without padding (e.g. 21x21, kernel 5: 8 stamps x 289 windows = 2,312
    pairs, where 2,377 left each 64-stamp block's last forward a fifth empty)."""
    if chunk:
        return int(chunk), max(1, int(chunk) // windows)
    budget = max(1, OCCLUDE_PIXELS // max(1, pixels))
    if windows <= budget:
        per = budget // windows
        return per * windows, per
    parts = -(-windows // budget)  # forwards per stamp
    return -(-windows // parts), 1


def occlusion_forward(pixels: int, windows: int, chunk: int | None = None,
                      use_gpu: bool = False) -> tuple[int, int]:
    """:func:`forward_shape`, or on CPUs scoring's shape where it fits ``SHARED_SHAPE_PIXELS`` (a forward's
    pairs then span stamps: a block's last forward is padded, or run uncompiled when short)."""
    from .inference import CPU_BATCH

    if chunk or use_gpu or CPU_BATCH * int(pixels) > SHARED_SHAPE_PIXELS:
        return forward_shape(pixels, windows, chunk)
    return CPU_BATCH, max(1, CPU_BATCH // int(windows))


def block_stamps(base: int, windows: int, pairs: int) -> int:
    """Stamps per block (``--batch-size`` by default). Forwards of whole stamps' windows, or of parts of one
    stamp's (:func:`forward_shape`): ``base`` rounded up to whole forwards, as before. Forwards that span
    stamps (:func:`occlusion_forward`): of ``base`` to ``2 * base - 1``, the number whose variants waste least
    in the block's last forward, padded to ``pairs`` or, when at most a third of it
    (``inference.EAGER_PART``), run uncompiled at about 2.5x the cost (21x21, kernel 5, 4,096 pairs: 85
    stamps, 11 pairs of padding, where 70 left 250)."""
    from .inference import EAGER_PART

    if windows >= pairs or pairs % windows == 0:
        return _round_up(int(base), max(1, pairs // windows))

    def waste(n: int) -> float:
        rest = n * windows % pairs
        return (0.0 if not rest else 1.5 * rest if rest <= pairs / EAGER_PART else pairs - rest) / (n * windows)

    return min(range(int(base), 2 * int(base)), key=waste)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def occlusion_maps(raw: np.ndarray, target: np.ndarray, kernel: int, stride: int,
                   preprocess: Callable[[np.ndarray], np.ndarray],
                   predict: Callable[[np.ndarray], np.ndarray], chunk: int | None = None) -> np.ndarray:
    """Heatmaps (n, H, W): probability of class ``target[i]`` with each window occluded.

    ``predict`` maps preprocessed stamps (N, C, H, W) to class probabilities (N, K). The (stamp, window)
    pairs are built and scored ``chunk`` at a time (default: ``OCCLUDE_PIXELS`` pixels' worth), so memory
    does not grow with the stamp size, the number of window positions or the batch: only the (n, positions)
    grid of probabilities is kept.
    """
    n, c, h, w = raw.shape
    ys, xs = occlusion_grid((c, h, w), kernel, stride)
    gy, gx = len(ys), len(xs)
    if n == 0:
        return np.zeros((0, h, w), np.float32)
    positions = gy * gx
    chunk = max(1, int(chunk or OCCLUDE_PIXELS // (c * h * w)))
    base = preprocess(raw)
    grid = np.empty(n * positions, np.float32)
    for k in range(0, n * positions, chunk):
        pair = np.arange(k, min(k + chunk, n * positions))
        stamp, pos = pair // positions, pair % positions
        # Every pair's window at once (no Python loop over the pairs): rows and columns inside the window.
        top, left = ys[pos // gx][:, None], xs[pos % gx][:, None]
        rows, cols = np.arange(h)[None, :], np.arange(w)[None, :]
        inside = (((rows >= top) & (rows < top + kernel))[:, :, None]
                  & ((cols >= left) & (cols < left + kernel))[:, None, :])
        variants = np.where(inside[:, None], np.float32(0.0), base[stamp])
        probs = predict(preprocess(variants))
        grid[pair] = probs[np.arange(len(pair)), target[stamp]]
    grid = grid.reshape(n, gy, gx)
    if stride > 1:  # each window position stands for the stride×stride block it starts
        grid = np.repeat(np.repeat(grid, stride, axis=1), stride, axis=2)[:, :h - kernel + 1, :w - kernel + 1]
    before, after = (kernel - 1) // 2, kernel // 2
    low = grid.reshape(n, -1).min(axis=1)[:, None, None]
    out = np.empty((n, h, w), np.float32)
    out[:] = low
    out[:, before:h - after, before:w - after] = grid
    return out


def _tensor_column(arr: np.ndarray) -> pa.ExtensionArray:
    """(n, ...) float32 -> Arrow's canonical fixed_shape_tensor column."""
    arr = np.ascontiguousarray(arr, np.float32)
    typ = pa.fixed_shape_tensor(pa.float32(), list(arr.shape[1:]))
    storage = pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), int(np.prod(arr.shape[1:])))
    return pa.ExtensionArray.from_storage(typ, storage)


class Occluder(ModelActor):
    """map_batches callable: stamp rows (or the work items to read them from) in; the selected stamps' maps
    written as a piece; a record out."""

    def __init__(self, model_bytes, out: str, kernel: int, stride: int, ids: list[str], where: str | None,
                 threads: int = 1, use_gpu: bool = False, limit: int | None = None, occlude_chunk: int | None = None,
                 chunk: int = 4096, compile: bool = False, source: dict | None = None, build_package: bool = False,
                 use_package: bool = True):
        super().__init__(model_bytes, threads, use_gpu, compile=compile, chunk=chunk, source=source,
                         build_package=build_package, use_package=use_package)
        self.out, self.kernel, self.stride, self.where = out, int(kernel), int(stride), where
        self.limit = int(limit) if limit else None  # no block maps more stamps than the job keeps
        self.occlude_chunk = int(occlude_chunk) if occlude_chunk else None  # (stamp, window) pairs per forward
        self.ids = pa.array(sorted(ids), pa.string()) if ids else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        batch = self.stamps(batch)
        # The block's place in the table (its shard, first row and length), for the driver to keep the
        # first --limit maps in table order whichever replica finishes first: one work item, one run of rows.
        shard = batch.column(SHARD)[0].as_py() if batch.num_rows else None
        row = batch.column(ROW)[0].as_py() if batch.num_rows else 0
        rows = batch.column(ROW).to_numpy()
        if batch.num_rows and (pc.count_distinct(batch.column(SHARD)).as_py() != 1
                               or not np.array_equal(rows, np.arange(row, row + len(rows)))):
            msg = f"occlude: a block of {batch.num_rows} rows from {shard} is not one run of rows (internal error)"
            raise RuntimeError(msg)
        maps = self.maps(batch)
        name = None
        if maps.num_rows:  # named after the block's first row: a block redone rewrites the same piece
            name = f"{shard.removesuffix('.parquet')}-{row:012d}-{batch.num_rows}.parquet"
            write_atomic(maps, st.join(self.out, PARTS_DIR, name), self.out)
        failed = maps.num_rows - maps.column(ERROR).null_count
        return pa.table({"piece": pa.array([name], pa.string()), "rows": [maps.num_rows - failed],
                         "errors": [failed], "node": [self.node_id], "shard": pa.array([shard], pa.string()),
                         "row": [int(row)], "length": [batch.num_rows]})

    def maps(self, batch: pa.Table) -> pa.Table:
        """Maps of the selected stamps of ``batch``; unusable rows carry their reason (``_error``)."""
        if self.ids is not None:
            batch = batch.filter(pc.is_in(batch.column(st.ID), value_set=self.ids))
        images, good, bad = self.decode_valid(batch)
        bad_rows = batch.take(pa.array([i for i, _ in bad], pa.int64()))
        batch = batch.take(pa.array(good, pa.int64()))
        base = self.probabilities(self.preprocess(images))
        pred = base.argmax(axis=1) if len(base) else np.zeros(0, np.int64)
        label = batch.column(st.LABEL).to_numpy(zero_copy_only=False) if len(batch) else np.zeros(0)
        has_label = batch.column(st.LABEL).is_valid().to_numpy(zero_copy_only=False) if len(batch) else \
            np.zeros(0, bool)
        label = np.where(has_label, np.nan_to_num(label, nan=-1), -1).astype(np.int64)
        target = np.where(has_label, label, pred)
        keep = np.ones(len(batch), bool)
        if self.where == "misclassified":
            keep = has_label & (pred != label)
        idx = np.nonzero(keep)[0][:self.limit]
        heat = occlusion_maps(images[idx], target[idx], self.kernel, self.stride, self.preprocess,
                              self.probabilities, self.occlude_chunk)
        rows = len(idx)
        # Rows that cannot be occluded (non-finite pixels, a wrong image size) travel on with their reason
        # and zero-filled maps; the commit writes them to ``OUT/_errors/`` and never among the maps.
        n_bad, hw = len(bad), tuple(self.shape[1:])
        kept = batch.take(pa.array(idx, pa.int64()))

        def both(col):
            return pa.concat_arrays([kept.column(col).combine_chunks(),
                                     bad_rows.column(col).combine_chunks().cast(kept.column(col).type)])

        return pa.table({
            st.ID: both(st.ID),
            st.LABEL: pa.array(np.concatenate([label[idx], np.zeros(n_bad, np.int64)]), pa.int64(),
                               mask=np.concatenate([~has_label[idx], np.ones(n_bad, bool)])),
            "pred": pa.array(np.concatenate([pred[idx], np.full(n_bad, -1)]).astype(np.int64)),
            "target": pa.array(np.concatenate([target[idx], np.full(n_bad, -1)]).astype(np.int64)),
            "base_prob": pa.array(np.concatenate([base[idx, target[idx]] if rows else np.zeros(0),
                                                  np.full(n_bad, np.nan)]), pa.float32()),
            "heatmap": _tensor_column(np.concatenate([heat.reshape(rows, *hw), np.zeros((n_bad, *hw))])),
            "stamp": _tensor_column(np.concatenate([self.preprocess(images[idx])[:, 0] if rows else
                                                    np.zeros((0, *hw)), np.zeros((n_bad, *hw))])),
            SHARD: both(SHARD),
            ROW: both(ROW),
            ERROR: pa.array([None] * rows + [reason for _, reason in bad], pa.string()),
        })


@dataclass
class OccludeResult:
    out: str
    rows: int
    pngs: list
    seconds: float
    set_aside: int = 0
    nodes: dict | None = None
    ids_not_found: list = field(default_factory=list)


def occlude(settings: OccludeSettings) -> OccludeResult:
    """Compute occlusion maps for the selected stamps and write them as Parquet (and PNGs)."""
    t0 = time.time()
    manifest, _, bundle, model_bytes = open_model_for(settings.model, settings.data, settings.rename_classes)
    occlusion_grid(manifest.spec.shape, settings.kernel, settings.stride)  # kernel fits?
    if settings.where == "misclassified" and not manifest.label_counts:
        msg = f"--where misclassified needs labels, and {settings.data} holds none"
        raise ValueError(msg)
    st.check_separate(settings.out, {"--data": settings.data})
    st.check_apart_from_model(settings.out, settings.model)
    if settings.png:
        st.check_separate(settings.png, {"--data": settings.data}, flag="--png")
        outfiles.check(settings.png, PNG_FILES, lambda found: _pngs_of(found, settings.data, settings.ids))
    st.inspect_shards(settings.data, manifest)
    fs, p = st.resolve(settings.out)
    if fs.get_file_info(p).type == st.pafs.FileType.File:
        msg = f"--out {settings.out} is a file; give a directory for the occlusion maps"
        raise ValueError(msg)
    if settings.ids:
        check_some_ids_present(settings.data, settings.ids)  # before --out is touched: a typo keeps the old maps
    with output_lock(settings.out, "occlude"):
        total, set_aside, nodes, missing = _occlude_locked(settings, model_bytes, manifest)
    if missing:
        log.warning(f"occlude: warning: {len(missing)} of the {len(settings.ids)} --ids are not in "
                    f"{settings.data}: {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
    if set_aside:
        log.warning(f"occlude: {set_aside} stamps could not be occluded (non-finite pixels or a wrong image "
                    f"size); listed with their reasons in {st.join(settings.out, st.ERRORS_DIR)}")
    if total == 0:
        log.warning("occlude: warning: no stamp matched the selection; wrote an empty table")
    pngs = []
    if settings.png and total:
        with fs.open_input_file(st.resolve(st.join(settings.out, "part-00000.parquet"))[1]) as f:
            first = pq.ParquetFile(f).read_row_group(0).slice(0, settings.png_limit)
        try:
            pngs = write_pngs(first, settings.png, list(bundle["class_names"]), settings.kernel)
        except ValueError as e:  # a user's file where a picture would go: the maps are in, say so
            raise ValueError(f"{e} (the maps themselves are written to {settings.out}; only the PNGs are not)") \
                from None
    return OccludeResult(settings.out, total, pngs, time.time() - t0, set_aside, nodes, missing)


def _pngs_of(names: set[str], data: str, ids: tuple[str, ...]) -> set[str]:
    """Of the PNG file ``names``, those of stamps the run may map: of the ``--ids``, or of any stamp in
    ``data`` (its id column read in bounded batches, only when such files are there)."""
    if ids:
        return names & {png_name(i) for i in ids}
    hit: set[str] = set()
    for batch in st.iter_batches(data, columns=[st.ID]):
        hit |= names & {png_name(i) for i in batch.column(0).to_pylist()}
    return hit


def check_some_ids_present(data: str, ids: tuple[str, ...]) -> None:
    """Refuse ``--ids`` none of which is in the table (reads its id column only, in bounded batches)."""
    wanted = pa.array(sorted(set(ids)), pa.string())
    found: set[str] = set()
    for batch in st.iter_batches(data, columns=[st.ID]):
        hit = pc.is_in(batch.column(0), value_set=wanted)
        if pc.any(hit).as_py():
            found.update(batch.column(0).filter(hit).to_pylist())
            break  # one is enough; the run reports any others it does not find
    if not found:
        missing = list(dict.fromkeys(ids))
        msg = (f"none of the {len(missing)} --ids is in {data} ({', '.join(missing[:10])}"
               f"{' ...' if len(missing) > 10 else ''}); check the ids against the table's stamp_id column")
        raise ValueError(msg)


def _occlude_locked(settings: OccludeSettings, model_bytes: bytes,
                    manifest: st.Manifest) -> tuple[int, int, dict, list[str]]:
    """Run and commit the maps into ``--out``, replacing only files an earlier ``occlude`` wrote there
    (listed in its ``_maps.json``)."""
    out = settings.out
    st.make_dirs(out)
    marker = st.join(out, MAPS_FILE)
    old = json.loads(st.read_text(marker)).get("files", []) if st.exists(marker) else None
    if old is None:
        theirs = [n for n in list_files(out) if n.startswith("part-")] + (
            [st.ERRORS_DIR] if st.exists(st.join(out, st.ERRORS_DIR)) else [])
        if theirs:
            msg = (f"--out {out} holds {', '.join(theirs[:3])}{' ...' if len(theirs) > 3 else ''}, which "
                   f"'stampray occlude' did not write there (no {MAPS_FILE}); choose a new or empty directory")
            raise ValueError(msg)
    delete_dir(st.join(out, PARTS_DIR))  # leftovers of a killed run
    delete_dir(st.join(out, TMP_DIR))
    total, set_aside, nodes, files, missing = _run(settings, model_bytes, manifest, old or [])
    delete_dir(st.join(out, PARTS_DIR))
    delete_dir(st.join(out, TMP_DIR))
    doc = {"verb": "occlude", "model": settings.model, "data": settings.data, "kernel": settings.kernel,
           "stride": settings.stride, "maps": total, "set_aside": set_aside, "files": files,
           "ids_not_found": missing, "provenance": provenance()}
    st.write_text(marker, json.dumps(doc, indent=2))
    return total, set_aside, nodes, missing


@contextlib.contextmanager
def _upscale_when_busy():
    """With one block in flight per replica, a pool's utilisation tops out at 100%: Ray Data's autoscaler
    must add replicas there (its default waits for 175%, which such a pool never reaches, and says so).
    The driver's DataContext is restored after, for the next verb in this process."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = ctx.autoscaling_config
    ctx.autoscaling_config = dataclasses.replace(saved, actor_pool_util_upscaling_threshold=1.0)
    try:
        yield
    finally:
        ctx.autoscaling_config = saved


@dataclass(frozen=True)
class _Plan:
    """What both runners need: the read items (``batch_size`` rows each), the window positions per stamp,
    the (stamp, window) pairs of one forward, the job's occluded variants and whether it compiles."""

    items: list
    windows: int
    pairs: int
    batch_size: int
    variants: int
    compile: bool


COLUMNS = [st.ID, st.IMAGE, st.LABEL]  # what occlusion reads of the table
HERE_THREAD = "stampray-occlude-"  # the threads of a job mapped in-process: stampray-occlude-0, -1, ...


def _plan(settings: OccludeSettings, manifest: st.Manifest) -> _Plan:
    from .data import work_items

    # The (stamp, window) pairs of one forward (occlusion_forward); compiled, the model's one shape is that
    # chunk too (an occlusion job is many forwards of exactly this size), and a block's stamps fill its
    # forwards (block_stamps): whole forwards, or a last one nearly full when forwards span stamps.
    ys, xs = occlusion_grid(manifest.spec.shape, settings.kernel, settings.stride)
    windows = len(ys) * len(xs)
    pairs, _ = occlusion_forward(int(np.prod(manifest.spec.shape)), windows, settings.chunk, settings.use_gpu)
    batch_size = settings.batch_size or block_stamps(512 if settings.use_gpu else 64, windows, pairs)
    # A read item per batch of rows, not per row group: each stamp is thousands of forwards, so a row group
    # given whole to one replica would leave the others idle.
    items = work_items(settings.data, [sh["path"] for sh in manifest.shards], rows=batch_size)
    variants = _wanted(settings, manifest) * windows
    compile_model = settings.compile == "on" or (settings.compile == "auto" and variants >= COMPILE_VARIANTS)
    return _Plan(items, windows, pairs, batch_size, variants, compile_model)


def _run(settings: OccludeSettings, model_bytes: bytes, manifest: st.Manifest,
         old_files: list[str]) -> tuple[int, int, dict, list[str], list[str]]:
    """Map the selected stamps, keep the books, then commit: in this process (:func:`_run_here`) or through a
    Ray pool (:func:`_run_ray`), as ``--in-process`` decides (:func:`stampray.inference.runs_here`).
    Returns (maps, set aside, maps per node, files written, --ids not found)."""
    plan = _plan(settings, manifest)
    if runs_here("maps", settings.in_process, plan.variants, settings.address, settings.use_gpu, settings.actors):
        if settings.in_process == "auto":
            log.info(f"occlude: {plan.variants:,} occluded variants: mapping in this process, without Ray "
                     f"(--in-process off: through Ray)")
        from .runtime import reap_before

        reap_before("occlude")  # the CLI has already; for a library caller's job
        return _run_here(settings, model_bytes, manifest, old_files, plan)
    return _run_ray(settings, model_bytes, manifest, old_files, plan)


def _book(records: pa.Table, books: BlocksInOrder, progress: Progress, limit: int | None) -> bool:
    """Enter the replicas' records in the books and the progress line; whether the job has its ``limit``.
    Each replica maps up to --limit stamps of a block; the commit keeps the first --limit in table order, so
    the job stops only once every block before them is in."""
    for r in records.to_pylist():
        books.add(r)
    progress.update((books.mapped if limit is None else min(books.mapped, limit)) - progress.done)
    return limit is not None and books.mapped >= limit


def _wanted(settings: OccludeSettings, manifest: st.Manifest) -> int:
    """The most stamps the job can map: the table's rows, or fewer with --limit or --ids."""
    bounds = [int(manifest.num_rows)] + ([int(settings.limit)] if settings.limit else []) + (
        [len(settings.ids)] if settings.ids else [])
    return min(bounds)


def _progress(settings: OccludeSettings, manifest: st.Manifest) -> Progress:
    return Progress("occlude", _wanted(settings, manifest), settings.progress, unit="maps")


def _run_here(settings: OccludeSettings, model_bytes: bytes, manifest: st.Manifest, old_files: list[str],
              plan: _Plan) -> tuple[int, int, dict, list[str], list[str]]:
    """Map in this process, without Ray: :func:`stampray.inference.here_workers` threads, each with its own
    :class:`Occluder` (built one after another: the first compiles, the others find Dynamo's graph made),
    take the work items from one queue and write the same pieces as a pool's replicas; this thread keeps the
    books (:class:`BlocksInOrder`, ``--limit`` in table order) and commits them as the pool's committer
    does (:func:`stampray.pieces.commit_maps`)."""
    from .inference import CPU_BATCH, GPU_BATCH

    limit = int(settings.limit) if settings.limit else None
    # No more threads than the blocks that hold the first --limit stamps (more would map stamps the job
    # drops), unless --where or --ids select an unknown share of each block.
    needed = len(plan.items)
    if limit is not None and not settings.where and not settings.ids:
        needed = min(needed, -(-limit // plan.batch_size))
    workers, threads = here_workers(local_cores(), settings.use_gpu, needed)
    books = BlocksInOrder(plan.items, limit)

    def make() -> Occluder:
        o = Occluder(model_bytes, settings.out, settings.kernel, settings.stride, list(settings.ids),
                     settings.where, threads=threads, use_gpu=settings.use_gpu, limit=settings.limit,
                     occlude_chunk=plan.pairs, compile=plan.compile, use_package=workers == 1,
                     chunk=plan.pairs if plan.compile else (GPU_BATCH if settings.use_gpu else CPU_BATCH),
                     source={"root": settings.data, "columns": COLUMNS})
        o.node_id = LOCAL_NODE  # even where this process has Ray up (--in-process on): no Ray node did it
        return o

    with torch_threads_kept(HERE_THREAD):
        replicas = [make() for _ in range(workers)]
        progress = _progress(settings, manifest)
        stopped = run_items_here(replicas, plan.items, lambda records: _book(records, books, progress, limit),
                                 HERE_THREAD, "occlude", "occlusion")
        progress.close()
    total, set_aside, files, missing = commit_maps(settings.out, books.pieces(complete=not stopped), limit,
                                                   old_files, list(settings.ids))
    return total, set_aside, books.nodes, files, missing


def _run_ray(settings: OccludeSettings, model_bytes: bytes, manifest: st.Manifest, old_files: list[str],
             plan: _Plan) -> tuple[int, int, dict, list[str], list[str]]:
    """Stream the stamps through a Ray pool, keep the books, then commit (in the job's committer actor)."""
    import ray
    import ray.data

    from .inference import check_gpu_nodes, run_pool, start_committer
    from .runtime import ensure_gpus, ray_session

    # A verb of tasks, actors and Ray Data only: the private Ray starts without the dashboard's modules.
    with ray_session(settings.address, dashboard=False), _upscale_when_busy():
        ray.data.DataContext.get_current().enable_progress_bars = False
        progress = _progress(settings, manifest)
        if settings.use_gpu:
            ensure_gpus("occlude", 1, float(settings.wait_gpu), progress.say)
            check_gpu_nodes("occlude")
        shards = [sh["path"] for sh in manifest.shards]
        stream = run_pool(Occluder, model_bytes, settings.data, shards, COLUMNS, plan.items,
                          use_gpu=settings.use_gpu, max_actors=settings.max_actors, actors=settings.actors,
                          # One work item (batch_size rows or a row group's tail) per call, from read
                          # tasks too: a record then names exactly the rows its block held (BlocksInOrder).
                          batch_size=None, chunk=plan.pairs if plan.compile else None,
                          tasks_in_flight=blocks_in_flight(plan.batch_size, plan.windows, bool(settings.limit)),
                          replica_kwargs={"out": settings.out, "kernel": settings.kernel,
                                          "stride": settings.stride, "ids": list(settings.ids),
                                          "where": settings.where, "limit": settings.limit,
                                          "occlude_chunk": plan.pairs, "compile": plan.compile},
                          forwards=plan.variants)
        # The commit reads the maps, so it runs beside the replicas, not in the driver: in an actor started
        # now, whose process starts (Python, Ray, pyarrow: 2-3 s here) while the pool does, not after it.
        committer = start_committer(MapsCommitter)
        limit = int(settings.limit) if settings.limit else None
        books, stopped = BlocksInOrder(plan.items, limit), False
        for records in stream:
            if _book(records, books, progress, limit):
                stopped = True
                break  # ends the dataset: the pool stops
        stream.close()
        progress.close()
        # Read to its end, every block is in: all their pieces, in table order (the commit keeps --limit).
        accepted, nodes = books.pieces(complete=not stopped), books.nodes
        total, set_aside, files, missing = ray.get(
            committer.commit.remote(settings.out, accepted, limit, old_files, list(settings.ids)), timeout=1800)
    return total, set_aside, nodes, files, missing


def read_maps(path: str) -> pa.Table:
    """The maps of an ``occlude`` output directory (or of one of its files), page checksums verified."""
    fs, p = st.resolve(path)
    if fs.get_file_info(p).type != st.pafs.FileType.Directory:
        return st.read_parquet(path)
    files = [n for n in list_files(path) if n.startswith("part-")]
    if not files:
        msg = f"{path} holds no occlusion maps (no part-*.parquet); run 'stampray occlude' first"
        raise FileNotFoundError(msg)
    return pa.concat_tables([st.read_parquet(st.join(path, n)) for n in files], promote_options="default")


def png_name(stamp_id: str) -> str:
    """A file name for a stamp's PNG, unique per id: characters unsafe in a file name become ``_`` and a
    short hash of the id is appended whenever that changed it (``a/b`` and ``a_b`` do not collide)."""
    safe = re.sub(r"^\.", "_", re.sub(r"[^\w.+=-]", "_", str(stamp_id)))[:120]  # no hidden files
    if safe != str(stamp_id):
        safe = f"{safe}-{hashlib.sha1(str(stamp_id).encode()).hexdigest()[:8]}"
    return safe + ".png"


def write_pngs(table: pa.Table, out_dir: str, class_names: list[str], kernel: int) -> list[str]:
    """The stamp beside its probability-change map (:func:`stampray.drawing.draw_occlusion`), one PNG per
    stamp, one grid of the change maps and ``index.csv`` (stamp id, file). They are drawn in a local staging
    directory, then put in ``out_dir`` (a path or a URI), ``index.csv`` last, replacing only files an earlier
    ``occlude --png`` wrote there (:mod:`stampray.outfiles`)."""
    with tempfile.TemporaryDirectory(prefix="stampray-png-") as tmp:
        local = _draw_pngs(table, tmp, class_names, kernel)
        with output_lock(out_dir, "occlude"):
            paths = outfiles.publish(tmp, [os.path.basename(p) for p in local] + ["index.csv"], out_dir, PNG_FILES)
    return paths[:-1]


def legacy_pngs(out_dir: str) -> set[str]:
    """The files of an ``occlude --png`` directory written before the outfiles marker: its index.csv's."""
    import csv
    import io

    path = st.join(out_dir, "index.csv")
    if not st.exists(path):
        return set()
    try:
        rows = list(csv.reader(io.StringIO(st.read_text(path))))
    except (OSError, ValueError, UnicodeDecodeError, csv.Error):
        return set()
    if not rows or rows[0] != ["stamp_id", "file"] or any(len(r) != 2 or r[1] != png_name(r[0]) for r in rows[1:]):
        return set()  # not occlude's: it names each picture png_name(stamp_id)
    return {"index.csv", "occlusion_grid.png", *(r[1] for r in rows[1:])}


PNG_FILES = outfiles.Files("occlude", "--png", ("index.csv",), ".png", legacy_pngs)


def _draw_pngs(table: pa.Table, out_dir: str, class_names: list[str], kernel: int) -> list[str]:
    import csv

    from .drawing import draw_occlusion, pyplot

    plt = pyplot()
    os.makedirs(out_dir, exist_ok=True)
    heat = table.column("heatmap").combine_chunks().to_numpy_ndarray()
    stamps = table.column("stamp").combine_chunks().to_numpy_ndarray()
    ids = table.column(st.ID).to_pylist()
    labels = table.column(st.LABEL).to_pylist()
    preds = table.column("pred").to_pylist()
    targets = table.column("target").to_pylist()
    base = table.column("base_prob").to_pylist()

    def title(i):
        true = class_names[labels[i]] if labels[i] is not None else "?"
        return f"{ids[i]}\ntrue {true}, pred {class_names[preds[i]]}, p={base[i]:.2f}"

    def draw(i, where):
        return draw_occlusion(stamps[i], heat[i], kernel, title(i), where, base_prob=base[i],
                              target=class_names[targets[i]])

    paths = []
    for i in range(len(ids)):
        path = os.path.join(out_dir, png_name(ids[i]))
        draw(i, path)
        paths.append(path)
    with open(os.path.join(out_dir, "index.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["stamp_id", "file"])
        w.writerows([ids[i], os.path.basename(paths[i])] for i in range(len(ids)))
    if ids:
        cols = min(5, len(ids))
        rows = (len(ids) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(2.8 * cols, 2.8 * rows), squeeze=False)
        for k, ax in enumerate(axes.flat):
            if k < len(ids):
                draw(k, ax)  # one Axes: the change map alone, centred on zero, border "not measured"
            else:
                ax.axis("off")
        fig.tight_layout()
        grid = os.path.join(out_dir, "occlusion_grid.png")
        fig.savefig(grid, dpi=100)
        plt.close(fig)
        paths.append(grid)
    return paths
