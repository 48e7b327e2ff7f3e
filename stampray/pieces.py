"""Pieces the replicas write and the commits that join them, with no torch import.

Commits run in the committer actors of score and occlude, worker processes that never load a
model: importing this module takes a fraction of a second, where the model modules (torch) take several,
which on a short job was a tenth of its time.
"""

from __future__ import annotations

import functools
import posixpath
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import table as st
from .data import ROW, SHARD
from .table import reason_counts  # noqa: F401 - the pieces' commits count set-aside rows by kind

TMP_DIR = "_tmp"  # atomic writes land here first, then move into place (local filesystems)
PARTS_DIR = "_parts"  # pieces written by the replicas before their shard is committed
ERROR = "_error"  # on a piece's rows that could not be scored or occluded: their reason (to OUT/_errors/)


@functools.lru_cache(maxsize=64)
def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The Parquet columns (leaf paths, as the writer names them: ``tags.list.element``) worth dictionary
    encoding in a result or map file: all but the stamp ids (unique) and floating-point values
    (probabilities, maps, features: rarely repeated). For those the writer fills a dictionary only to fall
    back to plain encoding: on a 50,000-row result file that doubled the write time (16.4 ms against 8.3)
    and the file (592 KB against 344 KB)."""
    sink = pa.BufferOutputStream()
    pq.write_table(schema.empty_table(), sink)
    leaves = pq.read_metadata(pa.BufferReader(sink.getvalue())).schema
    return [c.path for c in (leaves.column(i) for i in range(len(leaves)))
            if c.path != st.ID and c.physical_type not in ("FLOAT", "DOUBLE")]


def write_atomic(table: pa.Table, path: str, tmp_root: str, metadata: dict | None = None) -> None:
    """Write ``table`` to ``path`` so that a reader (or a rerun) sees the whole file or none of it
    (zstd, page checksums, dictionaries only where they pay: :func:`dictionary_columns`).

    Local filesystems: write under ``tmp_root/_tmp/`` then rename into place. Object stores: one PUT
    is already atomic, so the file is written in place.
    """
    fs, p = st.resolve(path)
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    options = {"compression": "zstd", "write_page_checksum": True,
               "use_dictionary": dictionary_columns(table.schema.remove_metadata())}
    if not isinstance(fs, pafs.LocalFileSystem):
        pq.write_table(table, p, filesystem=fs, **options)
        return
    _, root = st.resolve(tmp_root)
    tmp = posixpath.join(root, TMP_DIR, f"{posixpath.basename(p)}.{uuid.uuid4().hex[:12]}")
    fs.create_dir(posixpath.dirname(tmp), recursive=True)
    fs.create_dir(posixpath.dirname(p), recursive=True)
    pq.write_table(table, tmp, filesystem=fs, **options)
    fs.move(tmp, p)


def list_files(path: str, suffix: str = ".parquet") -> list[str]:
    """Names (not paths) of the files directly inside ``path`` ending in ``suffix``; [] when it is absent."""
    fs, p = st.resolve(path)
    infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
    return sorted(posixpath.basename(i.path) for i in infos
                  if i.type == pafs.FileType.File and i.path.endswith(suffix))


def delete_dir(path: str) -> None:
    """Remove a directory stampray wrote (its ``_parts``/``_tmp``), if present."""
    fs, p = st.resolve(path)
    if fs.get_file_info(p).type == pafs.FileType.Directory:
        fs.delete_dir(p)


# --------------------------------------------------------------------------------------------------
# The occlusion maps' commit
# --------------------------------------------------------------------------------------------------
MAP_FILE_ROWS = 10_000  # maps per output file


def commit_maps(out: str, pieces: list[str], limit: int | None, old_files: list[str] = (),
                ids: list[str] = ()) -> tuple[int, int, list, list]:
    """Join the accepted pieces (in order, each stamp once, at most ``limit`` maps) into
    ``part-NNNNN`` files and ``_errors/part-00000.parquet``, then remove an earlier run's files beyond them
    (``old_files``, from its ``_maps.json``); returns (maps, set aside, files written, the asked-for ``ids``
    that no piece holds)."""
    fs, _ = st.resolve(out)
    seen: set = set()
    found: set = set()
    pending, written, total, errors = [], 0, 0, []
    for name in pieces:
        t = st.read_parquet(st.join(out, PARTS_DIR, name))
        key = [f"{s}:{r}" for s, r in zip(t.column(SHARD).to_pylist(), t.column(ROW).to_pylist())]
        fresh = np.array([k not in seen for k in key], bool)
        seen.update(key)
        t = t.filter(pa.array(fresh))
        if ids:
            found.update(t.column(st.ID).to_pylist())
        failed = t.column(ERROR).is_valid()
        if pc.any(failed).as_py():
            errors.append(error_rows(t.filter(failed)))
        t = t.filter(pc.invert(failed)).drop_columns([SHARD, ROW, ERROR])
        if limit is not None:
            t = t.slice(0, max(0, limit - total))
        pending.append(t)
        total += t.num_rows
        if sum(x.num_rows for x in pending) >= MAP_FILE_ROWS:
            written = _flush(out, pending, written)
            pending = []
        if limit is not None and total >= limit:
            break
    if pending or written == 0:
        written = _flush(out, pending, written, allow_empty=True)
    files = [f"part-{i:05d}.parquet" for i in range(written)]
    for name in old_files:  # an earlier run's maps beyond this run's files
        if name not in files and posixpath.basename(name) == name and st.exists(st.join(out, name)):
            fs.delete_file(st.resolve(st.join(out, name))[1])
    stopped = limit is not None and total >= limit  # the data was not read to its end: no id is known missing
    if not errors:
        delete_dir(st.join(out, st.ERRORS_DIR))
    aside = st.write_errors(out, st.shard_name(0), pa.concat_tables(errors) if errors else [], tmp_root=out)
    return total, sum(aside.values()), files, [] if stopped else [i for i in ids if i not in found]


class MapsCommitter:
    """Ray actor: :func:`commit_maps` for ``stampray occlude``, started with the pool so that its process
    (Python, Ray, pyarrow: 2-3 s on the development machine) is up by the time the maps are in."""

    def commit(self, out: str, pieces: list[str], limit: int | None, old_files: list[str] = (),
               ids: list[str] = ()) -> tuple[int, int, list, list]:
        return commit_maps(out, pieces, limit, old_files, ids)


def error_rows(piece: pa.Table) -> pa.Table:
    """A piece's rows that were set aside (their ``_error`` set), as ``_errors`` rows: the stamp shard
    is their source and their index there their row (:data:`stampray.table.ERROR_SCHEMA`)."""
    return st.errors_table({"stamp_id": piece.column(st.ID), "source": piece.column(SHARD),
                            "row": piece.column(ROW), "reason": piece.column(ERROR)})


def _flush(out: str, tables: list, index: int, allow_empty: bool = False) -> int:
    if not tables and not allow_empty:
        return index
    tbl = pa.concat_tables(tables) if tables else pa.table({st.ID: pa.array([], pa.string())})
    write_atomic(tbl, st.join(out, f"part-{index:05d}.parquet"), out)
    return index + 1
