"""`ray job submit --working-dir . -- python jobs/ingest.py ...`: the `stampray ingest` verb as a Ray job.

The job's driver runs on the cluster and connects to it through the RAY_ADDRESS that Ray Jobs sets;
the arguments are exactly those of `stampray ingest` (see `stampray ingest --help`).
"""

import sys

from stampray.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
