"""Training throughput: `stampray train` with 1 and 2 Ray Train workers against a plain single-process
PyTorch loop over the same data (read with pyarrow, preprocessed, shuffled, trained), in one run.

Stamps/s are training stamps per second of epoch time (the mean over epochs after the first, which
includes start-up). Run: ``python benchmarks/train_throughput.py [-n 50000] [--epochs 3]``.
"""

import argparse
import os
import shutil
import time

import numpy as np
import torch

from stampray import preprocess as pp
from stampray import splits
from stampray import table as st
from stampray.models import create_model
from stampray.synth import SynthSettings, synth
from stampray.train import TrainSettings, fit


def plain_loop(data: str, epochs: int, batch: int) -> float:
    m = st.read_manifest(data)
    rates = []
    torch.manual_seed(0)
    model = create_model("cnn", 1, 21, 2)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    for _ in range(epochs):
        t = time.time()
        tbl = st.read_table(data, columns=["stamp_id", "image", "label"])
        keep = splits.mask(tbl, "train")
        x = pp.get("course_scaled")(st.decode_images(tbl.column("image"), m.spec.shape)[keep])
        y = tbl.column("label").to_numpy()[keep]
        perm = np.random.permutation(len(y))
        for i in range(0, len(y), batch):
            idx = perm[i:i + batch]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x[idx])), torch.from_numpy(y[idx]))
            loss.backward()
            opt.step()
        rates.append(len(y) / (time.time() - t))
    return float(np.mean(rates[1:] if len(rates) > 1 else rates))


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=50_000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--work", default="/tmp/stampray-bench")
    args = ap.parse_args()
    data = os.path.join(args.work, f"tno-{args.n}")
    if not os.path.exists(os.path.join(data, st.MANIFEST_NAME)):
        synth(SynthSettings(out=data, n=args.n, seed=0))
    base = plain_loop(data, args.epochs, args.batch_size)
    print(f"plain PyTorch loop, one process (torch threads {torch.get_num_threads()}): {base:,.0f} stamps/s")
    for workers in (1, 2):
        runs = os.path.join(args.work, f"runs-{workers}")
        shutil.rmtree(runs, ignore_errors=True)
        r = fit(TrainSettings(model="cnn", data=data, out=runs, workers=workers, epochs=args.epochs,
                              batch_size=args.batch_size))
        rates = [h["stamps_per_s"] for h in r.history]
        rate = float(np.mean(rates[1:] if len(rates) > 1 else rates))
        print(f"stampray train, {workers} worker(s): {rate:,.0f} stamps/s, ratio {rate / base:.2f} "
              f"(test accuracy {r.metrics['test_acc']:.4f})")


if __name__ == "__main__":
    main()
