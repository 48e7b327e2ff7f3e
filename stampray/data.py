"""Stamp datasets as Ray Data pipelines.

The shards are read by stampray's own half-CPU tasks rather than ``ray.data.read_parquet``: the manifest
already lists every shard, so no listing task is needed (Ray 2.60's file listing asks for a whole CPU,
which a node whose other CPUs hold Train workers or model actors may never have), and every row keeps
the name of the shard it came from, which the scorer uses to write each shard's results exactly once.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import table as st

SHARD = "_shard"
ROW = "_row"  # the row's index within its shard
READ_ERROR = "_read_error"  # why a row group could not be read (damaged page); its rows are set aside


def _unreadable(pf: pq.ParquetFile, rg: int, cols: list[str] | None, name: str, row0: int, e: Exception) -> pa.Table:
    """Stand-in rows for a row group that cannot be read: every column null, the reason in ``_read_error``."""
    n = pf.metadata.row_group(rg).num_rows
    sch = pf.schema_arrow if cols is None else pa.schema([pf.schema_arrow.field(c) for c in cols])
    reason = (f"corrupt: {name} rows {row0}-{row0 + n - 1} (row group {rg}) cannot be read ({e}); restore the "
              f"shard or re-create the table")
    tbl = pa.table({f.name: pa.nulls(n, f.type) for f in sch})
    return tbl.append_column(READ_ERROR, pa.array([reason] * n, pa.string()))


def _read_items(items: pa.Table, root: str, columns: list[str] | None, tag: bool):
    """map_batches callable: read the listed (shard, row group) pieces, one Arrow table each."""
    fs, _ = st.resolve(root)
    out = []
    names = items.schema.names
    row0s = items.column("row0").to_pylist() if "row0" in names else [0] * items.num_rows
    offsets = items.column("offset").to_pylist() if "offset" in names else [0] * items.num_rows
    lengths = items.column("length").to_pylist() if "length" in names else [None] * items.num_rows
    for name, rg, row0, offset, length in zip(items.column("shard").to_pylist(),
                                              items.column("row_group").to_pylist(), row0s, offsets, lengths):
        with fs.open_input_file(st.resolve(st.join(root, name))[1]) as f:
            pf = st.open_parquet(f)
            cols = [c for c in columns if c in pf.schema_arrow.names] if columns else None
            try:
                tbl = pf.read_row_group(rg, columns=cols) if length is None else \
                    _read_range(pf, rg, cols, offset, length)
            except (OSError, pa.ArrowException) as e:
                if not tag:  # a reader without row books (training) cannot set rows aside: it stops
                    raise ValueError(st.damaged(st.join(root, name), e)) from None
                tbl = _unreadable(pf, rg, cols, name, row0, e)
                if length is not None:
                    tbl = tbl.slice(offset, length)
        row0 += offset
        if tag:
            tbl = tbl.append_column(SHARD, pa.array([name] * tbl.num_rows, pa.string()))
            tbl = tbl.append_column(ROW, pa.array(np.arange(row0, row0 + tbl.num_rows, dtype=np.int64)))
        out.append(tbl)
    return pa.concat_tables(out, promote_options="default") if len(out) > 1 else out[0]


def _read_range(pf: pq.ParquetFile, rg: int, cols: list[str] | None, offset: int, length: int) -> pa.Table:
    """Rows ``offset .. offset+length`` of row group ``rg``, decoding no further than their end."""
    parts, seen = [], 0
    for batch in pf.iter_batches(batch_size=max(1, length), row_groups=[rg], columns=cols):
        lo, hi = max(0, offset - seen), min(batch.num_rows, offset + length - seen)
        if hi > lo:
            parts.append(batch.slice(lo, hi - lo))
        seen += batch.num_rows
        if seen >= offset + length:
            break
    if not parts:
        return pf.schema_arrow.empty_table().select(cols) if cols else pf.schema_arrow.empty_table()
    return pa.Table.from_batches(parts)


def work_items(path: str, shards: Sequence[str], rows: int | None = None) -> list[dict]:
    """One work item per row group of each shard (the unit of parallel reading); with ``rows``, one per
    ``rows`` rows of a row group, for work so heavy per row (occlusion) that a row group is too coarse a
    unit to share between replicas."""
    fs, _ = st.resolve(path)
    items = []
    for name in shards:
        meta = pq.read_metadata(st.resolve(st.join(path, name))[1], filesystem=fs)
        row0 = 0
        for i in range(meta.num_row_groups):
            n = meta.row_group(i).num_rows
            if rows:
                items.extend({"shard": name, "row_group": i, "row0": row0, "offset": k, "length": min(rows, n - k)}
                             for k in range(0, n, int(rows)))
            else:
                items.append({"shard": name, "row_group": i, "row0": row0})
            row0 += n
    return items


def read_stamps(path: str, shards: Sequence[str] | None = None, columns: Sequence[str] | None = None,
                tag_shard: bool = False, num_cpus: float = 0.5, items: list[dict] | None = None):
    """A Ray Dataset streaming the rows of a stamp dataset (all shards, or the named ones).

    Parameters
    ----------
    path : str
        Dataset directory or URI.
    shards : sequence of str, optional
        Shard file names (as in the manifest) to read; default all.
    columns : sequence of str, optional
        Columns to read; default all.
    tag_shard : bool
        Add a ``_shard`` column naming each row's shard and a ``_row`` column with its index there. A row
        group that cannot be read (a page fails its checksum) then comes as null rows with the reason in
        ``_read_error``, for the consumer to set aside; untagged, it stops the read naming the shard.
    num_cpus : float
        CPU request of each read task.
    items : list of dict, optional
        Precomputed :func:`work_items` (their order is the read order).
    """
    import ray.data

    if items is None:
        if shards is None:
            shards = [s["path"] for s in st.read_manifest(path).shards]
        items = work_items(path, shards)
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    return ds.map_batches(_read_items, batch_size=1, batch_format="pyarrow", num_cpus=num_cpus,
                          fn_kwargs={"root": str(path), "columns": list(columns) if columns else None,
                                     "tag": tag_shard})
