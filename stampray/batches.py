"""What the read tasks of a training run do, apart from the training itself, which imports torch: a
worker process that runs only these (a Ray Data read task, the set-aside ledger, a split count) starts
without importing torch (about 1 s of CPU each on the 2-core development machine).

- :func:`prepare_batch`: the rows of one split (of one worker's part), decoded and preprocessed;
- :class:`SetAside`: the ledger of stamps the reads set aside;
- :func:`count_splits`: the labelled stamps of each split in one shard.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from . import preprocess as pp
from . import splits
from . import table as st

OVERFLOW_RISK = 1e30  # a stamp with a pixel beyond this may overflow float32 when normalised


def part_mask(ids, part: tuple[int, int] | None) -> np.ndarray:
    """Rows of worker ``rank`` of ``world`` (``part``), from the id's hash: the validation and test splits
    are shared out this way, so each worker predicts on its own part and no row is predicted twice.
    Uses the hash's low bits; the split uses its high bits, so the parts are even within a split."""
    n = len(ids)
    if part is None or int(part[1]) <= 1:
        return np.ones(n, bool)
    h = splits._fmix64(splits.fnv1a64(ids)) & np.uint64(0xFFFFFFFF)
    return (h % np.uint64(int(part[1]))) == np.uint64(int(part[0]))


def prepare_batch(batch: pa.Table, split: str, fractions, shape, preprocess: str, ledger=None,
                  part: tuple[int, int] | None = None, raw: bool = False) -> dict:
    """Ray Data map_batches: keep the labelled rows of one split (of worker ``part``), decode and
    preprocess them (``raw``: leave the normalisation to the worker's device).

    Rows with non-finite pixels (before or after preprocessing) are left out and recorded in ``ledger`` (a
    :class:`SetAside` actor) with their reason, worded as ``score`` words it. With ``raw``, only stamps
    holding a pixel beyond ``OVERFLOW_RISK`` are normalised here, to learn whether they overflow: the
    rows set aside are the same either way."""
    keep = splits.mask(batch, split, fractions) & batch.column(st.LABEL).is_valid().to_numpy(zero_copy_only=False)
    if part is not None:
        keep &= part_mask(batch.column(st.ID), part)
    idx = np.nonzero(keep)[0]
    sub = batch.take(pa.array(idx, pa.int64()))
    images = st.decode_images(sub.column(st.IMAGE), shape)
    y = sub.column(st.LABEL).to_numpy().astype(np.int64)
    bad = ~np.isfinite(images).all(axis=(1, 2, 3))
    finite = images[~bad] if bad.any() else images  # per-stamp steps: a NaN stamp stays apart
    reasons = {int(i): f"nonfinite: {int((~np.isfinite(images[i])).sum())} non-finite pixels"
               for i in np.nonzero(bad)[0]}
    good = np.nonzero(~bad)[0]
    if raw:
        worse = np.zeros(len(finite), bool)
        risky = np.nonzero(np.abs(finite).max(axis=(1, 2, 3), initial=0.0) > OVERFLOW_RISK)[0]
        if len(risky):
            worse[risky] = ~np.isfinite(pp.get(preprocess)(finite[risky])).all(axis=(1, 2, 3))
        x = finite
    else:
        x = pp.get(preprocess)(finite)
        worse = ~np.isfinite(x).all(axis=(1, 2, 3))  # preprocessing overflowed (huge but finite pixels)
    for j in np.nonzero(worse)[0]:
        after = pp.get(preprocess)(finite[j:j + 1])
        reasons[int(good[j])] = f"nonfinite: {int((~np.isfinite(after)).sum())} non-finite pixels after {preprocess}"
    if not reasons:
        return {"x": x, "y": y}
    if ledger is None:
        msg = "prepare_batch: rows with non-finite pixels need a ledger to be set aside in"
        raise ValueError(msg)
    import ray

    rows = sorted(reasons)
    ids = sub.column(st.ID).take(pa.array(rows, pa.int64())).to_pylist()
    ray.get(ledger.add.remote(split, ids, [reasons[i] for i in rows]))
    return {"x": x[~worse], "y": y[good[~worse]]}


class SetAside:
    """The stamps the read tasks set aside (a Ray actor, one per ``fit``): stamp id -> (split, reason).

    Every epoch re-reads the table, and a failed read task is retried: keyed by id, each stamp counts once."""

    def __init__(self):
        self.rows: dict[str, tuple[str, str]] = {}

    def add(self, split: str, ids: list, reasons: list) -> None:
        for i, r in zip(ids, reasons):
            self.rows[str(i)] = (split, r)

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(st.SPLIT_NAMES, 0)
        for split, _ in self.rows.values():
            out[split] += 1
        return out

    def listing(self) -> list[dict]:
        return [{"stamp_id": i, "split": s, "reason": r} for i, (s, r) in sorted(self.rows.items())]


def count_splits(root: str, shard: str, fractions, columns: list[str]) -> dict[str, int]:
    """Labelled stamps of each split in one shard, from its ``columns`` only (id, label, and split where the
    table has one); a shard whose pages cannot be read is named in the error (:func:`table.read_parquet`)."""
    import pyarrow.compute as pc

    tbl = st.read_parquet(st.join(root, shard), columns)
    tbl = tbl.filter(pc.is_valid(tbl.column(st.LABEL)))
    names = splits.assign(tbl.column(st.ID), fractions, tbl.column(st.SPLIT) if st.SPLIT in columns else None)
    return {name: int((names == name).sum()) for name in st.SPLIT_NAMES}
