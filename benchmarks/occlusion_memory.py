"""Occlusion on big stamps: peak memory of the whole job and throughput against the model's own limit.

    python benchmarks/occlusion_memory.py                     # 150x150 stamps, kernel 5, stride 2, 2 stamps
    python benchmarks/occlusion_memory.py --size 150 --stride 1 --stamps 2

Floors (issue #19): peak memory of the whole job (driver, Ray's own processes and the replicas, summed
over the process tree as PSS, sampled every half second, PSS when the RSS sum grows) under 3 GB, and an occlusion rate of at least 0.6 of the
model's forward limit measured in the same run.

* The limit: two processes, one thread each (as the 2-core machine runs two single-thread replicas),
  each running the checkpoint's preprocessing and the model on in-memory batches of the same size as the
  occlusion's chunks; their rates summed, in forwards (stamps) per second.
* The job: ``stampray occlude`` in a fresh process on a private local Ray (started before its clock, as
  start-up is not occlusion work), one stamp per block so both replicas work; the rate is the number of
  occluded forwards (stamps x window positions) over the ``occlude`` call's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

LIMIT_CHILD = """
import json, sys, time
import numpy as np, torch
torch.set_num_threads(1)
from stampray import checkpoint as ck, preprocess as pp
bundle = ck.load_bundle(sys.argv[1])
model = ck.build_model(bundle).eval()
prep = pp.get(bundle["preprocess"])
size, chunk, seconds = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
x = np.random.default_rng(0).normal(size=(chunk, 1, size, size)).astype(np.float32)
with torch.inference_mode():
    torch.softmax(model(torch.from_numpy(prep(x))), 1)  # warm-up
    n, t0 = 0, time.time()
    while time.time() - t0 < seconds:
        torch.softmax(model(torch.from_numpy(prep(x))), 1).numpy()
        n += chunk
print("RESULT " + json.dumps({"rate": n / (time.time() - t0)}))
"""

JOB_CHILD = """
import json, sys, time
from stampray.runtime import ray_session
from stampray.occlusion import OccludeSettings, occlude
data, out, model, kernel, stride = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
with ray_session():
    print("READY", flush=True)
    t0 = time.time()
    r = occlude(OccludeSettings(model=model, data=data, out=out, kernel=kernel, stride=stride, batch_size=1,
                                progress=False))
    wall = time.time() - t0
print("RESULT " + json.dumps({"maps": r.rows, "wall_s": wall}))
"""


def _pss(pid: int) -> int:
    """Proportional set size of ``pid`` in bytes: its private pages plus its share of pages it shares (the
    torch and Ray libraries every worker maps), so summing it over processes counts a shared page once."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    """Child processes of ``pid`` from /proc/PID/task/*/children (no scan of every process)."""
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
    except OSError:
        pass
    return out


def _rss_and_name(pid: int) -> tuple[int, str]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            head, tail = f.read().rsplit(")", 1)
        return int(tail.split()[21]) * os.sysconf("SC_PAGE_SIZE"), head.split("(", 1)[1]
    except (OSError, IndexError, ValueError):
        return 0, "?"


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Ray's processes are children of the driver)."""
    found, frontier = [pid], [pid]
    while frontier:
        kids = _children(frontier.pop())
        found.extend(kids)
        frontier.extend(kids)
    return found


def tree_memory(pid: int, with_pss: bool = True) -> tuple[int, int, list[tuple[int, str, int]]]:
    """(RSS summed, PSS summed, [(pss, name, pid)]) over ``pid`` and its descendants, from /proc (Linux).
    PSS walks every process's page tables (costly), so ``with_pss=False`` gives the RSS sum alone."""
    pids = tree(pid)
    info = {p: _rss_and_name(p) for p in pids}
    rss = sum(r for r, _ in info.values())
    if not with_pss:
        return rss, 0, []
    per = sorted(((_pss(p), info[p][1], p) for p in pids), reverse=True)
    return rss, sum(x[0] for x in per), per


def child(code: str, *args: str, watch: bool = False) -> tuple[dict, dict]:
    env = {**os.environ, "RAY_ADDRESS": "", "STAMPRAY_PROGRESS": "0", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    peak = {"rss": 0, "pss": 0, "per": []}
    stop = threading.Event()

    def sample():
        t0 = time.thread_time()
        pss_at = 0  # the RSS sum when PSS was last measured
        while not stop.is_set():
            rss, _, _ = tree_memory(proc.pid, with_pss=False)
            peak["rss"] = max(peak["rss"], rss)
            # PSS (the costly part) again only when the RSS sum has grown 2 % since it was last measured,
            # or every 5th sample: the sampler must not take CPU from the job it measures
            peak["n"] = peak.get("n", 0) + 1
            if rss > 1.02 * pss_at or peak["n"] % 5 == 0:
                _, pss, per = tree_memory(proc.pid)
                pss_at = rss
                if pss > peak["pss"]:
                    peak["pss"], peak["per"] = pss, per
            time.sleep(0.5)
        peak["sampler_cpu_s"] = time.thread_time() - t0  # from the job

    thread = threading.Thread(target=sample, daemon=True)
    if watch:
        thread.start()
    out, err = proc.communicate(timeout=1800)
    stop.set()
    if watch:
        thread.join(timeout=10)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"child failed ({proc.returncode}):\n{err[-3000:]}")
    return json.loads(lines[-1][7:]), peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=150)
    ap.add_argument("--kernel", type=int, default=5)
    ap.add_argument("--stride", type=int, default=2)
    ap.add_argument("--stamps", type=int, default=2)
    ap.add_argument("--model", default="cnn")
    args = ap.parse_args()

    import numpy as np
    import torch

    from stampray import checkpoint as ck
    from stampray import table as st
    from stampray.models import create_model
    from stampray.occlusion import OCCLUDE_PIXELS

    root = tempfile.mkdtemp(prefix="stampray-occl-bench-")
    spec = st.StampSpec((1, args.size, args.size), ("extended", "point"), "benchmark")
    rng = np.random.default_rng(0)
    images = rng.normal(size=(args.stamps, 1, args.size, args.size)).astype(np.float32)
    writer = st.StampWriter(os.path.join(root, "data"), spec, rows_per_shard=args.stamps)
    writer.write(st.make_table(spec, [f"s{i}" for i in range(args.stamps)], images,
                               labels=np.arange(args.stamps) % 2))
    writer.close()
    torch.manual_seed(0)
    model = os.path.join(root, "m.pt")
    ck.save(ck.make_bundle(create_model(args.model, 1, args.size, 2), class_names=spec.class_names,
                           preprocess="course_scaled"), model)
    chunk = max(1, OCCLUDE_PIXELS // (args.size * args.size))
    positions = len(range(0, args.size - args.kernel + 1, args.stride)) ** 2
    forwards = args.stamps * positions

    seconds = 15.0
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(LIMIT_CHILD), model, str(args.size),
                               str(chunk), str(seconds)], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    rates = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        rates.append(json.loads([x for x in out.splitlines() if x.startswith("RESULT ")][-1][7:])["rate"])
    limit = sum(rates)

    job, peak = child(JOB_CHILD, os.path.join(root, "data"), os.path.join(root, "maps"), model,
                         str(args.kernel), str(args.stride), watch=True)
    rate = forwards / job["wall_s"]
    print(f"{args.stamps} stamps of {args.size}x{args.size}, kernel {args.kernel}, stride {args.stride}: "
          f"{positions:,} windows each, {forwards:,} occluded forwards, chunks of {chunk}")
    print(f"model forward limit (2 processes x 1 thread, preprocessing + model): {limit:,.0f} stamps/s "
          f"({rates[0]:,.0f} + {rates[1]:,.0f})")
    print(f"stampray occlude: {job['maps']} maps in {job['wall_s']:.1f} s = {rate:,.0f} occluded forwards/s")
    print(f"fraction of the forward limit: {rate / limit:.2f} (floor 0.60)")
    print(f"peak memory of the whole job (driver + Ray + replicas, PSS summed): {peak['pss'] / 2**30:.2f} GB "
          f"(floor < 3 GB); RSS summed, which counts each shared library once per process: "
          f"{peak['rss'] / 2**30:.2f} GB")
    print(f"(the sampler itself used {peak.get('sampler_cpu_s', 0):.1f} s of CPU during the job)")
    print("largest processes at the peak (PSS): " + ", ".join(
        f"{name}[{pid}] {pss / 2**20:.0f} MB" for pss, name, pid in peak["per"][:8]))


if __name__ == "__main__":
    main()
