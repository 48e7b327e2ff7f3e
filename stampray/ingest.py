"""Convert survey and course stamp files into a stamp table: ``stampray ingest``.

Source forms (exactly one per call):

* ``class_files``: one array file per class (``noise=stamps_noise.npy source=stamps_sources.npy``);
* ``images`` (+ ``labels``): one images array and one labels array, as two ``.npy`` files or two keys of
  one ``.npz``;
* ``hdf5``: named datasets for images and labels (the jet images: ``images`` (N,20,20), ``labels`` (N,));
* ``fits``: a directory of FITS cutouts and a CSV catalogue ``file,label[,id,metadata...]``;
* ``pickle``: refused unless ``allow_pickle`` is set, because unpickling runs code from the file.

Image arrays may be (N,H,W), channels-last (N,H,W,C), channels-first (N,C,H,W) or flat square (N,H*W).
Arrays are read in chunks (``.npy`` memory-mapped, ``.npz`` members streamed, HDF5 sliced), so memory stays
bounded by the chunk size whatever the file size. Rows that cannot be used are set aside in the dataset's
``_errors`` table with their reason and counted; nothing is dropped silently.
"""

from __future__ import annotations

import csv
import os
import time
import zipfile
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa

from . import table as st

LAYOUTS = ("auto", "nchw", "nhwc", "nhw", "flat")
NONFINITE = ("set-aside", "fail")


@dataclass(frozen=True)
class IngestSettings:
    """Settings of ``stampray ingest``; see ``stampray ingest --help``."""

    out: str
    class_files: tuple[tuple[str, str], ...] = ()
    images: str | None = None
    labels: str | None = None
    images_key: str = "images"
    labels_key: str = "labels"
    ids_key: str | None = None
    hdf5: str | None = None
    fits: str | None = None
    catalog: str | None = None
    size: int | None = None
    pickle: str | None = None
    allow_pickle: bool = False
    classes: tuple[str, ...] = ()
    split: str | None = None
    layout: str = "auto"
    nonfinite: str = "set-aside"
    shard_rows: int = 50_000
    chunk_rows: int = 8192
    id_prefix: str | None = None

    def __post_init__(self):
        forms = [bool(self.class_files), bool(self.images), bool(self.hdf5), bool(self.fits), bool(self.pickle)]
        if sum(forms) != 1:
            msg = ("give exactly one source form: --class NAME=FILE ..., --images FILE [--labels FILE], "
                   "--hdf5 FILE, --fits DIR --catalog CSV, or --pickle FILE --allow-pickle")
            raise ValueError(msg)
        if self.fits and not self.catalog:
            msg = "--fits DIR needs --catalog CSV (columns file,label[,id,metadata...])"
            raise ValueError(msg)
        if self.layout not in LAYOUTS:
            msg = f"--layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}"
            raise ValueError(msg)
        if self.nonfinite not in NONFINITE:
            msg = f"--nonfinite must be one of {', '.join(NONFINITE)}, got {self.nonfinite!r}"
            raise ValueError(msg)
        if self.split is not None and self.split not in st.SPLIT_NAMES:
            msg = f"--split must be one of {', '.join(st.SPLIT_NAMES)}, got {self.split!r}"
            raise ValueError(msg)
        if self.size is not None and int(self.size) <= 0:
            msg = f"--size must be a positive integer, got {self.size!r}"
            raise ValueError(msg)
        for name in ("shard_rows", "chunk_rows"):
            if int(getattr(self, name)) <= 0:
                msg = f"{name} must be a positive integer, got {getattr(self, name)!r}"
                raise ValueError(msg)


class IngestError(ValueError):
    """A problem with the input that stops the whole ingest (the message names the file and the fix)."""


# --------------------------------------------------------------------------------------------------
# Reading arrays in bounded memory
# --------------------------------------------------------------------------------------------------
def _refuse_pickle(path: str) -> IngestError:
    return IngestError(
        f"refusing to unpickle {path}: loading a pickle runs arbitrary code stored in the file. "
        f"If you trust where it came from, pass --allow-pickle; better, convert it once to .npy/.npz/HDF5")


class _StreamedNpy:
    """A ``.npy`` member of an ``.npz`` archive read sequentially, chunk by chunk."""

    def __init__(self, path: str, key: str):
        self.path, self.key = path, key
        self._zip = zipfile.ZipFile(path)
        name = key if key.endswith(".npy") else key + ".npy"
        if name not in self._zip.namelist():
            keys = ", ".join(n[:-4] for n in self._zip.namelist() if n.endswith(".npy"))
            raise IngestError(f"{path} has no array {key!r}; it holds: {keys}")
        self._name = name
        with self._zip.open(name) as f:
            self.shape, self.fortran, self.dtype = self._header(f)
        if self.dtype.hasobject:
            raise _refuse_pickle(f"{path}[{key}]")

    @staticmethod
    def _header(f):
        version = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return reader(f)

    def __len__(self):
        return self.shape[0]

    def chunks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        if self.fortran:
            raise IngestError(f"{self.path}[{self.key}] is stored in Fortran order and cannot be streamed; "
                              f"save it with np.savez(..., np.ascontiguousarray(a))")
        row_shape = self.shape[1:]
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * self.dtype.itemsize
        with self._zip.open(self._name) as f:
            self._header(f)
            for start in range(0, self.shape[0], rows):
                n = min(rows, self.shape[0] - start)
                buf = f.read(n * row_bytes)
                yield start, np.frombuffer(buf, dtype=self.dtype).reshape(n, *row_shape)

    def read_all(self) -> np.ndarray:
        parts = [a for _, a in self.chunks(1 << 20)]
        return np.concatenate(parts) if parts else np.zeros(self.shape, self.dtype)


class _Sliced:
    """An array that supports row slicing without loading it (np.memmap, h5py dataset, ndarray)."""

    def __init__(self, arr, path: str):
        self.arr, self.path = arr, path
        self.shape, self.dtype = tuple(arr.shape), np.dtype(arr.dtype)

    def __len__(self):
        return self.shape[0]

    def chunks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, self.shape[0], rows):
            yield start, np.asarray(self.arr[start:start + rows])

    def read_all(self) -> np.ndarray:
        return np.asarray(self.arr[:])


def _open_npy(path: str):
    if not os.path.exists(path):
        raise IngestError(f"{path} does not exist")
    try:
        return _Sliced(np.load(path, mmap_mode="r", allow_pickle=False), path)
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise _refuse_pickle(path) from None
        raise IngestError(f"{path} is not a readable .npy file: {e}") from None


def _open_array(path: str, key: str | None, allow_pickle: bool = False):
    """Open ``path`` (.npy, .npz with ``key``, or a pickle when allowed) for chunked reading."""
    if not os.path.exists(path):
        raise IngestError(f"{path} does not exist")
    if path.endswith(".npz"):
        return _StreamedNpy(path, key or "")
    if path.endswith(".npy"):
        return _open_npy(path)
    if path.endswith((".pkl", ".pickle", ".p")):
        return _Sliced(np.asarray(_load_pickle(path, allow_pickle)), path)
    raise IngestError(f"{path}: unknown array format; use .npy or .npz (or .pkl with --allow-pickle)")


def _load_pickle(path: str, allow_pickle: bool):
    if not allow_pickle:
        raise _refuse_pickle(path)
    import pickle  # only reached with the user's explicit --allow-pickle

    with open(path, "rb") as f:
        return pickle.load(f)  # noqa: S301 - explicit opt-in


# --------------------------------------------------------------------------------------------------
# Layout, labels, ids
# --------------------------------------------------------------------------------------------------
def image_layout(shape: tuple[int, ...], layout: str, path: str) -> tuple[str, tuple[int, int, int]]:
    """Decide how to read (N, ...) images and return ``(layout, (C, H, W))``."""
    rest = tuple(int(s) for s in shape[1:])
    if layout == "auto":
        if len(rest) == 2:
            layout = "nhw"
        elif len(rest) == 1:
            layout = "flat"
        elif len(rest) == 3:
            a, b, c = rest
            if c <= 4 < a:
                layout = "nhwc"
            elif a <= 4 < c:
                layout = "nchw"
            else:
                raise IngestError(f"{path}: cannot tell channels from image axes in shape {shape}; "
                                  f"pass --layout nchw or --layout nhwc")
        else:
            raise IngestError(f"{path}: images must have 2 to 4 axes (N,H,W), (N,H,W,C), (N,C,H,W) "
                              f"or (N,H*W); got shape {shape}")
    if layout == "nhw" and len(rest) == 2:
        return layout, (1, rest[0], rest[1])
    if layout == "nchw" and len(rest) == 3:
        return layout, rest
    if layout == "nhwc" and len(rest) == 3:
        return layout, (rest[2], rest[0], rest[1])
    if layout == "flat" and len(rest) == 1:
        side = int(round(rest[0] ** 0.5))
        if side * side != rest[0]:
            raise IngestError(f"{path}: flat images of {rest[0]} pixels are not square; "
                              f"reshape them to (N,H,W) before ingesting")
        return layout, (1, side, side)
    raise IngestError(f"{path}: --layout {layout} does not fit images of shape {shape}")


def to_nchw(chunk: np.ndarray, layout: str, shape: tuple[int, int, int]) -> np.ndarray:
    """One chunk of raw images to native-endian float32 (n, C, H, W)."""
    chunk = np.moveaxis(chunk, -1, 1) if layout == "nhwc" else chunk.reshape(len(chunk), *shape)
    return np.ascontiguousarray(chunk, dtype=np.float32)  # also swaps big-endian input to native


def map_labels(raw: np.ndarray | None, classes: tuple[str, ...], path: str):
    """Return ``(class_names, labels int64 with -1 for null, bad-row reasons dict)``."""
    if raw is None:
        return tuple(classes), None, {}
    raw = np.asarray(raw)
    if raw.ndim == 2 and raw.shape[1] > 1 and np.isin(raw, (0, 1)).all() and (raw.sum(axis=1) == 1).all():
        raw = raw.argmax(axis=1)  # one-hot rows, as the Keras notebooks store them
    if raw.ndim != 1:
        raise IngestError(f"{path}: labels must be one value per stamp, got shape {raw.shape}")
    bad: dict[int, str] = {}
    if raw.dtype.kind in "USO":
        values = raw.astype(str)
        names = tuple(classes) if classes else tuple(sorted(set(values.tolist())))
        lookup = {n: i for i, n in enumerate(names)}
        out = np.array([lookup.get(v, -2) for v in values.tolist()], dtype=np.int64)
        for i in np.nonzero(out == -2)[0]:
            bad[int(i)] = f"label: {str(values[i])!r} is not one of the classes ({', '.join(names)})"
        return names, out, bad
    if raw.dtype.kind == "f":
        null = np.isnan(raw)
        if (raw[~null] != np.round(raw[~null])).any():
            i = int(np.nonzero(~null & (raw != np.round(raw)))[0][0])
            raise IngestError(f"{path}: labels must be integers or class names; row {i} holds {raw[i]!r}")
        out = np.where(null, -1, raw).astype(np.int64)
    elif raw.dtype.kind in "iub":
        null = np.zeros(len(raw), bool)
        out = raw.astype(np.int64)
    else:
        raise IngestError(f"{path}: labels of dtype {raw.dtype} are neither integers nor class names")
    valid = out[~null]
    names = tuple(classes) if classes else tuple(str(i) for i in range(int(valid.max(initial=-1)) + 1))
    out_of_range = ~null & ((out < 0) | (out >= len(names)))
    for i in np.nonzero(out_of_range)[0]:
        bad[int(i)] = f"label: {int(out[i])} is outside the class list 0..{len(names) - 1} ({', '.join(names)})"
    out[null] = -1
    return names, out, bad


# --------------------------------------------------------------------------------------------------
# The common validation and writing loop
# --------------------------------------------------------------------------------------------------
@dataclass
class _Chunk:
    source: str
    row0: int
    images: np.ndarray  # (n, C, H, W) float32
    ids: list[str]
    labels: np.ndarray | None  # int64, -1 = null, -2 = invalid (see bad)
    bad: dict[int, str] = field(default_factory=dict)  # row within chunk -> reason
    metadata: dict[str, np.ndarray] = field(default_factory=dict)


class _Ingester:
    def __init__(self, settings: IngestSettings, spec: st.StampSpec):
        self.settings, self.spec = settings, spec
        self.writer = st.StampWriter(settings.out, spec, settings.shard_rows,
                                     settings={"ingest": _jsonable(asdict(settings))})
        self.seen: dict[str, str] = {}
        self.rows_in = 0

    def add(self, chunk: _Chunk) -> None:
        n = len(chunk.images)
        self.rows_in += n
        reasons: dict[int, str] = dict(chunk.bad)
        finite = np.isfinite(chunk.images).all(axis=(1, 2, 3))
        for i in np.nonzero(~finite)[0]:
            count = int((~np.isfinite(chunk.images[i])).sum())
            where = f"{chunk.source} row {chunk.row0 + int(i)}"
            if self.settings.nonfinite == "fail":
                raise IngestError(f"{where} has {count} non-finite pixels (NaN or inf); pass "
                                  f"--nonfinite set-aside to set such rows aside, or repair the input")
            reasons.setdefault(int(i), f"nonfinite: {count} non-finite pixels (NaN or inf)")
        for i, sid in enumerate(chunk.ids):
            first = self.seen.get(sid)
            if first is not None:
                reasons.setdefault(i, f"duplicate_id: {sid!r} already used by {first}")
            elif i not in reasons:
                self.seen[sid] = f"{chunk.source} row {chunk.row0 + i}"
        for i, reason in sorted(reasons.items()):
            self.writer.set_aside(chunk.ids[i], chunk.source, chunk.row0 + i, reason)
        keep = np.ones(n, bool)
        keep[list(reasons)] = False
        if not keep.any():
            return
        idx = np.nonzero(keep)[0]
        labels = None
        if chunk.labels is not None:
            lab = chunk.labels[idx]
            labels = pa.array(lab, type=pa.int64(), mask=lab < 0)
        split = [self.settings.split] * len(idx) if self.settings.split else None
        tbl = st.make_table(self.spec, [chunk.ids[i] for i in idx], chunk.images[idx], labels,
                            {k: v[idx] for k, v in chunk.metadata.items()}, split=split)
        self.writer.write(tbl)


def _jsonable(d):
    if isinstance(d, dict):
        return {k: _jsonable(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_jsonable(v) for v in d]
    return d


def _stem(path: str) -> str:
    base = os.path.basename(path.rstrip("/"))
    return base.split(".")[0] or base


def _ids(prefix: str, start: int, n: int) -> list[str]:
    return [f"{prefix}-{i:09d}" for i in range(start, start + n)]


def _array_chunks(arr, layout: str, shape, rows: int, source: str, prefix: str, labels, bad,
                  ids=None, metadata=None) -> Iterator[_Chunk]:
    for start, raw in arr.chunks(rows):
        n = len(raw)
        sl = slice(start, start + n)
        yield _Chunk(
            source=source, row0=start, images=to_nchw(raw, layout, shape),
            ids=np.asarray(ids[sl]).astype(str).tolist() if ids is not None else _ids(prefix, start, n),
            labels=None if labels is None else labels[sl],
            bad={i - start: r for i, r in bad.items() if start <= i < start + n},
            metadata={k: v[sl] for k, v in (metadata or {}).items()},
        )


def _check_same_shape(shapes: dict[str, tuple], paths_msg: str) -> tuple[int, int, int]:
    distinct = set(shapes.values())
    if len(distinct) > 1:
        detail = "; ".join(f"{p}: {s}" for p, s in shapes.items())
        raise IngestError(f"stamps of one dataset must share one shape, but {paths_msg} differ ({detail}); "
                          f"ingest them into separate datasets or resample them first")
    return distinct.pop()


def _extra_columns(names_and_arrays: dict, n: int, taken: set[str]) -> dict[str, np.ndarray]:
    """1-D arrays of N values beside the images pass through as metadata columns."""
    out = {}
    for name, arr in names_and_arrays.items():
        if name in taken or name in st.CORE_COLUMNS or name == st.SPLIT:
            continue
        if len(arr.shape) == 1 and arr.shape[0] == n and arr.dtype.kind in "iufbUS":
            out[name] = np.asarray(arr[:])
            if out[name].dtype.kind == "S":
                out[name] = out[name].astype(str)
    return out


# --------------------------------------------------------------------------------------------------
# Source forms
# --------------------------------------------------------------------------------------------------
def _plan_class_files(s: IngestSettings):
    names = [n for n, _ in s.class_files]
    classes = tuple(s.classes) if s.classes else tuple(names)
    missing = [n for n in names if n not in classes]
    if missing:
        raise IngestError(f"--class names {missing} are not in --classes {','.join(classes)}")
    arrays, layouts = [], {}
    for name, path in s.class_files:
        arr = _open_array(path, s.images_key, s.allow_pickle)
        layout, shape = image_layout(arr.shape, s.layout, path)
        arrays.append((name, path, arr, layout, shape))
        layouts[path] = shape
    shape = _check_same_shape(layouts, "the --class files")

    def chunks():
        for name, path, arr, layout, shp in arrays:
            labels = np.full(len(arr), classes.index(name), dtype=np.int64)
            prefix = s.id_prefix + "-" + _stem(path) if s.id_prefix else _stem(path)
            yield from _array_chunks(arr, layout, shp, s.chunk_rows, path, prefix, labels, {})

    return st.StampSpec(shape, classes, "class files: " + ", ".join(p for _, p in s.class_files)), chunks()


def _plan_arrays(s: IngestSettings, images, labels_raw, ids, metadata, source: str, path: str):
    layout, shape = image_layout(images.shape, s.layout, path)
    if labels_raw is not None and len(labels_raw) != len(images):
        raise IngestError(f"{source}: {len(images)} images but {len(labels_raw)} labels; "
                          f"the two arrays must have one entry per stamp")
    if ids is not None and len(ids) != len(images):
        raise IngestError(f"{source}: {len(images)} images but {len(ids)} ids")
    classes, labels, bad = map_labels(labels_raw, tuple(s.classes), source)
    prefix = s.id_prefix or _stem(path)
    return (st.StampSpec(shape, classes, source),
            _array_chunks(images, layout, shape, s.chunk_rows, path, prefix, labels, bad, ids, metadata))


def _plan_images(s: IngestSettings):
    if s.images.endswith(".npz"):
        images = _StreamedNpy(s.images, s.images_key)
        with zipfile.ZipFile(s.images) as z:
            keys = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
        labels_raw = None
        if s.labels:
            labels_raw = _open_array(s.labels, s.labels_key, s.allow_pickle).read_all()
        elif s.labels_key in keys:
            labels_raw = _StreamedNpy(s.images, s.labels_key).read_all()
        ids = _StreamedNpy(s.images, s.ids_key).read_all().astype(str) if s.ids_key else None
        others = {k: _StreamedNpy(s.images, k) for k in keys if k not in (s.images_key, s.labels_key, s.ids_key)}
        meta = {k: a.read_all() for k, a in others.items() if len(a.shape) == 1 and a.shape[0] == len(images)}
        meta = _extra_columns(meta, len(images), set())
        return _plan_arrays(s, images, labels_raw, ids, meta, s.images, s.images)
    images = _open_array(s.images, s.images_key, s.allow_pickle)
    labels_raw = _open_array(s.labels, s.labels_key, s.allow_pickle).read_all() if s.labels else None
    source = s.images + (f" + {s.labels}" if s.labels else "")
    return _plan_arrays(s, images, labels_raw, None, {}, source, s.images)


def _plan_hdf5(s: IngestSettings):
    try:
        import h5py
    except ImportError:  # pragma: no cover - h5py is a core dependency
        raise IngestError("HDF5 input needs h5py: pip install h5py") from None
    if not os.path.exists(s.hdf5):
        raise IngestError(f"{s.hdf5} does not exist")
    f = h5py.File(s.hdf5, "r")
    if s.images_key not in f:
        raise IngestError(f"{s.hdf5} has no dataset {s.images_key!r}; it holds: {', '.join(f.keys())}; "
                          f"name the images with --images-key")
    images = _Sliced(f[s.images_key], s.hdf5)
    labels_raw = np.asarray(f[s.labels_key][:]) if s.labels_key in f else None
    if labels_raw is not None and labels_raw.dtype.kind == "S":
        labels_raw = labels_raw.astype(str)
    ids = np.asarray(f[s.ids_key][:]).astype(str) if s.ids_key else None
    datasets = {k: f[k] for k in f.keys() if isinstance(f[k], h5py.Dataset)}
    meta = _extra_columns(datasets, len(images), {s.images_key, s.labels_key, s.ids_key or ""})
    return _plan_arrays(s, images, labels_raw, ids, meta, s.hdf5, s.hdf5)


def _plan_pickle(s: IngestSettings):
    obj = _load_pickle(s.pickle, s.allow_pickle)
    labels_raw = None
    if isinstance(obj, dict):
        if s.images_key not in obj:
            raise IngestError(f"{s.pickle} holds a dict without key {s.images_key!r} (keys: {', '.join(map(str, obj))})")
        images, labels_raw = obj[s.images_key], obj.get(s.labels_key)
    elif isinstance(obj, (tuple, list)) and len(obj) == 2 and np.ndim(obj[0]) >= 2:
        images, labels_raw = obj
    else:
        images = obj
    if s.labels:
        labels_raw = _open_array(s.labels, s.labels_key, s.allow_pickle).read_all()
    images = _Sliced(np.asarray(images), s.pickle)
    labels_raw = None if labels_raw is None else np.asarray(labels_raw)
    return _plan_arrays(s, images, labels_raw, None, {}, s.pickle, s.pickle)


def _fit_size(img: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop or pad (with the cutout's median) a (C, H, W) cutout to (C, size, size)."""
    c, h, w = img.shape
    fill = np.nanmedian(img) if np.isfinite(img).any() else 0.0
    out = np.full((c, size, size), fill, dtype=np.float32)
    # crop: take the central window of the source; pad: place the source in the centre of the output
    sy, sx = max(0, (h - size) // 2), max(0, (w - size) // 2)
    dy, dx = max(0, (size - h) // 2), max(0, (size - w) // 2)
    ch, cw = min(h, size), min(w, size)
    out[:, dy:dy + ch, dx:dx + cw] = img[:, sy:sy + ch, sx:sx + cw]
    return out


def _read_fits(path: str) -> np.ndarray:
    from astropy.io import fits

    with fits.open(path, memmap=False) as hdul:
        for hdu in hdul:
            if hdu.data is not None and getattr(hdu, "is_image", True) and np.ndim(hdu.data) >= 2:
                data = np.asarray(hdu.data)
                # FITS is big-endian on disk; astype to native float32 swaps the bytes once.
                data = data.astype(np.float32)
                return data[None] if data.ndim == 2 else data
    raise ValueError("no image HDU")


def _plan_fits(s: IngestSettings):
    if not os.path.isdir(s.fits):
        raise IngestError(f"--fits {s.fits} is not a directory of FITS cutouts")
    if not os.path.exists(s.catalog):
        raise IngestError(f"--catalog {s.catalog} does not exist")
    with open(s.catalog, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and "file" not in rows[0]:
        raise IngestError(f"{s.catalog}: the catalogue needs a 'file' column (file,label[,id,metadata...]); "
                          f"its columns are {', '.join(rows[0])}")
    has_label = bool(rows) and "label" in rows[0]
    raw = None
    if has_label:
        values = [r["label"] for r in rows]
        raw = np.array([np.nan if v.strip() == "" else float(v) for v in values]) if all(
            _is_number(v) or v.strip() == "" for v in values) else np.array(values, dtype=str)
    classes, labels, label_bad = map_labels(raw, tuple(s.classes), s.catalog)
    meta_cols = [c for c in (rows[0] if rows else {}) if c not in ("file", "label", "id", "split")]
    meta = {c: _column(rows, c) for c in meta_cols}
    ids = [r.get("id") or (s.id_prefix + "-" if s.id_prefix else "") + _stem(r["file"]) for r in rows]
    if s.size:
        shape_hw = (int(s.size), int(s.size))
        first = None
    else:
        first = None
        for r in rows:
            try:
                first = _read_fits(os.path.join(s.fits, r["file"])).shape
                break
            except Exception:  # noqa: BLE001 - unreadable files are reported per row below
                continue
        if first is None:
            raise IngestError(f"no readable FITS cutout among the {len(rows)} files of {s.catalog}")
        shape_hw = first[1:]
    channels = first[0] if first else None
    if channels is None:
        for r in rows:
            try:
                channels = _read_fits(os.path.join(s.fits, r["file"])).shape[0]
                break
            except Exception:  # noqa: BLE001
                continue
        channels = channels or 1
    shape = (int(channels), int(shape_hw[0]), int(shape_hw[1]))
    spec = st.StampSpec(shape, classes, f"FITS cutouts: {s.fits} + {s.catalog}")

    def chunks():
        for start in range(0, len(rows), s.chunk_rows):
            block = rows[start:start + s.chunk_rows]
            imgs = np.zeros((len(block), *shape), np.float32)
            bad = {}
            for i, r in enumerate(block):
                row = start + i
                path = os.path.join(s.fits, r["file"])
                if row in label_bad:
                    bad[i] = label_bad[row]
                    continue
                try:
                    img = _read_fits(path)
                except FileNotFoundError:
                    bad[i] = f"unreadable: {path} does not exist"
                    continue
                except Exception as e:  # noqa: BLE001 - any unreadable file is set aside with its reason
                    bad[i] = f"unreadable: {path}: {e}"
                    continue
                if img.shape[0] != shape[0]:
                    bad[i] = f"shape: {path} has {img.shape[0]} channels, the dataset {shape[0]}"
                elif img.shape[1:] != shape[1:]:
                    if s.size:
                        img = _fit_size(img, int(s.size))
                    else:
                        bad[i] = (f"shape: {path} is {img.shape[1]}x{img.shape[2]}, the dataset "
                                  f"{shape[1]}x{shape[2]}; pass --size N to centre-crop or pad every cutout")
                        continue
                imgs[i] = img
            sl = slice(start, start + len(block))
            yield _Chunk(source=s.catalog, row0=start, images=imgs, ids=ids[sl],
                         labels=None if labels is None else labels[sl], bad=bad,
                         metadata={k: v[sl] for k, v in meta.items()})

    return spec, chunks()


def _is_number(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def _column(rows: list[dict], name: str) -> np.ndarray:
    values = [r.get(name, "") for r in rows]
    if all(_is_number(v) for v in values if v != ""):
        return np.array([float(v) if v != "" else np.nan for v in values])
    return np.array(values, dtype=object)


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
@dataclass
class IngestResult:
    manifest: st.Manifest
    rows_in: int
    seconds: float

    @property
    def ingested(self) -> int:
        return self.manifest.num_rows

    @property
    def set_aside(self) -> dict[str, int]:
        return dict(self.manifest.errors)


def ingest(settings: IngestSettings) -> IngestResult:
    """Read one source form and write a stamp dataset at ``settings.out``.

    Raises
    ------
    IngestError
        For problems that concern a whole input (missing file, wrong layout, pickle without opt-in,
        non-finite pixels under ``nonfinite="fail"``). Row problems are set aside, not raised.
    """
    t0 = time.time()
    if settings.class_files:
        spec, chunks = _plan_class_files(settings)
    elif settings.images:
        spec, chunks = _plan_images(settings)
    elif settings.hdf5:
        spec, chunks = _plan_hdf5(settings)
    elif settings.fits:
        spec, chunks = _plan_fits(settings)
    else:
        spec, chunks = _plan_pickle(settings)
    job = _Ingester(settings, spec)
    for chunk in chunks:
        job.add(chunk)
    manifest = job.writer.close()
    return IngestResult(manifest, job.rows_in, time.time() - t0)
