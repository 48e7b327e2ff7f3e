"""Deterministic train / validation / test splits from a hash of ``stamp_id``.

A stamp's split depends on its id alone (64-bit FNV-1a of the UTF-8 bytes, finalised with MurmurHash3's
fmix64), so it is identical on every machine, for every sharding and every batch size, and the three
splits are disjoint by construction: no code path can draw a training stamp from the test set. A ``split`` column shipped with the data (a
published fixed split, recorded by ``stampray ingest --split``) takes precedence over the hash.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa

from .table import SPLIT, SPLIT_NAMES

DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    f = tuple(float(x) for x in fractions)
    if len(f) != 3 or not all(0 <= x <= 1 for x in f) or abs(sum(f) - 1.0) > 1e-6:  # NaN fails 0 <= x
        msg = f"split fractions must be three non-negative numbers (train, val, test) summing to 1, got {fractions!r}"
        raise ValueError(msg)
    return f  # type: ignore[return-value]


def fnv1a64(ids: Sequence[str] | pa.Array) -> np.ndarray:
    """64-bit FNV-1a hash of each id's UTF-8 bytes, vectorised over the ids."""
    arr = pa.array(ids, type=pa.string()) if not isinstance(ids, (pa.Array, pa.ChunkedArray)) else ids
    if isinstance(arr, pa.ChunkedArray):
        arr = pa.concat_arrays(arr.chunks) if arr.num_chunks else pa.array([], pa.string())
    arr = arr.cast(pa.string())
    n = len(arr)
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    if n == 0:
        return h
    bufs = arr.buffers()  # validity, int32 offsets, utf-8 bytes
    offsets = np.frombuffer(bufs[1], dtype=np.int32)[arr.offset:arr.offset + n + 1].astype(np.int64)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    lengths = offsets[1:] - offsets[:-1]
    starts = offsets[:-1]
    with np.errstate(over="ignore"):
        for k in range(int(lengths.max(initial=0))):
            live = lengths > k
            idx = np.nonzero(live)[0]
            byte = data[starts[idx] + k].astype(np.uint64)
            h[idx] = (h[idx] ^ byte) * _FNV_PRIME
    return h


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser: spreads FNV's weak high bits so that ids differing only in their
    last characters (``tno-s0-000000001``, ``...002``) land uniformly over [0, 1)."""
    with np.errstate(over="ignore"):
        h = h ^ (h >> np.uint64(33))
        h = h * np.uint64(0xFF51AFD7ED558CCD)
        h = h ^ (h >> np.uint64(33))
        h = h * np.uint64(0xC4CEB9FE1A85EC53)
        return h ^ (h >> np.uint64(33))


def hash_unit(ids: Sequence[str] | pa.Array) -> np.ndarray:
    """Map each id to a number in [0, 1) from its hash (53 significant bits)."""
    return (_fmix64(fnv1a64(ids)) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def assign(ids: Sequence[str] | pa.Array, fractions: Sequence[float] = DEFAULT_FRACTIONS,
           fixed: Sequence[str | None] | pa.Array | None = None) -> np.ndarray:
    """Split name per id: ``"train"``, ``"val"`` or ``"test"``.

    Parameters
    ----------
    ids : sequence of str
        Stamp ids.
    fractions : (train, val, test)
        Fractions of the hash range given to each split.
    fixed : sequence of str or None, optional
        A shipped split per row; non-null entries win over the hash.
    """
    f_train, f_val, _ = check_fractions(fractions)
    u = hash_unit(ids)
    out = np.where(u < f_train, "train", np.where(u < f_train + f_val, "val", "test")).astype(object)
    if fixed is not None:
        fixed_arr = fixed if isinstance(fixed, (pa.Array, pa.ChunkedArray)) else pa.array(list(fixed), pa.string())
        valid = fixed_arr.is_valid().to_numpy(zero_copy_only=False)
        values = fixed_arr.fill_null("").to_numpy(zero_copy_only=False).astype(object)
        bad = valid & ~np.isin(values, SPLIT_NAMES)
        if bad.any():
            i = int(np.argmax(bad))
            msg = f"split column holds {values[i]!r} at row {i}; allowed values are {', '.join(SPLIT_NAMES)}"
            raise ValueError(msg)
        out[valid] = values[valid]
    return out


def mask(table: pa.Table | pa.RecordBatch, name: str, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> np.ndarray:
    """Boolean mask of the rows of a stamp batch that belong to split ``name``."""
    if name not in SPLIT_NAMES:
        msg = f"unknown split {name!r}; choose one of {', '.join(SPLIT_NAMES)}"
        raise ValueError(msg)
    fixed = table.column(SPLIT) if SPLIT in table.schema.names else None
    return assign(table.column("stamp_id"), fractions, fixed) == name
