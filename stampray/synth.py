"""A reproducible synthetic survey written as a stamp table: ``stampray synth``.

``tno``
    21×21 coadded stamps along trial orbits, like the course data (about 45 % sources). Positives hold a
    Gaussian PSF (FWHM 2–4 px) with a sub-pixel offset from the centre (within ``max_offset`` = 0.75 px)
    and a true SNR drawn log-uniformly from 3 to 100 (the matched-filter SNR, ``F / (sigma sqrt(4 pi) s)``).
    Two options make the survey harder, as a search whose trial orbits only nearly match the objects
    would be: ``--max-offset PX`` spreads sources over a disc of that radius around the centre, and
    ``--trail PX`` smears each by up to PX along a random direction (the rate mismatch over the coadd;
    an elliptical Gaussian, SNR defined on the smeared PSF). Off-centre sources are what a per-pixel
    dense net cannot generalise over and a CNN can: see the README's training numbers.
    Negatives are noise-only trajectories; a share of them (and a smaller share of positives) carries
    look-alikes: off-centre stars, cosmic-ray streaks, hot pixels, hot columns, partly masked regions.
``radio``
    64×64 VLASS-like cutouts in four classes (extended, point source, double lobes, three points), each
    with noise and a random orientation.

Stamps are generated in fixed blocks of :data:`BLOCK` rows, each from its own random stream keyed by
``(seed, block)``, so the survey is identical for a given seed whatever the shard size or the number of
parallel Ray tasks. Large surveys are generated one shard per Ray task (bounded memory: one shard per task).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pyarrow as pa

from . import table as st
from .lock import output_lock
from .progress import Progress

BLOCK = 1000
KINDS = ("tno", "radio")
TNO_CLASSES = ("noise", "source")
RADIO_CLASSES = ("extended", "point", "double", "triple")
TNO_ARTIFACTS = ("none", "star", "cosmic_ray", "hot_pixel", "hot_column", "masked")
# Probability of each look-alike on a negative (row 0) and on a positive (row 1) stamp.
_ARTIFACT_P = np.array([
    [0.45, 0.15, 0.12, 0.10, 0.06, 0.12],
    [0.80, 0.04, 0.05, 0.04, 0.02, 0.05],
])
SNR_RANGE = (3.0, 100.0)
FWHM_RANGE = (2.0, 4.0)
MAX_OFFSET = 0.75  # px: sources lie within this distance of the centre (sub-pixel, as the course data)
FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
LOCAL_LIMIT = 50_000  # up to this many stamps are generated in-process; more go to Ray tasks


@dataclass(frozen=True)
class SynthSettings:
    """Settings of ``stampray synth``.

    Args:
        out: output stamp table directory (local path or URI).
        kind: tno: 21x21 point sources against noise; radio: 64x64 cutouts of four morphologies.
        n: number of stamps.
        seed: random seed; the same seed writes the same table.
        shard_rows: rows per Parquet shard.
        positive_fraction: tno: fraction of stamps holding a source (0.45, as the course data).
        max_offset: tno: sources lie within PX of the centre (0.75: sub-pixel, as the course data; 4 for trial
            orbits that only nearly match).
        trail: tno: smear each source by up to PX along a random direction.
        address: Ray cluster to connect to (default: a private local Ray; RAY_ADDRESS is honoured).
        progress: the progress line on stderr.
        append: add the stamps to the table at --out (use another --seed: the same seed repeats ids, which are
            set aside).
    """

    out: str = field(metadata={"path": True})
    kind: str = field(default="tno", metadata={"choices": KINDS})
    n: int = field(default=20_000, metadata={"flag": "-n"})
    seed: int = 0
    shard_rows: int = 50_000
    positive_fraction: float = 0.45
    max_offset: float = field(default=MAX_OFFSET, metadata={"metavar": "PX"})
    trail: float = field(default=0.0, metadata={"metavar": "PX"})
    address: str | None = None
    progress: bool = True
    append: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            msg = f"--kind must be one of {', '.join(KINDS)}, got {self.kind!r}"
            raise ValueError(msg)
        if int(self.n) < 0:
            msg = f"-n must be a non-negative integer, got {self.n!r}"
            raise ValueError(msg)
        if int(self.seed) < 0:
            msg = f"--seed must be an integer >= 0, got {self.seed!r}"
            raise ValueError(msg)
        if not 0.0 <= float(self.positive_fraction) <= 1.0:
            msg = f"--positive-fraction must lie in [0, 1], got {self.positive_fraction!r}"
            raise ValueError(msg)
        if not 0.0 <= float(self.max_offset) <= 8.0:
            msg = f"--max-offset must lie in [0, 8] px (a 21x21 stamp), got {self.max_offset!r}"
            raise ValueError(msg)
        if not 0.0 <= float(self.trail) <= 10.0:
            msg = f"--trail must lie in [0, 10] px, got {self.trail!r}"
            raise ValueError(msg)
        if int(self.shard_rows) <= 0:
            msg = f"--shard-rows must be a positive integer, got {self.shard_rows!r}"
            raise ValueError(msg)


def spec_for(kind: str) -> st.StampSpec:
    if kind == "tno":
        return st.StampSpec((1, 21, 21), TNO_CLASSES, "stampray synth --kind tno")
    return st.StampSpec((1, 64, 64), RADIO_CLASSES, "stampray synth --kind radio")


def _psf(cy, cx, sigma, size, trail=None, angle=None):
    """Unit-flux Gaussian PSFs sampled at pixel centres: (n, size, size).

    With ``trail`` (px) and ``angle``, the PSF is smeared along that direction as a source moving
    slightly off the trial orbit is in a coadd: a Gaussian whose variance along the trail grows by
    ``trail**2 / 12`` (a box of that length convolved with the PSF, to second moments).
    """
    grid = np.arange(size, dtype=np.float32)
    dy = grid[None, :, None] - cy[:, None, None]
    dx = grid[None, None, :] - cx[:, None, None]
    if trail is None:
        s2 = (sigma * sigma)[:, None, None]
        return np.exp(-(dx * dx + dy * dy) / (2 * s2)) / (2 * np.pi * s2)
    sa2 = (sigma * sigma + trail * trail / 12.0)[:, None, None]
    sb2 = (sigma * sigma)[:, None, None]
    c, s = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u = dx * c + dy * s
    v = dy * c - dx * s
    return np.exp(-(u * u / (2 * sa2) + v * v / (2 * sb2))) / (2 * np.pi * np.sqrt(sa2 * sb2))


def _log_uniform(rng, lo, hi, n):
    return np.exp(rng.uniform(np.log(lo), np.log(hi), n)).astype(np.float32)


def _add_artifacts(rng, img: np.ndarray, art: np.ndarray, sigma: np.ndarray) -> None:
    """Draw each stamp's artifact (TNO_ARTIFACTS[art]) into ``img`` in place, scaled by its noise ``sigma``."""
    size, mid = img.shape[-1], (img.shape[-1] - 1) / 2.0
    idx = np.nonzero(art == 1)[0]  # an off-centre star, 5-9 px from the centre
    if len(idx):
        r = rng.uniform(5.0, 9.0, len(idx))
        phi = rng.uniform(0, 2 * np.pi, len(idx))
        cy = np.clip(mid + r * np.sin(phi), 0, size - 1).astype(np.float32)
        cx = np.clip(mid + r * np.cos(phi), 0, size - 1).astype(np.float32)
        s = (rng.uniform(*FWHM_RANGE, len(idx)) * FWHM_TO_SIGMA).astype(np.float32)
        flux = _log_uniform(rng, 5.0, 100.0, len(idx)) * sigma[idx] * np.sqrt(4 * np.pi) * s
        img[idx] += flux[:, None, None] * _psf(cy, cx, s, size)
    idx = np.nonzero(art == 2)[0]  # a cosmic-ray streak: 2-4 sharp pixels in a line
    if len(idx):
        y = rng.integers(0, size, len(idx))
        x = rng.integers(0, size, len(idx))
        d = np.array([(0, 1), (1, 0), (1, 1), (1, -1)])[rng.integers(0, 4, len(idx))]
        length = rng.integers(2, 5, len(idx))
        amp = rng.uniform(10, 50, len(idx)).astype(np.float32) * sigma[idx]
        for k in range(4):
            m = k < length
            yy = np.clip(y + k * d[:, 0], 0, size - 1)
            xx = np.clip(x + k * d[:, 1], 0, size - 1)
            img[idx[m], yy[m], xx[m]] += amp[m]
    idx = np.nonzero(art == 3)[0]  # a hot pixel
    if len(idx):
        img[idx, rng.integers(0, size, len(idx)), rng.integers(0, size, len(idx))] += (
            rng.uniform(10, 100, len(idx)).astype(np.float32) * sigma[idx])
    idx = np.nonzero(art == 4)[0]  # a hot column
    if len(idx):
        img[idx, :, rng.integers(0, size, len(idx))] += (rng.uniform(2, 10, len(idx)).astype(np.float32)
                                                         * sigma[idx])[:, None]
    idx = np.nonzero(art == 5)[0]  # a masked rectangle (zeroed pixels), up to half the stamp each way
    if len(idx):
        h = rng.integers(3, 11, len(idx))
        w = rng.integers(3, 11, len(idx))
        y0 = rng.integers(0, size - h + 1)
        x0 = rng.integers(0, size - w + 1)
        grid = np.arange(size)
        my = (grid[None, :] >= y0[:, None]) & (grid[None, :] < (y0 + h)[:, None])
        mx = (grid[None, :] >= x0[:, None]) & (grid[None, :] < (x0 + w)[:, None])
        img[idx] = np.where(my[:, :, None] & mx[:, None, :], np.float32(0), img[idx])


def _tno_block(seed: int, block: int, n: int, positive_fraction: float, max_offset: float = MAX_OFFSET,
               trail: float = 0.0) -> dict:
    rng = np.random.default_rng([int(seed), int(block), 21])
    size, mid = 21, 10.0
    sigma = rng.uniform(0.8, 1.2, n).astype(np.float32)
    background = rng.normal(0.0, 0.3, n).astype(np.float32)
    img = rng.standard_normal((n, size, size), dtype=np.float32) * sigma[:, None, None] + background[:, None, None]
    label = (rng.random(n) < positive_fraction).astype(np.int64)
    snr = np.zeros(n, np.float32)
    fwhm = np.zeros(n, np.float32)

    pos = np.nonzero(label == 1)[0]
    if len(pos):
        fw = rng.uniform(*FWHM_RANGE, len(pos)).astype(np.float32)
        s = fw * FWHM_TO_SIGMA
        sn = _log_uniform(rng, *SNR_RANGE, len(pos))
        length = rng.uniform(0.0, float(trail), len(pos)).astype(np.float32)
        angle = rng.uniform(0, np.pi, len(pos)).astype(np.float32)
        sa = np.sqrt(s * s + length * length / 12.0)
        flux = sn * sigma[pos] * np.sqrt(4 * np.pi * sa * s)  # the matched-filter SNR is ``sn``
        r = float(max_offset) * np.sqrt(rng.random(len(pos)))  # uniform over a disc around the centre
        phi = rng.uniform(0, 2 * np.pi, len(pos))
        cy = (mid + r * np.sin(phi)).astype(np.float32)
        cx = (mid + r * np.cos(phi)).astype(np.float32)
        img[pos] += flux[:, None, None] * _psf(cy, cx, s, size, length if trail else None, angle)
        snr[pos], fwhm[pos] = sn, fw

    art = np.empty(n, np.int64)
    for cls in (0, 1):
        idx = np.nonzero(label == cls)[0]
        art[idx] = rng.choice(len(TNO_ARTIFACTS), size=len(idx), p=_ARTIFACT_P[cls])

    _add_artifacts(rng, img, art, sigma)

    return {
        "images": img[:, None],
        "label": label,
        "metadata": {
            "snr": snr,
            "fwhm": fwhm,
            "artifact": np.asarray(TNO_ARTIFACTS, dtype=object)[art],
            "ra": rng.uniform(0, 360, n),
            "dec": np.degrees(np.arcsin(rng.uniform(-1, 1, n))),
            "mjd": rng.uniform(60000, 61000, n),
        },
    }


def _radio_block(seed: int, block: int, n: int, positive_fraction: float, **_tno_only) -> dict:
    del positive_fraction  # four balanced classes
    rng = np.random.default_rng([int(seed), int(block), 64])
    size, mid = 64, 31.5
    img = rng.standard_normal((n, size, size), dtype=np.float32)
    label = rng.integers(0, 4, n).astype(np.int64)
    theta = rng.uniform(0, np.pi, n).astype(np.float32)
    peak = rng.uniform(8, 40, n).astype(np.float32)
    grid = np.arange(size, dtype=np.float32)

    def blob(idx, cy, cx, sa, sb, ang, amp):
        dy = grid[None, :, None] - cy[:, None, None]
        dx = grid[None, None, :] - cx[:, None, None]
        c, s = np.cos(ang)[:, None, None], np.sin(ang)[:, None, None]
        u = dx * c + dy * s
        v = -dx * s + dy * c
        img[idx] += amp[:, None, None] * np.exp(-0.5 * ((u / sa[:, None, None]) ** 2 + (v / sb[:, None, None]) ** 2))

    jitter = rng.uniform(-2, 2, (n, 2)).astype(np.float32)
    cy, cx = mid + jitter[:, 0], mid + jitter[:, 1]
    beam = rng.uniform(1.3, 2.0, n).astype(np.float32)
    idx = np.nonzero(label == 0)[0]  # extended: a large elliptical source
    if len(idx):
        sa = rng.uniform(5, 12, len(idx)).astype(np.float32)
        sb = sa * rng.uniform(0.3, 0.9, len(idx)).astype(np.float32)
        blob(idx, cy[idx], cx[idx], sa, sb, theta[idx], peak[idx] * 0.6)
    idx = np.nonzero(label == 1)[0]  # point source: one beam-sized source
    if len(idx):
        blob(idx, cy[idx], cx[idx], beam[idx], beam[idx], theta[idx], peak[idx])
    for cls, parts in ((2, (-1, 1)), (3, (-1, 0, 1))):  # double lobes; three points (core and two lobes)
        idx = np.nonzero(label == cls)[0]
        if not len(idx):
            continue
        sep = rng.uniform(6, 18, len(idx)).astype(np.float32)
        bend = rng.uniform(-0.25, 0.25, len(idx)).astype(np.float32)
        for p in parts:
            ang = theta[idx] + (bend if p > 0 else 0)
            oy = cy[idx] + p * sep * np.sin(ang)
            ox = cx[idx] + p * sep * np.cos(ang)
            b = beam[idx] * (1.3 if p else 1.0)
            blob(idx, oy, ox, b, b, theta[idx], peak[idx] * (0.8 if p else 1.0))
    return {
        "images": img[:, None],
        "label": label,
        "metadata": {"peak_snr": peak, "angle_deg": np.degrees(theta)},
    }


_GENERATORS = {"tno": _tno_block, "radio": _radio_block}


def generate(kind: str, seed: int, start: int, stop: int, positive_fraction: float = 0.45,
             max_offset: float = MAX_OFFSET, trail: float = 0.0) -> dict:
    """Stamps ``start`` to ``stop`` (exclusive) of the survey ``(kind, seed, options)`` as numpy arrays."""
    gen = _GENERATORS[kind]
    options = {"positive_fraction": positive_fraction, "max_offset": max_offset, "trail": trail}
    parts = []
    for b in range(start // BLOCK, (stop + BLOCK - 1) // BLOCK if stop > start else start // BLOCK):
        lo, hi = b * BLOCK, (b + 1) * BLOCK
        block = gen(seed, b, BLOCK, **options)
        a, z = max(start, lo) - lo, min(stop, hi) - lo
        parts.append({
            "images": block["images"][a:z],
            "label": block["label"][a:z],
            "metadata": {k: v[a:z] for k, v in block["metadata"].items()},
        })
    if not parts:
        empty = gen(seed, 0, 0, **options)
        return empty
    out = {
        "images": np.concatenate([p["images"] for p in parts]),
        "label": np.concatenate([p["label"] for p in parts]),
        "metadata": {k: np.concatenate([p["metadata"][k] for p in parts]) for k in parts[0]["metadata"]},
    }
    out["ids"] = [f"{kind}-s{seed}-{i:09d}" for i in range(start, stop)]
    return out


def _write_shard(out: str, index: int, kind: str, seed: int, start: int, stop: int,
                 options: dict) -> tuple[str, int, dict[str, int], "pa.Schema"]:
    spec = spec_for(kind)
    data = generate(kind, seed, start, stop, **options)
    tbl = st.make_table(spec, data["ids"], data["images"], data["label"], data["metadata"])
    name = st.shard_name(index)
    st.write_shard(st.join(out, name), tbl)
    counts = np.bincount(data["label"], minlength=spec.num_classes)
    return name, tbl.num_rows, {str(i): int(c) for i, c in enumerate(counts)}, tbl.schema


def synth(settings: SynthSettings) -> st.Manifest:
    """Generate a synthetic survey and write it as a stamp table.

    Returns the dataset's :class:`~stampray.table.Manifest`.
    """
    with output_lock(settings.out, "synth", scratch=(st.WRITER_MARK,)):
        if not settings.append:
            from .replace import replacing

            with replacing(settings.out) as target:  # a table already there is replaced once the new one is complete
                _synth(replace(settings, out=target))
            return st.read_manifest(settings.out)
        from .append import AppendError, discard_stage, existing_table, merge, stage_dir

        existing_table(settings.out)
        _synth(replace(settings, out=stage_dir(settings.out), append=False))
        try:
            return merge(settings.out, "synth", asdict(settings))[0]
        except AppendError:
            discard_stage(settings.out)
            raise


SYNTH_WAIT_S = 1800.0  # the longest a shard task may take (one shard: seconds of work)


def _synth(settings: SynthSettings) -> st.Manifest:
    spec = spec_for(settings.kind)
    if settings.address and int(settings.n) <= LOCAL_LIMIT:  # written here, but the cluster asked for is checked
        from .runtime import check_cluster

        check_cluster(settings.address, f"--address {settings.address}")
    writer = st.StampWriter(settings.out, spec, settings.shard_rows, settings={"synth": asdict(settings)})
    n, rows = int(settings.n), int(settings.shard_rows)
    jobs = [(i, a, min(a + rows, n)) for i, a in enumerate(range(0, n, rows))]
    args = (settings.kind, int(settings.seed))
    options = {"positive_fraction": float(settings.positive_fraction), "max_offset": float(settings.max_offset),
               "trail": float(settings.trail)}
    progress = Progress("synth", n, settings.progress)
    results = []
    if n <= LOCAL_LIMIT:
        for i, a, z in jobs:
            results.append(_write_shard(settings.out, i, *args, a, z, options))
            progress.update(z - a)
    else:
        import ray

        from .runtime import ray_session

        with ray_session(settings.address):
            # One task per shard: memory per task is one shard, and the tasks spread over the cluster.
            task = ray.remote(num_cpus=1, max_retries=3)(_write_shard)
            refs = {task.remote(settings.out, i, *args, a, z, options): i for i, a, z in jobs}
            by_index, pending, deadline = {}, list(refs), time.time() + SYNTH_WAIT_S
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=10.0)
                for ref in ready:
                    by_index[refs[ref]] = ray.get(ref, timeout=60)
                    progress.update(by_index[refs[ref]][1])
                if ready:
                    deadline = time.time() + SYNTH_WAIT_S
                elif time.time() > deadline:
                    msg = (f"synth: no shard finished in {SYNTH_WAIT_S:.0f} s ({len(pending)} waiting); check "
                           f"that the Ray cluster has free CPUs ('ray status')")
                    raise RuntimeError(msg)
            results = [by_index[i] for i in range(len(jobs))]
    progress.close()
    for name, count, labels, sch in results:
        writer.add_shard(name, count, labels, sch)
    return writer.close()
