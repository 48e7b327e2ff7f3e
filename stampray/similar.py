"""Stamps that look alike: ``stampray similar --scores SCORES --ids ID[,ID...] [--k 20] [--out FILE]``.

For each query stamp, the ``k`` stamps of a score table whose embeddings lie nearest by cosine distance
(``1 - cos``, 0 for the same direction, 2 for opposite ones). The embedding is the ``features`` column that
``stampray score --features`` writes beside ``stamp_id`` and the ``p_<class>`` columns: the model's
``forward_features`` vector, one fixed-size list of floats per stamp. The query itself comes first (rank 0,
distance 0); equal distances (rounded to ``DECIMALS`` decimals, below the precision of float32 features)
are listed in ``stamp_id`` order.

The search is exact and streams, so memory holds the queries and one batch of one result file, never the
table:

1. the ``stamp_id`` column of each result file is read to find the queries, then their feature vectors
   (only from the files that hold them); ids the table lacks are refused, by name;
2. each result file is read batch by batch (``stamp_id``, ``features`` and the ``p_<class>`` columns),
   rows whose vector is null, non-finite or all zero (cosine distance is undefined there) are set aside and
   counted by reason, and scikit-learn's ``NearestNeighbors(metric="cosine", algorithm="brute")``, fitted
   on the batch's other rows, gives each query's ``k`` nearest there;
3. these candidates are merged with each query's best ``k`` so far. A stamp among a query's ``k`` nearest
   in the whole table is among its ``k`` nearest in its own batch, so the merge of the per-batch top-k is
   the exact top-k.

A batch holds at most ``BATCH_BYTES`` of float64 vectors (16,384 rows of 2,048 dimensions, resnet50's
embedding), and the queries' best ``k`` take ``queries x k`` rows. The work is ``queries x stamps x D``
multiply-adds: a handful of queries over ten million 256-dim stamps is seconds to minutes on one machine.

Tables too big for one machine's time (thousands of queries, or lookups repeated all day):

* the same per-shard top-k as a Ray Data map over the result files (``ray.data.read_parquet(..., columns=
  ["stamp_id", "features"])`` then ``map_batches`` returning each batch's ``queries x k`` candidates), merged
  on the driver as here: still exact, the work spread over the cluster, the driver holding ``queries x k x
  tasks`` candidates;
* an approximate index built once and queried many times: FAISS ``IndexIVFPQ`` (train the coarse quantiser
  and the product quantiser on a sample, then ``add`` shard by shard; 64-byte codes hold 100 million stamps
  in about 6.4 GB, queries answer in milliseconds at a recall of about 0.9-0.99 depending on ``nprobe``),
  or an HNSW graph (``faiss.IndexHNSWFlat`` or hnswlib) where the vectors fit in memory. Normalise the
  vectors to unit length first: inner product on unit vectors is ``1 -`` the cosine distance.

The output (``--out``) is a Parquet or CSV file by its extension, with one row per (query, neighbour):
``query_id, rank, stamp_id, distance`` and the neighbour's ``p_<class>`` columns. It is written atomically
(a temporary file beside it, then a rename) and replaces an existing file only when ``stampray similar``
wrote that file: a Parquet file carries the settings and counts in its footer (``stampray_similar``), a CSV
file a sidecar ``FILE.similar.json`` with the same and the CSV's SHA-256. Without ``--out`` the table is
printed (:func:`format_table`).
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import outfiles
from . import table as st
from .classes import prob_column
from .progress import Progress
from .provenance import provenance
from .settings import positive

logger = logging.getLogger(__name__)

FEATURES = "features"  # the column 'stampray score --features' writes
METRIC = "cosine"
MARKER = b"stampray_similar"  # footer key of a Parquet file similar wrote
SIDECAR_SUFFIX = ".similar.json"  # beside a CSV file similar wrote
FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
BATCH_BYTES = 256 << 20  # float64 feature vectors held per batch of a result file
DECIMALS = 12  # distances are rounded to this many decimals: equal ones then compare equal
DEFAULT_BATCH_ROWS = 16_384  # when the vector length is not in the schema (a variable-size list column)


@dataclass(frozen=True)
class SimilarSettings:
    """Settings of ``stampray similar``.

    Args:
        scores: score directory written by 'stampray score --features' (local path or URI).
        ids: the stamp_id of each query stamp, comma-separated.
        k: neighbours listed per query, the query itself first (rank 0, distance 0).
        out: a Parquet (.parquet) or CSV (.csv) file for the neighbours (local path or URI); without it the
            table is printed. An existing file is replaced only when 'stampray similar' wrote it.
        progress: a line per stage and a progress count on stderr.
    """

    scores: str = field(metadata={"path": True, "metavar": "SCORES"})
    ids: tuple[str, ...] = field(metadata={"metavar": "ID[,ID...]"})
    k: int = field(default=20, metadata={"metavar": "K"})
    out: str | None = field(default=None, metadata={"path": True, "metavar": "FILE"})
    progress: bool = True

    def __post_init__(self):
        if not isinstance(self.scores, str) or not self.scores.strip():
            msg = f"--scores must name a score directory, got {self.scores!r}"
            raise ValueError(msg)
        ids = self.ids.split(",") if isinstance(self.ids, str) else list(self.ids)
        ids = [str(i).strip() for i in ids if str(i).strip()]
        if not ids:
            msg = f"--ids must name at least one stamp_id, got {self.ids!r}"
            raise ValueError(msg)
        object.__setattr__(self, "ids", tuple(dict.fromkeys(ids)))  # each query once, in the order given
        positive(self, "k", allow_none=False)
        if self.out is not None:
            if not isinstance(self.out, str) or not self.out.strip():
                msg = f"--out must name a .parquet or .csv file, got {self.out!r}"
                raise ValueError(msg)
            out_format(self.out)


@dataclass
class SimilarResult:
    """What :func:`similar` found: ``table`` (one row per query and neighbour, queries in the order asked,
    ranks ascending) and the bookkeeping the summary reports."""

    table: pa.Table
    queries: list[str]
    k: int  # neighbours asked for per query (a query gets fewer when the table has fewer usable stamps)
    searched: int  # stamps with a usable feature vector
    set_aside: pa.Table  # stamp_id, shard, reason: rows without a usable feature vector
    dim: int
    shards: int
    scores: str
    out: str | None
    seconds: float

    @property
    def set_aside_counts(self) -> dict[str, int]:
        """Rows set aside by kind of reason (``null``, ``nonfinite``, ``zero``)."""
        return st.reason_counts(self.set_aside.column("reason").to_pylist())


def out_format(out: str) -> str:
    """``parquet`` or ``csv``, by the extension of ``--out``."""
    ext = posixpath.splitext(out.lower())[1]
    if ext not in FORMATS:
        msg = f"--out must end in .parquet or .csv (the format is chosen by the extension), got {out!r}"
        raise ValueError(msg)
    return FORMATS[ext]


# --------------------------------------------------------------------------------------------------
# Reading the feature vectors
# --------------------------------------------------------------------------------------------------
def feature_matrix(column: pa.Array | pa.ChunkedArray, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A list column of vectors as float64 ``(n, D)`` (read-only; a row with a reason holds anything) and
    each row's reason to set it aside (None: usable).

    Reasons: ``null`` (no vector), ``nonfinite`` (a NaN or infinite value, or a null inside the vector),
    ``zero`` (all zeros: cosine distance is undefined), ``length`` (a vector of another length than ``dim``,
    or than the first one's without it; only a variable-size list column can hold one).
    """
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    reasons = np.full(n, None, dtype=object)
    valid = arr.is_valid().to_numpy(zero_copy_only=False) if n else np.zeros(0, bool)
    if pa.types.is_fixed_size_list(arr.type):
        d = arr.type.list_size
        x = arr.values.slice(arr.offset * d, n * d).cast(pa.float64()).to_numpy(zero_copy_only=False).reshape(n, d)
    else:  # a variable-size list: usable where a vector has the length of the first
        lengths = pc.list_value_length(arr).fill_null(-1).to_numpy(zero_copy_only=False)
        d = int(dim) if dim is not None else int(lengths[valid][0]) if valid.any() else 0
        wrong = valid & (lengths != d)
        reasons[wrong] = f"length: a feature vector of another length than {d}"
        valid = valid & ~wrong
        x = np.zeros((n, d))
        if valid.any():
            flat = pc.list_flatten(arr.filter(pa.array(valid))).cast(pa.float64())
            x[valid] = flat.to_numpy(zero_copy_only=False).reshape(-1, d)
    reasons[~valid & (reasons == None)] = "null: no feature vector"  # noqa: E711 - elementwise
    finite = np.isfinite(x).all(axis=1)
    reasons[valid & ~finite] = "nonfinite: the feature vector holds NaN or infinite values"
    zero = valid & finite & ~np.any(x, axis=1)
    reasons[zero] = "zero: an all-zero feature vector (cosine distance is undefined)"
    return x, reasons


def _shard_files(scores: str, doc: dict) -> list[tuple[str, str]]:
    """``(name, path)`` of every result file the score manifest lists."""
    return [(str(s["path"]), st.join(scores, str(s["path"]))) for s in doc.get("shards", [])]


@contextmanager
def _open(path: str) -> Iterator[pq.ParquetFile]:
    """A result file, open for reading; a damaged one is named in the error."""
    fs, p = st.resolve(path)
    try:
        with fs.open_input_file(p) as f:
            yield st.open_parquet(f)
    except (OSError, pa.ArrowException) as e:
        msg = (f"{path} cannot be read ({e}); restore it, or score the table again with "
               f"'stampray score --features'")
        raise ValueError(msg) from None


def _check_columns(pf: pq.ParquetFile, scores: str, name: str) -> None:
    names = pf.schema_arrow.names
    if FEATURES not in names:
        msg = (f"--scores {scores} has no '{FEATURES}' column (result file {name} lacks it): those scores were "
               f"made without feature vectors; score the table again with 'stampray score --features' (into a "
               f"new --out, or with --overwrite) and give that directory")
        raise ValueError(msg)
    if st.ID not in names:
        msg = f"--scores {scores}: result file {name} has no '{st.ID}' column; give the --out of 'stampray score'"
        raise ValueError(msg)


def _batch_rows(pf: pq.ParquetFile) -> int:
    t = pf.schema_arrow.field(FEATURES).type
    if pa.types.is_fixed_size_list(t):
        return max(1, BATCH_BYTES // (8 * max(1, t.list_size)))
    return DEFAULT_BATCH_ROWS


def find_queries(scores: str, files: list[tuple[str, str]], ids: tuple[str, ...]) -> np.ndarray:
    """The feature vectors of the query ids, ``(len(ids), D)`` float64, in the order of ``ids``.

    Reads each result file's ``stamp_id`` column, and the ``features`` of only the files that hold a query.
    Refuses ids the table lacks (naming them) and queries without a usable vector (with the reason).
    """
    want = pa.array(list(ids), pa.string())
    found: dict[str, np.ndarray] = {}
    bad: dict[str, str] = {}
    for name, path in files:
        with _open(path) as pf:
            _check_columns(pf, scores, name)
            if len(found) == len(ids):
                continue  # every file's columns are still checked: one without features is refused now
            if not pc.any(pc.is_in(pf.read(columns=[st.ID]).column(st.ID), value_set=want)).as_py():
                continue
            for batch in pf.iter_batches(batch_size=_batch_rows(pf), columns=[st.ID, FEATURES]):
                rows = pc.is_in(batch.column(st.ID), value_set=want).to_numpy(zero_copy_only=False)
                if not rows.any():
                    continue
                sel = batch.filter(pa.array(rows))
                x, reasons = feature_matrix(sel.column(FEATURES))
                for i, sid in enumerate(sel.column(st.ID).to_pylist()):
                    if sid in found:
                        continue
                    if reasons[i] is None:  # a repeated id: its first usable vector
                        found[sid] = x[i]
                        bad.pop(sid, None)
                    else:
                        bad.setdefault(sid, reasons[i])
    missing = [i for i in ids if i not in found and i not in bad]
    if missing:
        msg = (f"--ids names {len(missing)} stamp(s) that --scores {scores} does not hold: "
               f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}; give ids of scored stamps (stamps "
               f"appended to the table since it was scored: rerun the same 'stampray score' first; rows set aside "
               f"when scoring are listed in {scores}/{st.ERRORS_DIR}/)")
        raise ValueError(msg)
    unusable = [(i, bad[i]) for i in ids if i not in found]
    if unusable:
        listed = "; ".join(f"{i} ({r})" for i, r in unusable[:5])
        msg = f"--ids: {len(unusable)} query stamp(s) have no usable feature vector to compare: {listed}"
        raise ValueError(msg)
    dims = {len(v) for v in found.values()}
    if len(dims) != 1:
        msg = f"--scores {scores}: the query stamps' feature vectors differ in length ({sorted(dims)})"
        raise ValueError(msg)
    return np.stack([found[i] for i in ids])


# --------------------------------------------------------------------------------------------------
# The streaming exact top-k
# --------------------------------------------------------------------------------------------------
@dataclass
class _Best:
    """Each query's best ``k`` so far: distances, neighbour ids and their ``p_<class>`` values."""

    distance: list  # per query: float64 array
    ids: list  # per query: str array
    probs: list  # per query: (n, classes) float64 array

    @classmethod
    def empty(cls, queries: int, classes: int) -> "_Best":
        return cls([np.zeros(0)] * queries, [np.zeros(0, dtype=str)] * queries,
                   [np.zeros((0, classes))] * queries)

    def merge(self, q: int, distance: np.ndarray, ids: np.ndarray, probs: np.ndarray, query_id: str,
              k: int) -> None:
        """Keep query ``q``'s ``k`` nearest of its best so far and these candidates: by distance, the query
        itself first among equals, then by stamp_id."""
        d = np.concatenate([self.distance[q], distance])
        i = np.concatenate([self.ids[q], ids]).astype(str)
        p = np.concatenate([self.probs[q], probs])
        order = np.lexsort((i, i != query_id, d))[:k]
        self.distance[q], self.ids[q], self.probs[q] = d[order], i[order], p[order]


def search_batch(best: _Best, queries: np.ndarray, query_ids: tuple[str, ...], x: np.ndarray,
                 ids: np.ndarray, probs: np.ndarray, k: int) -> None:
    """Merge each query's ``k`` nearest among the usable rows ``x`` of one batch into ``best``."""
    from sklearn.neighbors import NearestNeighbors

    if not len(x):
        return
    nn = NearestNeighbors(n_neighbors=min(k, len(x)), metric=METRIC, algorithm="brute").fit(x)
    dist, idx = nn.kneighbors(queries)
    for q, qid in enumerate(query_ids):
        # Rounded, so that the ~1e-16 noise of the arithmetic does not order equal distances (those to
        # vectors pointing the same way); a vector's distance to itself is 0.
        d = np.round(dist[q], DECIMALS)
        d[ids[idx[q]] == qid] = 0.0
        best.merge(q, d, ids[idx[q]], probs[idx[q]], qid, k)


def similar(settings: SimilarSettings) -> SimilarResult:
    """Each query stamp's ``k`` nearest stamps by cosine distance of their features (see the module docs)."""
    t0 = time.time()
    if settings.out is not None:
        st.check_separate(settings.out, {"--scores": settings.scores})
        check_out(settings.out)
    from .score import score_manifest  # torch: only when similar runs, not for --help

    doc = score_manifest(settings.scores)
    names = [str(c) for c in doc["class_names"]]
    pcols = [prob_column(c) for c in names]
    files = _shard_files(settings.scores, doc)
    progress = Progress("similar", int(doc.get("num_rows") or 0), settings.progress)
    progress.say(f"finding {len(settings.ids)} query stamp(s) in {settings.scores}")
    queries = find_queries(settings.scores, files, settings.ids)
    dim, k = queries.shape[1], int(settings.k)

    best = _Best.empty(len(settings.ids), len(pcols))
    aside_ids, aside_shards, aside_reasons = [], [], []
    searched = 0
    for name, path in files:
        with _open(path) as pf:
            have = [c for c in pcols if c in pf.schema_arrow.names]
            for batch in pf.iter_batches(batch_size=_batch_rows(pf), columns=[st.ID, FEATURES, *have]):
                x, reasons = feature_matrix(batch.column(FEATURES), dim)
                ok = reasons == None  # noqa: E711 - elementwise
                if ok.any() and x.shape[1] != dim:
                    msg = (f"--scores {settings.scores}: result file {name} holds {x.shape[1]}-dim feature "
                           f"vectors, the queries {dim}-dim; give the scores of one model")
                    raise ValueError(msg)
                ids = np.asarray(batch.column(st.ID).to_pylist(), dtype=object)
                if not ok.all():
                    aside_ids += ids[~ok].tolist()
                    aside_shards += [name] * int((~ok).sum())
                    aside_reasons += reasons[~ok].tolist()
                probs = np.stack([batch.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
                                  if c in have else np.full(batch.num_rows, np.nan) for c in pcols], axis=1) \
                    if pcols else np.zeros((batch.num_rows, 0))
                search_batch(best, queries, settings.ids, x[ok], ids[ok].astype(str), probs[ok], k)
                searched += int(ok.sum())
                progress.update(batch.num_rows)
    progress.close()
    if searched < k:
        logger.warning("--k %d: %s holds %d stamps with a usable feature vector; each query lists them all",
                       k, settings.scores, searched)
    aside = pa.table({st.ID: pa.array(aside_ids, pa.string()), "shard": pa.array(aside_shards, pa.string()),
                      "reason": pa.array(aside_reasons, pa.string())})
    if aside.num_rows:
        logger.warning("%d stamp(s) of %s have no usable feature vector and were set aside: %s", aside.num_rows,
                       settings.scores, st.reason_counts(aside_reasons))
    result = SimilarResult(neighbours_table(best, settings.ids, pcols), list(settings.ids), k, searched, aside,
                           dim, len(files), settings.scores, settings.out, 0.0)
    if settings.out is not None:
        write_out(result, settings)
    result.seconds = round(time.time() - t0, 2)
    return result


def neighbours_table(best: _Best, query_ids: tuple[str, ...], pcols: list[str]) -> pa.Table:
    """``query_id, rank, stamp_id, distance, p_<class>...``: queries in the order asked, ranks from 0."""
    n = [len(d) for d in best.distance]
    cols = {
        "query_id": pa.array([q for q, m in zip(query_ids, n) for _ in range(m)], pa.string()),
        "rank": pa.array(np.concatenate([np.arange(m) for m in n]) if n else [], pa.int32()),
        st.ID: pa.array(np.concatenate(best.ids).tolist() if n else [], pa.string()),
        "distance": pa.array(np.concatenate(best.distance) if n else [], pa.float64()),
    }
    probs = np.concatenate(best.probs) if n else np.zeros((0, len(pcols)))
    for j, c in enumerate(pcols):
        cols[c] = pa.array(probs[:, j], pa.float32(), mask=np.isnan(probs[:, j]))
    return pa.table(cols)


# --------------------------------------------------------------------------------------------------
# The output file
# --------------------------------------------------------------------------------------------------
def _sidecar(out: str) -> str:
    return out + SIDECAR_SUFFIX


def written_by_similar(out: str) -> bool:
    """Whether the existing file ``out`` is one ``stampray similar`` wrote (see the module docstring)."""
    fs, p = st.resolve(out)
    if out_format(out) == "parquet":
        try:
            meta = pq.read_metadata(p, filesystem=fs).metadata or {}
        except (OSError, pa.ArrowException):
            return False
        return MARKER in meta
    side = _sidecar(out)
    if not st.exists(side):
        return False
    try:
        doc = json.loads(st.read_text(side))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return (isinstance(doc, dict) and doc.get("written_by") == "stampray similar"
            and doc.get("sha256") == outfiles.sha256(out))


def check_out(out: str) -> None:
    """Refuse an ``--out`` that is a directory, or a file that 'stampray similar' did not write."""
    how = "no stampray_similar footer" if out_format(out) == "parquet" else \
        f"no {posixpath.basename(_sidecar(out))} beside it that matches its content"
    outfiles.check_file(out, "--out", "similar", written_by_similar, how, posixpath.join(out, "neighbours.csv"))


def _record(result: SimilarResult, settings: SimilarSettings) -> dict:
    return {"written_by": "stampray similar", "settings": {k: list(v) if isinstance(v, tuple) else v
                                                           for k, v in asdict(settings).items()},
            "metric": METRIC, "dim": result.dim, "searched": result.searched, "set_aside": result.set_aside.num_rows,
            "set_aside_reasons": result.set_aside_counts, "provenance": provenance()}


def write_out(result: SimilarResult, settings: SimilarSettings) -> None:
    """Write the neighbours to ``--out`` atomically: a temporary file beside it, then a rename (object
    stores: one PUT, atomic already); a CSV's sidecar follows it."""
    out = settings.out
    check_out(out)  # again, just before replacing: the file may have appeared since
    fs, p = st.resolve(out)
    record = _record(result, settings)
    local = isinstance(fs, pafs.LocalFileSystem)
    tmp = posixpath.join(posixpath.dirname(p), f".{posixpath.basename(p)}.{uuid.uuid4().hex[:12]}.tmp") if local \
        else p
    fs.create_dir(posixpath.dirname(p), recursive=True)
    try:
        if out_format(out) == "parquet":
            table = result.table.replace_schema_metadata({MARKER: json.dumps(record).encode()})
            pq.write_table(table, tmp, filesystem=fs, compression="zstd")
        else:
            import pyarrow.csv as pcsv

            with fs.open_output_stream(tmp) as f:
                pcsv.write_csv(result.table, f)
        if local:
            fs.move(tmp, p)
    finally:
        if local and fs.get_file_info(tmp).type == pafs.FileType.File:
            fs.delete_file(tmp)
    if out_format(out) == "csv":
        st.write_text(_sidecar(out), json.dumps({**record, "sha256": outfiles.sha256(out)}, indent=1))


# --------------------------------------------------------------------------------------------------
# What the command line prints
# --------------------------------------------------------------------------------------------------
def format_table(result: SimilarResult) -> str:
    """The neighbours as an aligned text table, a blank line between queries (printed when there is no --out)."""
    cols = result.table.column_names
    records = result.table.to_pylist()
    cells = [cols] + [[_cell(r[c], c) for c in cols] for r in records]
    widths = [max(len(row[j]) for row in cells) for j in range(len(cols))]
    text = {"query_id", st.ID}
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()]
    for n, (r, row) in enumerate(zip(records, cells[1:])):
        if n and r["query_id"] != records[n - 1]["query_id"]:
            lines.append("")
        lines.append("  ".join(v.ljust(w) if c in text else v.rjust(w)
                               for c, v, w in zip(cols, row, widths)).rstrip())
    return "\n".join(lines)


def _cell(v, column: str) -> str:
    if v is None:
        return "-"
    if column == "distance":
        return f"{v:.6f}"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def summary(r: SimilarResult) -> str:
    """The verb's closing line: the queries, what was searched and set aside, where the table went, the time."""
    aside = ""
    if r.set_aside.num_rows:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(r.set_aside_counts.items()))
        aside = f" ({r.set_aside.num_rows} set aside without a usable feature vector: {kinds})"
    where = f"wrote {r.table.num_rows} rows to {r.out}" if r.out else f"{r.table.num_rows} rows listed above"
    short = f"; only {r.searched} stamps to list" if r.searched < r.k else ""
    return (f"similar: {len(r.queries)} quer{'y' if len(r.queries) == 1 else 'ies'}, {r.k} nearest each by "
            f"cosine distance of {r.dim}-dim features among {r.searched:,} stamps in {r.shards} result "
            f"file(s){aside}{short}; {where}; {r.seconds:.1f} s")
