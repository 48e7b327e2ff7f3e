"""The driver's share of a scoring job: its own CPU seconds and peak memory at two job sizes.

    python benchmarks/score_driver.py            # 200,000 and 1,000,000 stamps (about 4 minutes here)
    python benchmarks/score_driver.py --sizes 20000,100000

The workers write the results and the driver only keeps the books (see ``stampray/score.py``), so its
CPU time should not grow with the job beyond start-up and its peak RSS should stay flat. Each size is
scored in a fresh process (``ru_maxrss`` is a per-process peak) on a private local Ray started before the
clock starts; a 2,000-stamp job measured the same way is the start-up baseline. The job's coordinator
task (Ray Data's streaming executor and the books, a zero-CPU task beside the driver) reports its own CPU
seconds too: its cost follows the job's wall time (the executor's scheduling loop), not its rows. Printed per size: the
driver process's CPU seconds (``resource.getrusage(RUSAGE_SELF)``, user + system) for the ``score`` call,
its peak RSS, and then the CPU seconds per million stamps beyond the baseline and the RSS ratio between
the two sizes. Goal: RSS within 20 % and under 0.5 CPU s per million stamps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap

CHILD = """
import json, resource, sys, time
import ray
from stampray.runtime import ray_session
from stampray.score import ScoreSettings, score

data, out, model = sys.argv[1:4]
with ray_session():
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.time()
    r = score(ScoreSettings(model=model, data=data, out=out, progress=False))
    wall = time.time() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
print("RESULT " + json.dumps({"stamps": r.scored, "cpu_s": (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime),
                              "peak_rss_mb": ru1.ru_maxrss / 1024, "wall_s": wall, "rate": r.scored / wall,
                              "coordinator_cpu_s": r.coordinator_cpu_s}))
"""


def run(cmd: list[str]) -> dict:
    env = {**os.environ, "RAY_ADDRESS": "", "STAMPRAY_PROGRESS": "0"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        sys.exit(f"benchmark step failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="200000,1000000", help="two job sizes, comma-separated")
    ap.add_argument("--baseline", type=int, default=2000, help="stamps of the start-up baseline job")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="stampray-bench-") as tmp:
        model = os.path.join(tmp, "cnn.pt")
        subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
            import torch
            from stampray import checkpoint as ck
            from stampray.models import create_model
            torch.manual_seed(0)
            ck.save(ck.make_bundle(create_model("cnn", 1, 21, 2), class_names=["noise", "source"],
                                   preprocess="course_scaled"), {model!r})
        """)], check=True)
        results = {}
        for n in [args.baseline, *sizes]:
            data = os.path.join(tmp, f"data{n}")
            subprocess.run([sys.executable, "-m", "stampray", "synth", "-n", str(n), "--out", data, "--seed", "1"],
                           check=True, capture_output=True)
            results[n] = run([sys.executable, "-c", CHILD, data, os.path.join(tmp, f"scores{n}"), model])
            r = results[n]
            print(f"{n:>9,} stamps: driver CPU {r['cpu_s']:6.2f} s, driver peak RSS {r['peak_rss_mb']:7.1f} MB, "
                  f"{r['wall_s']:6.1f} s wall, {r['rate']:,.0f} stamps/s; coordinator task CPU "
                  f"{r['coordinator_cpu_s']:.2f} s ({r['coordinator_cpu_s'] / r['wall_s']:.1%} of a core)", flush=True)
            subprocess.run(["rm", "-rf", data], check=True)
    base = results[args.baseline]
    small, big = sizes
    for n in sizes:
        per_m = (results[n]["cpu_s"] - base["cpu_s"]) / ((n - args.baseline) / 1e6)
        print(f"driver CPU beyond start-up at {n:,}: {per_m:.3f} s per million stamps (goal < 0.5)")
    ratio = results[big]["peak_rss_mb"] / results[small]["peak_rss_mb"]
    print(f"driver peak RSS ratio {big:,} / {small:,}: {ratio:.2f} (goal within 1.20)")
    print(f"driver CPU ratio {big:,} / {small:,}: {results[big]['cpu_s'] / results[small]['cpu_s']:.2f}")


if __name__ == "__main__":
    main()
