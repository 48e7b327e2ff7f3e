"""`ray job submit --working-dir . -- python jobs/evaluate.py ...`: the `stampray evaluate` verb as a Ray job.

The job's driver runs on the cluster and connects to it through the RAY_ADDRESS that Ray Jobs sets;
the arguments are exactly those of `stampray evaluate` (see `stampray evaluate --help`).
"""

import sys

from stampray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
