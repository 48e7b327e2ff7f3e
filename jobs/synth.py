"""`ray job submit --working-dir . -- python jobs/synth.py ...`: the `stampray synth` verb as a Ray job.

The job's driver runs on the cluster and connects to it through the RAY_ADDRESS that Ray Jobs sets;
the arguments are exactly those of `stampray synth` (see `stampray synth --help`).
"""

import sys

from stampray.cli import main

if __name__ == "__main__":
    sys.exit(main(["synth", *sys.argv[1:]]))
