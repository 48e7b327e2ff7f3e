"""Occluded variants per second against the machine's forward limit, measured in one run.

    python benchmarks/occlusion_throughput.py            # 2,000 tno stamps of 21x21, kernel 5, stride 1
    python benchmarks/occlusion_throughput.py --in-process   # also the same job mapped in one process

(2,000 stamps are 578,000 occluded variants, about 10 s of the two cores' forwards: enough for the job to
compile its replicas and for a steady rate. 200, the default until 2026-12-01, were under a second's worth,
which left nothing but Ray's start-up to measure.)

* The limit: as in ``score_throughput.py``, two single-thread processes running the checkpoint's
  preprocessing and the ``torch.compile``d model on in-memory batches of decoded stamps, rates summed;
  measured right before and right after the job, and the mean of the two taken.
* The job: ``stampray occlude`` in a fresh process (its own private Ray, as a user runs it), every stamp of
  the table mapped; the rate is the occluded variants (stamps x window positions) over its wall time, and
  the steady rate excludes the start-up (from the progress lines). Goal (issue #14): 0.8 of the limit.
  Its checkpoint is the seed-0 ``cnn`` of ``score_throughput.py``: once that benchmark has run on the machine
  (a scoring job big enough to build the node's compiled package), this job's replicas load the package,
  as a user's occlusion does after scoring with the same checkpoint; before, they compile.
* ``--in-process``: the same job once more with ``stampray occlude --in-process on`` (threads of one process,
  no Ray; what ``--in-process auto`` does for jobs of under 200,000 occluded variants), against the limit
  measured around it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import torch

from stampray import checkpoint as ck
from stampray.models import create_model
from stampray.synth import SynthSettings, synth

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from score_throughput import limit_around, run_verb, steady_rate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=2000, help="stamps to map")
    ap.add_argument("--kernel", type=int, default=5)
    ap.add_argument("--stride", type=int, default=1)
    ap.add_argument("--work", default="/tmp/stampray-occl-throughput")
    ap.add_argument("--in-process", action="store_true", help="also map the table with --in-process on")
    args = ap.parse_args()
    # Names of its own under --work: an earlier run of this benchmark's, replaced; nothing else there is.
    data, maps, model = (os.path.join(args.work, x) for x in ("occlusion-bench-data", "occlusion-bench-maps",
                                                             "occlusion-bench-cnn.pt"))
    for mine in (data, maps):
        shutil.rmtree(mine, ignore_errors=True)
    synth(SynthSettings(out=data, n=args.n, seed=0, progress=False))
    torch.manual_seed(0)
    ck.save(ck.make_bundle(create_model("cnn", 1, 21, 2), class_names=["noise", "source"],
                           preprocess="course_scaled"), model)
    positions = len(range(0, 21 - args.kernel + 1, args.stride)) ** 2
    variants = args.n * positions
    print(f"{args.n} stamps of 21x21, kernel {args.kernel}, stride {args.stride}: {positions} windows each, "
          f"{variants:,} occluded variants")
    runs = [("stampray occlude", ("--in-process", "off"))]  # through Ray, as a job of this size is by default
    if args.in_process:
        runs.append(("stampray occlude --in-process on", ("--in-process", "on")))
    for name, extra in runs:
        shutil.rmtree(maps, ignore_errors=True)
        (wall, marks), limit, before, after = limit_around(model, lambda: run_verb(
            "occlude", "maps", "--model", model, "--data", data, "--out", maps, "--kernel", str(args.kernel),
            "--stride", str(args.stride), *extra))
        rate = variants / wall
        # Maps per second after start-up, as score_throughput's: between the first progress line and the
        # last, or for a job that printed one line, from it to the end of the run.
        steady = steady_rate(marks, args.n, wall) * positions
        print(f"forward limit (2 processes x 1 thread, preprocessing + compiled channels-last model): "
              f"{limit:,.0f} stamps/s, the mean of {sum(before):,.0f} before the run below and {sum(after):,.0f} "
              f"after it")
        first = f"; first map after {marks[0][0]:.1f} s" if marks else ""
        print(f"{name}: {wall:.1f} s = {rate:,.0f} variants/s{first}; steady {steady:,.0f} variants/s; "
              f"fraction of the forward limit: {rate / limit:.2f} end to end, steady {steady / limit:.2f} "
              f"(goal 0.8)")


if __name__ == "__main__":
    main()
