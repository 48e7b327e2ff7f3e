"""Pictures of stamps and occlusion maps an astronomer can read: one module every verb draws with.

* :func:`stretch` maps a stamp channel to [0, 1] the way survey viewers do: IRAF's ``zscale`` (astropy's
  :class:`~astropy.visualization.ZScaleInterval`, the DS9 default) or an ``asinh`` stretch of the
  0.5-99.5 percentile range (faint structure and bright cores both visible).
* :func:`draw_occlusion` puts the stamp (every channel, same stretch) beside its *probability-change* map:
  the occlusion map holds p(target) with each window occluded, and what a reader wants is how much hiding
  that window changed the probability, ``map - base_prob``. The change is drawn on a diverging colour map
  (``RdBu_r``) centred on zero with a symmetric scale (``vmin == -vmax``): blue where hiding the window
  lowered p (the model relied on it), red where it raised p, white for no change. The border of
  ``(kernel-1)//2`` leading and ``kernel//2`` trailing rows and columns, where no window was centred and
  :func:`stampray.occlusion.occlusion_maps` only pads, is masked and drawn grey ("not measured") rather
  than shown as a value.

``vet`` draws with this module; ``occlude --png`` and ``evaluate`` can call the same functions.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

STRETCHES = ("zscale", "asinh")
CHANGE_CMAP = "RdBu_r"
NOT_MEASURED = (0.6, 0.6, 0.6, 1.0)  # the grey of the unmeasured border (RGBA), also in the legend
MIN_SCALE = 1e-3  # the change scale never shrinks below +-0.001: a flat map stays white, not noise-coloured


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def stretch(img: np.ndarray, how: str = "zscale") -> np.ndarray:
    """One channel (H, W) -> float64 in [0, 1] for display.

    Parameters
    ----------
    img : ndarray
        The raw pixel values; non-finite pixels are ignored when choosing the limits and shown as 0.
    how : {"zscale", "asinh"}
        ``zscale``: linear between IRAF's zscale limits. ``asinh``: ``asinh(10 x) / asinh(10)`` of the values
        scaled linearly from the 0.5th to the 99.5th percentile (astropy's ``AsinhStretch(a=0.1)``).

    A constant (or all non-finite) image is returned as zeros.
    """
    from astropy.visualization import AsinhStretch, PercentileInterval, ZScaleInterval

    if how not in STRETCHES:
        msg = f"stretch must be one of {', '.join(STRETCHES)}, got {how!r}"
        raise ValueError(msg)
    img = np.asarray(img, dtype=np.float64)
    finite = np.isfinite(img)
    out = np.zeros(img.shape, np.float64)
    if not finite.any():
        return out
    values = img[finite]
    interval = ZScaleInterval() if how == "zscale" else PercentileInterval(99.0)
    lo, hi = interval.get_limits(values)
    if not hi - lo > 1e-12 * max(1.0, abs(lo)):  # constant image (zscale may even return lo > hi)
        return out
    scaled = np.clip((values - lo) / (hi - lo), 0.0, 1.0)
    if how == "asinh":
        scaled = np.clip(AsinhStretch(a=0.1)(scaled), 0.0, 1.0)
    out[finite] = scaled
    return out


def measured_mask(shape: Sequence[int], kernel: int) -> np.ndarray:
    """Boolean (H, W): True where the occlusion map was measured, False on the padded border of
    ``(kernel-1)//2`` leading and ``kernel//2`` trailing rows and columns."""
    h, w = int(shape[-2]), int(shape[-1])
    kernel = int(kernel)
    if kernel < 1:
        msg = f"kernel must be a positive integer, got {kernel!r}"
        raise ValueError(msg)
    before, after = (kernel - 1) // 2, kernel // 2
    mask = np.zeros((h, w), bool)
    mask[before:h - after, before:w - after] = True
    return mask


def probability_change(heatmap: np.ndarray, base_prob: float, kernel: int) -> np.ma.MaskedArray:
    """``heatmap - base_prob`` as a masked array; the unmeasured border (and non-finite values) masked."""
    heatmap = np.asarray(heatmap, dtype=np.float64)
    if heatmap.ndim != 2:
        msg = f"heatmap must be 2-D (H, W), got shape {heatmap.shape}"
        raise ValueError(msg)
    change = heatmap - float(base_prob)
    bad = ~measured_mask(heatmap.shape, kernel) | ~np.isfinite(change)
    return np.ma.masked_array(change, mask=bad)


def symmetric_scale(change: np.ma.MaskedArray) -> float:
    """``vmax`` of a colour scale centred on zero (``vmin = -vmax``): the largest measured |change|."""
    if change.count() == 0:
        return MIN_SCALE
    return max(float(np.abs(change).max()), MIN_SCALE)


@dataclass
class OcclusionDrawing:
    """What :func:`draw_occlusion` drew: the masked change, its scale and the change map's image artist."""

    change: np.ma.MaskedArray
    vmax: float
    image: Any  # matplotlib AxesImage of the change map (its .axes, .figure, .cmap)
    path: str | None = None


def _change_cmap():
    import matplotlib

    return matplotlib.colormaps[CHANGE_CMAP].with_extremes(bad=NOT_MEASURED)


def draw_change(ax, change: np.ma.MaskedArray, vmax: float, target: str = "target", colorbar: bool = True,
                legend: bool = True):
    """The change map alone on ``ax``: diverging colours centred on zero, grey where not measured."""
    from matplotlib.patches import Patch

    im = ax.imshow(change, cmap=_change_cmap(), vmin=-vmax, vmax=vmax, origin="lower", interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if colorbar:
        bar = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        bar.set_label(f"change of p({target}) when occluded", fontsize=7)
        bar.ax.tick_params(labelsize=6)
    if legend and change.mask.any():
        ax.legend(handles=[Patch(facecolor=NOT_MEASURED, edgecolor="0.3", label="not measured (kernel border)")],
                  loc="upper center", bbox_to_anchor=(0.5, -0.02), fontsize=6, frameon=False)
    return im


def draw_occlusion(stamp_raw: np.ndarray, heatmap: np.ndarray, kernel: int, title: str, path_or_ax,
                   *, base_prob: float, target: str = "target", how: str = "zscale", dpi: int = 100
                   ) -> OcclusionDrawing:
    """The stamp beside its probability-change map.

    Parameters
    ----------
    stamp_raw : ndarray (C, H, W) or (H, W)
        The stamp as stored in the stamp table (not preprocessed); each channel is one panel.
    heatmap : ndarray (H, W)
        The occlusion map: p(target) with the window at each position occluded (``occlude``'s ``heatmap``).
    kernel : int
        The occlusion window's size, which fixes the unmeasured border.
    title : str
        Drawn above the figure (a path) or the change panel (axes).
    path_or_ax
        A file name (str or PathLike): a new figure with C stamp panels and the change map is saved there
        (PNG). A matplotlib Figure: the panels are added to it. A sequence of C+1 Axes: channels, then the
        change map. A single Axes: the change map alone (for grids).
    base_prob : float
        p(target) of the unoccluded stamp (``occlude``'s ``base_prob``); the map is drawn as ``heatmap - base_prob``.
    target : str
        The class name in the colour bar's label.
    how : {"zscale", "asinh"}
        The stamp's stretch (:func:`stretch`).
    """
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    raw = np.asarray(stamp_raw)
    raw = raw[None] if raw.ndim == 2 else raw
    if raw.ndim != 3 or raw.shape[1:] != np.shape(heatmap):
        msg = f"stamp of shape {np.shape(stamp_raw)} does not match a heatmap of shape {np.shape(heatmap)}"
        raise ValueError(msg)
    change = probability_change(heatmap, base_prob, kernel)
    vmax = symmetric_scale(change)
    c = raw.shape[0]
    path = None
    if isinstance(path_or_ax, Axes):
        im = draw_change(path_or_ax, change, vmax, target)
        path_or_ax.set_title(title, fontsize=7)
        return OcclusionDrawing(change, vmax, im)
    if isinstance(path_or_ax, (str, os.PathLike)):
        path = os.fspath(path_or_ax)
        fig = pyplot().figure(figsize=(2.2 * (c + 1) + 0.6, 2.9), layout="constrained")
    elif isinstance(path_or_ax, Figure):
        fig = path_or_ax
    else:
        axes = list(path_or_ax)
        if len(axes) != c + 1:
            msg = f"give {c + 1} axes for a {c}-channel stamp and its map, got {len(axes)}"
            raise ValueError(msg)
        fig = axes[0].figure
    if path is not None or isinstance(path_or_ax, Figure):
        axes = fig.subplots(1, c + 1, squeeze=False)[0]
        fig.suptitle(title, fontsize=8)
    for k in range(c):
        axes[k].imshow(stretch(raw[k], how), cmap="gray", vmin=0, vmax=1, origin="lower", interpolation="nearest")
        axes[k].set_xticks([])
        axes[k].set_yticks([])
        axes[k].set_title(f"channel {k} ({how})" if c > 1 else f"stamp ({how})", fontsize=7)
    im = draw_change(axes[c], change, vmax, target)
    axes[c].set_title(f"p({target}) {float(base_prob):.3f}: change", fontsize=7)
    if path is not None:
        fig.savefig(path, dpi=dpi)  # no tight bbox: the saved pixels keep the figure's coordinates
        pyplot().close(fig)
    return OcclusionDrawing(change, vmax, im, path)


def channel_png(channel: np.ndarray, how: str = "zscale") -> bytes:
    """One stretched channel as PNG bytes at its own resolution (grey, origin lower left, as in the figures);
    pages scale it up with ``image-rendering: pixelated``."""
    buf = io.BytesIO()
    pyplot().imsave(buf, stretch(channel, how), cmap="gray", vmin=0, vmax=1, origin="lower", format="png")
    return buf.getvalue()


def figure_png(fig, dpi: int = 90) -> bytes:
    """A figure as PNG bytes (closed afterwards)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    return buf.getvalue()
