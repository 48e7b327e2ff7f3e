"""`ray job submit --working-dir . -- python jobs/pipeline.py --out DIR [-n N]`: the whole pipeline as one
Ray job (synthesise, train on Ray Train, score with Ray Data, occlusion maps, evaluate) — `stampray demo`
on the cluster the job was submitted to. Arguments are those of `stampray demo`.
"""

import sys

from stampray.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
