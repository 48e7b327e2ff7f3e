"""`stampray score` end to end against a plain one-process pyarrow + PyTorch loop, measured in one run.

Builds (or reuses) N synthetic tno stamps and a Studio 13 CNN checkpoint, then times, over the same
Parquet shards and the same model and preprocessing:

* baseline: one process reads each shard with pyarrow, decodes, preprocesses, runs the model (PyTorch's
  default threads) and writes one Parquet result per shard;
* stampray: ``stampray score`` as a user runs it (a fresh process: Ray start-up, actor pool, compile,
  Parquet out), wall clock.

Prints both rates and their ratio. Run: ``python benchmarks/score_throughput.py [-n 1000000]``.
"""

import argparse
import os
import shutil
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from stampray import checkpoint as ck
from stampray import preprocess as pp
from stampray import table as st
from stampray.models import create_model
from stampray.synth import SynthSettings, synth


def baseline(data: str, model_path: str, out: str) -> int:
    bundle = ck.load_bundle(model_path)
    model = ck.build_model(bundle)
    prep = pp.get(bundle["preprocess"])
    m = st.read_manifest(data)
    os.makedirs(out, exist_ok=True)
    rows = 0
    with torch.inference_mode():
        for shard in m.shards:
            parts = []
            pf = pq.ParquetFile(os.path.join(data, shard["path"]))
            for batch in pf.iter_batches(batch_size=4096, columns=["stamp_id", "image", "label"]):
                x = prep(st.decode_images(batch.column("image"), m.spec.shape))
                p = torch.softmax(model(torch.from_numpy(x)), 1).numpy()
                parts.append(pa.table({"stamp_id": batch.column("stamp_id"), "label": batch.column("label"),
                                       "pred": p.argmax(1), "p_noise": p[:, 0], "p_source": p[:, 1]}))
                rows += batch.num_rows
            pq.write_table(pa.concat_tables(parts), os.path.join(out, shard["path"]))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=1_000_000)
    ap.add_argument("--work", default="/tmp/stampray-bench")
    args = ap.parse_args()
    data = os.path.join(args.work, f"tno-{args.n}")
    if not os.path.exists(os.path.join(data, st.MANIFEST_NAME)):
        t = time.time()
        synth(SynthSettings(out=data, n=args.n, seed=0))
        print(f"built {args.n:,} stamps in {time.time() - t:.0f} s")
    model_path = os.path.join(args.work, "cnn.pt")
    torch.manual_seed(0)
    ck.save(ck.make_bundle(create_model("cnn", 1, 21, 2), class_names=["noise", "source"],
                           preprocess="course_scaled"), model_path)

    out_a, out_b = os.path.join(args.work, "scores-baseline"), os.path.join(args.work, "scores-stampray")
    for d in (out_a, out_b):
        shutil.rmtree(d, ignore_errors=True)
    t = time.time()
    n_a = baseline(data, model_path, out_a)
    base_s = time.time() - t
    t = time.time()
    subprocess.run([sys.executable, "-m", "stampray", "score", "--model", model_path, "--data", data,
                    "--out", out_b, "--no-progress"], check=True, env={**os.environ, "RAY_ADDRESS": ""})
    ray_s = time.time() - t
    n_b = sum(pq.read_metadata(os.path.join(out_b, f)).num_rows for f in os.listdir(out_b) if f.startswith("part-"))
    assert n_a == n_b == args.n, (n_a, n_b)
    a, b = n_a / base_s, n_b / ray_s
    print(f"baseline (one process, pyarrow + PyTorch, torch threads {torch.get_num_threads()}): "
          f"{a:,.0f} stamps/s ({base_s:.1f} s)")
    print(f"stampray score (end to end, fresh process): {b:,.0f} stamps/s ({ray_s:.1f} s)")
    print(f"ratio stampray / baseline: {b / a:.2f}")


if __name__ == "__main__":
    main()
