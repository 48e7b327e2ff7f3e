"""Stamps cut from mosaics at catalogue positions: ``stampray cutout``.

Inputs: ``images``, one FITS mosaic or a directory (or URI prefix) of them (``.fits``, ``.fits.gz``,
``.fits.fz``, any case, found recursively), and ``catalog``, a CSV ``id,ra,dec[,label,split,metadata...]``
with ICRS positions in degrees. The output is an ordinary stamp table (:mod:`stampray.table`) of 1×N×N
stamps, with the metadata columns ``ra``, ``dec`` (the catalogue's), ``mosaic`` (the file the stamp was cut
from, relative to ``images``), ``x``, ``y`` (the position in that mosaic, zero-based pixels) and the
catalogue's other columns.

How it runs
-----------
1. The driver reads the catalogue and each mosaic's header only (threads; never a mosaic's pixels).
2. Each mosaic's footprint, a cap around its centre pixel found from points along its edges, selects the
   candidate rows from a KD-tree of the catalogue; each candidate's pixel position comes from the mosaic's
   WCS, and it lies in the mosaic when its centre pixel does. A row in several mosaics goes to the first
   (in sorted name order) that holds its whole cutout, else to the first that holds its centre.
3. Rows are cut by Ray tasks, one per mosaic (a mosaic with many rows is cut by several, each returning at
   most ``PIECE_BYTES`` of stamps). A task opens its mosaic, cuts with :class:`astropy.nddata.Cutout2D` (an
   uncompressed or tile-compressed mosaic is read section by section, never whole) and returns its stamps.
4. The driver writes the stamps in mosaic order with :class:`stampray.table.StampWriter`, with a bounded
   number of tasks in flight or waiting to be written, and the manifest last.

Every catalogue row becomes a stamp or is set aside in ``_errors`` with its reason: ``outside`` (no mosaic
holds its centre), ``partial`` (its cutout runs off the mosaic; ``partial="pad"`` keeps it instead, padded),
``nonfinite`` (NaN or inf pixels of the mosaic inside the cutout; ``nonfinite="fail"`` stops instead, as in
ingest), ``duplicate_id``, ``label`` and ``split`` (as in ingest), ``position`` (no valid ra/dec), ``id``
(empty), ``unreadable`` (the mosaic's pixels there could not be read: a damaged or truncated file).

Padding and the non-finite rule
-------------------------------
Ingest never writes non-finite pixels, and train and score set such stamps aside. With ``partial="pad"``
the padding is NaN by default (``pad_value``), as :class:`~astropy.nddata.Cutout2D` pads: the padding was
asked for and is not screened, while NaN or inf pixels of the mosaic itself follow the ``nonfinite`` rule.
NaN-padded stamps are therefore kept in the table but set aside by ``train`` and ``score``; a finite
``pad_value`` (0, or the sky level) makes them usable there.

The Ray tasks read the mosaics themselves: on a remote cluster, ``images`` (and ``out``) must be URIs or on
a filesystem every node shares.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import posixpath
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Iterator

from .classes import check_class_names
from .progress import Progress

if TYPE_CHECKING:  # numpy, pyarrow and astropy load when a cutout runs, not when the CLI builds its parser
    import numpy as np

    from . import table as st

logger = logging.getLogger(__name__)

PARTIAL = ("set-aside", "pad")
NONFINITE = ("set-aside", "fail")  # as ingest's --nonfinite (restated so the CLI parser needs no numpy)
FITS_SUFFIXES = (".fits", ".fits.gz", ".fits.fz")
OWN_COLUMNS = ("ra", "dec", "mosaic", "x", "y")  # metadata columns cutout writes itself
CATALOG_KEYS = ("id", "ra", "dec", "label", "split")  # catalogue columns with a meaning; the others pass through
PIECE_BYTES = 64 << 20  # the most stamp bytes one task returns: a big mosaic is cut by several tasks
HELD_BYTES = 1 << 30  # the most stamp bytes in flight or waiting on the driver to be written in order
TASK_CPUS = 0.5  # cutting is mostly reading: two tasks per core, and a 2-CPU laptop never starves
HEADER_THREADS = 16  # header reads on the driver are small I/O, so threads overlap their latency
WAIT_S = 1.0  # the longest the driver blocks on Ray at a time (progress, Ctrl-C)
GET_S = 300.0  # fetching one finished task's stamps
STALL_S = 600.0  # warn when no task has finished for this long


@dataclass(frozen=True)
class CutoutSettings:
    """Settings of ``stampray cutout``.

    Args:
        images: one FITS mosaic, or a directory or URI prefix searched recursively for mosaics
            (.fits, .fits.gz, .fits.fz, any case).
        catalog: CSV with columns id,ra,dec[,label,split,metadata...]; ICRS degrees.
        out: output stamp table directory (local path or URI).
        size: stamps are N x N pixels, centred on the catalogue position.
        hdu: HDU of each mosaic to cut from, by index or EXTNAME (default: the first holding a 2-D image).
        partial: a cutout that runs off its mosaic: set-aside in _errors, or pad (kept, padded with
            --pad-value).
        pad_value: with --partial pad, the value of pixels off the mosaic (default NaN; train and score set
            stamps with NaN pixels aside, so give a finite value such as 0 to use them there).
        nonfinite: NaN or inf pixels of a mosaic inside a cutout: set-aside in _errors, or fail.
        classes: class names in label order, e.g. noise,source (default: the sorted labels).
        shard_rows: rows per Parquet shard.
        overwrite: replace the stamp table already in --out.
        progress: the progress line on stderr.
        address: Ray cluster to connect to (default: RAY_ADDRESS, else a private local Ray).
    """

    images: str = field(metadata={"path": True, "metavar": "MOSAIC.fits|DIR"})
    catalog: str = field(metadata={"path": True, "metavar": "CSV"})
    out: str = field(metadata={"path": True})
    size: int = field(metadata={"metavar": "N"})
    hdu: str | int | None = field(default=None, metadata={"metavar": "N|NAME"})
    partial: str = field(default="set-aside", metadata={"choices": PARTIAL})
    pad_value: float | None = field(default=None, metadata={"metavar": "V"})
    nonfinite: str = field(default="set-aside", metadata={"choices": NONFINITE})
    classes: tuple[str, ...] = field(default=(), metadata={"metavar": "NAME,NAME"})
    shard_rows: int = field(default=50_000, metadata={"metavar": "R"})
    overwrite: bool = False
    progress: bool = True
    address: str | None = None

    def __post_init__(self):
        for name in ("images", "catalog", "out"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                msg = f"--{name} must name a path or URI, got {getattr(self, name)!r}"
                raise ValueError(msg)
        for name in ("size", "shard_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                msg = f"--{name.replace('_', '-')} must be a positive integer, got {value!r}"
                raise ValueError(msg)
        if self.partial not in PARTIAL:
            msg = f"--partial must be one of {', '.join(PARTIAL)}, got {self.partial!r}"
            raise ValueError(msg)
        if self.pad_value is not None and self.partial != "pad":
            msg = f"--pad-value {self.pad_value} applies to padded cutouts only; pass --partial pad with it"
            raise ValueError(msg)
        if self.nonfinite not in NONFINITE:
            msg = f"--nonfinite must be one of {', '.join(NONFINITE)}, got {self.nonfinite!r}"
            raise ValueError(msg)
        if isinstance(self.hdu, bool) or (self.hdu is not None and not str(self.hdu).strip()):
            msg = f"--hdu must be an HDU index (0, 1, ...) or an EXTNAME such as SCI, got {self.hdu!r}"
            raise ValueError(msg)
        if self.classes:
            check_class_names(self.classes, "--classes")


class CutoutError(ValueError):
    """A problem with an input that stops the whole cutout (the message names the file and the fix)."""


@dataclass
class CutoutResult:
    """What a cutout wrote: the manifest, and counts of catalogue rows and mosaics."""

    manifest: st.Manifest
    rows_in: int  # catalogue rows
    mosaics: int  # FITS mosaics found under --images
    mosaics_used: int  # mosaics that at least one row was cut from
    tasks: int  # Ray tasks run
    seconds: float

    @property
    def stamps(self) -> int:
        return self.manifest.num_rows

    @property
    def set_aside(self) -> dict[str, int]:
        """Rows set aside, by reason (``{"outside": 2, "partial": 1}``)."""
        return dict(self.manifest.errors)


# --------------------------------------------------------------------------------------------------
# Mosaics: listing, opening, headers
# --------------------------------------------------------------------------------------------------
def _is_uri(path: str) -> bool:
    return "://" in str(path)


def list_mosaics(images: str) -> list[tuple[str, str]]:
    """``[(path, name)]`` of the mosaics ``images`` names, sorted by name: the file itself, or the FITS files
    under a directory or prefix (recursively); ``name`` is relative to ``images`` (the ``mosaic`` column)."""
    import pyarrow.fs as pafs

    from . import table as st

    fs, root = st.resolve(images)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        return [(images, posixpath.basename(root))]
    if info.type != pafs.FileType.Directory:
        raise CutoutError(f"--images {images} does not exist; give a FITS mosaic or a directory of them")
    root = root.rstrip("/")
    names = sorted(i.path[len(root) + 1:] for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                   if i.type == pafs.FileType.File and i.path.lower().endswith(FITS_SUFFIXES))
    if not names:
        raise CutoutError(f"--images {images} holds no FITS mosaic ({', '.join(FITS_SUFFIXES)}, any case)")
    if _is_uri(images):
        return [(st.join(images, n), n) for n in names]
    return [(os.path.join(root, *n.split("/")), n) for n in names]


@contextlib.contextmanager
def _open_fits(path: str, whole: bool = False):
    """An HDUList, loaded lazily. Local files open by name (astropy memory-maps or un-gzips them). A URI
    opens through its filesystem: for headers by random access (gzip decompressed as a stream, only as far
    as read), or with ``whole`` read into memory at once: one request rather than one per cutout."""
    import gzip

    from astropy.io import fits

    from . import table as st

    if not _is_uri(path):
        with fits.open(path, lazy_load_hdus=True) as hdul:
            yield hdul
        return
    fs, p = st.resolve(path)
    if whole:
        with fs.open_input_stream(p, compression=None) as f:
            data = f.read()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        with fits.open(io.BytesIO(data), lazy_load_hdus=True) as hdul:
            yield hdul
        return
    with fs.open_input_file(p) as f:
        gzipped = f.read(2) == b"\x1f\x8b"
        f.seek(0)
        with fits.open(gzip.GzipFile(fileobj=f) if gzipped else f, lazy_load_hdus=True) as hdul:
            yield hdul


def _hdu_at(hdul, i: int):
    try:
        return hdul[i]
    except IndexError:
        return None


def _axes(header) -> tuple[int, ...]:
    return tuple(int(header.get(f"NAXIS{k}", 0)) for k in range(1, int(header.get("NAXIS", 0)) + 1))


def _image_axes(hdu) -> tuple[int, ...] | None:
    """(NAXIS1, NAXIS2, ...) of an image HDU whose axes beyond the second have length 1, else None."""
    if not getattr(hdu, "is_image", False):
        return None
    axes = _axes(hdu.header)
    if len(axes) < 2 or axes[0] < 1 or axes[1] < 1 or any(a != 1 for a in axes[2:]):
        return None
    return axes


def _pick_hdu(hdul, hdu: str | int | None, name: str) -> int:
    """Index of the HDU to cut from: ``hdu`` by index or EXTNAME, else the first holding a 2-D image."""
    if hdu is None:
        i = 0
        while (h := _hdu_at(hdul, i)) is not None:
            if _image_axes(h):
                return i
            i += 1
        raise CutoutError(f"{name} holds no 2-D image HDU; check the file")
    if str(hdu).strip().isdigit():
        i = int(str(hdu).strip())
        if _hdu_at(hdul, i) is None:
            raise CutoutError(f"{name} has no HDU {i} (it has {len(hdul)}); give --hdu 0..{len(hdul) - 1} or an "
                              f"EXTNAME")
    else:
        try:
            i = hdul.index_of(str(hdu).strip())
        except KeyError:
            names = ", ".join(h.name for h in hdul)
            raise CutoutError(f"{name} has no HDU named {hdu!r} (it has: {names}); give --hdu NAME or an "
                              f"index") from None
    if not _image_axes(hdul[i]):
        raise CutoutError(f"{name}: HDU {hdu} holds no 2-D image; give --hdu an image HDU, or leave it out to "
                          f"take the first")
    return i


@dataclass(frozen=True)
class _Mosaic:
    """One mosaic as planned from its header."""

    path: str  # local path or URI
    name: str  # relative to --images: the ``mosaic`` column
    hdu: int
    naxis: int  # axes of its data (beyond two: length 1, e.g. radio frequency and Stokes)
    shape: tuple[int, int]  # (ny, nx)
    wcs: object  # its celestial astropy WCS (driver only)


def read_header(path: str, name: str, hdu: str | int | None = None) -> _Mosaic:
    """Plan one mosaic from its header: which HDU, its shape and its celestial WCS; no pixels are read."""
    from astropy.wcs import WCS, FITSFixedWarning

    try:
        with _open_fits(path) as hdul:
            i = _pick_hdu(hdul, hdu, name)
            header = hdul[i].header.copy()
            _say_if_truncated(hdul[i], path, name)
    except CutoutError:
        raise
    except (OSError, ValueError, EOFError) as e:
        raise CutoutError(f"{name}: cannot read its header ({e})") from None
    axes = _axes(header)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)  # astropy's fixes of old-style keywords
        try:
            wcs = WCS(header)
        except Exception as e:  # noqa: BLE001 - astropy raises many kinds for a bad WCS
            raise CutoutError(f"{name}: HDU {i} has no usable WCS ({e})") from None
    if not wcs.has_celestial or {wcs.wcs.lng, wcs.wcs.lat} != {0, 1}:
        raise CutoutError(f"{name}: HDU {i} has no celestial WCS on its first two axes (CTYPE "
                          f"{', '.join(wcs.wcs.ctype) or 'missing'}); cutout needs RA/Dec (or another sky frame) "
                          f"on NAXIS1 and NAXIS2")
    return _Mosaic(path, name, i, len(axes), (axes[1], axes[0]), wcs.celestial)


@contextlib.contextmanager
def _truncation_unsaid():
    """Astropy's "File may have been truncated" warning, which names no file, is not shown while the block
    runs: the driver names a short mosaic itself (:func:`_say_if_truncated`) and the cutout tasks set its
    unreadable stamps aside with their reason. Warning filters are the process's: set this around threads,
    not in them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="File may have been truncated")
        yield


def _say_if_truncated(hdu, path: str, name: str) -> None:
    """A local, uncompressed mosaic shorter than its header says: one warning naming it (astropy's own
    "File may have been truncated" names no file; it is silenced in :func:`read_headers`). The stamps past its
    end are set aside as ``unreadable`` by the cutout tasks."""
    info = hdu.fileinfo() if not _is_uri(path) and not path.lower().endswith(".gz") else None
    if not info:
        return
    data = int(info["datSpan"])  # the data with its padding to whole 2880-byte blocks, which holds no pixels
    size_bytes = getattr(hdu, "size", None)
    if isinstance(size_bytes, int) and 0 < size_bytes <= data:
        data = size_bytes
    need, size = int(info["datLoc"]) + data, os.path.getsize(path)
    if size < need:
        logger.warning(f"cutout: warning: {name} is shorter than its header says ({size:,} of {need:,} bytes): "
                       f"the stamps past its end are set aside as unreadable")


def read_headers(mosaics: list[tuple[str, str]], hdu: str | int | None) -> list[_Mosaic]:
    """Every mosaic's header, read in threads; one message names the first few that cannot be used."""
    from concurrent.futures import ThreadPoolExecutor

    def one(item):
        try:
            return read_header(item[0], item[1], hdu)
        except CutoutError as e:
            return e

    with _truncation_unsaid(), ThreadPoolExecutor(max(1, min(HEADER_THREADS, len(mosaics)))) as pool:
        planned = list(pool.map(one, mosaics))
    bad = [str(p) for p in planned if isinstance(p, CutoutError)]
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise CutoutError(f"{len(bad)} of {len(mosaics)} mosaics cannot be used: {'; '.join(bad[:3])}{more}; "
                          f"repair them or move them out of --images")
    return planned


# --------------------------------------------------------------------------------------------------
# The catalogue
# --------------------------------------------------------------------------------------------------
@dataclass
class _Catalog:
    path: str
    ids: list[str]
    ra: np.ndarray  # float64 degrees, NaN where not a number
    dec: np.ndarray
    classes: tuple[str, ...]
    labels: np.ndarray | None  # int64, -1 = null
    split: list | None  # train/val/test or None per row; None when the catalogue has no split column
    metadata: dict[str, np.ndarray]
    reasons: dict[int, str]  # catalogue row -> why it is set aside before any cutting

    def __len__(self) -> int:
        return len(self.ids)


def _raw_labels(values: list[str]):
    """The label column as ingest reads it: numbers (empty = unlabelled) or class names."""
    import numpy as np

    from .ingest import _is_number

    if all(_is_number(v) or v.strip() == "" for v in values):
        return np.array([np.nan if v.strip() == "" else float(v) for v in values])
    return np.array(values, dtype=str)


def read_catalog(s: CutoutSettings) -> _Catalog:
    """Read ``s.catalog``: positions, ids, labels, split and passthrough columns, and the reasons to set rows
    aside that the catalogue alone shows (empty or duplicate id, invalid position, label, split)."""
    import numpy as np

    from . import table as st
    from .ingest import IngestError, _column, _read_catalog, map_labels

    try:
        rows = _read_catalog(s.catalog)
        columns = list(rows[0]) if rows else []
        missing = [c for c in ("id", "ra", "dec") if c not in columns]
        if rows and missing:
            raise CutoutError(f"{s.catalog}: the catalogue needs columns id,ra,dec[,label,metadata...]; it lacks "
                              f"{', '.join(missing)} (its columns are {', '.join(columns)})")
        clash = [c for c in columns if c not in CATALOG_KEYS and (c in OWN_COLUMNS or c in st.CORE_COLUMNS)]
        if clash:
            raise CutoutError(f"{s.catalog}: column {', '.join(clash)} would clash with a column of the stamp table "
                              f"({', '.join(st.CORE_COLUMNS + OWN_COLUMNS)}); rename it in the catalogue")
        raw = _raw_labels([r["label"] or "" for r in rows]) if "label" in columns else None
        classes, labels, reasons = map_labels(raw, tuple(s.classes), s.catalog)
    except IngestError as e:
        raise CutoutError(str(e)) from None
    ids = [(r.get("id") or "").strip() for r in rows]
    ra, dec = _column(rows, "ra"), _column(rows, "dec")
    ra = ra.astype(float) if ra.dtype.kind == "f" else np.array([_float(v) for v in ra])
    dec = dec.astype(float) if dec.dtype.kind == "f" else np.array([_float(v) for v in dec])
    for i in np.nonzero(~(np.isfinite(ra) & np.isfinite(dec) & (np.abs(dec) <= 90)))[0]:
        reasons.setdefault(int(i), f"position: ra={rows[i]['ra']!r}, dec={rows[i]['dec']!r} is not a sky position "
                                   f"in degrees (finite ra, -90 <= dec <= 90)")
    split = None
    if "split" in columns:
        split = [(r["split"] or "").strip() or None for r in rows]
        for i, v in enumerate(split):
            if v is not None and v not in st.SPLIT_NAMES:
                reasons.setdefault(i, f"split: {v!r} is not one of {', '.join(st.SPLIT_NAMES)} (or empty)")
    first: dict[str, int] = {}
    for i, sid in enumerate(ids):
        if not sid:
            reasons.setdefault(i, "id: the row has no id")
        elif sid in first:
            reasons.setdefault(i, f"duplicate_id: {sid!r} already used by {s.catalog} row {first[sid]}")
        else:
            first[sid] = i  # the first row naming an id owns it, as in ingest, even when set aside otherwise
    meta = {c: _column(rows, c) for c in columns if c not in CATALOG_KEYS}
    return _Catalog(s.catalog, ids, ra, dec, tuple(classes), labels, split, meta, reasons)


def _float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


# --------------------------------------------------------------------------------------------------
# Matching rows to mosaics
# --------------------------------------------------------------------------------------------------
def _unit_vectors(ra, dec):
    import numpy as np

    r, d = np.radians(ra), np.radians(dec)
    return np.stack([np.cos(d) * np.cos(r), np.cos(d) * np.sin(r), np.sin(d)], axis=-1)


def _footprint(m: _Mosaic):
    """``(centre unit vector, chord radius)`` of a cap holding the mosaic: its centre pixel and the farthest
    of 40 points along its edges, with 1% to spare; the whole sky where the WCS gives no position there."""
    import numpy as np

    ny, nx = m.shape
    t = np.linspace(0.0, 1.0, 10)
    bx = np.concatenate([t * nx, t * nx, np.zeros_like(t), np.full_like(t, nx)]) - 0.5
    by = np.concatenate([np.zeros_like(t), np.full_like(t, ny), t * ny, t * ny]) - 0.5
    with warnings.catch_warnings(), np.errstate(invalid="ignore"):
        warnings.simplefilter("ignore")  # points off an all-sky projection come back NaN with a warning
        edge = m.wcs.pixel_to_world(bx, by).icrs
        centre = m.wcs.pixel_to_world((nx - 1) / 2.0, (ny - 1) / 2.0).icrs
    c = _unit_vectors(centre.ra.deg, centre.dec.deg)
    e = _unit_vectors(edge.ra.deg, edge.dec.deg)
    if not (np.isfinite(c).all() and np.isfinite(e).all()):
        return np.array([0.0, 0.0, 1.0]), 2.1
    return c, float(np.linalg.norm(e - c, axis=1).max()) * 1.01 + 1e-9


def pixel_positions(m: _Mosaic, ra, dec):
    """Zero-based ``(x, y)`` pixel positions of ICRS ``ra``, ``dec`` (degrees) in mosaic ``m``."""
    import astropy.units as u
    import numpy as np
    from astropy.coordinates import SkyCoord

    with warnings.catch_warnings(), np.errstate(invalid="ignore"):
        warnings.simplefilter("ignore")  # positions beyond the projection's edge come back NaN
        x, y = m.wcs.world_to_pixel(SkyCoord(ra * u.deg, dec * u.deg, frame="icrs"))
    return np.asarray(x, float), np.asarray(y, float)


def whole_cutout(x, y, size: int, shape: tuple[int, int]):
    """Whether the SIZE x SIZE cutout at ``(x, y)`` lies wholly inside an image of ``shape`` (ny, nx): the
    first pixel is ``ceil(x - size / 2)``, as :func:`astropy.nddata.utils.overlap_slices` places it
    (the tasks cut in its strict mode when partial cutouts are set aside, which checks this decision)."""
    import numpy as np

    x0, y0 = np.ceil(x - size / 2.0), np.ceil(y - size / 2.0)
    return (x0 >= 0) & (y0 >= 0) & (x0 + size <= shape[1]) & (y0 + size <= shape[0])


@dataclass
class _Match:
    mosaic: np.ndarray  # per catalogue row: index of its mosaic, -1 for none
    full: np.ndarray  # bool: the whole cutout lies in that mosaic
    x: np.ndarray
    y: np.ndarray


def match(cat: _Catalog, mosaics: list[_Mosaic], size: int) -> _Match:
    """Assign each catalogue row not already set aside to the first mosaic (in the given order) holding its
    whole cutout, else to the first holding its centre pixel."""
    import numpy as np
    from scipy.spatial import cKDTree  # scipy comes with scikit-learn (and astropy uses it for the same)

    n = len(cat)
    result = _Match(np.full(n, -1, np.int64), np.zeros(n, bool), np.full(n, np.nan), np.full(n, np.nan))
    todo = np.array([i for i in range(n) if i not in cat.reasons], dtype=np.int64)
    if not len(todo):
        return result
    tree = cKDTree(_unit_vectors(cat.ra[todo], cat.dec[todo]))
    for k, m in enumerate(mosaics):
        centre, radius = _footprint(m)
        near = todo[np.asarray(tree.query_ball_point(centre, radius), dtype=np.int64)]
        if not len(near):
            continue
        near.sort()
        x, y = pixel_positions(m, cat.ra[near], cat.dec[near])
        ny, nx = m.shape
        with np.errstate(invalid="ignore"):
            inside = (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)
        rows, x, y = near[inside], x[inside], y[inside]
        full = whole_cutout(x, y, size, m.shape)
        take = (result.mosaic[rows] < 0) | (~result.full[rows] & full)
        rows = rows[take]
        result.mosaic[rows], result.full[rows], result.x[rows], result.y[rows] = k, full[take], x[take], y[take]
    return result


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Piece:
    """Catalogue rows to cut from one mosaic by one Ray task."""

    mosaic: int
    rows: np.ndarray  # catalogue rows, ascending
    x: np.ndarray
    y: np.ndarray


@dataclass
class _Plan:
    spec: st.StampSpec
    catalog: _Catalog
    mosaics: list[_Mosaic]
    found: int  # mosaics listed under --images
    pieces: list[_Piece]
    reasons: dict[int, str]  # catalogue row -> reason, for rows set aside before cutting


def _piece_rows(size: int) -> int:
    return max(1, PIECE_BYTES // (4 * size * size))


def plan(s: CutoutSettings) -> _Plan:
    """Read the catalogue and the mosaics' headers, match rows to mosaics and cut the work into pieces."""
    import numpy as np

    from . import table as st

    cat = read_catalog(s)
    listed = list_mosaics(s.images)
    mosaics = read_headers(listed, s.hdu)
    m = match(cat, mosaics, s.size)
    reasons = dict(cat.reasons)
    for i in np.nonzero(m.mosaic < 0)[0]:
        reasons.setdefault(int(i), f"outside: no mosaic contains ra={cat.ra[i]:.6f},dec={cat.dec[i]:.6f}")
    if s.partial == "set-aside":
        for i in np.nonzero((m.mosaic >= 0) & ~m.full)[0]:
            mo = mosaics[m.mosaic[i]]
            reasons[int(i)] = (f"partial: the {s.size}x{s.size} cutout at x={m.x[i]:.2f},y={m.y[i]:.2f} runs off "
                               f"{mo.name} ({mo.shape[1]}x{mo.shape[0]} pixels); pass --partial pad to keep it "
                               f"NaN-padded")
    cut = np.array(sorted(set(np.nonzero(m.mosaic >= 0)[0].tolist()) - set(reasons)), dtype=np.int64)
    step = _piece_rows(s.size)
    pieces = []
    for k in range(len(mosaics)):
        rows = cut[m.mosaic[cut] == k]
        pieces += [_Piece(k, rows[a:a + step], m.x[rows[a:a + step]], m.y[rows[a:a + step]])
                   for a in range(0, len(rows), step)]
    spec = st.StampSpec((1, s.size, s.size), cat.classes, f"cutouts of {s.images} at {s.catalog}")
    return _Plan(spec, cat, mosaics, len(listed), pieces, reasons)


# --------------------------------------------------------------------------------------------------
# One piece, inside its Ray task
# --------------------------------------------------------------------------------------------------
def _image_data(hdul, m_hdu: int, naxis: int, lazy: bool):
    """The 2-D image to cut from: a lazy section where the file allows it (uncompressed or tile-compressed),
    else the array (a gzipped file is decompressed once rather than on every seek)."""
    hdu = hdul[m_hdu]
    data = hdu.section if lazy else hdu.data
    if naxis > 2:  # degenerate axes (radio cubes of one frequency and Stokes): read the one plane
        data = data[(0,) * (naxis - 2) + (slice(None), slice(None))]
    return data


def cut_piece(path: str, hdu: int, naxis: int, size: int, pad: bool, pad_value: float, x, y) -> dict:
    """Ray task: cut SIZE x SIZE stamps at zero-based ``(x, y)`` from one mosaic.

    Returns ``images`` (n, 1, size, size) float32, ``nonfinite`` (per stamp, NaN or inf pixels of the mosaic
    inside it), ``padded`` (pixels off the mosaic, set to ``pad_value``) and ``errors`` (stamp -> why its
    pixels could not be read: the mosaic cannot be opened, or is truncated there).
    """
    import numpy as np
    from astropy.nddata import Cutout2D
    from astropy.nddata.utils import NoOverlapError, PartialOverlapError

    n = len(x)
    images = np.zeros((n, 1, size, size), np.float32)
    nonfinite, padded = np.zeros(n, np.int64), np.zeros(n, np.int64)
    errors: dict[int, str] = {}
    unreadable = (OSError, ValueError, EOFError, IndexError, TypeError)  # astropy's kinds for damaged files
    lazy = not _is_uri(path) and not path.lower().endswith(".gz")  # a URI is read whole: one request
    inside = np.zeros((size, size), bool)
    try:
        with _truncation_unsaid(), _open_fits(path, whole=_is_uri(path)) as hdul:
            data = _image_data(hdul, hdu, naxis, lazy)
            # Cutout2D pads with fill_value in the data's dtype: an integer image takes 0, replaced below.
            fill = np.nan if np.asarray(data[0:1, 0:1]).dtype.kind == "f" else 0
            for i in range(n):
                try:
                    c = Cutout2D(data, (float(x[i]), float(y[i])), size, mode="partial" if pad else "strict",
                                 fill_value=fill)
                    img = images[i, 0]
                    img[...] = c.data
                except (PartialOverlapError, NoOverlapError):
                    raise  # the driver sent a cutout that does not fit: a bug, not a bad file
                except unreadable as e:
                    errors[i] = f"{type(e).__name__}: {e}"
                    continue
                inside[...] = False
                inside[c.slices_cutout] = True
                nonfinite[i] = int((~np.isfinite(img[inside])).sum())
                padded[i] = size * size - int(inside.sum())
                img[~inside] = pad_value
    except (PartialOverlapError, NoOverlapError):
        raise
    except unreadable as e:
        errors = {i: f"{type(e).__name__}: {e}" for i in range(n)}
    return {"images": images, "nonfinite": nonfinite, "padded": padded, "errors": errors}


# --------------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------------
def _get(ref):
    import ray

    try:
        return ray.get(ref, timeout=GET_S)
    except ray.exceptions.RayTaskError as e:
        if isinstance(getattr(e, "cause", None), CutoutError):
            raise CutoutError(str(e.cause)) from None
        raise


def _run(s: CutoutSettings, p: _Plan, progress: Progress) -> Iterator[tuple[_Piece, dict]]:
    """Yield ``(piece, result)`` in plan order. Pieces are written in order, so one slow piece keeps those
    after it waiting: at most ``window`` pieces (enough to keep every CPU busy), and ``HELD_BYTES`` of stamps,
    are running or finished and not yet yielded, which bounds what the driver holds."""
    import ray

    from .runtime import cluster_cpus

    task = ray.remote(num_cpus=TASK_CPUS, max_retries=3)(cut_piece)
    window = max(2, int(2 * cluster_cpus() / TASK_CPUS))
    pad_value = float("nan") if s.pad_value is None else float(s.pad_value)
    pending: dict = {}  # ref -> piece index
    done: dict[int, dict] = {}
    submit = emit = held = 0  # held: bytes of the stamps of pieces submitted and not yet yielded
    stamp_bytes = 4 * s.size * s.size
    last = time.time()
    try:
        while emit < len(p.pieces):
            while (submit < len(p.pieces) and len(pending) + len(done) < window
                   and (held < HELD_BYTES or not (pending or done))):
                piece, m = p.pieces[submit], p.mosaics[p.pieces[submit].mosaic]
                pending[task.remote(m.path, m.hdu, m.naxis, s.size, s.partial == "pad", pad_value,
                                    piece.x, piece.y)] = submit
                held += len(piece.rows) * stamp_bytes
                submit += 1
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=WAIT_S)
            for ref in ready:
                done[pending.pop(ref)] = _get(ref)
                last = time.time()
            while emit in done:
                result = done.pop(emit)
                held -= len(p.pieces[emit].rows) * stamp_bytes
                yield p.pieces[emit], result
                progress.update(1, len(p.pieces[emit].rows) - len(result["errors"]))
                emit += 1
            if time.time() - last > STALL_S:
                logger.warning("cutout: no task finished in the last %.0f min (%d running); check that the Ray "
                               "cluster has free CPUs ('ray status')", STALL_S / 60, len(pending))
                last = time.time()
    except BaseException as e:
        from .runtime import end_tasks

        end_tasks(pending, e)  # a failed cutout leaves no task running on a shared cluster
        raise


def _write_piece(writer: st.StampWriter, s: CutoutSettings, p: _Plan, piece: _Piece, result: dict) -> None:
    """Write one piece's stamps; set aside its unreadable or non-finite ones."""
    import numpy as np
    import pyarrow as pa

    from . import table as st

    cat, m = p.catalog, p.mosaics[piece.mosaic]
    assert s.partial == "pad" or not result["padded"].any(), "a cutout sent as whole came back padded"
    bad = result["nonfinite"] > 0
    for j, why in result["errors"].items():
        bad[j] = True
        r = int(piece.rows[j])
        writer.set_aside(cat.ids[r], cat.path, r, f"unreadable: {m.name}: its pixels cannot be read ({why})")
    for j in np.nonzero(result["nonfinite"] > 0)[0]:
        r, count = int(piece.rows[j]), int(result["nonfinite"][j])
        if s.nonfinite == "fail":
            raise CutoutError(f"{m.name}: the cutout of {cat.ids[r]!r} ({cat.path} row {r}) holds {count} non-finite "
                              f"pixels (NaN or inf); pass --nonfinite set-aside to set such rows aside")
        writer.set_aside(cat.ids[r], cat.path, r, f"nonfinite: {count} non-finite pixels (NaN or inf) of {m.name}")
    keep = np.nonzero(~bad)[0]
    if not len(keep):
        return
    rows = piece.rows[keep]
    labels = None
    if cat.labels is not None:
        lab = cat.labels[rows]
        labels = pa.array(lab, type=pa.int64(), mask=lab < 0)
    meta = {"ra": cat.ra[rows], "dec": cat.dec[rows], "mosaic": [m.name] * len(rows), "x": piece.x[keep],
            "y": piece.y[keep], **{k: v[rows] for k, v in cat.metadata.items()}}
    split = [cat.split[r] for r in rows] if cat.split is not None else None
    writer.write(st.make_table(p.spec, [cat.ids[r] for r in rows], result["images"][keep], labels, meta, split))


def _check_out(s: CutoutSettings) -> None:
    """Refuse to replace a finished stamp table without ``overwrite`` (a killed run's files are replaced)."""
    from . import table as st

    why = st.not_a_stamp_manifest(s.out)
    if why:
        raise CutoutError(f"--out {s.out} is not a stamp table stampray wrote ({why}), so nothing in it is "
                          f"replaced; choose a new or empty directory")
    if not s.overwrite and st.exists(st.join(s.out, st.MANIFEST_NAME)):
        raise CutoutError(f"--out {s.out} already holds a stamp table; pass --overwrite to replace it, or choose "
                          f"another --out")


def cutout(settings: CutoutSettings) -> CutoutResult:
    """Cut stamps from the mosaics ``settings.images`` at the positions of ``settings.catalog`` into a stamp
    table at ``settings.out`` (see the module docstring).

    Raises
    ------
    CutoutError
        For problems of a whole input (a missing file, a catalogue without id,ra,dec, a mosaic without a
        usable header or WCS, non-finite pixels under ``nonfinite="fail"``). Row problems are set aside.
    """
    from . import table as st
    from .lock import output_lock

    t0 = time.time()
    images_is_dir = not settings.images.lower().endswith(FITS_SUFFIXES)
    st.check_separate(settings.out, {"--images": settings.images}, files=not images_is_dir)
    st.check_separate(settings.out, {"--catalog": settings.catalog}, files=True)
    with output_lock(settings.out, "cutout", scratch=(st.WRITER_MARK,)):
        from .replace import pending, roll_forward

        if pending(settings.out):  # a replacement a kill interrupted: finished first, so --overwrite is asked
            roll_forward(settings.out)
        _check_out(settings)
        p = plan(settings)
        from .replace import replacing

        with replacing(settings.out) as target:  # a table already there is replaced once the new one is complete
            writer = st.StampWriter(target, p.spec, settings.shard_rows, settings={"cutout": asdict(settings)})
            for row, reason in sorted(p.reasons.items()):
                writer.set_aside(p.catalog.ids[row], p.catalog.path, row, reason)
            if p.pieces:
                from .runtime import ray_session

                with ray_session(settings.address):
                    progress = Progress("cutout", len(p.pieces), settings.progress, unit="tasks")
                    # closing: a failed write stops the generator at once, which cancels the tasks still running
                    with contextlib.closing(_run(settings, p, progress)) as results:
                        try:
                            for piece, result in results:
                                _write_piece(writer, settings, p, piece, result)
                        finally:
                            progress.close()
            writer.errors.sort(key=lambda e: e["row"])  # the _errors table in catalogue order
            manifest = writer.close()
        if target != settings.out:
            manifest = st.read_manifest(settings.out)
    assert manifest.num_rows + len(writer.errors) == len(p.catalog), "a catalogue row was neither cut nor set aside"
    return CutoutResult(manifest, len(p.catalog), p.found, len({pc.mosaic for pc in p.pieces}), len(p.pieces),
                        time.time() - t0)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def summary(settings: CutoutSettings, r: CutoutResult) -> str:
    """The verb's closing line: what was written where, the counts, the time."""
    aside = sum(r.set_aside.values())
    detail = ", ".join(f"{k} {v}" for k, v in sorted(r.set_aside.items())) or "none"
    return (f"cutout: {r.rows_in} catalogue rows, {r.mosaics} mosaics ({r.mosaics_used} used, {r.tasks} tasks); "
            f"wrote {r.stamps} stamps {r.manifest.spec.shape} into {len(r.manifest.shards)} shards at "
            f"{settings.out}; set aside {aside} ({detail})" + (f", listed in {settings.out}/_errors" if aside else "")
            + f"; classes {list(r.manifest.spec.class_names)}; {r.seconds:.1f} s")

