"""GPU smoke run: the ``gpu`` test module on this machine's GPU, then its throughputs.

    python benchmarks/gpu_smoke.py

Runs ``tests/test_gpu.py`` (resnet50 training 2 epochs with AMP on 1 GPU and the CPU evaluating what it
wrote, a kill and resume on the GPU, ``score --use-gpu`` and ``occlude --use-gpu`` on 64x64 radio stamps
for ``cnn`` and ``resnet50``) and prints the rates those tests measured: stamps/s for scoring and images/s
for training. Exits non-zero, printing why, where torch cannot use CUDA or a test fails.
"""

from __future__ import annotations

import os
import subprocess
import sys


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print(f"gpu_smoke: torch {torch.__version__} cannot use CUDA here (torch.version.cuda = "
              f"{torch.version.cuda}); run this on a GPU machine", file=sys.stderr)
        return 2
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-m", "gpu", "-p", "no:cacheprovider",
                          os.path.join(root, "tests", "test_gpu.py")], capture_output=True, text=True, cwd=root)
    for line in out.stdout.splitlines():
        if "GPU-RATE" in line:
            print(line[line.index("GPU-RATE") + 9:])
    print(out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-2000:])
    return out.returncode


if __name__ == "__main__":
    sys.exit(main())
