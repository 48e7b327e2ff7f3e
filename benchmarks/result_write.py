"""Writing a result file: Parquet dictionaries on every column (pyarrow's default) against only on the columns
whose values repeat (``stampray.pieces.dictionary_columns``), measured in one run.

Builds an N-row result table of score's columns (unique stamp ids, a few labels and class names, float32
probabilities), writes it both ways (zstd, page checksums, as ``write_atomic`` does) and prints the time per
write, the file sizes and the ratios. Then commits N rows of pieces (four in order) with
``stampray.score.commit_shard``, the join a score job's committer runs per shard. The README's numbers
(Benchmarks, *Dictionaries only where values repeat*) come from this script. Run:
``python benchmarks/result_write.py [-n 50000] [--repeat 20]``.
"""

import argparse
import os
import shutil
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stampray.pieces import PARTS_DIR, dictionary_columns, write_atomic
from stampray.score import commit_shard


def result_table(n: int) -> pa.Table:
    rng = np.random.default_rng(0)
    p = rng.random(n).astype(np.float32)
    pred = (p > 0.5).astype(np.int64)
    return pa.table({
        "stamp_id": pa.array([f"tno-{i:09d}" for i in range(n)]),
        "label": pa.array(rng.integers(0, 2, n)),
        "split": pa.array(np.array(["train", "val", "test"])[rng.integers(0, 3, n)]),
        "pred": pa.array(pred),
        "pred_name": pa.array(np.array(["noise", "source"])[pred]),
        "p_noise": pa.array(1 - p),
        "p_source": pa.array(p),
        "model": pa.array(["cnn@0123456789ab"] * n),
    })


def timed_write(table: pa.Table, path: str, use_dictionary, repeat: int) -> float:
    pq.write_table(table, path, compression="zstd", write_page_checksum=True, use_dictionary=use_dictionary)
    t = time.perf_counter()
    for _ in range(repeat):
        pq.write_table(table, path, compression="zstd", write_page_checksum=True, use_dictionary=use_dictionary)
    return (time.perf_counter() - t) / repeat


def timed_commit(table: pa.Table, work: str, repeat: int) -> float:
    n, total = table.num_rows, 0.0
    table = table.append_column("_row", pa.array(np.arange(n))).append_column("_error", pa.nulls(n, pa.string()))
    cuts = np.linspace(0, n, 5).astype(int)
    for _ in range(repeat):
        out = os.path.join(work, "scores")
        shutil.rmtree(out, ignore_errors=True)
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            piece = os.path.join(out, PARTS_DIR, "part-00000", f"{lo:012d}-{hi - lo}.parquet")
            write_atomic(table.slice(lo, hi - lo), piece, out)
        t = time.perf_counter()
        commit_shard(out, "part-00000.parquet", n)
        total += time.perf_counter() - t
    return total / repeat


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=50_000, help="rows of the result file")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    table = result_table(args.n)
    with tempfile.TemporaryDirectory() as work:
        path = os.path.join(work, "r.parquet")
        every = timed_write(table, path, True, args.repeat)
        every_kb = os.path.getsize(path) / 1e3
        chosen = dictionary_columns(table.schema)
        some = timed_write(table, path, chosen, args.repeat)
        some_kb = os.path.getsize(path) / 1e3
        commit = timed_commit(table, work, max(1, args.repeat // 4))
    print(f"{args.n:,} result rows; dictionaries on {', '.join(chosen)}")
    print(f"every column:  {every * 1e3:6.1f} ms per write, {every_kb:7.0f} KB")
    print(f"repeating only: {some * 1e3:6.1f} ms per write, {some_kb:7.0f} KB")
    print(f"ratio (every / repeating only): time {every / some:.2f}, size {every_kb / some_kb:.2f}")
    print(f"commit_shard of {args.n:,} rows in 4 pieces: {commit * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
