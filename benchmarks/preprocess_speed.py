"""How fast is the checkpoint's preprocessing? The course steps against their earlier implementation, measured.

The earlier ``course_normalize`` (kept below as the baseline, as it was before issue #14) found the three
quartiles with one ``np.partition`` at all their kth indices; stampray's sorts each row with ``np.sort`` (numpy's
SIMD sort) and works in place on one output array. For each stamp shape the script checks that both give the
same bits, then times them alternately on the same in-memory batch (one thread, as a scoring replica runs),
the best of ``--repeats`` rounds each, and prints stamps/s and the ratio new / old. Also timed on their own:
the quartiles, and the selection methods considered for them. Run:
``python benchmarks/preprocess_speed.py [--batch 4096] [--repeats 7]``.
"""

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per replica, as in scoring

import numpy as np

from stampray import preprocess as pp

SIGMA_G_COEFF = pp.SIGMA_G_COEFF


# ---- the baseline: course_normalize and _quartiles as they were before issue #14 ---------------------------
def old_quartiles(flat):
    m = flat.shape[1]
    pos = [q * (m - 1) for q in (0.25, 0.5, 0.75)]
    kth = sorted({int(np.floor(p)) for p in pos} | {int(np.ceil(p)) for p in pos})
    part = np.partition(flat, kth, axis=1)
    out = []
    for p in pos:
        lo, hi = int(np.floor(p)), int(np.ceil(p))
        a = part[:, lo].astype(np.float64)
        out.append(a if lo == hi else a + (part[:, hi].astype(np.float64) - a) * (p - lo))
    return out[0], out[1], out[2]


def old_course_normalize(x):
    x = np.asarray(x, dtype=np.float32)
    n, c, h, w = x.shape
    flat = x.reshape(n * c, h * w)
    p25, p50, p75 = old_quartiles(flat)
    floor = (p50 - 2.0 * SIGMA_G_COEFF * (p75 - p25)).astype(np.float32)
    clipped = np.maximum(flat, floor[:, None])
    clipped -= clipped.min(axis=1, keepdims=True)
    total = clipped.sum(axis=1, dtype=np.float64, keepdims=True)
    degenerate = total <= 0
    out = np.where(degenerate, np.float32(1.0 / (h * w)),
                   clipped * (1.0 / np.where(degenerate, 1.0, total)).astype(np.float32))
    return out.astype(np.float32, copy=False).reshape(n, c, h, w)


def old_course_scaled(x):
    x = old_course_normalize(x)
    return x * np.float32(x.shape[2] * x.shape[3])


# ---- timing ------------------------------------------------------------------------------------------------
def best_seconds(fns: dict, repeats: int, min_s: float = 0.2) -> dict:
    """Best time per call of each function, the functions run alternately (round robin), so that a busy
    neighbour on a shared CPU slows all of them alike."""
    calls = {}
    for name, fn in fns.items():  # warm up; calls per round so that one round lasts about min_s
        t0 = time.perf_counter()
        fn()
        calls[name] = max(1, int(min_s / max(time.perf_counter() - t0, 1e-6)))
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / calls[name])
    return best


def selection_methods(flat: np.ndarray) -> dict:
    """Ways to get the quartiles' order statistics of every row, each giving the same values."""
    m = flat.shape[1]
    kth = sorted({int(np.floor(q * (m - 1))) for q in (0.25, 0.5, 0.75)}
                 | {int(np.ceil(q * (m - 1))) for q in (0.25, 0.5, 0.75)})

    def single_kth():
        a = flat.copy()
        prev = 0
        for k in kth:  # each partition on the part right of the previous kth
            a[:, prev:].partition(k - prev, axis=1)
            prev = k + 1
        return a

    methods = {"np.partition, all kth at once": lambda: np.partition(flat, kth, axis=1),
               "np.partition, one kth at a time": single_kth,
               "np.sort": lambda: np.sort(flat, axis=1)}
    try:
        import torch

        torch.set_num_threads(1)
        t = torch.from_numpy(flat)
        methods["torch.sort"] = lambda: torch.sort(t, dim=1)
        methods["torch.kthvalue per kth"] = lambda: [torch.kthvalue(t, k + 1, dim=1) for k in kth]
    except ImportError:
        pass
    return methods


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4096, help="stamps per call (a scoring replica's chunk)")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds; the best of them is reported")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"numpy {np.__version__}, batch {args.batch}, best of {args.repeats} rounds, one thread")
    print(f"{'shape':>10} {'step':>14} {'old stamps/s':>14} {'new stamps/s':>14} {'new/old':>8}  same bits")
    for shape in [(1, 21, 21), (3, 21, 21), (1, 20, 20), (1, 64, 64)]:
        n = args.batch if shape[1] < 64 else max(1, args.batch // 8)
        x = rng.normal(10, 3, size=(n, *shape)).astype(np.float32)
        x[0] = 0.0  # a degenerate stamp
        for name, old, new in [("course", old_course_normalize, pp.get("course")),
                               ("course_scaled", old_course_scaled, pp.get("course_scaled")),
                               ("quartiles", lambda: None, None)]:
            flat = x.reshape(-1, shape[1] * shape[2])
            if name == "quartiles":
                old, new = (lambda: old_quartiles(flat)), (lambda: pp._quartiles(flat))
                same = all(np.array_equal(a, b) for a, b in zip(old(), new()))
                t = best_seconds({"old": old, "new": new}, args.repeats)
            else:
                same = np.array_equal(old(x), new(x))
                t = best_seconds({"old": lambda: old(x), "new": lambda: new(x)}, args.repeats)
            print(f"{'x'.join(map(str, shape)):>10} {name:>14} {n / t['old']:14,.0f} {n / t['new']:14,.0f} "
                  f"{t['old'] / t['new']:8.2f}  {same}")
    print("\nselection of the order statistics alone, 1x21x21 (rows/s):")
    flat = rng.normal(size=(args.batch, 441)).astype(np.float32)
    for name, s in best_seconds(selection_methods(flat), args.repeats).items():
        print(f"  {name:34s} {args.batch / s:12,.0f}")


if __name__ == "__main__":
    main()
