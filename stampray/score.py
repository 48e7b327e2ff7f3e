"""Bulk scoring with Ray Data: ``stampray score``.

Stamp shards stream through an autoscaling pool of model replicas (:mod:`stampray.inference`) and the
results land as one Parquet file per input shard. The workers write; the driver keeps the books:

1. every row carries its shard's name and its index there (``_shard``, ``_row``, added by the read: on
   CPUs each replica reads its own work items, a row group each, see :func:`stampray.inference.run_pool`);
2. a replica scores a block and writes each shard's rows of it as a *piece*,
   ``SCORES/_parts/<shard>/<first row>-<rows>.parquet``, straight to the output filesystem (atomically),
   and returns one small record per piece: shard, first row, rows, rows set aside, node;
3. the job's coordinator — a zero-CPU Ray task the driver starts beside itself, which runs Ray Data's
   streaming executor — adds each record's row interval to its shard's books; once the intervals cover the
   shard's every row it has the job's *committer* (a quarter-CPU actor beside it) commit the shard: read
   the shard's pieces, drop any row delivered twice (a block redone after a node loss), check every row
   ``0..n-1`` is there once, and write ``_errors/<shard>`` (rows that cannot be scored, with their
   reason) and then ``<shard>`` —
   the result file, written last and atomically, marks the shard done;
4. a rerun skips every shard whose result file exists and deletes the pieces of the others before redoing
   them, so a job whose driver was killed at any moment finishes with every stamp exactly once; rerunning
   a finished job does no work.

A small job (``--in-process``, :func:`in_process`) runs the same replica class (one per thread,
:func:`here_workers`), books and commits in the driver's own process, without Ray: starting Ray and a pool
would cost it more than its scoring.

No result row passes through the driver or the coordinator: the coordinator handles one small record per
block (a few per 16,384 stamps) and the driver only prints the progress it streams back, so neither's
CPU time nor memory grows with the job's rows (``benchmarks/score_driver.py`` measures both).

Each stamp gets one plain pass through the model, or K passes with ``--tta K`` (symmetry transforms) or
``--mc-dropout K`` (dropout active): ``p_<class>`` is then their mean and ``p_<class>_std`` their spread, at
K times the work; ``--features`` adds the model's embedding. The passes are :func:`stampray.predict`'s own
(:func:`stampray.notebook.forward_passes`), so the two give the same numbers.
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
import zlib
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import checkpoint as ck
from . import splits
from . import table as st
from .classes import prob_column, std_column
from .data import ROW, SHARD
from .lock import output_lock
from .inference import (COMPILE, CPU_BATCH, GPU_BATCH, HERE_WORKERS, IN_PROCESS, LOCAL_NODE,  # noqa: F401
                        PARTS_DIR, READ_CPUS, TMP_DIR, ModelActor, Progress, check_compatible, check_in_process,
                        delete_dir, here_workers, list_files, local_cores, open_model_for, reason_counts,
                        run_items_here, runs_here, torch_threads_kept, write_atomic)
from .inference import IN_PROCESS_FORWARDS as IN_PROCESS_ROWS  # noqa: F401 - --in-process auto's bound
from .pieces import ERROR
from .provenance import provenance

logger = logging.getLogger(__name__)

JOB_FILE = "_job.json"
SCORE_MANIFEST = "_manifest.json"
ERRORS_META = b"stampray_errors"  # per-shard counts of set-aside rows by reason, in the result file's footer
PROGRESS_EVERY_S = 2.0  # the coordinator streams the count of rows accounted for this often
COMMITS_AT_ONCE = 4  # threads of the job's committer actor
# Work items queued at one CPU replica (Ray Data's default is 2): with 2 a replica waited for its next item
# 12 % of the time on the 2-core machine (py-spy); with 4, 1,000,000 stamps took 19.8 s against 21.0 s
# (means of 8 and 6 runs). GPU pools keep Ray's default: their blocks come from read tasks.
ITEMS_IN_FLIGHT = 4
COMPILE_ROWS = 200_000  # --compile auto compiles the model for jobs of at least this many stamps
FEATURES = "features"  # --features: the forward_features vector
HERE_THREAD = "stampray-score-"  # the names of those threads: stampray-score-0, -1, ...
RECORD_SCHEMA = pa.schema([("shard", pa.string()), ("row0", pa.int64()), ("rows", pa.int64()),
                           ("errors", pa.int64()), ("node", pa.string())])


@dataclass(frozen=True)
class ScoreSettings:
    """Settings of ``stampray score``.

    Args:
        model: checkpoint: model.pt, a checkpoint dir, or a run dir (its best.pt).
        data: stamp table to score.
        out: result directory (one Parquet file per input shard).
        keep: metadata columns to pass through, e.g. snr,ra,dec.
        batch_size: stamps per model call (default: 4096 on a CPU, 16384 on a GPU); with --tta or --mc-dropout
            K, a call holds the K variants of batch-size // K stamps.
        use_gpu: one GPU per model replica; on an autoscaling cluster whose GPU nodes are not up yet, ask the
            autoscaler for them and wait (see --wait-gpu).
        actors: a fixed pool of exactly N model replicas instead of an autoscaling one.
        max_actors: most model replicas of the autoscaling pool (default: one per CPU core, or per GPU, of
            every node the cluster has or its autoscaler can launch).
        wait_gpu: with --use-gpu, how long to wait for the autoscaler's GPU nodes, in seconds.
        fractions: split fractions for the 'split' column (default: those the checkpoint was trained with;
            others are refused, as they would test the model on stamps it trained on).
        overwrite: discard earlier results in --out.
        compile: torch.compile the model in each replica: auto for jobs of 200,000 forward passes or more
            (stamps, times K with --tta); never with --mc-dropout, which runs in eager mode.
        progress: a progress line on stderr (--no-progress: none).
        address: Ray cluster to connect to (default: a private local Ray; RAY_ADDRESS is honoured).
        rename_classes: the table names its classes otherwise than the model (e.g. 0,1 against
            noise,source): take the model's class names by position instead of refusing.
        tta: test-time augmentation: average the probabilities over the first K of the fixed symmetry
            transforms of each stamp (the eight flips and quarter turns, identity first, then shifts; see
            stampray.predict); K of 2 or more adds p_<class>_std, their spread. Costs K times the work.
        mc_dropout: Monte Carlo dropout: average K passes with the model's dropout layers active (refused for
            a model without dropout); K of 2 or more adds p_<class>_std. Costs K times the work.
        features: add a 'features' column: the model's forward_features vector (float32, the embedding) of
            every stamp, from its plain (first) pass.
        in_process: score in this process, without Ray (up to 4 threads sharing its cores): auto for jobs of
            under 200,000 forward passes that would otherwise start a private Ray of their own (no --address or
            RAY_ADDRESS, no --use-gpu or --actors, no Ray running in this Python process); on: always; off:
            never. The results, the books and a resumed run are the same either way.
    """

    model: str = field(metadata={"path": True})
    data: str = field(metadata={"path": True})
    out: str = field(metadata={"path": True})
    keep: tuple[str, ...] = ()
    batch_size: int | None = None
    use_gpu: bool = False
    actors: int | None = None
    max_actors: int | None = None
    wait_gpu: float = field(default=1800.0, metadata={"metavar": "SECONDS"})
    fractions: tuple[float, float, float] | None = field(default=None, metadata={"metavar": "TRAIN,VAL,TEST"})
    overwrite: bool = False
    compile: str = field(default="auto", metadata={"choices": COMPILE})
    progress: bool = True
    address: str | None = None
    rename_classes: bool = False
    tta: int = field(default=0, metadata={"metavar": "K"})
    mc_dropout: int = field(default=0, metadata={"metavar": "K"})
    features: bool = False
    in_process: str = field(default="auto", metadata={"choices": IN_PROCESS})

    def __post_init__(self):
        check_in_process("scores", self.in_process, self.address)
        if self.batch_size is not None and int(self.batch_size) <= 0:
            msg = f"--batch-size must be a positive integer, got {self.batch_size!r}"
            raise ValueError(msg)
        if self.compile not in COMPILE:
            msg = f"--compile must be auto, on or off, got {self.compile!r}"
            raise ValueError(msg)
        for name in ("actors", "max_actors"):
            value = getattr(self, name)
            if value is not None and int(value) <= 0:
                msg = f"--{name.replace('_', '-')} must be a positive integer, got {value!r}"
                raise ValueError(msg)
        for name in ("tta", "mc_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                msg = f"--{name.replace('_', '-')} counts passes: an integer >= 0 (0: one plain pass), got {value!r}"
                raise ValueError(msg)
            object.__setattr__(self, name, int(value))
        if self.tta and self.mc_dropout:
            msg = (f"--tta {self.tta} and --mc-dropout {self.mc_dropout}: choose one (the spread of either is "
                   f"p_<class>_std)")
            raise ValueError(msg)
        if float(self.wait_gpu) < 0:
            msg = f"--wait-gpu must be a number of seconds >= 0, got {self.wait_gpu!r}"
            raise ValueError(msg)
        if self.fractions is not None:
            object.__setattr__(self, "fractions", splits.check_fractions(self.fractions))

    @property
    def passes(self) -> int:
        """Forward passes per stamp."""
        return max(self.tta, self.mc_dropout, 1)


class Scorer(ModelActor):
    """map_batches callable: stamp rows (or the work items to read them from) in; result pieces written to
    ``OUT/_parts/``; small records out."""

    def __init__(self, model_bytes: bytes, out: str, keep: list[str], fractions, model_tag: str,
                 threads: int = 1, use_gpu: bool = False, compile: bool = False, chunk: int = 4096,
                 duplicates: dict | None = None, tta: int = 0, mc_dropout: int = 0, features: bool = False,
                 source: dict | None = None, build_package: bool = False, use_package: bool = True):
        super().__init__(model_bytes, threads, use_gpu, compile, chunk, tta=tta, mc_dropout=mc_dropout,
                         features=features, source=source, build_package=build_package, use_package=use_package)
        self.out, self.keep, self.fractions, self.model_tag = out, list(keep), tuple(fractions), model_tag
        if duplicates is not None and not isinstance(duplicates, dict):  # an ObjectRef: shared by the replicas
            import ray

            duplicates = ray.get(duplicates)
        self.duplicates = duplicates or {}  # {shard: {row: reason}}: repeated ids, set aside
        self.prob_names = [prob_column(c) for c in self.class_names]

    def results(self, batch: pa.Table) -> pa.Table:
        """One result row per stamp, in batch order (the columns of :func:`result_schema`, then ``_shard``,
        ``_row`` and ``_error``); rows that cannot be scored carry their reason."""
        n = batch.num_rows
        images, good, bad = self.decode_valid(batch)
        k = len(self.class_names)
        probs = np.full((n, k), np.nan, np.float32)
        std = np.full((n, k), np.nan, np.float32) if max(self.tta, self.mc_dropout) > 1 else None
        feats = np.full((n, self.feature_width), np.nan, np.float32) if self.features else None
        if len(good):
            seed = block_seed(batch.column(SHARD)[0].as_py(), batch.column(ROW)[0].as_py())
            out = self.predict(images, seed)
            probs[good] = out.probs
            if std is not None:
                std[good] = out.std
            if feats is not None:
                feats[good] = out.features
        pred = probs.argmax(axis=1) if n else np.zeros(0, np.int64)
        valid = np.ones(n, bool)
        errors = np.full(n, None, dtype=object)
        for i, reason in bad:
            valid[i] = False
            errors[i] = reason
        if self.duplicates:
            for i, (shard, row) in enumerate(zip(batch.column(SHARD).to_pylist(), batch.column(ROW).to_pylist())):
                reason = self.duplicates.get(shard, {}).get(row)
                if reason is not None and errors[i] is None:
                    valid[i] = False
                    errors[i] = reason
        names = np.asarray(self.class_names, dtype=object)[pred] if n else np.zeros(0, object)
        fixed = batch.column(st.SPLIT) if st.SPLIT in batch.schema.names else None
        cols = {
            st.ID: batch.column(st.ID),
            st.LABEL: batch.column(st.LABEL) if st.LABEL in batch.schema.names else pa.nulls(n, pa.int64()),
            st.SPLIT: pa.array(splits.assign(batch.column(st.ID), self.fractions, fixed), pa.string()),
            "pred": pa.array(pred.astype(np.int64), mask=~valid),
            "pred_name": pa.array(names, pa.string(), mask=~valid),
        }
        for j, name in enumerate(self.prob_names):
            cols[name] = pa.array(probs[:, j], pa.float32(), mask=~valid)
        if std is not None:
            for j, c in enumerate(self.class_names):
                cols[std_column(c)] = pa.array(std[:, j], pa.float32(), mask=~valid)
        if feats is not None:
            cols[FEATURES] = pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1), pa.float32()),
                                                               self.feature_width, mask=pa.array(~valid))
        cols["model"] = pa.array([self.model_tag] * n, pa.string())
        for column in self.keep:
            cols[column] = batch.column(column)
        cols[SHARD] = batch.column(SHARD)
        cols[ROW] = batch.column(ROW)
        cols[ERROR] = pa.array(errors, pa.string())
        return pa.table(cols)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return write_pieces(self.results(self.stamps(batch)), self.out, self.node_id)


def result_schema(class_names, keep: list[pa.Field] = (), spread: bool = False,
                  feature_width: int | None = None) -> pa.Schema:
    """The columns of every result file, in order: ``stamp_id``, ``label``, ``split``, ``pred``,
    ``pred_name``, ``p_<class>`` per class, ``p_<class>_std`` per class (``spread``: two passes or more),
    ``features`` (a fixed-size list of ``feature_width`` float32), ``model``, then the ``keep`` columns.
    A shard with no stamps gets a file of these columns too (:func:`commit_shard`)."""
    fields = [pa.field(st.ID, pa.string()), pa.field(st.LABEL, pa.int64()), pa.field(st.SPLIT, pa.string()),
              pa.field("pred", pa.int64()), pa.field("pred_name", pa.string())]
    fields += [pa.field(prob_column(c), pa.float32()) for c in class_names]
    if spread:
        fields += [pa.field(std_column(c), pa.float32()) for c in class_names]
    if feature_width:
        fields.append(pa.field(FEATURES, pa.list_(pa.float32(), int(feature_width))))
    return pa.schema([*fields, pa.field("model", pa.string()), *keep])


def block_seed(shard: str, row: int) -> int:
    """The MC-dropout seed of a block whose first row is ``row`` of ``shard``: a block redone (a rerun, a
    lost node) draws the same dropout masks, so its numbers do not change."""
    return zlib.crc32(f"{shard}:{int(row)}".encode())


def write_pieces(table: pa.Table, out: str, node: str) -> pa.Table:
    """Write each shard's contiguous runs of rows in ``table`` as pieces; one record per piece."""
    records = []
    shard_col = table.column(SHARD)
    names = pc.unique(shard_col).to_pylist()
    for name in names:
        part = table.filter(pc.equal(shard_col, name)) if len(names) > 1 else table
        rows = part.column(ROW).to_numpy()
        cuts = np.nonzero(np.diff(rows) != 1)[0] + 1
        for run in np.split(np.arange(len(rows)), cuts):
            piece = part if len(run) == part.num_rows else part.take(pa.array(run))
            row0 = int(rows[run[0]])
            path = st.join(out, PARTS_DIR, _stem(name), f"{row0:012d}-{len(run)}.parquet")
            write_atomic(piece.drop_columns([SHARD]), path, out)
            records.append({"shard": name, "row0": row0, "rows": len(run),
                            "errors": piece.num_rows - piece.column(ERROR).null_count, "node": node})
    return pa.Table.from_pylist(records, schema=RECORD_SCHEMA)


def find_duplicates(data: str, shards: list[str]) -> dict[str, dict[int, str]]:
    """Rows whose ``stamp_id`` an earlier row (in manifest order) already has: ``{shard: {row: reason}}``.

    Reads only the ids (8-byte hashes of every id are held at once: 80 MB for 10 million stamps; rows whose
    hashes collide are compared by their ids). Tables stampray wrote itself need no such pass: ingest and
    synth keep ids unique (see :func:`trusted_unique`).
    """
    from concurrent.futures import ThreadPoolExecutor

    def ids_of(name: str) -> pa.Array:
        col = st.read_parquet(st.join(data, name), [st.ID]).column(st.ID)
        return col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)

    with ThreadPoolExecutor(8) as pool:
        columns = list(pool.map(ids_of, shards))
    hashes = np.concatenate([splits.fnv1a64(c.fill_null("")) for c in columns]) if columns else np.zeros(0, np.uint64)
    where = np.concatenate([np.stack([np.full(len(c), k), np.arange(len(c))], 1) for k, c in enumerate(columns)]
                           ) if columns else np.zeros((0, 2), np.int64)
    valid = np.concatenate([c.is_valid().to_numpy(zero_copy_only=False) for c in columns]) if columns else hashes
    order = np.argsort(hashes, kind="stable")  # stable: equal hashes stay in manifest order
    sh = hashes[order]
    same = np.zeros(len(sh), bool)
    same[1:] = sh[1:] == sh[:-1]
    groups = np.unique(sh[same]) if same.any() else np.zeros(0, np.uint64)
    out: dict[str, dict[int, str]] = {}
    for h in groups:
        first: dict[str, tuple[int, int]] = {}
        for pos in order[np.searchsorted(sh, h, "left"):np.searchsorted(sh, h, "right")]:
            if not valid[pos]:
                continue
            k, row = int(where[pos, 0]), int(where[pos, 1])
            sid = columns[k][row].as_py()
            if sid in first:
                fk, frow = first[sid]
                out.setdefault(shards[k], {})[row] = (f"duplicate: stamp_id {sid!r} is also at {shards[fk]} row "
                                                      f"{frow}, which is scored")
            else:
                first[sid] = (k, row)
    return out


def trusted_unique(manifest: st.Manifest) -> bool:
    """Whether stampray wrote the table (ingest or synth, every shard's footer recorded and checked), so its
    ids are unique by construction."""
    return (any(k in manifest.settings for k in ("ingest", "synth", "cutout"))
            and all(s.get("footer") for s in manifest.shards))


def _stem(shard: str) -> str:
    return shard[:-len(".parquet")] if shard.endswith(".parquet") else shard


class Books:
    """The driver's ledger: which rows of which shard are accounted for (merged row intervals)."""

    def __init__(self, expected: dict[str, int]):
        self.expected = dict(expected)
        self.covered: dict[str, list[list[int]]] = {name: [] for name in expected}
        self.count: dict[str, int] = {name: 0 for name in expected}

    def add(self, shard: str, row0: int, rows: int) -> int:
        """Account for rows ``row0 .. row0+rows-1`` of ``shard``; return how many were new."""
        if shard not in self.expected:
            msg = f"a replica returned rows of {shard!r}, which this job does not score"
            raise RuntimeError(msg)
        spans = sorted(self.covered[shard] + [[row0, row0 + rows]])
        merged: list[list[int]] = []
        for lo, hi in spans:
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        total = sum(hi - lo for lo, hi in merged)
        new, self.count[shard], self.covered[shard] = total - self.count[shard], total, merged
        return new

    def complete(self, shard: str) -> bool:
        return self.covered[shard] == [[0, self.expected[shard]]] or self.expected[shard] == 0

    def incomplete(self) -> dict[str, int]:
        return {n: c for n, c in self.count.items() if not self.complete(n)}


def commit_shard(out: str, name: str, expected: int, schema: pa.Schema | None = None) -> dict:
    """Join a shard's pieces into ``<shard>`` (and ``_errors/<shard>``); see the module docstring.
    ``schema``: the columns of a shard with no rows (:func:`result_schema`; None: ``stamp_id`` only)."""
    parts = st.join(out, PARTS_DIR, _stem(name))
    fs, _ = st.resolve(out)
    pieces = list_files(parts)
    result = st.join(out, name)
    if expected and st.exists(result):
        # A retry of a commit that finished (its node died before it could return, perhaps part way
        # through removing the pieces): the result file is written last, so the shard is done.
        meta = pq.read_metadata(st.resolve(result)[1], filesystem=fs)
        kv = meta.metadata or {}
        if pieces:
            delete_dir(parts)
        return {"shard": name, "rows": meta.num_rows,
                "errors": json.loads(kv[ERRORS_META]) if ERRORS_META in kv else {}}
    tables = [st.read_parquet(st.join(parts, f)) for f in pieces]
    table = pa.concat_tables(tables, promote_options="default") if tables else None
    rows = table.column(ROW).to_numpy() if table is not None else np.zeros(0, np.int64)
    in_order = len(rows) == expected and np.array_equal(rows, np.arange(expected))  # the common case: no take
    if not in_order:
        order = np.argsort(rows, kind="stable")
        first = np.ones(len(order), bool)
        first[1:] = np.diff(rows[order]) != 0  # a row delivered twice (a block redone) is kept once
        keep = order[first]
        if len(keep) != expected or (expected and (rows[keep[0]] != 0 or rows[keep[-1]] != expected - 1)):
            msg = (f"score: the pieces of {name} hold {len(keep)} distinct rows of {expected}; rerun the same "
                   f"command to redo that shard")
            raise RuntimeError(msg)
        if expected:
            table = table.take(pa.array(keep))
    if not expected:
        table = schema.empty_table() if schema is not None else pa.table({st.ID: pa.array([], pa.string())})
    counts: dict[str, int] = {}
    if expected:
        failed = table.column(ERROR).is_valid()
        errors = table.filter(failed)
        # Written (or, with none, an earlier attempt's removed) before the result file that marks the shard done.
        counts = st.write_errors(out, name, {"stamp_id": errors.column(st.ID), "row": errors.column(ROW),
                                             "source": pa.array([name] * errors.num_rows, pa.string()),
                                             "reason": errors.column(ERROR)}, tmp_root=out)
        table = (table.filter(pc.invert(failed)) if errors.num_rows else table).drop_columns([ROW, ERROR])
    # The result file is written last: its presence marks the shard as done.
    write_atomic(table, st.join(out, name), out, metadata={ERRORS_META: json.dumps(counts).encode()})
    delete_dir(parts)
    return {"shard": name, "rows": table.num_rows, "errors": counts}


@dataclass
class ScoreResult:
    out: str
    scored: int
    set_aside: int
    errors: dict
    seconds: float
    rows_per_s: float
    skipped_shards: int
    nothing_to_do: bool = False
    scored_now: int = 0
    nodes: dict = field(default_factory=dict)
    coordinator_cpu_s: float = 0.0  # CPU seconds of the job's coordinator task (Ray Data's executor, books)


# What a job is, besides its data and model: the passes and columns each stamp gets. A job document written
# before these were recorded scored with the defaults.
JOB_PASSES = {"tta": 0, "mc_dropout": 0, "features": False}


def _job_doc(settings: ScoreSettings, bundle: dict, tag: str, shards: dict[str, dict], split: dict,
             feature_width: int | None = None) -> dict:
    return {"model": settings.model, "model_tag": tag, "data": settings.data, "keep": list(settings.keep),
            "preprocess": bundle["preprocess"], "class_names": list(bundle["class_names"]),
            "split": split, **{k: getattr(settings, k) for k in JOB_PASSES}, "feature_width": feature_width,
            "data_shards": {name: info["footer"] for name, info in shards.items()}}


def split_rule(bundle: dict, asked, table_has_column: bool, data: str) -> dict:
    """The split the ``split`` column of the scores follows: the one the model was trained with.

    ``--fractions`` other than the checkpoint's are refused (the 'test' rows would include stamps the model
    trained on). A checkpoint that records no split gets the default fractions and a warning; a model
    trained on a table with a fixed ``split`` column, scoring a table without one, gets a warning. The
    record (``fractions``, ``source``: checkpoint or default, ``column``) goes into the score manifest,
    where ``evaluate`` reads it.
    """
    trained = ck.split_of(bundle)
    if trained is None:
        fractions = tuple(float(f) for f in (asked or splits.DEFAULT_FRACTIONS))
        logger.warning(f"score: warning: the checkpoint does not record the split it was trained with; the 'split' "
                       f"column uses fractions {','.join(f'{f:g}' for f in fractions)}, and its 'test' rows may "
                       f"include training stamps")
        return {"fractions": list(fractions), "source": "assumed", "column": table_has_column}
    fractions = tuple(trained["fractions"])
    if asked is not None and not np.allclose(splits.check_fractions(asked), fractions, atol=1e-9):
        msg = (f"--fractions {','.join(f'{f:g}' for f in asked)} differs from the split the model was trained "
               f"with ({','.join(f'{f:g}' for f in fractions)}): its 'test' rows would include stamps it trained "
               f"on; drop --fractions (score uses the checkpoint's)")
        raise ValueError(msg)
    if trained.get("column") and not table_has_column:
        logger.warning(f"score: warning: the model was trained on a table with a fixed 'split' column and {data} "
                       f"has none, so its 'split' column comes from the id hash; if this is the training data, its "
                       f"'test' rows are not the training's test split")
    return {"fractions": list(fractions), "source": "checkpoint", "column": table_has_column,
            "trained_with_column": trained.get("column")}


def _check_shard_names(manifest: st.Manifest, data: str) -> dict[str, int]:
    """Shard names must be plain file names inside the table: output names are derived from them."""
    expected = {}
    for s in manifest.shards:
        name = str(s["path"])
        if not name or posixpath.basename(name) != name or name in (".", "..") or name.startswith("_"):
            msg = (f"{data}/{st.MANIFEST_NAME} lists shard {name!r}, which is not a plain file name inside the "
                   f"table; re-create the table with 'stampray ingest'")
            raise ValueError(msg)
        expected[name] = int(s["rows"])
    return expected


def _prepare_out(settings: ScoreSettings, job: dict) -> None:
    """Check --out belongs to this job (or start over with --overwrite) and record the job.

    A job is the model, the preprocessing, the kept columns, the passes and columns each stamp gets (``--tta``,
    ``--mc-dropout``, ``--features``), the data's path *and its content*: the footer digest of every input
    shard. Scores of shards that changed since are stale: refused, or redone from
    scratch with ``--overwrite``. Shards added to the table since (an append) are simply scored.
    """
    out = settings.out
    fs, p = st.resolve(out)
    if fs.get_file_info(p).type == st.pafs.FileType.File:
        msg = f"--out {out} is a file; give a directory for the scores"
        raise ValueError(msg)
    st.make_dirs(out)
    job_path = st.join(out, JOB_FILE)
    before = json.loads(st.read_text(job_path)) if st.exists(job_path) else None
    if before is None:
        theirs = [n for n in [*job["data_shards"], SCORE_MANIFEST, st.ERRORS_DIR, PARTS_DIR] if st.exists(st.join(out, n))]
        if theirs:
            msg = (f"--out {out} holds {', '.join(theirs[:3])}{' ...' if len(theirs) > 3 else ''}, which "
                   f"'stampray score' did not write there (no {JOB_FILE}); choose a new or empty directory")
            raise ValueError(msg)
    elif not settings.overwrite:
        key = _job_differs(before, job)
        if key:
            msg = (f"{out} holds results of another job ({key}: {before.get(key, JOB_PASSES.get(key))} vs "
                   f"{job[key]}); choose another --out, or pass --overwrite to start it again")
            raise ValueError(msg)
        old = before.get("data_shards")
        if old is not None:
            changed = sorted(n for n, d in old.items() if job["data_shards"].get(n) != d)
            if changed:
                msg = (f"{settings.data} changed since {out} was scored: {len(changed)} of its shards "
                       f"({', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}) differ from those scored "
                       f"or are gone, so the scores there are stale; pass --overwrite to score the table again "
                       f"from scratch, or choose another --out")
                raise ValueError(msg)
    if settings.overwrite and before is not None:
        _clear_scores(out, before, job)
    st.write_text(job_path, json.dumps(job, indent=2))
    delete_dir(st.join(out, TMP_DIR))  # leftovers of a killed run


def _job_files(out: str, before: dict, job: dict) -> list[str]:
    """The files an earlier score job wrote in ``out`` (its result files, books and manifests), relative to
    it; files a user put beside them are not among them."""
    from .replace import files_under

    names = set(before.get("data_shards") or {}) | set(job["data_shards"])
    if st.exists(st.join(out, SCORE_MANIFEST)):
        names |= {str(s["path"]) for s in json.loads(st.read_text(st.join(out, SCORE_MANIFEST))).get("shards", [])}
    found = [n for n in sorted(names) if posixpath.basename(n) == n and st.exists(st.join(out, n))]
    found += [n for n in (SCORE_MANIFEST, JOB_FILE) if st.exists(st.join(out, n))]
    for d in (PARTS_DIR, TMP_DIR, st.ERRORS_DIR):
        found += [f"{d}/{n}" for n in files_under(st.join(out, d))]
    return found


def _clear_scores(out: str, before: dict, job: dict) -> None:
    """Delete what an earlier score job wrote in ``out`` (:func:`_job_files`) and nothing else: files a user
    put beside them stay."""
    fs, _ = st.resolve(out)
    for name in _job_files(out, before, job):
        fs.delete_file(st.resolve(st.join(out, name))[1])
    for name in (PARTS_DIR, TMP_DIR, st.ERRORS_DIR):
        delete_dir(st.join(out, name))


def score(settings: ScoreSettings) -> ScoreResult:
    """Score every stamp of ``settings.data`` with the checkpoint ``settings.model`` (see module docs)."""
    t0 = time.time()
    manifest, _, bundle, model_bytes = open_model_for(settings.model, settings.data, settings.rename_classes)
    missing = [k for k in settings.keep if k not in manifest.columns]
    if missing:
        extra = [c for c in manifest.columns if c not in st.CORE_COLUMNS]
        msg = f"--keep names columns {missing} that {settings.data} does not have; it has: {', '.join(extra) or 'none'}"
        raise ValueError(msg)
    width = _check_passes(settings, bundle)
    written = result_schema(bundle["class_names"], (), settings.passes > 1, width).names
    clash = [k for k in settings.keep if k in written]
    if clash:
        msg = f"--keep {clash}: score writes these columns itself"
        raise ValueError(msg)
    expected = _check_shard_names(manifest, settings.data)
    st.check_separate(settings.out, {"--data": settings.data})
    st.check_apart_from_model(settings.out, settings.model)
    unlisted = st.unlisted_shards(settings.data, manifest)
    if unlisted:
        logger.warning(f"score: warning: {settings.data} holds Parquet files its manifest does not list, which are "
                       f"not scored: {', '.join(unlisted[:10])}{' ...' if len(unlisted) > 10 else ''} "
                       f"({len(unlisted)} files); ingest them into a table of their own")
    shards = st.inspect_shards(settings.data, manifest)
    tag = f"{bundle['model']}@{ck.weights_hash(bundle)}"
    split = split_rule(bundle, settings.fractions, st.SPLIT in manifest.columns, settings.data)
    settings = replace(settings, fractions=tuple(split["fractions"]))
    job = _job_doc(settings, bundle, tag, shards, split, width)
    schema = result_schema(bundle["class_names"], _keep_fields(settings.data, manifest, settings.keep),
                           settings.passes > 1, width)
    with output_lock(settings.out, "score", scratch=(JOB_FILE,)):
        return _score_locked(settings, manifest, bundle, model_bytes, tag, job, expected, t0, schema)


def _check_passes(settings: ScoreSettings, bundle: dict) -> int | None:
    """Refuse passes the checkpoint's model cannot take (before any Ray work); its feature width with
    ``--features``."""
    if settings.passes == 1 and not settings.mc_dropout and not settings.features:
        return None
    from .notebook import check_passes, feature_width

    net = ck.build_model(bundle)
    check_passes(net, settings.tta, settings.mc_dropout)
    if settings.mc_dropout and settings.compile == "on":
        logger.warning("score: warning: --compile on does not apply to --mc-dropout, whose passes run in eager "
                       "mode")
    return feature_width(net) if settings.features else None


def _keep_fields(data: str, manifest: st.Manifest, keep) -> list[pa.Field]:
    """The ``--keep`` columns as the table's first shard declares them (null-typed for a table of no shards)."""
    if not keep:
        return []
    declared = pa.schema([])
    if manifest.shards:
        fs, p = st.resolve(st.join(data, str(manifest.shards[0]["path"])))
        declared = pq.read_schema(p, filesystem=fs)
    return [declared.field(k) if k in declared.names else pa.field(k, pa.null()) for k in keep]


def _score_locked(settings: ScoreSettings, manifest: st.Manifest, bundle: dict, model_bytes: bytes, tag: str,
                  job: dict, expected: dict[str, int], t0: float, schema: pa.Schema) -> ScoreResult:
    """Score into ``--out``; with ``--overwrite`` over an earlier job's complete results, into a staging area
    swapped in only once the new results are complete (:mod:`stampray.replace`)."""
    from . import replace as swap

    out = settings.out
    if swap.pending(out):
        swap.roll_forward(out)  # an --overwrite killed while its results were swapped in
    if not (settings.overwrite and st.exists(st.join(out, SCORE_MANIFEST)) and st.exists(st.join(out, JOB_FILE))):
        return _score_into(settings, manifest, bundle, model_bytes, tag, job, expected, t0, schema)
    before = json.loads(st.read_text(st.join(out, JOB_FILE)))
    old_files = _job_files(out, before, job)
    stage = swap.stage_dir(out)
    staged_job = st.join(stage, JOB_FILE)
    resumes = st.exists(staged_job) and _same_job(json.loads(st.read_text(staged_job)), job)
    try:  # a stage of this same job, killed or failed, resumes; another is started over
        r = _score_into(replace(settings, out=stage, overwrite=not resumes), manifest, bundle, model_bytes, tag,
                        job, expected, t0, schema)
    except Exception:
        if not [n for n in expected if st.exists(st.join(stage, n))]:
            delete_dir(st.join(out, swap.REPLACE_DIR))  # nothing to resume from; the earlier results stand
        raise
    swap.swap(out, old_files)
    return replace(r, out=out)


JOB_KEYS = ("model_tag", "data", "keep", "preprocess", "class_names", "split", *JOB_PASSES)  # what a job is


def _job_differs(before: dict, job: dict, keys=JOB_KEYS) -> str | None:
    """The first of ``keys`` in which the recorded job ``before`` differs from ``job`` (a pass setting an
    earlier stampray did not record counts as its default), or None."""
    def norm(k, v):  # --data named relatively by an earlier stampray, absolutely now: the same table
        return st.canonical(v) if k == "data" and isinstance(v, str) else v

    return next((k for k in keys if norm(k, before.get(k, JOB_PASSES.get(k, job[k]))) != norm(k, job[k])), None)


def _same_job(before: dict, job: dict) -> bool:
    return _job_differs(before, job, (*JOB_KEYS, "data_shards")) is None


def _score_into(settings: ScoreSettings, manifest: st.Manifest, bundle: dict, model_bytes: bytes, tag: str,
                job: dict, expected: dict[str, int], t0: float, schema: pa.Schema) -> ScoreResult:
    out = settings.out
    _prepare_out(settings, job)
    done = {name for name in expected if st.exists(st.join(out, name))}
    for name in sorted(done):
        _check_result_file(out, name, expected[name], settings.data)
    todo = [name for name in expected if name not in done]
    for name in todo:  # pieces of shards a killed run left uncommitted are redone from scratch
        delete_dir(st.join(out, PARTS_DIR, _stem(name)))
    if manifest.num_rows == 0:
        logger.warning(f"score: warning: {settings.data} holds no stamps; wrote an empty result")
    nodes: dict[str, int] = {}
    coordinator_cpu = 0.0
    if todo and done and settings.progress:  # a table that grew since (an append): only its new shards
        logger.info(f"score: {len(todo)} new shards ({sum(expected[n] for n in todo)} stamps), {len(done)} already "
                    f"scored")
    if todo:
        nodes, coordinator_cpu = _run(settings, bundle, model_bytes, tag, {n: expected[n] for n in todo}, manifest,
                                      schema)
    delete_dir(st.join(out, PARTS_DIR))
    delete_dir(st.join(out, TMP_DIR))
    doc = _write_manifest(settings, job, expected, nodes)
    seconds = time.time() - t0
    now = sum(expected[n] for n in todo)
    return ScoreResult(out, doc["num_rows"], doc["set_aside"], doc["errors"], seconds,
                       now / max(seconds, 1e-9) if todo else 0.0, len(done), nothing_to_do=not todo,
                       scored_now=now, nodes=nodes, coordinator_cpu_s=coordinator_cpu)


def _run(settings: ScoreSettings, bundle: dict, model_bytes: bytes, tag: str, todo: dict[str, int],
         manifest: st.Manifest, schema: pa.Schema) -> tuple[dict[str, int], float]:
    """Score the shards in ``todo``: in this process (:func:`run_here`) or through Ray (:func:`_run_ray`),
    as :func:`in_process` decides; (rows per node, the coordinating process's CPU seconds)."""
    check = None if trusted_unique(manifest) else [str(s["path"]) for s in manifest.shards]
    rows = sum(todo.values())
    if in_process(settings, rows):
        if settings.in_process == "auto":
            logger.info(f"score: {rows:,} stamps: scoring in this process, without Ray "
                        f"(--in-process off: through Ray)")
        from .runtime import reap_before

        reap_before("score")  # the CLI has already; for a library caller's job
        return run_here(settings, model_bytes, tag, todo, list(manifest.columns), check, schema)
    return _run_ray(settings, model_bytes, tag, todo, list(manifest.columns), check, schema)


def in_process(settings: ScoreSettings, rows: int) -> bool:
    """Whether the job runs in this process, without Ray (``--in-process``; see
    :func:`stampray.inference.runs_here`): ``rows`` stamps are ``rows`` times ``--tta``/``--mc-dropout`` K
    forward passes."""
    return runs_here("scores", settings.in_process, rows * settings.passes, settings.address, settings.use_gpu,
                     settings.actors)


def _run_ray(settings: ScoreSettings, model_bytes: bytes, tag: str, todo: dict[str, int], columns_present: list,
             check: list | None, schema: pa.Schema) -> tuple[dict[str, int], float]:
    """Run the job's coordinator beside the driver and show its progress; (rows per node, its CPU s).

    The coordinator (:func:`coordinate`) is a zero-CPU Ray task on the driver's node: Ray Data's streaming
    executor, the books and the commits run there, so the driver process does nothing per block and can
    be a thin client. It is owned by the driver: a killed driver takes it, and its pool, along.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from .inference import check_gpu_nodes
    from .runtime import ensure_gpus, ray_session

    # The driver builds no dataset (the coordinator does) and uses none of the dashboard's APIs: a private
    # Ray starts without its modules and this process without Ray Data (about 1.3 s of a small job).
    with ray_session(settings.address, dashboard=False, data=False):
        progress = Progress("score", sum(todo.values()), settings.progress)
        if settings.use_gpu:
            ensure_gpus("score", 1, float(settings.wait_gpu), progress.say)
            check_gpu_nodes("score")
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        task = ray.remote(num_cpus=0, max_retries=0)(coordinate).options(
            num_returns="streaming", scheduling_strategy=here, name="stampray-score-coordinator")
        # The model travels once, by reference, to every replica.
        report: dict = {}
        try:
            for ref in task.remote(asdict(settings), [ray.put(model_bytes)], tag, todo, columns_present, check,
                                   schema):
                msg = ray.get(ref)
                if "rows" in msg:
                    progress.update(msg["rows"])
                else:
                    report = msg
        except ray.exceptions.RayTaskError as e:
            raise (e.cause if isinstance(e.cause, (RuntimeError, ValueError)) else e) from None
        progress.close()
    return report["nodes"], report["cpu_s"]


def _plan(settings: ScoreSettings, todo: dict[str, int], columns_present: list,
          check_ids: list | None) -> tuple[list, list, dict, dict]:
    """What both runners need: the read items, the columns to read, the rows set aside as repeated ids
    ({shard: {row: reason}}, with ``check_ids``) and the replicas' own constructor arguments."""
    from .data import work_items

    total = sum(todo.values())
    duplicates = find_duplicates(settings.data, list(check_ids)) if check_ids else {}
    duplicates = {k: v for k, v in duplicates.items() if k in todo}
    items = work_items(settings.data, list(todo))
    columns = [st.ID, st.IMAGE, st.LABEL, *settings.keep] + ([st.SPLIT] if st.SPLIT in columns_present else [])
    # torch.compile pays a few seconds per replica and doubles CPU throughput: worth it for big jobs. With
    # --tta K a forward holds the K variants of batch_size // K stamps, the same compiled shape; --mc-dropout
    # runs eager (see ModelActor).
    compile_model = not settings.mc_dropout and (
        settings.compile == "on" or (settings.compile == "auto" and total * settings.passes >= COMPILE_ROWS))
    kwargs = {"out": settings.out, "keep": list(settings.keep), "fractions": tuple(settings.fractions),
              "compile": compile_model, "tta": settings.tta, "mc_dropout": settings.mc_dropout,
              "features": settings.features}
    return items, columns, duplicates, kwargs


def _account(records: pa.Table, books: Books, todo: dict[str, int], nodes: dict, commits: dict, commit) -> int:
    """Enter the replicas' ``records`` in the books; ``commit(shard)`` every shard they complete (its result
    kept in ``commits``). Returns the rows newly accounted for."""
    new = 0
    for r in records.to_pylist():
        new += books.add(r["shard"], r["row0"], r["rows"])
        nodes[r["node"]] = nodes.get(r["node"], 0) + r["rows"]
        if books.complete(r["shard"]) and r["shard"] not in commits:
            commits[r["shard"]] = commit(r["shard"])
    return new


def _check_books(books: Books, todo: dict[str, int]) -> None:
    short = books.incomplete()
    if short:
        msg = (f"score: shards {sorted(short)} came back incomplete ({short} rows of "
               f"{[todo[n] for n in sorted(short)]}); rerun the same command to finish them")
        raise RuntimeError(msg)


def run_here(settings: ScoreSettings, model_bytes: bytes, tag: str, todo: dict[str, int], columns_present: list,
             check_ids: list | None = None, schema: pa.Schema | None = None) -> tuple[dict[str, int], float]:
    """Score in this process, without Ray: :func:`here_workers` threads, each with its own :class:`Scorer`,
    take the work items from one queue and write the same pieces as the Ray job's replicas; this thread keeps
    the books and commits each complete shard, so a killed run resumes, and mixes with Ray runs, the same
    way. (rows per node, 0.0: there is no coordinator task). torch's thread count, which the scorers set for
    the process, is put back afterwards (:func:`stampray.inference.torch_threads_kept`)."""
    items, columns, duplicates, kwargs = _plan(settings, todo, columns_present, check_ids)
    with torch_threads_kept(HERE_THREAD):
        return _score_here(settings, model_bytes, tag, todo, schema, items, columns, duplicates, kwargs,
                           *here_workers(local_cores(), settings.use_gpu, len(items), settings.mc_dropout > 0))


def _score_here(settings: ScoreSettings, model_bytes: bytes, tag: str, todo: dict[str, int], schema, items: list,
                columns: list, duplicates: dict, kwargs: dict, workers: int, threads: int) -> tuple[dict[str, int], float]:
    """:func:`run_here`'s loop: the scorers (built one after another: the first compiles, the others find
    Dynamo's graph already made), and the books and a commit per complete shard, kept in this thread.

    One scorer runs here, in this thread. Several run in threads of their own (:data:`HERE_THREAD`), and
    run ``torch.compile`` rather than a compiled package, whose forward holds the GIL. A scorer that fails
    stops the others after their current item; what they finished is booked (and complete shards
    committed) before its error is raised here, as it is on Ctrl-C."""

    def make() -> Scorer:
        s = Scorer(model_bytes, model_tag=tag, threads=threads, use_gpu=settings.use_gpu,
                   chunk=settings.batch_size or (GPU_BATCH if settings.use_gpu else CPU_BATCH), duplicates=duplicates,
                   source={"root": settings.data, "columns": columns}, use_package=workers == 1, **kwargs)
        s.node_id = LOCAL_NODE  # even where this process has Ray up (--in-process on): no Ray node did it
        return s

    scorers = [make() for _ in range(workers)]
    books, commits, nodes = Books(todo), {}, {}
    progress = Progress("score", sum(todo.values()), settings.progress)
    for shard in todo:
        if todo[shard] == 0:
            commits[shard] = commit_shard(settings.out, shard, 0, schema)

    def account(records: pa.Table) -> None:
        progress.update(_account(records, books, todo, nodes, commits,
                                 lambda shard: commit_shard(settings.out, shard, todo[shard])))

    run_items_here(scorers, items, account, HERE_THREAD, "score", "scoring")
    progress.close()
    _check_books(books, todo)
    return nodes, 0.0


def coordinate(settings_doc: dict, model_box: list, tag: str, todo: dict[str, int], columns_present: list,
               check_ids: list | None = None, schema: pa.Schema | None = None):
    """Ray task (a generator): stream the shards in ``todo`` through the pool, keep the books, commit each
    shard once complete. Yields ``{"rows": n}`` as rows are accounted for (every ``PROGRESS_EVERY_S``), then
    ``{"nodes": {node: rows}, "cpu_s": its own CPU seconds, "duplicates": rows set aside as repeated ids}``.
    With ``check_ids`` (every shard of a table stampray did not write), rows repeating an earlier row's id
    are found first (:func:`find_duplicates`) and set aside by the replicas. ``schema``: the result columns,
    for the files of shards with no rows."""
    import resource

    import ray
    import ray.data

    from .inference import run_pool, start_committer
    from .runtime import _quiet_data_context

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    settings = ScoreSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings_doc.items()})
    _quiet_data_context()
    ray.data.DataContext.get_current().enable_progress_bars = False  # the driver prints one progress line
    items, columns, duplicates, kwargs = _plan(settings, todo, columns_present, check_ids)
    # 1. The pool (each block is one batch) and what each Scorer needs besides the model.
    stream = run_pool(Scorer, model_box[0], settings.data, list(todo), columns, items, use_gpu=settings.use_gpu,
                      max_actors=settings.max_actors, actors=settings.actors, batch_size=None,
                      chunk=settings.batch_size,
                      tasks_in_flight=None if settings.use_gpu else ITEMS_IN_FLIGHT,
                      replica_kwargs={**kwargs, "model_tag": tag,
                                      "duplicates": ray.put(duplicates) if duplicates else None},
                      forwards=sum(todo.values()) * settings.passes)
    # 2. The books, and a commit for every shard whose rows are all in, by one committer actor beside this
    # task: a commit is tens of ms of pyarrow, where a fresh worker per commit task cost 2 s of CPU
    # (starting Python, importing Ray and pyarrow) as Ray ended idle workers between commits.
    books, commits, nodes, unsaid, said = Books(todo), {}, {}, 0, time.time()
    committer = start_committer(Committer, COMMITS_AT_ONCE)
    for shard in todo:
        if todo[shard] == 0:
            commits[shard] = committer.commit.remote(settings.out, shard, 0, schema)
    for records in stream:
        unsaid += _account(records, books, todo, nodes, commits,
                           lambda shard: committer.commit.remote(settings.out, shard, todo[shard]))
        if time.time() - said > PROGRESS_EVERY_S:
            yield {"rows": unsaid}
            unsaid, said = 0, time.time()
    yield {"rows": unsaid}
    _check_books(books, todo)
    _wait_commits(commits)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    yield {"nodes": nodes, "cpu_s": (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime),
           "duplicates": sum(len(v) for v in duplicates.values())}


class Committer:
    """Ray actor: runs :func:`commit_shard` for the coordinator, up to ``COMMITS_AT_ONCE`` at a time (threads:
    pyarrow leaves the GIL while it reads and writes, which on an object store is mostly waiting)."""

    def commit(self, out: str, name: str, expected: int, schema: pa.Schema | None = None) -> dict:
        return commit_shard(out, name, expected, schema)


def _wait_commits(commits: dict, timeout_s: float = 900.0) -> None:
    """Wait for the commits, bounded: each only joins a shard's small result pieces."""
    import ray

    pending, deadline = list(commits.values()), time.time() + timeout_s
    while pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=5.0)
        ray.get(ready)  # a failed commit raises its own message
        if pending and time.time() > deadline:
            msg = (f"score: {len(pending)} shard commits did not finish within {timeout_s:.0f} s; rerun the same "
                   f"command to finish them")
            raise RuntimeError(msg)


def _check_result_file(out: str, name: str, rows: int, data: str) -> None:
    """Refuse a result file whose results and set-aside rows (its footer) no longer add up to the ``rows`` of
    the input shard it was written for: changed since (cut short, rewritten by hand), its stamps would go
    unscored while the job reported itself complete."""
    fs, p = st.resolve(st.join(out, name))
    meta = pq.read_metadata(p, filesystem=fs)
    kv = meta.metadata or {}
    aside = sum(json.loads(kv[ERRORS_META]).values()) if ERRORS_META in kv else None
    if (meta.num_rows + aside != int(rows)) if aside is not None else meta.num_rows > int(rows):
        msg = (f"{st.join(out, name)} holds {meta.num_rows} results and {aside or 0} set-aside rows, but the shard "
               f"{st.join(data, name)} has {rows} stamps: the file was changed since 'stampray score' wrote it; "
               f"move it out of {out} (or delete it) and rerun to score that shard again")
        raise RuntimeError(msg)


def _write_manifest(settings: ScoreSettings, job: dict, expected: dict[str, int], nodes: dict) -> dict:
    """The result's manifest, from the footers of every shard's result file (also those of earlier runs)."""
    fs, _ = st.resolve(settings.out)
    shard_docs, scored, aside, errors = [], 0, 0, {}
    for name in expected:
        meta = pq.read_metadata(st.resolve(st.join(settings.out, name))[1], filesystem=fs)
        kv = meta.metadata or {}
        counts = json.loads(kv[ERRORS_META]) if ERRORS_META in kv else {}
        e_rows = sum(counts.values())
        for kind, n in counts.items():
            errors[kind] = errors.get(kind, 0) + n
        shard_docs.append({"path": name, "rows": meta.num_rows, "errors": e_rows})
        scored += meta.num_rows
        aside += e_rows
    doc = {**job, "num_rows": scored, "set_aside": aside, "errors": errors, "shards": shard_docs, "nodes": nodes,
           "settings": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()},
                        "provenance": provenance()}}
    st.write_text(st.join(settings.out, SCORE_MANIFEST), json.dumps(doc, indent=2))
    return doc


def read_scores(path: str, columns=None, skip: tuple[str, ...] = ()) -> pa.Table:
    """All result rows of a score directory: ``columns``, or every column but those in ``skip`` (evaluate
    and vet skip ``features``, a vector per stamp that only ``similar`` reads)."""
    doc = json.loads(st.read_text(st.join(path, SCORE_MANIFEST)))

    def read(file: str, rows: int | None) -> pa.Table:
        want = columns
        if want is None and skip:
            fs, p = st.resolve(file)
            want = [n for n in pq.read_schema(p, filesystem=fs).names if n not in skip]
        t = st.read_parquet(file, want)
        if rows is not None and t.num_rows != int(rows):
            msg = (f"{file} holds {t.num_rows} results where 'stampray score' wrote {rows} (its {SCORE_MANIFEST}): "
                   f"the file was changed since; move it out of {path} (or delete it) and rerun the same 'stampray "
                   f"score' to score that shard again")
            raise RuntimeError(msg)
        return t

    tables = [read(st.join(path, s["path"]), s.get("rows")) for s in doc["shards"]]
    if not tables:  # a table of no shards: the columns its shards would have had
        spread = max(int(doc.get("tta") or 0), int(doc.get("mc_dropout") or 0)) > 1
        empty = result_schema(doc["class_names"], [pa.field(k, pa.null()) for k in doc.get("keep", [])], spread,
                              doc.get("feature_width")).empty_table()
        if columns is None:
            columns = [n for n in empty.column_names if n not in skip]
        return empty.select(list(columns))
    return pa.concat_tables(tables, promote_options="default")


def score_manifest(path: str) -> dict:
    if not st.exists(st.join(path, SCORE_MANIFEST)) and st.exists(st.join(path, st.REPLACE_PLAN)):
        msg = (f"{path}: new results are being swapped in by 'stampray score --overwrite' (or that was interrupted: "
               f"rerun the same score without --overwrite to finish it)")
        raise FileNotFoundError(msg)
    if not st.exists(st.join(path, SCORE_MANIFEST)):
        msg = f"{path} holds no finished scores ({SCORE_MANIFEST} missing); run 'stampray score' first"
        raise FileNotFoundError(msg)
    try:
        doc = json.loads(st.read_text(st.join(path, SCORE_MANIFEST)))
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or "model_tag" not in doc or "class_names" not in doc:
        what = ("a stamp table, not scores" if isinstance(doc, dict) and "image_shape" in doc
                else f"not a score table ({SCORE_MANIFEST} is not one 'stampray score' wrote)")
        msg = f"--scores {path} is {what}; give the --out directory of 'stampray score'"
        raise ValueError(msg)
    return doc
