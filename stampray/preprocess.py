"""Named preprocessing steps, applied identically at training, scoring and occlusion time.

A model checkpoint records the *name* of the step it was trained with; :func:`get` returns the function,
so scoring can never apply a different normalisation than training did.

Every step takes and returns a float32 array of shape (N, C, H, W) and works per stamp and per channel,
vectorised over the batch.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

SIGMA_G_COEFF = 0.7413  # sigma_G = 0.7413 * IQR: the Gaussian-equivalent width from the interquartile range

_STEPS: dict[str, Callable[[np.ndarray], np.ndarray]] = {}


def register(name: str):
    def deco(fn):
        if name in _STEPS:
            msg = f"preprocessing step {name!r} is already registered"
            raise ValueError(msg)
        _STEPS[name] = fn
        fn.preprocess_name = name
        return fn

    return deco


def names() -> list[str]:
    return sorted(_STEPS)


def get(name: str) -> Callable[[np.ndarray], np.ndarray]:
    """The preprocessing function registered under ``name``."""
    try:
        return _STEPS[name]
    except KeyError:
        msg = f"unknown preprocessing {name!r}; known steps: {', '.join(names())}"
        raise ValueError(msg) from None


def _as_batch(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4:
        msg = f"preprocessing expects a batch of shape (N, C, H, W), got shape {x.shape}"
        raise ValueError(msg)
    return x


@register("course")
def course_normalize(x: np.ndarray) -> np.ndarray:
    """The course normalisation of the TNO notebooks, per stamp and per channel.

    Clip every pixel below ``median - 2 sigma_G`` (``sigma_G = 0.7413 IQR``) to that value, subtract the
    minimum, divide by the sum. A stamp whose clipped pixels are all equal (constant or all-zero) has no
    contrast to normalise; it becomes the uniform stamp ``1 / (H W)``, the limit that keeps the unit sum,
    instead of 0/0. A stamp of finite pixels near float32's limits (3e38 beside -3e38) overflows to
    non-finite values, quietly: every caller sets such a stamp aside with its reason ("nonfinite: ... after
    course"), so numpy's RuntimeWarnings would only be noise in a job's log.
    """
    x = _as_batch(x)
    n, c, h, w = x.shape
    if x.size == 0:
        return x.copy()
    flat = x.reshape(n * c, h * w)
    p25, p50, p75 = _quartiles(flat)
    with np.errstate(over="ignore", invalid="ignore"):
        floor = (p50 - 2.0 * SIGMA_G_COEFF * (p75 - p25)).astype(np.float32)
        out = np.maximum(flat, floor[:, None])  # the one new array; every later step works in place on it
        out -= out.min(axis=1, keepdims=True)
        total = out.sum(axis=1, dtype=np.float64, keepdims=True)
        degenerate = total[:, 0] <= 0
        out *= (1.0 / np.where(degenerate[:, None], 1.0, total)).astype(np.float32)
    out[degenerate] = np.float32(1.0 / (h * w))
    return out.reshape(n, c, h, w)


def _quartiles(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """25th, 50th and 75th percentiles of each row (float64), equal bit for bit to
    ``np.percentile(flat.astype(np.float64), [25, 50, 75], axis=1)`` (its default linear rule).

    The rows are sorted rather than partitioned: on 4,096 stamps of 21x21 float32 pixels (one thread, numpy
    2.4), ``np.sort`` (numpy's SIMD sort) took 7.4 ms, ``np.partition`` at the three kth indices at once
    39 ms, one kth at a time 11 ms, ``torch.sort`` 93 ms (benchmarks/preprocess_speed.py); sorting also won
    for 400, 1,200 and 4,096 pixels. Any exact selection yields the same order statistics, so only the
    interpolation below decides the bits.
    """
    ordered = np.sort(flat, axis=1)
    return tuple(_lerp_percentile(ordered, q) for q in (0.25, 0.5, 0.75))


def _lerp_percentile(ordered: np.ndarray, q: float) -> np.ndarray:
    """The ``q`` quantile of each sorted row by ``np.percentile``'s linear rule and its rounding: numpy's
    ``_lerp`` computes ``a + (b - a) t`` for ``t < 0.5`` and ``b - (b - a)(1 - t)`` from 0.5 on."""
    m = ordered.shape[1]
    pos = q * (m - 1)
    lo = int(np.floor(pos))
    hi = min(lo + 1, m - 1)
    t = pos - lo
    a = ordered[:, lo].astype(np.float64)
    if t == 0:  # 21x21 stamps: every quartile is a pixel value
        return a
    b = ordered[:, hi].astype(np.float64)
    if t < 0.5:
        return a + (b - a) * t
    return b - (b - a) * (1.0 - t)


@register("course_scaled")
def course_scaled(x: np.ndarray) -> np.ndarray:
    """The course normalisation times the number of pixels per channel: the same picture, with a flat
    stamp at 1 everywhere instead of ``1 / (H W)``. Networks train far better on it: the Studio 13 CNN on
    20,000 synthetic tno stamps reached 0.964 test accuracy after one epoch with this step and 0.561
    (the class prior; it needs about three epochs to leave that plateau) with ``course`` itself.
    It is ``stampray train``'s default."""
    x = course_normalize(x)  # a new array: scaled in place
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite stays so; see course_normalize
        x *= np.float32(x.shape[2] * x.shape[3])
    return x


@register("none")
def identity(x: np.ndarray) -> np.ndarray:
    """No preprocessing: the pixels as stored (the jet and radio notebooks feed raw images)."""
    return _as_batch(x)


@register("standardize")
def standardize(x: np.ndarray) -> np.ndarray:
    """Zero mean and unit variance per stamp and channel; a constant stamp becomes all zeros."""
    x = _as_batch(x)
    n, c, h, w = x.shape
    flat = x.reshape(n, c, h * w).astype(np.float64)
    mean = flat.mean(axis=-1, keepdims=True)
    std = flat.std(axis=-1, keepdims=True)
    out = (flat - mean) / np.where(std > 0, std, 1.0)
    return out.astype(np.float32).reshape(n, c, h, w)


# --------------------------------------------------------------------------------------------------
# The same steps in torch, for the device (a GPU replica copies raw pixels and normalises there)
# --------------------------------------------------------------------------------------------------
def _torch_course(x):
    """:func:`course_normalize` on a torch tensor (N, C, H, W), on whatever device it lives."""
    import torch

    n, c, h, w = x.shape
    if x.numel() == 0:
        return x.clone()
    flat = x.reshape(n * c, h * w).float()
    m = h * w
    ordered = flat.sort(dim=1).values
    quart = []
    for q in (0.25, 0.5, 0.75):  # np.percentile's default linear rule and rounding, as _lerp_percentile
        p = q * (m - 1)
        lo = int(np.floor(p))
        t = p - lo
        a, b = ordered[:, lo].double(), ordered[:, min(lo + 1, m - 1)].double()
        quart.append(a if t == 0 else a + (b - a) * t if t < 0.5 else b - (b - a) * (1.0 - t))
    p25, p50, p75 = quart
    floor = (p50 - 2.0 * SIGMA_G_COEFF * (p75 - p25)).float()
    clipped = torch.maximum(flat, floor[:, None])
    clipped = clipped - clipped.min(dim=1, keepdim=True).values
    total = clipped.sum(dim=1, keepdim=True, dtype=torch.float64)
    degenerate = total <= 0
    scale = (1.0 / torch.where(degenerate, torch.ones_like(total), total)).float()
    out = torch.where(degenerate, torch.full_like(clipped, 1.0 / m), clipped * scale)
    return out.reshape(n, c, h, w)


def _torch_standardize(x):
    n, c, h, w = x.shape
    flat = x.reshape(n, c, h * w).double()
    mean = flat.mean(dim=-1, keepdim=True)
    std = flat.std(dim=-1, keepdim=True, unbiased=False)
    out = (flat - mean) / torch_where_positive(std)
    return out.float().reshape(n, c, h, w)


def torch_where_positive(std):
    import torch

    return torch.where(std > 0, std, torch.ones_like(std))


_TORCH_STEPS = {
    "course": _torch_course,
    "course_scaled": lambda x: _torch_course(x) * float(x.shape[2] * x.shape[3]),
    "none": lambda x: x.float(),
    "standardize": _torch_standardize,
}


def get_torch(name: str):
    """The torch version of the step ``name`` (equal to :func:`get`'s within float tolerance): it runs where
    its input tensor lives, so a GPU replica normalises on the GPU. None for a step without one."""
    get(name)  # unknown names are refused with the list of known ones
    return _TORCH_STEPS.get(name)
