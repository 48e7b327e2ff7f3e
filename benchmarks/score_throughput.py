"""`stampray score` end to end against a plain one-process pyarrow + PyTorch loop, measured in one run.

Builds (or reuses) N synthetic tno stamps and a Studio 13 CNN checkpoint, then times, over the same
Parquet shards and the same model and preprocessing:

* baseline: one process reads each shard with pyarrow, decodes, preprocesses, runs the model (PyTorch's
  default threads) and writes one Parquet result per shard;
* stampray: ``stampray score`` as a user runs it (a fresh process: Ray start-up, actor pool, compile,
  Parquet out), wall clock; with ``-n`` under 200,000 that is an in-process run, without Ray (see
  ``stampray score --in-process``);
* the machine's forward limit: two processes (as many as the replicas of a 2-core machine), one thread
  each, running the checkpoint's preprocessing and the ``torch.compile``d model (channels-last, as the
  replicas run it) on in-memory batches of decoded stamps (no I/O, no Ray), their rates summed; measured
  right before and right after the score run, and the mean of the two taken.

Prints the rates, the time to the first result (score's first progress line), ``ratio stampray /
baseline`` and ``fraction of the forward limit``, end to end and for the steady rate after start-up (from
score's own progress lines, a line every ~10 s: stamps scored between its first line and its last over the
time between them); then the cost of ``--tta 8`` (``--tta-n`` stamps scored plainly and with it). With
``--in-process``: the same table scored by ``stampray score --in-process on`` (scoring threads in one
process, no Ray), and one process's forward on two Python threads. Run:
``python benchmarks/score_throughput.py [-n 1000000] [--tta-n 100000] [--in-process] [--address ADDR]``
(``--address``: the score run on a Ray already running, as a job on a cluster runs, without Ray's start).
"""

import argparse
import os
import re
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


LIMIT_CHILD = r"""
import json, sys, time
import numpy as np, torch
torch.set_num_threads(1)
from stampray import checkpoint as ck, preprocess as pp, table as st
bundle = ck.load_bundle(sys.argv[1])
model = ck.build_model(bundle).eval()
prep = pp.get(bundle["preprocess"])
batch, seconds, threads = int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
images = np.random.default_rng(0).normal(size=(batch, 1, 21, 21)).astype(np.float32)
# Channels-last, as stampray's replicas run the compiled model: 1.7x the channels-first forward here.
fwd = torch.compile(model.to(memory_format=torch.channels_last), dynamic=False)
def step():
    x = torch.from_numpy(prep(images)).contiguous(memory_format=torch.channels_last)
    return torch.softmax(fwd(x), 1).numpy()
with torch.inference_mode():
    for _ in range(3):  # compile and warm up
        step()
done = []
def run():  # one Python thread's loop; with several, torch's kernels run at once (they release the GIL)
    with torch.inference_mode():
        n, t0 = 0, time.time()
        while time.time() - t0 < seconds:
            step()
            n += batch
        done.append(n / (time.time() - t0))
import threading
pool = [threading.Thread(target=run) for _ in range(threads)]
for t in pool:
    t.start()
for t in pool:
    t.join()
print("RESULT " + json.dumps({"rate": sum(done)}))
"""


LIMIT_S = 10.0  # seconds of each forward-limit measurement


def forward_limit(model_path: str, batch: int = 4096, seconds: float = 20.0, procs: int = 2,
                  threads: int = 1) -> list[float]:
    """Rates (stamps/s) of ``procs`` processes of one torch thread each running preprocessing + the compiled
    model at once on in-memory decoded stamps, each on ``threads`` Python threads (their rates summed)."""
    import json

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ps = [subprocess.Popen([sys.executable, "-c", LIMIT_CHILD, model_path, str(batch), str(seconds), str(threads)],
                           stdout=subprocess.PIPE, text=True, env=env) for _ in range(procs)]
    rates = []
    for p in ps:
        out, _ = p.communicate(timeout=900)
        rates.append(json.loads([x for x in out.splitlines() if x.startswith("RESULT ")][-1][7:])["rate"])
    return rates


def run_verb(verb: str, unit: str, *args: str) -> tuple[float, list[tuple[float, int]]]:
    """``stampray VERB ARGS`` as a user runs it (a fresh process; a private Ray unless ARGS give
    ``--address``): wall seconds, and (seconds since the start, ``unit`` done) from each of its progress
    lines."""
    t = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "stampray", verb, *args], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RAY_ADDRESS": "", "STAMPRAY_PROGRESS": "1"})
    marks = []
    for line in proc.stderr:
        m = re.match(rf"{verb}: ([\d,]+)/[\d,]+ {unit}", line.strip())
        if m:
            marks.append((time.time() - t, int(m.group(1).replace(",", ""))))
    if proc.wait(timeout=3600) != 0:
        raise SystemExit(f"stampray {verb} {' '.join(args)} failed")
    return time.time() - t, marks


def run_score(model_path: str, data: str, out: str, *extra: str) -> tuple[float, list[tuple[float, int]]]:
    """``stampray score`` into a fresh ``out`` (:func:`run_verb`)."""
    shutil.rmtree(out, ignore_errors=True)
    return run_verb("score", "stamps", "--model", model_path, "--data", data, "--out", out, *extra)


def limit_around(model_path: str, job):
    """``job()`` between two forward-limit measurements of ``LIMIT_S`` each, right before and right after it:
    (its result, the limit: the mean of the two, the rates before, the rates after). This machine's speed
    drifts (76,000 and 98,000 stamps/s three minutes apart), and one measurement minutes away from the run
    it is compared with could flatter it or wrong it."""
    before = forward_limit(model_path, seconds=LIMIT_S)
    result = job()
    after = forward_limit(model_path, seconds=LIMIT_S)
    return result, (sum(before) + sum(after)) / 2, before, after


def tta_cost(model_path: str, work: str, n: int, k: int = 8) -> None:
    """The cost of ``--tta K`` (K passes per stamp, one K x N batch per forward): the same table scored
    plainly and with ``--tta K``, each a fresh, compiled ``stampray score``; prints the ratio of the steady
    rates (what K costs once running) and of the wall times."""
    data = os.path.join(work, f"tno-{n}")
    if not os.path.exists(os.path.join(data, st.MANIFEST_NAME)):
        synth(SynthSettings(out=data, n=n, seed=1, progress=False))
    # Both compiled and both through Ray (--compile auto and --in-process auto would treat the K-pass job
    # and the plain one differently at some sizes).
    both = ("--compile", "on", "--in-process", "off")
    plain_s, plain = run_score(model_path, data, os.path.join(work, "scores-plain"), *both)
    tta_s, tta = run_score(model_path, data, os.path.join(work, "scores-tta"), "--tta", str(k), *both)
    r_plain, r_tta = steady_rate(plain, n, plain_s), steady_rate(tta, n, tta_s)
    print(f"TTA cost (--tta {k}, {n:,} stamps): {n / tta_s:,.0f} stamps/s end to end ({tta_s:.1f} s) against "
          f"{n / plain_s:,.0f} plain ({plain_s:.1f} s): {tta_s / plain_s:.1f}x the time; steady "
          f"{r_tta:,.0f} against {r_plain:,.0f} stamps/s: {r_plain / r_tta:.1f}x the time per stamp (the model "
          f"does {k}x the work; reading, preprocessing and writing a stamp cost the same)")


def steady_rate(marks: list[tuple[float, int]], n: int | None = None, wall: float | None = None) -> float:
    """Stamps per second after start-up: between the first progress line and the last (a line every ~10 s,
    and one when the last stamp is in); for a job that printed one line, from it to the end of the run, when
    ``n`` and ``wall`` are given (NaN otherwise)."""
    if len(marks) >= 2 and marks[-1][0] > marks[0][0]:
        return (marks[-1][1] - marks[0][1]) / (marks[-1][0] - marks[0][0])
    if marks and n and wall and wall > marks[0][0]:
        return (n - marks[0][1]) / (wall - marks[0][0])
    return float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=1_000_000)
    ap.add_argument("--work", default="/tmp/stampray-bench")
    ap.add_argument("--tta-n", type=int, default=100_000, help="stamps for the --tta 8 cost line (0: skip it)")
    ap.add_argument("--in-process", action="store_true",
                    help="also score the table with --in-process on, and measure one process on two threads")
    ap.add_argument("--address", help="score on this running Ray (a `ray start --head` on this machine, whose "
                                      "cores the forward limit measures): the job without Ray's start")
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
    shutil.rmtree(out_a, ignore_errors=True)
    t = time.time()
    n_a = baseline(data, model_path, out_a)
    base_s = time.time() - t
    on = ("--address", args.address) if args.address else ()
    (ray_s, marks), limit, before, after = limit_around(model_path, lambda: run_score(model_path, data, out_b, *on))
    steady = steady_rate(marks)
    n_b = sum(pq.read_metadata(os.path.join(out_b, f)).num_rows for f in os.listdir(out_b) if f.startswith("part-"))
    assert n_a == n_b == args.n, (n_a, n_b)
    a, b = n_a / base_s, n_b / ray_s
    print(f"baseline (one process, pyarrow + PyTorch, torch threads {torch.get_num_threads()}): "
          f"{a:,.0f} stamps/s ({base_s:.1f} s)")
    where = f"on the running Ray at {args.address}" if args.address else "its own private Ray"
    print(f"stampray score (end to end, fresh process, {where}): {b:,.0f} stamps/s ({ray_s:.1f} s); first result "
          f"after {marks[0][0]:.1f} s" if marks else f"stampray score ({where}): {b:,.0f} stamps/s ({ray_s:.1f} s)")
    print(f"ratio stampray / baseline: {b / a:.2f}")
    print(f"forward limit (2 processes x 1 thread, preprocessing + compiled channels-last model, in memory): "
          f"{limit:,.0f} stamps/s, the mean of {sum(before):,.0f} ({' + '.join(f'{r:,.0f}' for r in before)}) "
          f"before the score run and {sum(after):,.0f} ({' + '.join(f'{r:,.0f}' for r in after)}) after it")
    print(f"fraction of the forward limit: {b / limit:.2f} end to end (goal 0.75); steady rate "
          f"{steady:,.0f} stamps/s = {steady / limit:.2f} (goal 0.85)")
    if args.in_process:
        in_process_lines(model_path, data, os.path.join(args.work, "scores-in-process"), args.n)
    if args.tta_n:
        tta_cost(model_path, args.work, args.tta_n)


def in_process_lines(model_path: str, data: str, out: str, n: int) -> None:
    """``stampray score --in-process on`` (scoring threads in one process, no Ray) against the limit measured
    around it (before and after, as for the Ray job), and the forward of one process on two Python threads
    of one torch thread each."""
    (wall, marks), limit, _, _ = limit_around(
        model_path, lambda: run_score(model_path, data, out, "--in-process", "on"))
    two = forward_limit(model_path, procs=1, threads=2, seconds=LIMIT_S)[0]
    steady = steady_rate(marks)
    print(f"forward limit around the in-process run: {limit:,.0f} stamps/s")
    print(f"stampray score --in-process on: {n / wall:,.0f} stamps/s ({wall:.1f} s) = {n / wall / limit:.2f} "
          f"of the limit end to end; steady {steady:,.0f} stamps/s = {steady / limit:.2f}")
    print(f"one process, 2 Python threads x 1 torch thread (preprocessing + compiled model, in memory): "
          f"{two:,.0f} stamps/s = {two / limit:.2f} of the limit")


if __name__ == "__main__":
    main()
