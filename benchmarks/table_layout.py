"""Which Arrow layout should hold the stamp image? Read + decode speed and file size, measured.

Writes N synthetic 1x21x21 stamps in four layouts (zstd Parquet), then times reading each file and
decoding the image column to an (N, C, H, W) float32 array. The numbers in ``stampray/table.py`` come
from this script. Run: ``python benchmarks/table_layout.py [-n 200000]``.
"""

import argparse
import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SHAPE = (1, 21, 21)
PIX = int(np.prod(SHAPE))


def layouts(images):
    n = len(images)
    flat = pa.array(images.reshape(-1))
    yield "fixed_size_list<float32>", pa.FixedSizeListArray.from_arrays(flat, PIX), \
        lambda col: col.combine_chunks().flatten().to_numpy().reshape(-1, *SHAPE)
    ttype = pa.fixed_shape_tensor(pa.float32(), list(SHAPE))
    yield "canonical fixed_shape_tensor", pa.ExtensionArray.from_storage(
        ttype, pa.FixedSizeListArray.from_arrays(flat, PIX)), \
        lambda col: col.combine_chunks().to_numpy_ndarray()
    fixed = pa.FixedSizeBinaryArray.from_buffers(pa.binary(PIX * 4), n, [None, pa.py_buffer(images)])
    yield "fixed_size_binary[1764]", fixed, \
        lambda col: np.frombuffer(col.combine_chunks().buffers()[1], np.float32).reshape(-1, *SHAPE)
    blobs = pa.array([images[i].tobytes() for i in range(n)], pa.binary())
    yield "binary blob per row", blobs, \
        lambda col: np.frombuffer(b"".join(col.to_pylist()), np.float32).reshape(-1, *SHAPE)
    offsets = pa.array(np.arange(0, (n + 1) * PIX, PIX, dtype=np.int32))
    yield "list<float32> (variable)", pa.ListArray.from_arrays(offsets, flat), \
        lambda col: col.combine_chunks().flatten().to_numpy().reshape(-1, *SHAPE)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--compression", default="zstd")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.n, *SHAPE), dtype=np.float32)
    print(f"{args.n} stamps of {SHAPE}; {args.compression}; best of {args.repeat}")
    print(f"{'layout':<32}{'file MB':>9}{'read+decode ms':>16}{'stamps/s':>12}")
    with tempfile.TemporaryDirectory() as d:
        results = []
        for name, col, decode in layouts(images):
            path = os.path.join(d, name.split()[0].replace("<", "_").replace(">", "") + ".parquet")
            pq.write_table(pa.table({"image": col}), path, compression=args.compression, row_group_size=65536)
            best = float("inf")
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                out = decode(pq.read_table(path).column("image"))
                best = min(best, time.perf_counter() - t0)
            assert np.array_equal(out, images), name
            results.append((name, os.path.getsize(path) / 1e6, best))
            print(f"{name:<32}{results[-1][1]:>9.1f}{best * 1e3:>16.0f}{args.n / best / 1e6:>11.2f}M")
        base = results[0][2]
        print("ratios of read+decode time against fixed_size_list: "
              + ", ".join(f"{n}: {t / base:.2f}x" for n, _, t in results[1:]))


if __name__ == "__main__":
    main()
