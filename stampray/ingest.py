"""Convert survey and course stamp files into a stamp table: ``stampray ingest``.

Source forms (exactly one per call):

* ``class_files``: one array file per class (``noise=stamps_noise.npy source=stamps_sources.npy``);
* ``images`` (+ ``labels``): one images array and one labels array, as two ``.npy`` files or two keys of
  one ``.npz``;
* ``hdf5``: named datasets for images and labels (the jet images: ``images`` (N,20,20), ``labels`` (N,));
* ``fits``: a directory of FITS cutouts and a CSV catalogue ``file,label[,id,metadata...]``. Cutouts may be
  gzipped or tile-compressed; ``hdu`` picks the HDU (several stack as channels), ``header_keys`` copies header
  values into columns, and a celestial WCS gives ``ra``, ``dec`` of the stamp centre. Without an ``id`` column
  a cutout's id is its whole file name less the FITS extension;
* ``pickle``: refused unless ``allow_pickle`` is set, because unpickling runs code from the file.

Image arrays may be (N,H,W), channels-last (N,H,W,C), channels-first (N,C,H,W) or flat square (N,H*W).
Arrays are read in chunks (``.npy`` memory-mapped, ``.npz`` members streamed, HDF5 sliced), so memory stays
bounded by the chunk size whatever the file size. Rows that cannot be used are set aside in the dataset's
``_errors`` table with their reason and counted; nothing is dropped silently.

Every input may be a local path or a URI (``s3://bucket/key``), read through pyarrow filesystems: FITS
cutouts, catalogues and pickles are read as bytes, ``.npy`` files by byte ranges, and ``.npz`` and HDF5
files are copied to a local temporary file first (deleted afterwards).

Distributed ingest
------------------
FITS directories and class files are split into *units*: runs of ``unit_files`` catalogue rows, or of up to
``unit_rows`` array rows (small files grouped, ``.npy`` files cut into row ranges). With more than one unit
(``parallel="auto"``) or with ``parallel="on"`` each unit is one Ray task that reads its inputs and writes
its own shards ``part-UUUUU-KKK.parquet``, its set-aside rows ``_errors/part-UUUUU.parquet`` and then a
marker ``_ingest/unit-UUUUU.json``; the driver receives only these small records. Shard names sort in input
order, so the table reads back with exactly the rows, order, ids and reasons of the in-process ingest.
Duplicate ids are found on the driver before dispatch (ids are known up front: the catalogue's, the
FITS file names, or file stem plus row). The first row that names an id owns it, on either path.

The manifest is written last. ``_ingest/_job.json`` records the settings and a fingerprint of the inputs
(names, sizes, modification times): rerunning a killed ingest with the same settings and inputs keeps the
units that have markers, deletes the others' partial files and finishes; other settings or inputs, or a
complete table, start over. ``_ingest/`` is removed once the manifest is written.

The Ray workers read the inputs themselves: on a remote cluster, inputs (and ``out``) must be URIs or on
a filesystem that every node shares.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import shutil
import sys
import tempfile
import time
import zipfile
import zlib
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from . import table as st
from .classes import check_class_names
from .lock import output_lock
from .progress import Progress

LAYOUTS = ("auto", "nchw", "nhwc", "nhw", "flat")
NONFINITE = ("set-aside", "fail")
LABELS_KEY = "labels"  # the labels array/dataset read when --labels-key is not given (if the file has it)
RESERVED_COLUMNS = (*st.CORE_COLUMNS, st.SPLIT)  # written by stampray: never a metadata column
WCS_COLUMNS = ("ra", "dec")  # the stamp centre from a FITS cutout's celestial WCS (degrees)
HEADER_SCAN = 20  # FITS files the driver reads to type a --header-keys column the first cutout lacks
# FITS names end in .fits/.fit/.fts, each optionally compressed (.gz, .fz, .bz2), or in a bare .fz
FITS_EXTENSION = re.compile(r"\.(?:fits|fit|fts)(?:\.(?:gz|fz|bz2))?$|\.fz$", re.IGNORECASE)
ARRAY_EXTENSION = re.compile(r"\.(?:npy|npz|h5|hdf5|hdf|he5|pkl|pickle|p)$", re.IGNORECASE)
PARALLEL = ("auto", "on", "off")
UNIT_FILES = 500  # FITS cutouts per unit: each file is one small read, so a unit is a few seconds of work
UNIT_ROWS = 200_000  # array rows per unit (about 350 MB of 21x21 float32 stamps)
log = logging.getLogger(__name__)
SOURCE = "source (exactly one form)"  # the --help group of the source flags


def class_file(text: str) -> tuple[str, str]:
    """``--class NAME=FILE`` as (name, path)."""
    import argparse

    if "=" not in text:
        msg = f"--class wants NAME=FILE (e.g. noise=stamps_noise.npy), got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    name, path = text.split("=", 1)
    return name.strip(), path.strip()


JOB_NAME = "_job.json"
WAIT_S = 1.0  # the longest the driver blocks on Ray at a time (progress, Ctrl-C)
STALL_S = 600.0  # warn when no unit has finished for this long


@dataclass(frozen=True)
class IngestSettings:
    """Settings of ``stampray ingest``.

    Args:
        out: output stamp table directory (local path or URI).
        class_files: one array file per class, repeated (label = order given), e.g. noise=stamps_noise.npy.
        images: images array (.npy, or .npz with --images-key).
        labels: labels array (.npy, or key of --images .npz).
        hdf5: HDF5 file with --images-key and --labels-key datasets.
        fits: directory of FITS cutouts (needs --catalog).
        catalog: CSV: file,label[,id,metadata...]; without an id column a cutout's id is its file name less the
            FITS extension (J123456.78+012345.6_r.fits -> J123456.78+012345.6_r).
        size: FITS: centre-crop or pad every cutout to N x N.
        hdu: FITS: the HDU to read, by index or EXTNAME (default: the first HDU holding an image, so an empty
            primary HDU is skipped); a comma list such as SCI,TEMPLATE,DIFF stacks those HDUs as channels (each a
            2-D image of one shape). A file without a named HDU is set aside.
        header_keys: FITS: copy these header values (from the first --hdu, else the primary header) into columns
            named by the key in lower case (EXPTIME -> exptime): numbers as float64, other values as strings,
            null where a file lacks the key. Cutouts with a celestial WCS also get ra and dec (degrees, of the
            stamp centre; null without a WCS) unless the catalogue or --header-keys already gives an ra or dec
            column, which is kept instead.
        pickle: pickled images (needs --allow-pickle).
        images_key: array/dataset name of the images.
        labels_key: array/dataset name of the labels (default 'labels' when the file has it, else the images
            are unlabelled; a key given here must exist).
        ids_key: array/dataset of stamp ids (default: FILESTEM-ROW).
        classes: class names in label order, e.g. noise,source.
        split: the whole input belongs to this fixed split (overrides the id hash).
        layout: image axis order; auto refuses an array that looks like one image saved without its N axis,
            such as (21,21) or (21,21,3).
        nonfinite: rows with NaN/inf pixels: set aside in _errors, or fail.
        allow_pickle: allow unpickling (runs code from the file: only for trusted sources).
        shard_rows: rows per Parquet shard.
        chunk_rows: rows read and converted at a time by one reader.
        id_prefix: prefix for generated stamp ids.
        parallel: read the inputs with Ray tasks: auto (when the input makes more than one unit), on, off; on a
            remote cluster inputs must be URIs or on a shared filesystem.
        unit_files: FITS cutouts per Ray task.
        unit_rows: array rows per Ray task.
        progress: the progress line on stderr.
        address: Ray cluster to connect to (default: a private local Ray; RAY_ADDRESS is honoured).
        append: add the stamps to the table at --out (same shape, classes and columns; a repeated id is set
            aside); the manifest is replaced in one step, so readers see the table before or after.
    """

    out: str = field(metadata={"path": True})
    class_files: tuple[tuple[str, str], ...] = field(default=(), metadata={"path": True,
        "flag": "--class", "metavar": "NAME=FILE", "append": True, "parse": class_file, "group": SOURCE})
    images: str | None = field(default=None, metadata={"path": True, "group": SOURCE})
    labels: str | None = field(default=None, metadata={"path": True, "group": SOURCE})
    images_key: str = "images"
    labels_key: str | None = None
    ids_key: str | None = None
    hdf5: str | None = field(default=None, metadata={"path": True, "group": SOURCE})
    fits: str | None = field(default=None, metadata={"path": True, "metavar": "DIR", "group": SOURCE})
    catalog: str | None = field(default=None, metadata={"path": True, "metavar": "CSV", "group": SOURCE})
    size: int | None = field(default=None, metadata={"group": SOURCE})
    hdu: str | None = field(default=None, metadata={"metavar": "N|NAME[,NAME...]", "group": SOURCE})
    header_keys: tuple[str, ...] = field(default=(), metadata={"metavar": "KEY,KEY", "group": SOURCE})
    pickle: str | None = field(default=None, metadata={"path": True, "group": SOURCE})
    allow_pickle: bool = False
    classes: tuple[str, ...] = ()
    split: str | None = field(default=None, metadata={"choices": st.SPLIT_NAMES})
    layout: str = field(default="auto", metadata={"choices": LAYOUTS})
    nonfinite: str = field(default="set-aside", metadata={"choices": NONFINITE})
    shard_rows: int = 50_000
    chunk_rows: int = 8192
    id_prefix: str | None = None
    parallel: str = field(default="auto", metadata={"choices": PARALLEL})
    unit_files: int = UNIT_FILES
    unit_rows: int = UNIT_ROWS
    progress: bool = True
    address: str | None = None
    append: bool = False

    def __post_init__(self):
        forms = [bool(self.class_files), bool(self.images), bool(self.hdf5), bool(self.fits), bool(self.pickle)]
        if sum(forms) != 1:
            msg = ("give exactly one source form: --class NAME=FILE ..., --images FILE [--labels FILE], "
                   "--hdf5 FILE, --fits DIR --catalog CSV, or --pickle FILE --allow-pickle")
            raise ValueError(msg)
        if self.fits and not self.catalog:
            msg = "--fits DIR needs --catalog CSV (columns file,label[,id,metadata...])"
            raise ValueError(msg)
        self._check_fits_options()
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
        for name in ("shard_rows", "chunk_rows", "unit_files", "unit_rows"):
            if int(getattr(self, name)) <= 0:
                msg = f"{name} must be a positive integer, got {getattr(self, name)!r}"
                raise ValueError(msg)
        if self.parallel not in PARALLEL:
            msg = (f"--parallel must be one of {', '.join(PARALLEL)} (auto: Ray tasks when the input makes "
                   f"more than one unit), got {self.parallel!r}")
            raise ValueError(msg)
        if self.parallel == "on" and not (self.fits or self.class_files):
            msg = ("--parallel on distributes --fits and --class inputs; --images, --hdf5 and --pickle are "
                   "single inputs read in-process: use --parallel auto or off")
            raise ValueError(msg)
        self._check_class_names()

    def _check_fits_options(self) -> None:
        """``--hdu`` and ``--header-keys``: normalised (an int HDU, a "A,B" string of keys) and checked."""
        if isinstance(self.hdu, int) and not isinstance(self.hdu, bool):
            object.__setattr__(self, "hdu", str(self.hdu))
        if isinstance(self.header_keys, str):
            object.__setattr__(self, "header_keys", tuple(k.strip() for k in self.header_keys.split(",")))
        object.__setattr__(self, "header_keys", tuple(str(k).strip() for k in self.header_keys))
        if (self.hdu is not None or self.header_keys) and not self.fits:
            msg = "--hdu and --header-keys choose what is read from FITS cutouts: they need --fits DIR --catalog CSV"
            raise ValueError(msg)
        if self.hdu is not None and (not str(self.hdu).strip() or "" in _hdu_tokens(self.hdu)):
            msg = f"--hdu wants an HDU index or EXTNAME, or a comma list of them (SCI,TEMPLATE,DIFF), got {self.hdu!r}"
            raise ValueError(msg)
        columns: dict[str, str] = {}
        for key in self.header_keys:
            col = key.lower()
            if not key:
                msg = f"--header-keys has an empty key in {','.join(self.header_keys)!r}; give KEY,KEY"
                raise ValueError(msg)
            if col in RESERVED_COLUMNS:
                msg = (f"--header-keys {key}: its column {col!r} is one stampray writes itself "
                       f"({', '.join(RESERVED_COLUMNS)}); it cannot be copied from the header")
                raise ValueError(msg)
            if col in columns:
                msg = f"--header-keys names {columns[col]} and {key}, which both make the column {col!r}"
                raise ValueError(msg)
            columns[col] = key

    def _check_class_names(self) -> None:
        """Every class needs a distinct, non-empty name: the score columns ``p_<class>`` derive from them."""
        if self.classes:
            check_class_names(self.classes, "--classes")
        files: dict[str, str] = {}
        for name, path in self.class_files:
            if not str(name).strip():
                msg = f"--class ={path}: the class name is empty; give NAME=FILE, e.g. noise={path}"
                raise ValueError(msg)
            if name in files and not self.classes:
                msg = (f"--class {name} is given twice ({files[name]} and {path}); each --class adds a class. "
                       f"To read several files into one class, list the classes once with --classes "
                       f"(e.g. --classes {name},...)")
                raise ValueError(msg)
            files.setdefault(name, path)
        if not self.classes:
            check_class_names(list(files), "--class")


class IngestError(ValueError):
    """A problem with the input that stops the whole ingest (the message names the file and the fix)."""


# --------------------------------------------------------------------------------------------------
# Inputs: local paths or URIs
# --------------------------------------------------------------------------------------------------
def _is_uri(path: str) -> bool:
    return "://" in str(path)


def _exists(path: str) -> bool:
    return st.exists(path) if _is_uri(path) else os.path.exists(path)


def _is_dir(path: str) -> bool:
    if not _is_uri(path):
        return os.path.isdir(path)
    fs, p = st.resolve(path)
    return fs.get_file_info(p).type == pafs.FileType.Directory


def _read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    # compression=None: the bytes as stored; callers that accept compressed data detect it themselves.
    with fs.open_input_stream(path, compression=None) as f:
        return f.read()


class _LocalCopies:
    """Local temporary copies of URI inputs, for readers that need a file on disk (zipfile, h5py, pickle).

    ``local(path)`` returns ``path`` itself for a local path, else a copy's path; the copies are deleted on
    ``close()`` (or leaving the ``with`` block).
    """

    def __init__(self):
        self._dir: str | None = None
        self._paths: dict[str, str] = {}

    def __call__(self, path: str) -> str:
        if not _is_uri(path):
            return path
        if path not in self._paths:
            self._dir = self._dir or tempfile.mkdtemp(prefix="stampray-ingest-")
            # Keep the base name: readers choose the format by the extension.
            local = os.path.join(self._dir, f"{len(self._paths)}-{posixpath.basename(path.rstrip('/'))}")
            fs, p = st.resolve(path)
            try:
                with fs.open_input_stream(p, compression=None) as src, open(local, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
            except FileNotFoundError:
                raise IngestError(f"{path} does not exist") from None
            self._paths[path] = local
        return self._paths[path]

    def close(self) -> None:
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir, self._paths = None, {}

    def __enter__(self) -> "_LocalCopies":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------
# Reading arrays in bounded memory
# --------------------------------------------------------------------------------------------------
def _refuse_pickle(path: str) -> IngestError:
    return IngestError(
        f"refusing to unpickle {path}: loading a pickle runs arbitrary code stored in the file. "
        f"If you trust where it came from, pass --allow-pickle; better, convert it once to .npy/.npz/HDF5")


def _npy_header(f):
    version = np.lib.format.read_magic(f)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return reader(f)


class _StreamedNpy:
    """A ``.npy`` member of an ``.npz`` archive read sequentially, chunk by chunk.

    ``path`` names the archive in messages; ``file`` (a local copy, or a random-access file of a URI when
    only the header is wanted) is what is opened, ``path`` itself when not given. ``flag`` is the option
    that named ``key`` (``--images-key``), for the message when the archive lacks it.
    """

    def __init__(self, path: str, key: str, file=None, flag: str | None = None):
        self.path, self.key = path, key
        try:
            self._zip = zipfile.ZipFile(path if file is None else file)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise IngestError(f"{path} is not a readable .npz archive ({e}); it may have been cut short in a "
                              f"copy: save it again with numpy.savez, or copy it again") from None
        name = key if key.endswith(".npy") else key + ".npy"
        if name not in self._zip.namelist():
            keys = ", ".join(n[:-4] for n in self._zip.namelist() if n.endswith(".npy"))
            raise IngestError(f"{path} has no array {key!r}; it holds: {keys}"
                              + (f"; name the array with {flag}" if flag else ""))
        self._name = name
        with self._zip.open(name) as f:
            self.shape, self.fortran, self.dtype = self._header(f)
        if self.dtype.hasobject:
            raise _refuse_pickle(f"{path}[{key}]")

    _header = staticmethod(_npy_header)

    def __len__(self):
        return self.shape[0]

    def chunks(self, rows: int, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        if self.fortran:
            raise IngestError(f"{self.path}[{self.key}] is stored in Fortran order and cannot be streamed; "
                              f"save it with np.savez(..., np.ascontiguousarray(a))")
        stop = self.shape[0] if stop is None else stop
        row_shape = self.shape[1:]
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * self.dtype.itemsize
        with self._zip.open(self._name) as f:
            self._header(f)
            if start:
                f.seek(start * row_bytes, os.SEEK_CUR)
            for a in range(start, stop, rows):
                n = min(rows, stop - a)
                try:
                    buf = f.read(n * row_bytes)
                except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
                    raise IngestError(f"{self.path}[{self.key}] is damaged at rows {a}-{a + n - 1} ({e}); save it "
                                      f"again with numpy.savez, or copy it again") from None
                if len(buf) != n * row_bytes:
                    raise IngestError(f"{self.path}[{self.key}] ends at row {a + len(buf) // max(1, row_bytes)} of "
                                      f"{self.shape[0]}: the archive is cut short; save it again with numpy.savez")
                yield a, np.frombuffer(buf, dtype=self.dtype).reshape(n, *row_shape)

    def read_all(self) -> np.ndarray:
        parts = [a for _, a in self.chunks(1 << 20)]
        return np.concatenate(parts) if parts else np.zeros(self.shape, self.dtype)


class _RangedNpy:
    """A ``.npy`` file behind a URI, read by byte ranges: a unit reads only its own rows, and nothing is
    copied whole (the memory-mapped local reader's counterpart)."""

    def __init__(self, path: str):
        self.path = path
        fs, p = st.resolve(path)
        try:
            self._f = fs.open_input_file(p)
        except FileNotFoundError:
            raise IngestError(f"{path} does not exist") from None
        try:
            head = io.BytesIO(self._f.read_at(min(self._f.size(), 1 << 20), 0))
            self.shape, fortran, self.dtype = _npy_header(head)
        except ValueError as e:
            raise IngestError(f"{path} is not a readable .npy file: {e}") from None
        if self.dtype.hasobject:
            raise _refuse_pickle(path)
        if fortran:
            raise IngestError(f"{path} is stored in Fortran order and cannot be read by rows; "
                              f"save it with np.save(..., np.ascontiguousarray(a))")
        self._offset = head.tell()
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def __len__(self):
        return self.shape[0]

    def chunks(self, rows: int, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        stop = self.shape[0] if stop is None else stop
        for a in range(start, stop, rows):
            n = min(rows, stop - a)
            buf = self._f.read_at(n * self._row_bytes, self._offset + a * self._row_bytes)
            yield a, np.frombuffer(buf, dtype=self.dtype).reshape(n, *self.shape[1:])

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

    def chunks(self, rows: int, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        stop = self.shape[0] if stop is None else stop
        for a in range(start, stop, rows):
            yield a, np.asarray(self.arr[a:min(a + rows, stop)])

    def read_all(self) -> np.ndarray:
        return np.asarray(self.arr[:])


def _open_npy(path: str):
    if _is_uri(path):
        return _RangedNpy(path)
    if not os.path.exists(path):
        raise IngestError(f"{path} does not exist")
    try:
        return _Sliced(np.load(path, mmap_mode="r", allow_pickle=False), path)
    except ValueError as e:
        with open(path, "rb") as f:
            head = f.read(6)
        if head[:2] == b"\x1f\x8b":  # numpy reads a file without its magic as a pickle: say what it is
            raise IngestError(f"{path} is gzip-compressed, not a .npy file; decompress it first "
                              f"(gunzip -k {path}) and ingest the result") from None
        if head != b"\x93NUMPY" and head[:1] == b"\x80" and ("pickle" in str(e).lower()):
            raise _refuse_pickle(path) from None
        if head != b"\x93NUMPY":
            raise IngestError(f"{path} is not a .npy file (it does not start with numpy's magic bytes); "
                              f"save arrays with numpy.save, or use .npz or HDF5") from None
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise _refuse_pickle(path) from None
        raise IngestError(f"{path} is not a readable .npy file: {e}") from None


def _open_array(path: str, key: str | None, allow_pickle: bool = False, local: _LocalCopies | None = None,
                flag: str | None = None):
    """Open ``path`` (.npy, .npz with ``key``, or a pickle when allowed) for chunked reading.

    ``local`` makes local copies of URIs for the readers that need a file (``.npz``, pickles); ``flag`` names
    the option that gave ``key`` in the message when an ``.npz`` lacks it.
    """
    if not _exists(path):
        raise IngestError(f"{path} does not exist")
    if path.endswith(".npz"):
        return _StreamedNpy(path, key or "", local(path) if local is not None else None, flag)
    if path.endswith(".npy"):
        return _open_npy(path)
    if path.endswith((".pkl", ".pickle", ".p")):
        return _Sliced(np.asarray(_load_pickle(path, allow_pickle)), path)
    raise IngestError(f"{path}: unknown array format; use .npy or .npz (or .pkl with --allow-pickle)")


def _load_pickle(path: str, allow_pickle: bool):
    if not allow_pickle:
        raise _refuse_pickle(path)
    import pickle  # only reached with the user's explicit --allow-pickle

    if _is_uri(path):
        fs, p = st.resolve(path)
        try:
            return pickle.loads(_read_bytes(fs, p))  # noqa: S301 - explicit opt-in
        except FileNotFoundError:
            raise IngestError(f"{path} does not exist") from None
    with open(path, "rb") as f:
        return pickle.load(f)  # noqa: S301 - explicit opt-in


# --------------------------------------------------------------------------------------------------
# Layout, labels, ids
# --------------------------------------------------------------------------------------------------
def image_layout(shape: tuple[int, ...], layout: str, path: str) -> tuple[str, tuple[int, int, int]]:
    """Decide how to read (N, ...) images and return ``(layout, (C, H, W))``."""
    rest = tuple(int(s) for s in shape[1:])
    if layout == "auto":
        _refuse_single_image(tuple(int(s) for s in shape), path)
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


def _refuse_single_image(shape: tuple[int, ...], path: str) -> None:
    """Under ``--layout auto``, refuse arrays that hold one image rather than a batch: read along their first
    axis they would become rows of a single image, without a warning."""
    fix = "save images with a leading N axis (np.save(f, img[None]))"
    if len(shape) == 2:
        n, p = shape
        side = int(np.sqrt(p) + 0.5)
        if side * side != p:  # cannot be flat square images: one image
            raise IngestError(f"{path} holds one {n}x{p} image (shape {shape}), not a batch; {fix}")
        if n == p:  # a square array: one image far more often than n flat images of sqrt(n) x sqrt(n)
            raise IngestError(f"{path} holds one {n}x{p} image (shape {shape}), not a batch; {fix}, or pass "
                              f"--layout flat if it holds {n} flat images of {side}x{side} pixels")
    elif len(shape) == 3:
        n, h, w = shape
        if min(h, w) <= 4 < max(h, w):  # as (N,H,W): N images of 21x3 pixels, where 3 is a channel axis
            what = f"one {n}x{h} image with {w} channels (channels-last)" if w <= 4 else "one image"
            raise IngestError(f"{path}: shape {shape} would be read as {n} images of {h}x{w} pixels; it looks "
                              f"like {what}, not a batch; {fix}, or pass --layout nhw if it holds {n} images "
                              f"of {h}x{w} pixels")


def to_nchw(chunk: np.ndarray, layout: str, shape: tuple[int, int, int]) -> np.ndarray:
    """One chunk of raw images to native-endian float32 (n, C, H, W)."""
    chunk = np.moveaxis(chunk, -1, 1) if layout == "nhwc" else chunk.reshape(len(chunk), *shape)
    return np.ascontiguousarray(chunk, dtype=np.float32)  # also swaps big-endian input to native


def map_labels(raw: np.ndarray | None, classes: tuple[str, ...], path: str):
    """Return ``(class_names, labels int64 with -1 for null, bad-row reasons dict)``."""
    names, labels, bad = _map_labels(raw, classes, path)
    if not classes:  # names read from the labels themselves (--classes was checked on its own)
        check_class_names(names, f"the labels of {path}",
                          "list the classes with --classes (labels that are none of them are set aside)")
    return names, labels, bad


def _map_labels(raw: np.ndarray | None, classes: tuple[str, ...], path: str):
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
        empty = np.char.strip(values) == ""  # an empty cell is an unlabelled stamp, as with numeric labels
        names = tuple(classes) if classes else tuple(sorted(set(values[~empty].tolist())))
        lookup = {n: i for i, n in enumerate(names)}
        out = np.array([-1 if e else lookup.get(v, -2) for v, e in zip(values.tolist(), empty.tolist())],
                       dtype=np.int64)
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
    fields: tuple[pa.Field, ...] = ()  # types (and order) of metadata columns fixed up front (FITS)


def _screen(chunk: _Chunk, nonfinite: str) -> dict[int, str]:
    """Reasons to set rows of a chunk aside that the chunk itself shows (input problems, non-finite
    pixels), by row within the chunk; raises under ``nonfinite="fail"``."""
    reasons: dict[int, str] = dict(chunk.bad)
    finite = np.isfinite(chunk.images).all(axis=(1, 2, 3))
    for i in np.nonzero(~finite)[0]:
        count = int((~np.isfinite(chunk.images[i])).sum())
        where = f"{chunk.source} row {chunk.row0 + int(i)}"
        if nonfinite == "fail":
            raise IngestError(f"{where} has {count} non-finite pixels (NaN or inf); pass "
                              f"--nonfinite set-aside to set such rows aside, or repair the input")
        reasons.setdefault(int(i), f"nonfinite: {count} non-finite pixels (NaN or inf)")
    return reasons


def _kept_table(chunk: _Chunk, reasons: dict[int, str], spec: st.StampSpec, split: str | None) -> pa.Table | None:
    """The chunk's rows that were not set aside, as a stamp table (None when none is left)."""
    keep = np.ones(len(chunk.images), bool)
    keep[list(reasons)] = False
    if not keep.any():
        return None
    idx = np.nonzero(keep)[0]
    labels = None
    if chunk.labels is not None:
        lab = chunk.labels[idx]
        labels = pa.array(lab, type=pa.int64(), mask=lab < 0)
    return st.make_table(spec, [chunk.ids[i] for i in idx], chunk.images[idx], labels,
                         {k: v[idx] for k, v in chunk.metadata.items()},
                         split=[split] * len(idx) if split else None, extra_fields=chunk.fields)


class _Ingester:
    def __init__(self, settings: IngestSettings, spec: st.StampSpec):
        self.settings, self.spec = settings, spec
        self.writer = st.StampWriter(settings.out, spec, settings.shard_rows,
                                     settings={"ingest": _jsonable(asdict(settings))})
        self.seen: dict[str, str] = {}
        self.rows_in = 0

    def add(self, chunk: _Chunk) -> None:
        self.rows_in += len(chunk.images)
        reasons = _screen(chunk, self.settings.nonfinite)
        for i, sid in enumerate(chunk.ids):
            first = self.seen.get(sid)
            if first is not None:
                reasons.setdefault(i, f"duplicate_id: {sid!r} already used by {first}")
            else:
                # The first row naming an id owns it even when it is set aside for another reason: the owner
                # then follows from the ids alone, as the distributed ingest decides it before reading.
                self.seen[sid] = f"{chunk.source} row {chunk.row0 + i}"
        for i, reason in sorted(reasons.items()):
            self.writer.set_aside(chunk.ids[i], chunk.source, chunk.row0 + i, reason)
        table = _kept_table(chunk, reasons, self.spec, self.settings.split)
        if table is not None:
            self.writer.write(table)


def _jsonable(d):
    if isinstance(d, dict):
        return {k: _jsonable(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_jsonable(v) for v in d]
    return d


def _stem(path: str) -> str:
    """The id prefix of an array file: its base name less a known extension, dots kept (``run.2.npy`` ->
    ``run.2``, so ``run.1.npy`` and ``run.2.npy`` do not collide); other names up to their first dot."""
    base = os.path.basename(path.rstrip("/"))
    m = ARRAY_EXTENSION.search(base)
    if m and m.start() > 0:
        return base[:m.start()]
    return base.split(".")[0] or base


def _fits_id(name: str) -> str:
    """The id of a FITS cutout: its whole base name less the FITS extension (``J123456.78+012345.6_r.fits``
    -> ``J123456.78+012345.6_r``), so two files share an id only when their names do."""
    base = posixpath.basename(name.replace(os.sep, "/").rstrip("/"))
    m = FITS_EXTENSION.search(base)
    return base[:m.start()] if m and m.start() > 0 else base


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
# Source forms: class files
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _ClassFile:
    """One ``--class NAME=FILE`` input, planned from its header."""

    path: str
    label: int
    prefix: str
    rows: int
    layout: str
    shape: tuple[int, int, int]

    @property
    def splittable(self) -> bool:
        return self.path.endswith(".npy")  # memory-mapped or read by byte ranges: any row range is cheap


def _array_header(path: str, s: IngestSettings, local: _LocalCopies):
    """The array in ``path`` opened for its shape: a URI's ``.npz`` through the filesystem's random access
    (a few small reads), not copied."""
    if _is_uri(path) and path.endswith(".npz"):
        if not _exists(path):
            raise IngestError(f"{path} does not exist")
        fs, p = st.resolve(path)
        return _StreamedNpy(path, s.images_key, fs.open_input_file(p), "--images-key")
    return _open_array(path, s.images_key, s.allow_pickle, local, "--images-key")


def _class_files(s: IngestSettings, local: _LocalCopies) -> tuple[st.StampSpec, list[_ClassFile], dict]:
    """Plan the class files from their headers: ``(spec, files, opened readers to reuse in-process)``."""
    names = [n for n, _ in s.class_files]
    classes = tuple(s.classes) if s.classes else tuple(names)
    missing = [n for n in names if n not in classes]
    if missing:
        raise IngestError(f"--class names {missing} are not in --classes {','.join(classes)}")
    files, shapes, opened = [], {}, {}
    for name, path in s.class_files:
        arr = _array_header(path, s, local)
        layout, shape = image_layout(arr.shape, s.layout, path)
        prefix = s.id_prefix + "-" + _stem(path) if s.id_prefix else _stem(path)
        files.append(_ClassFile(path, classes.index(name), prefix, len(arr), layout, shape))
        shapes[path] = shape
        if not (_is_uri(path) and path.endswith(".npz")):  # that one was opened for its header only
            opened[path] = arr
    shape = _check_same_shape(shapes, "the --class files")
    return st.StampSpec(shape, classes, "class files: " + ", ".join(p for _, p in s.class_files)), files, opened


def _class_chunks(arr, f: _ClassFile, rows: int, start: int = 0, stop: int | None = None) -> Iterator[_Chunk]:
    for a, raw in arr.chunks(rows, start, stop):
        n = len(raw)
        yield _Chunk(source=f.path, row0=a, images=to_nchw(raw, f.layout, f.shape), ids=_ids(f.prefix, a, n),
                     labels=np.full(n, f.label, dtype=np.int64))


def _class_duplicates(files: list[_ClassFile]) -> list[tuple[tuple[int, int, str], ...]]:
    """For each file, the row ranges ``(lo, hi, path)`` whose ids an earlier file already used.

    Ids are ``PREFIX-ROW``, so two files collide only when they share a prefix (their file stem), and then
    row by row: row i belongs to the first file with that prefix that has more than i rows.
    """
    earlier: dict[str, list[tuple[int, str]]] = {}
    out = []
    for f in files:
        ranges, covered = [], 0
        for rows, path in earlier.get(f.prefix, []):
            hi = min(rows, f.rows)
            if hi > covered:
                ranges.append((covered, hi, path))
            covered = max(covered, rows)
        out.append(tuple(ranges))
        earlier.setdefault(f.prefix, []).append((f.rows, f.path))
    return out


def _range_dups(chunk: _Chunk, ranges) -> dict[int, str]:
    out = {}
    for lo, hi, path in ranges:
        for row in range(max(lo, chunk.row0), min(hi, chunk.row0 + len(chunk.ids))):
            sid = chunk.ids[row - chunk.row0]
            out[row - chunk.row0] = f"duplicate_id: {sid!r} already used by {path} row {row}"
    return out


# --------------------------------------------------------------------------------------------------
# Source forms: single arrays (images + labels, HDF5, pickle), always read in-process
# --------------------------------------------------------------------------------------------------
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


def _plan_images(s: IngestSettings, local: _LocalCopies):
    if s.images.endswith(".npz"):
        if not _exists(s.images):
            raise IngestError(f"{s.images} does not exist")
        file = local(s.images)
        images = _StreamedNpy(s.images, s.images_key, file, "--images-key")
        with zipfile.ZipFile(file) as z:
            keys = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
        labels_key = s.labels_key or LABELS_KEY
        labels_raw = None
        if s.labels:
            labels_raw = _open_array(s.labels, labels_key, s.allow_pickle, local, "--labels-key").read_all()
        elif s.labels_key is not None or LABELS_KEY in keys:
            # A key the user named must be there: without it every label would be null, and the real
            # labels array would pass through as a column.
            labels_raw = _StreamedNpy(s.images, labels_key, file, "--labels-key").read_all()
        ids = _StreamedNpy(s.images, s.ids_key, file, "--ids-key").read_all().astype(str) if s.ids_key else None
        others = {k: _StreamedNpy(s.images, k, file) for k in keys
                  if k not in (s.images_key, labels_key, s.ids_key)}
        meta = {k: a.read_all() for k, a in others.items() if len(a.shape) == 1 and a.shape[0] == len(images)}
        meta = _extra_columns(meta, len(images), set())
        return _plan_arrays(s, images, labels_raw, ids, meta, s.images, s.images)
    images = _open_array(s.images, s.images_key, s.allow_pickle, local, "--images-key")
    labels_raw = (_open_array(s.labels, s.labels_key or LABELS_KEY, s.allow_pickle, local, "--labels-key").read_all()
                  if s.labels else None)
    source = s.images + (f" + {s.labels}" if s.labels else "")
    return _plan_arrays(s, images, labels_raw, None, {}, source, s.images)


def _plan_hdf5(s: IngestSettings, local: _LocalCopies):
    try:
        import h5py
    except ImportError:  # pragma: no cover - h5py is a core dependency
        raise IngestError("HDF5 input needs h5py: pip install h5py") from None
    if not _exists(s.hdf5):
        raise IngestError(f"{s.hdf5} does not exist")
    try:
        f = h5py.File(local(s.hdf5), "r")
    except OSError as e:
        raise IngestError(f"{s.hdf5} is not a readable HDF5 file ({' '.join(str(e).split())}); check that it is "
                          f"HDF5 (h5dump -H {s.hdf5}) and was not cut short in a copy") from None
    if s.images_key not in f:
        raise IngestError(f"{s.hdf5} has no dataset {s.images_key!r}; it holds: {', '.join(f.keys())}; "
                          f"name the images with --images-key")
    for flag, key in (("--images-key", s.images_key), ("--labels-key", s.labels_key), ("--ids-key", s.ids_key)):
        if key and key in f and not isinstance(f[key], h5py.Dataset):
            inside = ", ".join(f"{key}/{k}" for k in f[key].keys()) or "nothing"
            raise IngestError(f"{s.hdf5}: {flag} {key!r} names a group, not a dataset (it holds {inside}); "
                              f"give the path of a dataset, e.g. {flag} {key}/NAME")
    labels_key = s.labels_key or LABELS_KEY
    if s.labels_key is not None and s.labels_key not in f:
        raise IngestError(f"{s.hdf5} has no dataset {s.labels_key!r}; it holds: {', '.join(f.keys())}; "
                          f"name the labels with --labels-key (or leave it out for unlabelled images)")
    images = _Sliced(f[s.images_key], s.hdf5)
    labels_raw = np.asarray(f[labels_key][:]) if labels_key in f else None
    if labels_raw is not None and labels_raw.dtype.kind == "S":
        labels_raw = labels_raw.astype(str)
    ids = np.asarray(f[s.ids_key][:]).astype(str) if s.ids_key else None
    datasets = {k: f[k] for k in f.keys() if isinstance(f[k], h5py.Dataset)}
    meta = _extra_columns(datasets, len(images), {s.images_key, labels_key, s.ids_key or ""})
    return _plan_arrays(s, images, labels_raw, ids, meta, s.hdf5, s.hdf5)


def _plan_pickle(s: IngestSettings, local: _LocalCopies):
    obj = _load_pickle(s.pickle, s.allow_pickle)
    labels_raw = None
    if isinstance(obj, dict):
        keys = ", ".join(map(str, obj))
        if s.images_key not in obj:
            raise IngestError(f"{s.pickle} holds a dict without key {s.images_key!r} (keys: {keys}); "
                              f"name the images with --images-key")
        if s.labels_key is not None and s.labels_key not in obj:
            raise IngestError(f"{s.pickle} holds a dict without key {s.labels_key!r} (keys: {keys}); "
                              f"name the labels with --labels-key")
        images, labels_raw = obj[s.images_key], obj.get(s.labels_key or LABELS_KEY)
    elif isinstance(obj, (tuple, list)) and len(obj) == 2 and np.ndim(obj[0]) >= 2:
        images, labels_raw = obj
    else:
        images = obj
    if s.labels:
        labels_raw = _open_array(s.labels, s.labels_key or LABELS_KEY, s.allow_pickle, local,
                                 "--labels-key").read_all()
    images = _Sliced(np.asarray(images), s.pickle)
    labels_raw = None if labels_raw is None else np.asarray(labels_raw)
    return _plan_arrays(s, images, labels_raw, None, {}, s.pickle, s.pickle)


# --------------------------------------------------------------------------------------------------
# Source forms: FITS cutouts and their catalogue
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _FitsColumns:
    """The per-file metadata columns of a FITS ingest: ``--header-keys`` values and the WCS centre.

    Their types are fixed on the driver before any unit runs (from the first cutouts that hold each key), so
    every unit, and the in-process reader, writes the same schema whatever files it happens to read.
    """

    keys: tuple[tuple[str, str, str], ...] = ()  # (header key, column, "float64" or "string")
    wcs: bool = False  # ra, dec of the stamp centre (False when the catalogue or a header key gives them)

    @property
    def names(self) -> list[str]:
        return [col for _, col, _ in self.keys] + (list(WCS_COLUMNS) if self.wcs else [])

    def fields(self) -> list[pa.Field]:
        types = {"float64": pa.float64(), "string": pa.string()}
        return ([pa.field(col, types[kind]) for _, col, kind in self.keys]
                + ([pa.field(c, pa.float64()) for c in WCS_COLUMNS] if self.wcs else []))


@dataclass
class _FitsRows:
    """A run of catalogue rows (the whole catalogue, or one unit's part) with what the driver knows of them."""

    row0: int  # catalogue row of the first entry
    files: list[str]
    ids: list[str]
    labels: np.ndarray | None
    bad: dict[int, str]  # catalogue row -> reason known from the catalogue (a label outside the classes)
    metadata: dict[str, np.ndarray]
    columns: _FitsColumns = field(default_factory=_FitsColumns)  # read from each file's header

    def slice(self, a: int, b: int, bad: dict[int, str]) -> "_FitsRows":
        """Catalogue rows ``a`` to ``b`` (exclusive); ``bad`` holds those of ``self.bad`` in that range."""
        i, j = a - self.row0, b - self.row0
        return _FitsRows(a, self.files[i:j], self.ids[i:j], None if self.labels is None else self.labels[i:j],
                         bad, {k: v[i:j] for k, v in self.metadata.items()}, self.columns)


def _fit_window(h: int, w: int, size: int) -> tuple[int, int, int, int]:
    """``(sy, sx, dy, dx)``: where a centred ``size`` window starts in the source (crop) and where the source
    starts in the window (pad)."""
    return max(0, (h - size) // 2), max(0, (w - size) // 2), max(0, (size - h) // 2), max(0, (size - w) // 2)


def _fit_size(img: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop or pad (with the cutout's median) a (C, H, W) cutout to (C, size, size)."""
    c, h, w = img.shape
    fill = np.nanmedian(img) if np.isfinite(img).any() else 0.0
    out = np.full((c, size, size), fill, dtype=np.float32)
    # crop: take the central window of the source; pad: place the source in the centre of the output
    sy, sx, dy, dx = _fit_window(h, w, size)
    ch, cw = min(h, size), min(w, size)
    out[:, dy:dy + ch, dx:dx + cw] = img[:, sy:sy + ch, sx:sx + cw]
    return out


@dataclass
class _FitsImage:
    """One cutout as read: the image and the headers ``--header-keys`` and the WCS are read from."""

    image: np.ndarray  # (C, H, W) float32
    header: object  # the first selected HDU's header (astropy Header)
    primary: object  # the primary header, where --header-keys look for a key the first one lacks


class _HduProblem(ValueError):
    """A file whose HDUs do not fit ``--hdu``: set aside under the reason kind ``kind`` (the message follows
    the file's path)."""

    def __init__(self, kind: str, msg: str):
        super().__init__(msg)
        self.kind = kind


def _hdu_tokens(hdu: str | None) -> tuple[int | str, ...]:
    """``--hdu 1`` -> ``(1,)``; ``--hdu SCI,TEMPLATE`` -> ``("SCI", "TEMPLATE")``; None -> ``()``."""
    if hdu is None:
        return ()
    return tuple(int(t) if t.isdigit() else t for t in (t.strip() for t in str(hdu).split(",")))


def _fits_source(path: str, fs: pafs.FileSystem | None):
    """What ``fits.open`` reads: the path itself, or a URI's bytes (un-gzipped: astropy un-gzips files it
    opens by name, not file objects; tile-compressed .fz files are FITS and need nothing)."""
    if fs is None:
        return path
    data = _read_bytes(fs, path)
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    elif data[:3] == b"BZh":
        data = bz2.decompress(data)
    return io.BytesIO(data)


def _image_data(hdu) -> np.ndarray | None:
    """An HDU's image with at least two axes (leading length-1 axes of radio cubes dropped), else None."""
    if not getattr(hdu, "is_image", True) or hdu.data is None or np.ndim(hdu.data) < 2:
        return None
    data = np.asarray(hdu.data)
    while data.ndim > 3 and data.shape[0] == 1:  # (1, 1, H, W): Stokes and frequency axes of one plane
        data = data[0]
    return data


def _select_hdus(hdul, tokens: tuple[int | str, ...]) -> list[tuple[object, np.ndarray]]:
    """``(hdu, image)`` of the HDUs ``--hdu`` names, or of the first HDU holding an image by default."""
    if not tokens:
        for hdu in hdul:
            data = _image_data(hdu)
            if data is not None:
                return [(hdu, data)]
        raise ValueError("no image HDU")
    present = ", ".join(f"{i} {h.name}".rstrip() for i, h in enumerate(hdul))
    out = []
    for t in tokens:
        try:
            hdu = hdul[t] if isinstance(t, int) else hdul[hdul.index_of(t)]
        except (IndexError, KeyError):
            raise _HduProblem("hdu", f"has no HDU {t!r} (--hdu {','.join(map(str, tokens))}); "
                                     f"its HDUs: {present}") from None
        data = _image_data(hdu)
        if data is None:
            raise _HduProblem("hdu", f"HDU {t!r} holds no image ({type(hdu).__name__}); its HDUs: {present}")
        out.append((hdu, data))
    if len(out) > 1 and (len({d.shape for _, d in out}) > 1 or out[0][1].ndim != 2):
        shapes = ", ".join(f"{t} {'x'.join(map(str, d.shape))}" for t, (_, d) in zip(tokens, out))
        raise _HduProblem("shape", f"has HDUs {shapes} of different shapes; stacked HDUs "
                                   f"(--hdu {','.join(map(str, tokens))}) must be 2-D images of one shape")
    return out


def _read_fits(path: str, fs: pafs.FileSystem | None = None, hdu: str | None = None) -> _FitsImage:
    """The ``--hdu`` image(s) of a FITS file as (C, H, W) float32 with their headers; through ``fs`` (a URI's
    filesystem) when given. Several HDUs stack as channels; a cube's planes are channels. A file shorter
    than its header says raises astropy's "File may have been truncated" warning as the error (the caller
    sets the file aside with it as its reason) rather than letting astropy print it, naming no file, and read
    on into an array of the wrong size."""
    import warnings

    from astropy.io import fits
    from astropy.io.fits.verify import VerifyWarning

    with warnings.catch_warnings():
        # astropy's notes on headers it repairs name no file; a header it cannot use raises, and sets the file aside
        warnings.simplefilter("ignore", VerifyWarning)
        warnings.filterwarnings("error", message="File may have been truncated")
        with fits.open(_fits_source(path, fs), memmap=False) as hdul:
            chosen = _select_hdus(hdul, _hdu_tokens(hdu))
            # FITS is big-endian on disk; astype to native float32 swaps the bytes once (BSCALE/BZERO and
            # BLANK were applied by astropy: blank integers come out NaN).
            data = np.stack([d for _, d in chosen]) if len(chosen) > 1 else chosen[0][1]
            data = data.astype(np.float32)
            if data.ndim == 2:
                data = data[None]
            return _FitsImage(data, chosen[0][0].header, hdul[0].header)


def _fits_root(s: IngestSettings) -> tuple[pafs.FileSystem | None, str]:
    """``(filesystem, root)`` of a URI FITS directory; ``(None, dir)`` for a local one, opened by name."""
    return st.resolve(s.fits) if _is_uri(s.fits) else (None, s.fits)


def _fits_path(s: IngestSettings, fs, root: str, name: str) -> tuple[str, str]:
    """``(what is opened, what messages name)`` for one catalogue file."""
    if fs is None:
        return os.path.join(root, name), os.path.join(root, name)
    return posixpath.join(root, name), st.join(s.fits, name)


def _header_value(got: _FitsImage, key: str):
    """A header value from the first selected HDU, else the primary header; None when neither has it."""
    from astropy.io.fits.card import Undefined

    for header in (got.header, got.primary):
        if key in header:
            value = header[key]
            return None if isinstance(value, Undefined) else value
    return None


def _header_kind(value) -> str | None:
    """The column type a header value makes: numbers (and FITS logicals, as 1/0) float64, others strings."""
    if value is None:
        return None
    if isinstance(value, (bool, int, float, np.bool_, np.integer, np.floating)):
        return "float64"
    return "string"


def _sky_centre(header, x: float, y: float) -> tuple[float | None, float | None]:
    """``(ra, dec)`` in degrees of the zero-based pixel ``(x, y)``, or ``(None, None)`` without a celestial WCS.

    Equatorial axes give their own values (``pixel_to_world_values``); other celestial frames (galactic,
    ecliptic) are converted to ICRS, so ``ra``/``dec`` never hold longitudes of another frame.
    """
    if not any(k.startswith("CTYPE") for k in header.keys()):
        return None, None  # no axis types, no celestial WCS: skip building one (a few ms a file)
    import warnings

    from astropy.utils.exceptions import AstropyWarning
    from astropy.wcs import WCS

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyWarning)  # header fix-ups, repeated for every file
            wcs = WCS(header)
            if not wcs.has_celestial:
                return None, None
            cel = wcs.celestial
            if cel.wcs.lngtyp == "RA" and cel.wcs.lattyp == "DEC":
                ra, dec = cel.pixel_to_world_values(x, y)
            else:
                sky = cel.pixel_to_world(x, y).icrs
                ra, dec = sky.ra.deg, sky.dec.deg
    except Exception:  # noqa: BLE001 - a WCS astropy cannot use is no WCS: the centre is null
        return None, None
    ra, dec = float(ra), float(dec)
    return (ra, dec) if np.isfinite(ra) and np.isfinite(dec) else (None, None)


def _file_values(got: _FitsImage, columns: _FitsColumns, path: str, centre: tuple[float, float]):
    """``(reason, None)`` or ``(None, {column: value})``: the file's ``--header-keys`` values and WCS centre."""
    values: dict[str, object] = {}
    for key, col, kind in columns.keys:
        v = _header_value(got, key)
        if v is None:
            values[col] = None
        elif kind == "string":
            values[col] = str(v)
        elif _header_kind(v) == "float64":
            values[col] = float(v)
        else:
            return (f"header: {path}: {key} = {v!r} is not a number, but the column {col!r} is numeric (from "
                    f"the first cutouts that have {key}); fix the header or leave {key} out of --header-keys"), None
    if columns.wcs:
        values["ra"], values["dec"] = _sky_centre(got.header, *centre)
    return None, values


def _fits_cutout(s: IngestSettings, fs, root: str, name: str, shape,
                 columns: _FitsColumns = _FitsColumns()) -> tuple[str | None, np.ndarray | None, dict]:
    """Read one catalogue file: ``(None, image, {column: value})``, or ``(reason, None, {})`` when it must be
    set aside."""
    opened, path = _fits_path(s, fs, root, name)
    try:
        got = _read_fits(opened, fs, s.hdu)
    except FileNotFoundError:
        return f"unreadable: {path} does not exist", None, {}
    except _HduProblem as e:
        return f"{e.kind}: {path} {e}", None, {}
    except Exception as e:  # noqa: BLE001 - any unreadable file is set aside with its reason
        return f"unreadable: {path}: {e}", None, {}
    img = got.image
    c, h, w = img.shape
    if c != shape[0]:
        return f"shape: {path} has {c} channels, the dataset {shape[0]}", None, {}
    # The stamp's centre pixel, in the cutout's zero-based pixel coordinates (as stored: after crop or pad).
    centre = ((w - 1) / 2, (h - 1) / 2)
    if (h, w) != tuple(shape[1:]):
        if not s.size:
            return (f"shape: {path} is {h}x{w}, the dataset {shape[1]}x{shape[2]}; "
                    f"pass --size N to centre-crop or pad every cutout"), None, {}
        size = int(s.size)
        sy, sx, dy, dx = _fit_window(h, w, size)
        img, centre = _fit_size(img, size), (sx - dx + (size - 1) / 2, sy - dy + (size - 1) / 2)
    reason, values = _file_values(got, columns, path, centre)
    if reason is not None:
        return reason, None, {}
    return None, img, values


def _read_catalog(path: str) -> list[dict]:
    if _is_uri(path):
        if not st.exists(path):
            raise IngestError(f"--catalog {path} does not exist")
        return list(csv.DictReader(io.StringIO(st.read_text(path), newline="")))
    if not os.path.exists(path):
        raise IngestError(f"--catalog {path} does not exist")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _fits_probe(s: IngestSettings, files: list[str],
                catalog_columns: list[str]) -> tuple[tuple[int, int, int], _FitsColumns]:
    """The stamp shape (channels and, without --size, height and width of the first readable cutout) and
    the types of the ``--header-keys`` columns: a key's type is that of its value in the first readable
    cutout that has it, looking at most ``HEADER_SCAN`` files further; a key none of them has is a string."""
    fs, root = _fits_root(s)
    first, first_error, kinds, looked = None, None, {}, 0
    keys = list(s.header_keys)
    for name in files:
        if first is not None and (looked >= HEADER_SCAN or all(k in kinds for k in keys)):
            break
        try:
            got = _read_fits(_fits_path(s, fs, root, name)[0], fs, s.hdu)
        except Exception as e:  # noqa: BLE001 - unreadable files are reported per row when read
            first_error = first_error or f"{name}: {e}"
            continue
        if first is None:
            first = got.image.shape
        else:
            looked += 1
        for key in keys:
            kind = _header_kind(_header_value(got, key))
            if kind is not None:
                kinds.setdefault(key, kind)
    if first is None and not s.size:
        raise IngestError(f"no readable FITS cutout among the {len(files)} files of {s.catalog}"
                          + (f" (the first, {first_error})" if first_error else ""))
    channels = first[0] if first else len(_hdu_tokens(s.hdu)) or 1
    hw = (int(s.size), int(s.size)) if s.size else (first[1], first[2])
    columns = tuple((k, k.lower(), kinds.get(k, "string")) for k in keys)
    taken = {c.lower() for c in catalog_columns} | {col for _, col, _ in columns}
    wcs = not any(c in taken for c in WCS_COLUMNS)  # the catalogue's (or a header key's) ra, dec win
    return (int(channels), int(hw[0]), int(hw[1])), _FitsColumns(columns, wcs)


def _fits_catalog(s: IngestSettings) -> tuple[st.StampSpec, _FitsRows]:
    """Read the catalogue (labels, ids, metadata) and the stamp shape; only the first cutouts are read."""
    if not _is_dir(s.fits):
        raise IngestError(f"--fits {s.fits} is not a directory of FITS cutouts")
    rows = _read_catalog(s.catalog)
    if rows and "file" not in rows[0]:
        raise IngestError(f"{s.catalog}: the catalogue needs a 'file' column (file,label[,id,metadata...]); "
                          f"its columns are {', '.join(rows[0])}")
    header = list(rows[0]) if rows else []
    for key in s.header_keys:
        if key.lower() in header:
            raise IngestError(f"--header-keys {key}: its column {key.lower()!r} is already a column of "
                              f"{s.catalog}; leave {key} out of --header-keys or rename the catalogue column")
    has_label = bool(rows) and "label" in rows[0]
    raw = None
    if has_label:
        values = [r["label"] for r in rows]
        raw = np.array([np.nan if v.strip() == "" else float(v) for v in values]) if all(
            _is_number(v) or v.strip() == "" for v in values) else np.array(values, dtype=str)
    classes, labels, label_bad = map_labels(raw, tuple(s.classes), s.catalog)
    meta_cols = [c for c in header if c not in ("file", "label", "id", "split")]
    meta = {c: _column(rows, c) for c in meta_cols}
    prefix = s.id_prefix + "-" if s.id_prefix else ""
    ids = [r.get("id") or prefix + _fits_id(r["file"]) for r in rows]
    files = [r["file"] for r in rows]
    shape, columns = _fits_probe(s, files, header)
    spec = st.StampSpec(shape, classes, f"FITS cutouts: {s.fits} + {s.catalog}")
    return spec, _FitsRows(0, files, ids, labels, label_bad, meta, columns)


def _fits_chunks(s: IngestSettings, shape: tuple[int, int, int], rows: _FitsRows) -> Iterator[_Chunk]:
    """Read the cutouts of ``rows`` in chunks of ``chunk_rows``, with their header and WCS columns."""
    fs, root = _fits_root(s)
    # Catalogue columns first, then the header keys and ra, dec; typed up front, the same in every unit.
    fields = [pa.field(k, pa.float64() if v.dtype.kind == "f" else pa.string()) for k, v in rows.metadata.items()]
    fields += rows.columns.fields()
    for a in range(0, len(rows.files), s.chunk_rows):
        b = min(len(rows.files), a + s.chunk_rows)
        imgs = np.zeros((b - a, *shape), np.float32)
        per_file = {col: np.full(b - a, None, dtype=object) for col in rows.columns.names}
        bad = {}
        for i in range(a, b):
            if rows.row0 + i in rows.bad:
                bad[i - a] = rows.bad[rows.row0 + i]
                continue
            reason, img, values = _fits_cutout(s, fs, root, rows.files[i], shape, rows.columns)
            if reason is None:
                imgs[i - a] = img
                for col, v in values.items():
                    per_file[col][i - a] = v
            else:
                bad[i - a] = reason
        yield _Chunk(source=s.catalog, row0=rows.row0 + a, images=imgs, ids=rows.ids[a:b],
                     labels=None if rows.labels is None else rows.labels[a:b], bad=bad,
                     metadata={**{k: v[a:b] for k, v in rows.metadata.items()}, **per_file}, fields=tuple(fields))


def _fits_duplicates(s: IngestSettings, rows: _FitsRows) -> dict[int, str]:
    """Catalogue row -> reason, for rows whose id an earlier row already used."""
    first: dict[str, int] = {}
    out = {}
    for i, sid in enumerate(rows.ids):
        row = rows.row0 + i
        if sid in first:
            out[row] = f"duplicate_id: {sid!r} already used by {s.catalog} row {first[sid]}"
        else:
            first[sid] = row
    return out


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
# Units: the pieces of a distributed ingest
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Names:
    """File names of a distributed ingest, zero-padded so that they sort in input order."""

    unit_width: int = 5
    shard_width: int = 3

    def shard(self, unit: int, k: int) -> str:
        return f"part-{unit:0{self.unit_width}d}-{k:0{self.shard_width}d}.parquet"

    def errors(self, unit: int) -> str:
        return f"part-{unit:0{self.unit_width}d}.parquet"

    def marker(self, unit: int) -> str:
        return f"unit-{unit:0{self.unit_width}d}.json"


def _names(units: int, rows_per_unit: int, shard_rows: int) -> _Names:
    shards = max(1, -(-rows_per_unit // shard_rows))
    return _Names(max(5, len(str(max(units - 1, 0)))), max(3, len(str(shards - 1))))


@dataclass(frozen=True)
class _Segment:
    """Rows ``start`` to ``stop`` of one class file, with the row ranges whose ids an earlier file used."""

    file: _ClassFile
    start: int
    stop: int
    dups: tuple[tuple[int, int, str], ...] = ()


@dataclass(frozen=True)
class _ArrayUnit:
    index: int
    segments: tuple[_Segment, ...]

    @property
    def inputs(self) -> int:  # progress counts stamps
        return sum(seg.stop - seg.start for seg in self.segments)


@dataclass(frozen=True)
class _FitsUnit:
    index: int
    rows: _FitsRows
    dups: dict[int, str]  # catalogue row -> duplicate_id reason

    @property
    def inputs(self) -> int:  # progress counts files
        return len(self.rows.files)


@dataclass
class _Plan:
    """What to ingest, both ways: ``units`` for Ray tasks, ``chunks()`` for the in-process reader."""

    spec: st.StampSpec
    units: list
    names: _Names
    total: int
    what: str  # what progress counts: "files" or "stamps"
    fingerprint: Callable[[], dict]
    chunks: Callable[[], Iterator[_Chunk]]


def _plan_fits(s: IngestSettings) -> _Plan:
    spec, rows = _fits_catalog(s)
    n, step = len(rows.files), int(s.unit_files)
    dups: dict[int, dict[int, str]] = {}
    bad: dict[int, dict[int, str]] = {}
    # Bucketed by unit in one pass: filtering them per unit would cost units x rows.
    for row, reason in _fits_duplicates(s, rows).items():
        dups.setdefault(row // step, {})[row] = reason
    for row, reason in rows.bad.items():
        bad.setdefault(row // step, {})[row] = reason
    units = [_FitsUnit(u, rows.slice(a, min(a + step, n), bad.get(u, {})), dups.get(u, {}))
             for u, a in enumerate(range(0, n, step))]
    return _Plan(spec, units, _names(len(units), step, s.shard_rows), n, "files",
                 lambda: _fits_fingerprint(s, rows.files), lambda: _fits_chunks(s, spec.shape, rows))


def _plan_class_files(s: IngestSettings, local: _LocalCopies) -> _Plan:
    spec, files, opened = _class_files(s, local)
    units, segments, room = [], [], int(s.unit_rows)
    for f, dups in zip(files, _class_duplicates(files)):
        start = 0
        while start < f.rows:
            # Small files share a unit; a .npy is cut at the unit boundary, any other file stays whole.
            if segments and (room <= 0 or (not f.splittable and f.rows > room)):
                units.append(_ArrayUnit(len(units), tuple(segments)))
                segments, room = [], int(s.unit_rows)
            stop = min(f.rows, start + room) if f.splittable else f.rows
            segments.append(_Segment(f, start, stop, tuple(d for d in dups if d[0] < stop and d[1] > start)))
            room -= stop - start
            start = stop
    if segments:
        units.append(_ArrayUnit(len(units), tuple(segments)))
    widest = max((u.inputs for u in units), default=1)

    def chunks():
        for f in files:
            arr = (opened[f.path] if f.path in opened
                   else _open_array(f.path, s.images_key, s.allow_pickle, local, "--images-key"))
            yield from _class_chunks(arr, f, s.chunk_rows)

    return _Plan(spec, units, _names(len(units), widest, s.shard_rows), sum(f.rows for f in files), "stamps",
                 lambda: {"files": [_stat(p) for _, p in s.class_files]}, chunks)


def _stat(path: str) -> list:
    """``[path, size, mtime_ns]``, sizes and times None when the file is missing."""
    fs, p = st.resolve(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        return [path, None, None]
    return [path, info.size, info.mtime_ns]


def _fits_fingerprint(s: IngestSettings, files: list[str]) -> dict:
    """Names, sizes and modification times of the catalogue and its cutouts (one listing of the directory)."""
    fs, root = st.resolve(s.fits)
    root = root.rstrip("/")
    listing = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        if info.type == pafs.FileType.File:
            listing[info.path[len(root) + 1:]] = [info.size, info.mtime_ns]
    entries = []
    for name in dict.fromkeys(files):
        key = posixpath.normpath(name)
        # Files outside the directory's listing (absolute paths in the catalogue) are looked up one by one.
        stat = listing.get(key) or _stat(st.join(s.fits, name))[1:]
        entries.append([name, *stat])
    digest = hashlib.sha256(json.dumps(entries).encode()).hexdigest()
    return {"catalog": _stat(s.catalog), "fits": s.fits, "files": len(entries), "sha256": digest}


# --------------------------------------------------------------------------------------------------
# One unit, inside its Ray task
# --------------------------------------------------------------------------------------------------
class _UnitWriter:
    """Writes one unit's shards and set-aside rows; ``finish()`` returns the unit's small record."""

    def __init__(self, s: IngestSettings, spec: st.StampSpec, names: _Names, unit: int):
        self.s, self.spec, self.names, self.unit = s, spec, names, unit
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.schema: pa.Schema | None = None
        self.shards: list[dict] = []
        self.errors: list[dict] = []
        self.label_counts: dict[str, int] = {}
        self.rows_in = 0

    def add(self, chunk: _Chunk, dups: dict[int, str]) -> None:
        """Set aside and write one chunk exactly as the in-process ingest would; ``dups`` were decided on
        the driver (reasons by row within the chunk)."""
        self.rows_in += len(chunk.images)
        reasons = _screen(chunk, self.s.nonfinite)
        for i, reason in dups.items():
            reasons.setdefault(i, reason)
        for i, reason in sorted(reasons.items()):
            self.errors.append({"stamp_id": chunk.ids[i], "source": chunk.source, "row": chunk.row0 + i,
                                "reason": reason})
        table = _kept_table(chunk, reasons, self.spec, self.s.split)
        if table is None:
            return
        if self.schema is None:
            self.schema = table.schema
        else:
            table = table.cast(self.schema)
        st.count_labels(table, self.label_counts)
        self.pending.append(table)
        self.pending_rows += table.num_rows
        while self.pending_rows >= self.s.shard_rows:
            self._flush(self.s.shard_rows)

    def _flush(self, rows: int) -> None:
        whole = pa.concat_tables(self.pending)
        head, tail = whole.slice(0, rows), whole.slice(rows)
        name = self.names.shard(self.unit, len(self.shards))
        st.write_shard(st.join(self.s.out, name), head.combine_chunks())
        self.shards.append({"path": name, "rows": head.num_rows})
        self.pending = [tail] if tail.num_rows else []
        self.pending_rows = tail.num_rows

    def finish(self, inputs: int) -> dict:
        if self.pending_rows:
            self._flush(self.pending_rows)
        counts: dict[str, int] = {}
        error_file = None
        if self.errors:
            error_file = self.names.errors(self.unit)
            counts = st.write_errors(self.s.out, error_file, self.errors)
        return {"unit": self.unit, "shards": self.shards, "label_counts": self.label_counts, "errors": counts,
                "error_file": error_file, "rows_in": self.rows_in, "inputs": inputs,
                "columns": list(self.schema.names) if self.schema is not None else None}


def _unit_chunks(s: IngestSettings, spec: st.StampSpec, unit, local: _LocalCopies):
    """``(chunk, duplicate reasons by row within the chunk)`` of one unit, in input order."""
    if isinstance(unit, _FitsUnit):
        for chunk in _fits_chunks(s, spec.shape, unit.rows):
            end = chunk.row0 + len(chunk.ids)
            yield chunk, {r - chunk.row0: d for r, d in unit.dups.items() if chunk.row0 <= r < end}
        return
    for seg in unit.segments:
        arr = _open_array(seg.file.path, s.images_key, s.allow_pickle, local, "--images-key")
        for chunk in _class_chunks(arr, seg.file, s.chunk_rows, seg.start, seg.stop):
            yield chunk, _range_dups(chunk, seg.dups)


def _run_unit(s: IngestSettings, spec: st.StampSpec, names: _Names, unit) -> dict:
    """Ray task: read one unit's inputs, write its shards and set-aside rows, then its marker."""
    with _LocalCopies() as local:
        writer = _UnitWriter(s, spec, names, unit.index)
        for chunk, dups in _unit_chunks(s, spec, unit, local):
            writer.add(chunk, dups)
        record = writer.finish(unit.inputs)
    # The marker comes after the unit's files: a unit without one is unfinished, and a rerun redoes it.
    st.write_text(st.join(s.out, st.INGEST_DIR, names.marker(unit.index)), json.dumps(record))
    return record


# --------------------------------------------------------------------------------------------------
# The driver of a distributed ingest
# --------------------------------------------------------------------------------------------------
_RUN_ONLY = ("parallel", "address", "progress")  # how to run, not what to write: a resume may change them


def _job_doc(s: IngestSettings, plan: _Plan) -> dict:
    """What identifies the job: a rerun resumes only when this is the same."""
    settings = {k: v for k, v in _jsonable(asdict(s)).items() if k not in _RUN_ONLY}
    doc = {"version": 1, "settings": settings, "inputs": plan.fingerprint(), "spec": plan.spec.metadata(),
           "units": len(plan.units), "names": [plan.names.unit_width, plan.names.shard_width]}
    return json.loads(json.dumps(doc))  # as it reads back from the job file


def _read_json(fs: pafs.FileSystem, path: str):
    try:
        return json.loads(_read_bytes(fs, path))
    except (OSError, ValueError):  # missing, or cut short by a kill: treated as absent
        return None


def _listing(fs: pafs.FileSystem, path: str) -> set[str]:
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return {posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.File}


def _prepare(s: IngestSettings, plan: _Plan, job: dict) -> dict[int, dict]:
    """Resume a killed run of the same job (returns the finished units' records) or start over (``{}``)."""
    fs, root = st.resolve(s.out)
    info = fs.get_file_info(root)
    job_path = posixpath.join(root, st.INGEST_DIR, JOB_NAME)
    if (info.type == pafs.FileType.Directory and not st.exists(st.join(s.out, st.MANIFEST_NAME))
            and _read_json(fs, job_path) == job):
        return _keep_finished(fs, root, plan)
    st.clear_dataset(s.out)  # deletes only what stampray wrote: shards, manifest, _errors/, _ingest/
    st.make_dirs(st.join(s.out, st.ERRORS_DIR))
    st.make_dirs(st.join(s.out, st.INGEST_DIR))
    st.write_text(st.join(s.out, st.INGEST_DIR, JOB_NAME), json.dumps(job, indent=1))
    return {}


_RECORD_KEYS = {"unit", "shards", "label_counts", "errors", "error_file", "rows_in", "inputs", "columns"}


def _complete(rec, unit: int, shards: set[str], errors: set[str]) -> bool:
    """Whether a unit's marker is whole and every file it lists is there."""
    try:
        return (_RECORD_KEYS <= set(rec) and rec["unit"] == unit
                and all(sh["path"] in shards and int(sh["rows"]) >= 0 for sh in rec["shards"])
                and (rec["error_file"] is None or rec["error_file"] in errors))
    except (TypeError, KeyError, ValueError):  # valid JSON of another shape: not a marker we wrote
        return False


def _keep_finished(fs: pafs.FileSystem, root: str, plan: _Plan) -> dict[int, dict]:
    """The units whose marker and files are all there; every other shard, errors file and marker goes."""
    shards = _listing(fs, root)
    errors = _listing(fs, posixpath.join(root, st.ERRORS_DIR))
    markers = _listing(fs, posixpath.join(root, st.INGEST_DIR))
    done: dict[int, dict] = {}
    for u in range(len(plan.units)):
        if plan.names.marker(u) not in markers:
            continue
        rec = _read_json(fs, posixpath.join(root, st.INGEST_DIR, plan.names.marker(u)))
        if _complete(rec, u, shards, errors):
            done[u] = rec
    keep = {sh["path"] for rec in done.values() for sh in rec["shards"]}
    for name in shards:
        if name.startswith("part-") and name.endswith(".parquet") and name not in keep:
            fs.delete_file(posixpath.join(root, name))  # a partial shard of an unfinished unit
    keep = {rec["error_file"] for rec in done.values()}
    for name in errors - keep:
        fs.delete_file(posixpath.join(root, st.ERRORS_DIR, name))
    keep = {plan.names.marker(u) for u in done} | {JOB_NAME}
    for name in markers - keep:
        fs.delete_file(posixpath.join(root, st.INGEST_DIR, name))
    return done


class _Progress(Progress):
    """The driver's progress line (``ingest: 1,234/2,000 files (61.7%), 850 stamps/s``), and a warning,
    whatever the progress setting, when no unit has finished for ``STALL_S`` (a stuck ingest must say so)."""

    def __init__(self, total: int, what: str, enabled: bool, done: int = 0):
        super().__init__("ingest", total, enabled, unit=what, rate_unit="stamps", done=done)
        self.last_unit = self.stall_warned = self.t0

    def update(self, units: int = 1, counted: int | None = None) -> None:
        self.last_unit = time.time()
        super().update(units, counted)

    def show(self, running: int = 0, force: bool = False) -> None:
        now = time.time()
        if now - max(self.last_unit, self.stall_warned) > STALL_S:
            if self.tty and self.last:
                sys.stderr.write("\n")  # end the progress display's in-place line before the warning
            log.warning(f"ingest: no unit finished in the last {STALL_S / 60:.0f} min ({running} running); "
                        f"check that the Ray cluster has free CPUs ('ray status')")
            self.stall_warned = now
        super().show(force)


def _result(ref) -> dict:
    import ray

    try:
        return ray.get(ref, timeout=WAIT_S)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, IngestError):
            raise IngestError(str(cause)) from None  # the input's own one-line message, not a traceback
        raise


def _dispatch(s: IngestSettings, plan: _Plan, todo: list[int], progress: _Progress) -> dict[int, dict]:
    """Run the units in ``todo`` as Ray tasks, a bounded number in flight; return their records."""
    import ray

    from .runtime import cluster_cpus

    task = ray.remote(num_cpus=1, max_retries=3)(_run_unit)
    window = max(2, 2 * int(cluster_cpus()))  # enough queued to keep every CPU busy, not the whole plan
    queue = list(reversed(todo))
    pending: dict = {}
    records: dict[int, dict] = {}
    try:
        while queue or pending:
            while queue and len(pending) < window:
                u = queue.pop()
                pending[task.remote(s, plan.spec, plan.names, plan.units[u])] = u
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=WAIT_S)
            for ref in ready:
                u = pending.pop(ref)
                records[u] = _result(ref)
                progress.update(records[u]["inputs"], records[u]["rows_in"])
            progress.show(len(pending))
    except BaseException as e:
        from .runtime import end_tasks

        end_tasks(pending, e)  # a failed ingest leaves no task running on a shared cluster
        raise
    return records


def _ingest_units(s: IngestSettings, plan: _Plan, t0: float) -> "IngestResult":
    """The distributed ingest: resume or start over, run the missing units, write the manifest last."""
    done = _prepare(s, plan, _job_doc(s, plan))
    todo = [u for u in range(len(plan.units)) if u not in done]
    records = dict(done)
    if todo:
        from .runtime import ray_session

        with ray_session(s.address):
            # Started here, so that the rate counts reading, not Ray's start-up.
            progress = _Progress(plan.total, plan.what, s.progress, sum(r["inputs"] for r in done.values()))
            try:
                records.update(_dispatch(s, plan, todo, progress))
            finally:
                progress.close()
    writer = st.StampWriter(s.out, plan.spec, s.shard_rows, settings={"ingest": _jsonable(asdict(s))}, clear=False)
    for u in range(len(plan.units)):
        rec = records[u]
        for k, shard in enumerate(rec["shards"]):
            writer.add_shard(shard["path"], shard["rows"], rec["label_counts"] if k == 0 else None,
                             columns=rec["columns"])
        writer.add_errors(rec["errors"])
    manifest = writer.close()
    fs, root = st.resolve(s.out)
    fs.delete_dir(posixpath.join(root, st.INGEST_DIR))  # after the manifest: a kill in between starts over
    if not any(r["error_file"] for r in records.values()):
        # Made before dispatch for the tasks; without set-aside rows there is no _errors/, as in-process.
        fs.delete_dir(posixpath.join(root, st.ERRORS_DIR))
    rows_in = sum(int(r["rows_in"]) for r in records.values())
    return IngestResult(manifest, rows_in, time.time() - t0, units=len(plan.units), resumed=len(done))


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
@dataclass
class IngestResult:
    manifest: st.Manifest
    rows_in: int
    seconds: float
    units: int = 0  # units run as Ray tasks (0: read in-process)
    resumed: int = 0  # units a rerun found finished and kept
    appended: int | None = None  # with --append: the stamps added (the manifest is the whole table's)
    appended_aside: dict = field(default_factory=dict)  # with --append: this run's rows set aside, by kind

    @property
    def ingested(self) -> int:
        return self.manifest.num_rows

    @property
    def set_aside(self) -> dict[str, int]:
        return dict(self.manifest.errors)


def _distribute(s: IngestSettings, plan: _Plan) -> bool:
    if s.parallel == "auto":
        return len(plan.units) > 1  # one unit: a single small input stays in-process
    return s.parallel == "on"


def ingest(settings: IngestSettings) -> IngestResult:
    """Read one source form and write a stamp dataset at ``settings.out``.

    FITS directories and class files that make more than one unit are read by Ray tasks (see the module
    docstring); a killed run resumes when rerun with the same settings and inputs.

    Raises
    ------
    IngestError
        For problems that concern a whole input (missing file, wrong layout, pickle without opt-in,
        non-finite pixels under ``nonfinite="fail"``). Row problems are set aside, not raised.
    """
    t0 = time.time()
    st.check_separate(settings.out, {"--fits": settings.fits})
    st.check_separate(settings.out, {"--catalog": settings.catalog, "--images": settings.images,
                                     "--labels": settings.labels, "--hdf5": settings.hdf5,
                                     "--pickle": settings.pickle,
                                     **{f"--class {n}": f for n, f in settings.class_files}}, files=True)
    with output_lock(settings.out, "ingest", scratch=(st.WRITER_MARK, f"{st.INGEST_DIR}/{JOB_NAME}")):
        if settings.append:
            return _append(settings, t0)
        from .replace import replacing

        with replacing(settings.out) as target:  # a table already there is replaced once the new one is complete
            r = _ingest(replace(settings, out=target), t0)
        return r if target == settings.out else replace(r, manifest=st.read_manifest(settings.out))


def _append(settings: IngestSettings, t0: float) -> IngestResult:
    """``--append``: ingest into the table's staging area as usual (resumable), then merge it in."""
    from .append import AppendError, discard_stage, existing_table, merge, stage_dir

    old = existing_table(settings.out)
    # Labels map to the table's classes unless --classes says otherwise (a mismatch is refused at the merge).
    staged = replace(settings, out=stage_dir(settings.out), append=False,
                     classes=tuple(settings.classes) or tuple(old.spec.class_names))
    r = _ingest(staged, t0)
    try:
        manifest, appended, aside = merge(settings.out, "ingest", _jsonable(asdict(settings)))
    except AppendError:
        discard_stage(settings.out)  # refused: the table is as it was, and no staging area is left in it
        raise
    return IngestResult(manifest, r.rows_in, time.time() - t0, units=r.units, resumed=r.resumed,
                        appended=appended, appended_aside=aside)


def _ingest(settings: IngestSettings, t0: float) -> IngestResult:
    with _LocalCopies() as local:
        if settings.class_files or settings.fits:
            plan = _plan_fits(settings) if settings.fits else _plan_class_files(settings, local)
            if _distribute(settings, plan):
                return _ingest_units(settings, plan, t0)
            spec, chunks = plan.spec, plan.chunks()
        elif settings.images:
            spec, chunks = _plan_images(settings, local)
        elif settings.hdf5:
            spec, chunks = _plan_hdf5(settings, local)
        else:
            spec, chunks = _plan_pickle(settings, local)
        job = _Ingester(settings, spec)
        for chunk in chunks:
            job.add(chunk)
        manifest = job.writer.close()
    return IngestResult(manifest, job.rows_in, time.time() - t0)
