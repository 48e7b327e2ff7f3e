"""The stamp table: the one definition every stampray reader and writer goes through.

A *stamp dataset* is a directory (local or a pyarrow-filesystem URI such as ``s3://bucket/prefix``)::

    STAMPS/
      _manifest.json          schema version, image shape, class names, source, shard row counts and
                              footer digests (a hash of each shard's Parquet footer)
      part-00000.parquet      stamp shards, ``rows_per_shard`` rows each (the last may be shorter)
      part-00001.parquet
      _errors/part-00000.parquet   rows set aside at ingest, with their reason (only when there are any)
      _ingest/                job file and unit markers of a distributed ingest, only while it runs

A distributed ingest names its shards ``part-UUUUU-KKK.parquet`` (unit, shard within the unit), which sort
in input order just as ``part-NNNNN.parquet`` do.

Columns of every shard:

============  =====================================  ==============================================
column        Arrow type                             meaning
============  =====================================  ==============================================
``stamp_id``  ``string``                             unique, stable across reruns
``image``     ``fixed_size_binary[C*H*W*4]``         the stamp, C×H×W little-endian float32
``label``     ``int64`` (nullable)                   class index; null for unlabelled stamps
``split``     ``string`` (nullable, optional)        fixed split shipped with the data
...           any                                    passthrough metadata (``snr``, ``ra``, ``dec``)
============  =====================================  ==============================================

Schema metadata (key ``stampray``) holds the schema version, the image shape, the class names and the
source, so a single shard is self-describing.

Why ``fixed_size_binary``
-------------------------
Measured with ``benchmarks/table_layout.py`` (200,000 noise stamps of 1×21×21, one thread of the 2-core
development machine, best of 3; read the Parquet file and decode to an ``(N, C, H, W)`` float32 array)::

                                   --------- LZ4 ---------    --------- zstd --------
    layout                          file MB   read+decode ms   file MB   read+decode ms
    fixed_size_binary[1764]           354.9              140     326.8              379
    fixed_size_list<float32>[441]     356.7              723     328.6              779
    canonical fixed_shape_tensor      356.7              651     328.6              879
    list<float32> (variable)          356.7              479     328.6              871
    binary blob per row               355.7              718     327.6             1303

Parquet stores list types value by value with repetition levels; a fixed-width binary is one
FIXED_LEN_BYTE_ARRAY per stamp, and decoding a batch is one zero-copy ``np.frombuffer(...).reshape`` of
the column's data buffer — 5× faster than the canonical tensor type and readable by every Parquet
reader (pyarrow, pandas, DuckDB, Spark) without an extension-type registry. The shape lives in the schema
metadata and the manifest. Images are written with LZ4 (noise does not compress, sparse stamps such as
jet images do, and LZ4 decodes far faster than zstd); the small columns use zstd.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .provenance import provenance

SCHEMA_VERSION = 1
MANIFEST_NAME = "_manifest.json"
ERRORS_DIR = "_errors"
INGEST_DIR = "_ingest"  # a distributed ingest's job file and unit markers; removed once the manifest is written
WRITER_MARK = f"{INGEST_DIR}/writer.json"  # marks shards as a StampWriter's until its manifest is written
METADATA_KEY = b"stampray"

ID = "stamp_id"
IMAGE = "image"
LABEL = "label"
SPLIT = "split"
CORE_COLUMNS = (ID, IMAGE, LABEL)
SPLIT_NAMES = ("train", "val", "test")

# The ``_errors/`` table: one schema for every verb that sets rows aside (ingest, cutout, train, score,
# occlude), written only through :func:`write_errors`.
#
#   stamp_id  string  the row's id (null when the row had none)
#   source    string  where the row came from: the input file (ingest, cutout), the stamp shard (score,
#                     occlude), or the table and split (train)
#   row       int64   the row's index in ``source`` (null when unknown)
#   reason    string  ``"<kind>: <detail>"``, e.g. ``"nonfinite: 3 non-finite pixels"``; manifests count by kind
ERROR_SCHEMA = pa.schema(
    [
        pa.field("stamp_id", pa.string()),
        pa.field("source", pa.string()),
        pa.field("row", pa.int64()),
        pa.field("reason", pa.string()),
    ]
)


# --------------------------------------------------------------------------------------------------
# Filesystem helpers: every path may be local or a URI.
# --------------------------------------------------------------------------------------------------
def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path inside it)`` for a local path or a URI (``s3://``, ``file://``)."""
    path = str(path)
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    import os

    return pafs.LocalFileSystem(), os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    """Join path parts for either a local path or a URI."""
    if "://" in str(base):
        return posixpath.join(str(base), *parts)
    import os

    return os.path.join(str(base), *parts)


def exists(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def write_bytes(path: str, data: bytes) -> None:
    """Write a small file whole or not at all: locally a temporary file beside it, then a rename (a run killed
    mid-write leaves the old file, never half of the new one); an object store's PUT is atomic already."""
    fs, p = resolve(path)
    fs.create_dir(posixpath.dirname(p), recursive=True)
    if not isinstance(fs, pafs.LocalFileSystem):
        with fs.open_output_stream(p) as f:
            f.write(data)
        return
    import uuid

    tmp = posixpath.join(posixpath.dirname(p), f".{posixpath.basename(p)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_text(path: str) -> str:
    fs, p = resolve(path)
    with fs.open_input_stream(p) as f:
        return f.read().decode()


def canonical(path: str) -> str:
    """A comparable form of a path or URI: scheme plus the absolute path, no trailing slash."""
    path = str(path)
    if "://" in path:
        scheme, rest = path.split("://", 1)  # by text alone: resolving an s3:// filesystem asks the network
        return scheme.lower() + "://" + posixpath.normpath("/" + rest.split("?", 1)[0]).rstrip("/")
    import os

    return os.path.realpath(path).rstrip("/")


def check_separate(out: str, inputs: dict[str, str | None] | Sequence[tuple[str, str | None]], flag: str = "--out",
                   files: bool = False) -> None:
    """Refuse an output that equals, lies inside or contains an input: writing there would replace or mix
    with what the user gave (``score --data d --out d`` once overwrote the input's manifest). ``inputs``:
    {flag: path}, or (flag, path) pairs where a flag repeats. With ``files``, the inputs are single files,
    and an output directory beside them is fine."""
    o = canonical(out)
    for name, path in (inputs.items() if isinstance(inputs, dict) else inputs):
        if not path:
            continue
        i = canonical(path)
        how = ("is" if o == i else "lies inside" if o.startswith(i + "/") else
               "contains" if i.startswith(o + "/") and not files else None)
        if how:
            msg = (f"{flag} {out} {how} {name} {path}; write the output to a directory of its own, "
                   f"outside every input")
            raise ValueError(msg)


def check_apart_from_model(out: str, model: str, flag: str = "--out") -> None:
    """:func:`check_separate` for ``--model``: a run directory is an input like any other; a checkpoint file
    only may not be the output itself."""
    fs, p = resolve(model)
    check_separate(out, {"--model": model}, flag=flag, files=fs.get_file_info(p).type != pafs.FileType.Directory)


def unlisted_shards(path: str, manifest: "Manifest") -> list[str]:
    """Parquet files in the table's directory that its manifest does not list (another tool's, a copy)."""
    fs, p = resolve(path)
    listed = {str(s["path"]) for s in manifest.shards}
    infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
    return sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.File
                  and i.path.endswith(".parquet") and posixpath.basename(i.path) not in listed)


def footer_digest(path: str) -> tuple[int, str]:
    """``(rows, digest)`` of a Parquet file from its footer alone: a short hash of the footer's bytes (schema,
    row groups, column statistics, key-value metadata), so any rewrite of a shard changes it. Raises a
    ValueError naming the file when it is not a readable Parquet file (truncated, random bytes) or lacks
    the ``stamp_id`` or ``image`` column."""
    fs, p = resolve(path)
    try:
        with fs.open_input_file(p) as f:
            size = f.size()
            if size < 12:
                raise ValueError(f"{size} bytes, too short for Parquet")
            f.seek(size - 8)
            tail = f.read(8)
            length = int.from_bytes(tail[:4], "little")
            if tail[4:] != b"PAR1" or length + 8 > size:
                raise ValueError("Parquet magic bytes not found in footer (truncated, or not a Parquet file)")
            f.seek(size - 8 - length)
            footer = f.read(length)
            meta = pq.ParquetFile(f).metadata
            rows, names = meta.num_rows, meta.schema.to_arrow_schema().names
    except FileNotFoundError:
        raise
    except (OSError, ValueError, pa.ArrowException) as e:
        msg = f"{path} is not a readable Parquet file ({e}); restore it, or re-create it with 'stampray ingest'"
        raise ValueError(msg) from None
    missing = [c for c in (ID, IMAGE) if c not in names]
    if missing:
        msg = (f"{path} has no {' and no '.join(missing)} column (it has: {', '.join(names[:12]) or 'none'}); a stamp "
               f"table needs stamp_id (string) and image (C*H*W float32 bytes): make one with 'stampray ingest'")
        raise ValueError(msg)
    return int(rows), hashlib.blake2b(footer, digest_size=16).hexdigest()


def inspect_shards(path: str, manifest: "Manifest", threads: int = 16) -> dict[str, dict]:
    """Check every shard a manifest lists against its file; ``{name: {"rows", "footer"}}``.

    Refuses, naming the shard, a file that is missing or not Parquet, a manifest whose row count disagrees
    with the file, and a shard whose footer differs from the digest recorded when the table was written
    (the file was replaced after its manifest).
    """
    from concurrent.futures import ThreadPoolExecutor

    names = [str(s["path"]) for s in manifest.shards]

    def one(name: str) -> tuple[int, str]:
        shard = join(path, name)
        if not exists(shard):
            msg = (f"{path}: shard {name}, listed in {MANIFEST_NAME}, is missing; restore it, or re-create the "
                   f"table with 'stampray ingest'")
            raise FileNotFoundError(msg)
        return footer_digest(shard)

    with ThreadPoolExecutor(max(1, min(threads, len(names)))) as pool:
        found = dict(zip(names, pool.map(one, names)))
    for s in manifest.shards:
        name = str(s["path"])
        rows, digest = found[name]
        if int(s["rows"]) != rows:
            msg = (f"{path}/{MANIFEST_NAME} is wrong about {name}: it lists {int(s['rows'])} rows, the file holds "
                   f"{rows}; the manifest does not describe its shards (rerunning cannot fix that): re-create the "
                   f"table with 'stampray ingest'")
            raise ValueError(msg)
        if s.get("footer") and s["footer"] != digest:
            msg = (f"{path}/{name} was changed after the table's manifest was written (its Parquet footer differs "
                   f"from the one recorded); restore the shard, or re-create the table with 'stampray ingest'")
            raise ValueError(msg)
    return {name: {"rows": rows, "footer": digest} for name, (rows, digest) in found.items()}


def make_dirs(path: str) -> None:
    fs, p = resolve(path)
    fs.create_dir(p, recursive=True)


# --------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StampSpec:
    """What a stamp dataset holds: image shape, class names and where it came from."""

    shape: tuple[int, int, int]
    class_names: tuple[str, ...] = ()
    source: str = ""

    def __post_init__(self):
        if len(self.shape) != 3 or any(int(s) <= 0 for s in self.shape):
            msg = f"image shape must be three positive integers (C, H, W), got {self.shape!r}"
            raise ValueError(msg)
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))

    @property
    def pixels(self) -> int:
        c, h, w = self.shape
        return c * h * w

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def metadata(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "image_shape": list(self.shape),
            "class_names": list(self.class_names),
            "source": self.source,
        }

    @classmethod
    def from_metadata(cls, meta: dict) -> "StampSpec":
        version = int(meta.get("schema_version", -1))
        if version != SCHEMA_VERSION:
            msg = (f"stamp table schema version {version} is not supported (this stampray reads "
                   f"version {SCHEMA_VERSION}); re-run 'stampray ingest' with this version")
            raise ValueError(msg)
        return cls(tuple(meta["image_shape"]), tuple(meta.get("class_names", ())), meta.get("source", ""))


def image_type(spec: StampSpec) -> pa.DataType:
    """``fixed_size_binary[C*H*W*4]``: one little-endian float32 C×H×W array per row."""
    return pa.binary(spec.pixels * 4)


def schema(spec: StampSpec, extra: Sequence[pa.Field] = (), with_split: bool = False) -> pa.Schema:
    """The Arrow schema of a stamp shard, with the spec in its metadata."""
    fields = [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(IMAGE, image_type(spec), nullable=False),
        pa.field(LABEL, pa.int64(), nullable=True),
    ]
    if with_split:
        fields.append(pa.field(SPLIT, pa.string(), nullable=True))
    fields.extend(f for f in extra if f.name not in (ID, IMAGE, LABEL, SPLIT))
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(spec.metadata()).encode()})


def spec_from_schema(sch: pa.Schema) -> StampSpec:
    meta = sch.metadata or {}
    if METADATA_KEY not in meta:
        msg = "this Parquet file has no stampray metadata; create stamp tables with 'stampray ingest'"
        raise ValueError(msg)
    return StampSpec.from_metadata(json.loads(meta[METADATA_KEY]))


# --------------------------------------------------------------------------------------------------
# Encoding and decoding images (vectorised: one reshape of the child buffer)
# --------------------------------------------------------------------------------------------------
def encode_images(images: np.ndarray, spec: StampSpec) -> pa.FixedSizeBinaryArray:
    """(N, C, H, W) array -> the ``image`` column (one buffer copy at most, no per-row Python)."""
    images = np.ascontiguousarray(images, dtype="<f4")
    if images.shape[1:] != spec.shape:
        msg = f"images have shape {images.shape[1:]}, the table holds {spec.shape}"
        raise ValueError(msg)
    return pa.FixedSizeBinaryArray.from_buffers(image_type(spec), len(images), [None, pa.py_buffer(images)])


def decode_images(column: pa.Array | pa.ChunkedArray, shape: Sequence[int]) -> np.ndarray:
    """The ``image`` column -> (N, C, H, W) float32: a zero-copy view of the column's data buffer."""
    shape = tuple(int(s) for s in shape)
    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks == 0:
            return np.zeros((0, *shape), dtype=np.float32)
        column = column.chunk(0) if column.num_chunks == 1 else pa.concat_arrays(column.chunks)
    width = int(np.prod(shape)) * 4
    if column.type != pa.binary(width):
        msg = (f"image column has type {column.type}, expected fixed_size_binary[{width}] for stamps of "
               f"shape {shape}; is this a stamp table written by this stampray version?")
        raise ValueError(msg)
    if column.null_count:
        msg = "image column holds nulls; stamp tables never store null images"
        raise ValueError(msg)
    n = len(column)
    data = column.buffers()[1]
    arr = np.frombuffer(data, dtype="<f4", count=n * width // 4, offset=column.offset * width)
    return arr.reshape(n, *shape)


def make_table(
    spec: StampSpec,
    ids: Sequence[str] | pa.Array,
    images: np.ndarray,
    labels: np.ndarray | Sequence | None = None,
    metadata: dict[str, np.ndarray | Sequence] | None = None,
    split: Sequence | None = None,
    extra_fields: Sequence[pa.Field] = (),
) -> pa.Table:
    """Build one stamp table batch with the canonical schema."""
    n = len(images)
    if labels is None:
        label_arr = pa.nulls(n, pa.int64())
    elif isinstance(labels, pa.Array):
        label_arr = labels.cast(pa.int64())
    else:
        label_arr = pa.array(labels, type=pa.int64(), from_pandas=True)
    columns = {ID: pa.array(ids, type=pa.string()), IMAGE: encode_images(images, spec), LABEL: label_arr}
    if split is not None:
        columns[SPLIT] = pa.array(split, type=pa.string())
    fields = list(extra_fields)
    known = {f.name for f in fields}
    for name, values in (metadata or {}).items():
        arr = pa.array(values)
        columns[name] = arr
        if name not in known:
            fields.append(pa.field(name, arr.type))
    sch = schema(spec, fields, with_split=split is not None)
    return pa.table([columns[f.name].cast(f.type) for f in sch], schema=sch)


# --------------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------------
@dataclass
class Manifest:
    """The small JSON beside the shards: enough to validate without scanning the data."""

    spec: StampSpec
    shards: list[dict] = field(default_factory=list)  # {"path": relative, "rows": int, "footer": digest}
    errors: dict[str, int] = field(default_factory=dict)  # reason kind -> count
    columns: list[str] = field(default_factory=list)
    label_counts: dict[str, int] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return sum(int(s["rows"]) for s in self.shards)

    def to_json(self) -> str:
        doc = {
            **self.spec.metadata(),
            "num_rows": self.num_rows,
            "shards": self.shards,
            "errors": self.errors,
            "columns": self.columns,
            "label_counts": self.label_counts,
            "settings": self.settings,
        }
        return json.dumps(doc, indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        doc = json.loads(text)
        return cls(
            spec=StampSpec.from_metadata(doc),
            shards=list(doc.get("shards", [])),
            errors=dict(doc.get("errors", {})),
            columns=list(doc.get("columns", [])),
            label_counts=dict(doc.get("label_counts", {})),
            settings=dict(doc.get("settings", {})),
        )


REPLACE_PLAN = "_replace/plan.json"  # stampray.replace's plan of a swap under way (read here, by readers)


def not_a_stamp_manifest(path: str) -> str | None:
    """Why the ``_manifest.json`` at ``path`` is not a stamp table's, in words for a message (a score
    directory has one too); None when it is one, or when there is none."""
    mpath = join(path, MANIFEST_NAME)
    if not exists(mpath):
        return None
    try:
        doc = json.loads(read_text(mpath))
    except (ValueError, UnicodeDecodeError):
        return f"its {MANIFEST_NAME} is not JSON"
    if isinstance(doc, dict) and "schema_version" in doc and "image_shape" in doc:
        return None
    if isinstance(doc, dict) and "model_tag" in doc:
        return "it holds the results of 'stampray score'"
    return f"its {MANIFEST_NAME} is not one stampray wrote for a stamp table"


def read_manifest(path: str) -> Manifest:
    """Read a dataset's manifest, with a message that says what to do when it is missing or is not a
    stamp table's."""
    mpath = join(path, MANIFEST_NAME)
    if not exists(mpath):
        if exists(join(path, REPLACE_PLAN)):  # stampray.replace: a swap under way, or interrupted
            msg = (f"{path} is being replaced by a new stamp table (no {MANIFEST_NAME} while the files are swapped "
                   f"in); if no ingest, synth or cutout is running there, one was interrupted: the next ingest, "
                   f"synth or cutout into it finishes the swap first")
            raise FileNotFoundError(msg)
        if not exists(path):
            msg = f"{path} does not exist; give a stamp table made by 'stampray ingest', 'synth' or 'cutout'"
            raise FileNotFoundError(msg)
        msg = (f"{path} is not a stamp dataset (no {MANIFEST_NAME}); create one with "
               f"'stampray ingest' or 'stampray synth'")
        raise FileNotFoundError(msg)
    why = not_a_stamp_manifest(path)
    if why:
        msg = f"{path} is not a stamp table ({why}); give a table written by 'stampray ingest', 'synth' or 'cutout'"
        raise ValueError(msg)
    try:
        return Manifest.from_json(read_text(mpath))
    except FileNotFoundError:  # gone since: a replacement began (stampray.replace)
        return read_manifest(path)


def shard_paths(path: str, manifest: Manifest | None = None) -> list[str]:
    manifest = manifest or read_manifest(path)
    return [join(path, s["path"]) for s in manifest.shards]


def read_table(path: str, columns: Sequence[str] | None = None) -> pa.Table:
    """Read a whole (small) dataset into one Arrow table; large data goes through Ray Data."""
    manifest = read_manifest(path)
    tables = [read_parquet(p, columns) for p in shard_paths(path, manifest)]
    if not tables:
        return schema(manifest.spec).empty_table().select(columns or schema(manifest.spec).names)
    return pa.concat_tables(tables, promote_options="default")


def iter_batches(path: str, batch_size: int = 65536, columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
    """Stream record batches over all shards in manifest order (bounded memory)."""
    manifest = read_manifest(path)
    fs, _ = resolve(path)
    for p in shard_paths(path, manifest):
        with fs.open_input_file(resolve(p)[1]) as f:
            try:
                yield from open_parquet(f).iter_batches(batch_size=batch_size, columns=columns)
            except (OSError, pa.ArrowException) as e:
                raise ValueError(damaged(p, e)) from None


def open_parquet(f) -> pq.ParquetFile:
    """A ParquetFile that verifies page checksums where the writer stored them."""
    return pq.ParquetFile(f, page_checksum_verification=True)


def one_line(e: BaseException) -> str:
    """An error's message on one line (pyarrow's and S3's span several), for a message the CLI prints."""
    return " ".join(str(e).split())


def damaged(path: str, e: Exception) -> str:
    return f"{path} is damaged and cannot be read ({one_line(e)}); restore it, or re-create it with 'stampray ingest'"


def read_parquet(path: str, columns: Sequence[str] | None = None) -> pa.Table:
    """Read one Parquet file whole, verifying page checksums; a damaged file is named in the error."""
    fs, p = resolve(path)
    try:
        with fs.open_input_file(p) as f:
            return open_parquet(f).read(columns=columns)
    except FileNotFoundError:
        raise
    except (OSError, pa.ArrowException) as e:
        raise ValueError(damaged(path, e)) from None


def reason_counts(reasons) -> dict[str, int]:
    """``{"nonfinite": 3, "shape": 1}`` from reasons such as ``"nonfinite: 12 non-finite pixels"``."""
    counts: dict[str, int] = {}
    for r in reasons:
        kind = str(r).split(":", 1)[0]
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def errors_table(rows) -> pa.Table:
    """The ``_errors`` table (:data:`ERROR_SCHEMA`) of ``rows``: dicts, or a table or columns mapping
    with the schema's column names; a missing ``source`` or ``row`` is null."""
    if isinstance(rows, list):
        return pa.Table.from_pylist(rows, schema=ERROR_SCHEMA)
    n = len(rows[ID]) if not isinstance(rows, pa.Table) else rows.num_rows
    cols = {}
    for f in ERROR_SCHEMA:
        have = f.name in (rows.column_names if isinstance(rows, pa.Table) else rows)
        col = rows[f.name] if have else pa.nulls(n, f.type)
        cols[f.name] = col.cast(f.type) if isinstance(col, (pa.Array, pa.ChunkedArray)) else pa.array(col, f.type)
    return pa.table(cols, schema=ERROR_SCHEMA)


def write_errors(out: str, name: str, rows, tmp_root: str | None = None) -> dict[str, int]:
    """Write the rows set aside to ``OUT/_errors/<name>`` (:data:`ERROR_SCHEMA`; see :func:`errors_table`
    for ``rows``) and return their counts by reason kind. With no rows, nothing is written and an earlier
    ``OUT/_errors/<name>`` is removed.

    ``tmp_root``: write atomically (workers whose file a rerun may find half-written): on a local
    filesystem the file is written under ``tmp_root/_tmp/`` and moved into place; on an object store one
    PUT already is atomic. Without it the file is written in place (a writer whose manifest, written last,
    marks the output complete).
    """
    table = errors_table(rows)
    path = join(out, ERRORS_DIR, name)
    fs, p = resolve(path)
    if not table.num_rows:
        if fs.get_file_info(p).type == pafs.FileType.File:
            fs.delete_file(p)
        return {}
    fs.create_dir(posixpath.dirname(p), recursive=True)
    if tmp_root is None or not isinstance(fs, pafs.LocalFileSystem):
        write_shard(path, table)
    else:
        import uuid

        tmp = posixpath.join(resolve(tmp_root)[1], "_tmp", f"{name}.{uuid.uuid4().hex[:12]}")
        fs.create_dir(posixpath.dirname(tmp), recursive=True)
        write_shard(tmp, table)
        fs.move(tmp, p)
    return reason_counts(table.column("reason").to_pylist())


def read_errors(path: str) -> pa.Table:
    """The rows set aside at ingest (empty table when there were none)."""
    epath = join(path, ERRORS_DIR)
    fs, p = resolve(epath)
    if fs.get_file_info(p).type == pafs.FileType.NotFound:
        return ERROR_SCHEMA.empty_table()
    files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(p)) if i.path.endswith(".parquet"))
    if not files:
        return ERROR_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(f, filesystem=fs) for f in files])


# --------------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------------
def clear_dataset(path: str) -> None:
    """Delete what stampray wrote at ``path`` (shards, manifest, ``_errors/``, ``_ingest/``) and nothing else;
    create the directory when missing."""
    fs, p = resolve(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.File:
        msg = f"--out {path} is a file; give a directory for the stamp dataset"
        raise ValueError(msg)
    if info.type == pafs.FileType.Directory:
        why = not_a_stamp_manifest(path)
        if why:
            msg = (f"--out {path} is not a stamp table stampray wrote ({why}), so nothing in it is replaced; "
                   f"choose a new or empty directory")
            raise ValueError(msg)
        items = fs.get_file_info(pafs.FileSelector(p))
        names = {posixpath.basename(i.path) for i in items}
        theirs = sorted(n for n in names if (n.startswith("part-") and n.endswith(".parquet")) or n == ERRORS_DIR)
        if theirs and MANIFEST_NAME not in names and INGEST_DIR not in names:
            msg = (f"--out {path} holds {', '.join(theirs[:3])}{' ...' if len(theirs) > 3 else ''}, which stampray "
                   f"did not write there (no {MANIFEST_NAME}); choose a new or empty directory")
            raise ValueError(msg)
        for item in items:
            name = posixpath.basename(item.path)
            if name.startswith("part-") and name.endswith(".parquet"):
                fs.delete_file(item.path)
            elif name == MANIFEST_NAME:
                fs.delete_file(item.path)
            elif name in (ERRORS_DIR, INGEST_DIR, "_append"):  # _append: an unfinished append's staging area
                fs.delete_dir(item.path)
    fs.create_dir(p, recursive=True)


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def write_shard(path: str, table: pa.Table) -> None:
    """Write one Parquet shard: LZ4 for the images (noise does not compress; sparse stamps do, and LZ4
    decodes at memory speed), zstd for the small columns; every page carries a CRC that readers verify
    (:func:`open_parquet`), so a damaged page is found rather than scored."""
    fs, p = resolve(path)
    compression = {name: ("lz4" if name == IMAGE else "zstd") for name in table.schema.names}
    pq.write_table(table, p, filesystem=fs, compression=compression,
                   row_group_size=row_group_rows(table), write_page_checksum=True)


ROW_GROUP_BYTES = 64 << 20  # a row group is the unit one read task holds in memory


def row_group_rows(table: pa.Table) -> int:
    """Rows per row group: at most 16,384, and at most ``ROW_GROUP_BYTES`` of decoded data, so a reader's
    memory does not grow with the stamp size (16,384 stamps of 150x150 float32 would be 1.4 GB)."""
    per_row = table.nbytes / max(1, table.num_rows)
    return int(max(1, min(16384, table.num_rows, ROW_GROUP_BYTES // max(1, per_row))))


class StampWriter:
    """Accumulate stamp batches and write fixed-size Parquet shards, the errors table and the manifest.

    Parameters
    ----------
    out : str
        Dataset directory (local or URI). Existing shards there are replaced.
    spec : StampSpec
        Image shape, class names and source.
    rows_per_shard : int
        Rows per Parquet shard (the last shard may be shorter).
    settings : dict, optional
        Recorded in the manifest.
    clear : bool
        Delete what a previous writer left (shards, manifest, ``_errors/``, ``_ingest/``) first. False when
        the shards were written elsewhere (Ray tasks) and are only registered here with :meth:`add_shard`.
    """

    def __init__(self, out: str, spec: StampSpec, rows_per_shard: int = 50_000, settings: dict | None = None,
                 clear: bool = True):
        if rows_per_shard <= 0:
            msg = f"rows_per_shard must be a positive integer, got {rows_per_shard!r}"
            raise ValueError(msg)
        self.out, self.spec, self.rows_per_shard = str(out), spec, int(rows_per_shard)
        self.settings = settings or {}
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._schema: pa.Schema | None = None
        self.shards: list[dict] = []
        self.errors: list[dict] = []
        self.label_counts: dict[str, int] = {}
        self._error_counts: dict[str, int] = {}  # rows set aside and listed under _errors/ by Ray tasks
        self._columns: list[str] | None = None
        self._marker = join(self.out, WRITER_MARK) if clear else None
        if clear:
            self._clear()
            # Marks the shards that follow as stampray's until the manifest is written: a rerun after a kill
            # may then replace them (clear_dataset refuses part files it cannot tell are its own).
            write_text(self._marker, json.dumps({"writer": "stampray", "rows_per_shard": self.rows_per_shard}))

    def _clear(self) -> None:
        clear_dataset(self.out)

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        if self._schema is None:
            self._schema = table.schema
        elif table.schema.names != self._schema.names:
            msg = f"batch columns {table.schema.names} differ from the first batch's {self._schema.names}"
            raise ValueError(msg)
        else:
            table = table.cast(self._schema)
        count_labels(table, self.label_counts)
        self._pending.append(table)
        self._pending_rows += table.num_rows
        while self._pending_rows >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def _flush(self, rows: int) -> None:
        whole = pa.concat_tables(self._pending)
        head, tail = whole.slice(0, rows), whole.slice(rows)
        name = shard_name(len(self.shards))
        write_shard(join(self.out, name), head.combine_chunks())
        self.shards.append({"path": name, "rows": head.num_rows})
        self._pending = [tail] if tail.num_rows else []
        self._pending_rows = tail.num_rows

    def set_aside(self, stamp_id: str | None, source: str, row: int | None, reason: str) -> None:
        self.errors.append({"stamp_id": stamp_id, "source": source, "row": row, "reason": reason})

    def add_shard(self, name: str, rows: int, label_counts: dict[str, int] | None = None,
                  sch: pa.Schema | None = None, columns: Sequence[str] | None = None) -> None:
        """Register a shard written elsewhere (a Ray task) under this dataset.

        ``sch`` (or only its column names, ``columns``) of the first shard registered gives the manifest's
        column list.
        """
        self.shards.append({"path": name, "rows": int(rows)})
        for k, v in (label_counts or {}).items():
            self.label_counts[k] = self.label_counts.get(k, 0) + int(v)
        if sch is not None and self._schema is None:
            self._schema = sch
        if columns is not None and self._columns is None:
            self._columns = list(columns)

    def add_errors(self, counts: dict[str, int]) -> None:
        """Count rows set aside elsewhere (a Ray task listed them under ``_errors/`` itself), by reason kind."""
        for k, v in counts.items():
            self._error_counts[k] = self._error_counts.get(k, 0) + int(v)

    def _record_footers(self) -> None:
        """Record each shard's footer digest: readers check it, and a scoring job is tied to the content
        it scored, not only to the table's path."""
        from concurrent.futures import ThreadPoolExecutor

        todo = [s for s in self.shards if not s.get("footer")]
        with ThreadPoolExecutor(max(1, min(16, len(todo)))) as pool:
            for s, (rows, digest) in zip(todo, pool.map(lambda s: footer_digest(join(self.out, s["path"])), todo)):
                if rows != int(s["rows"]):
                    msg = f"{join(self.out, s['path'])} holds {rows} rows where {s['rows']} were written"
                    raise RuntimeError(msg)
                s["footer"] = digest

    def close(self) -> Manifest:
        if self._pending_rows:
            self._flush(self._pending_rows)
        counts = write_errors(self.out, shard_name(0), self.errors) if self.errors else {}
        for kind, n in self._error_counts.items():
            counts[kind] = counts.get(kind, 0) + n
        if self._schema is None and self._columns is not None:
            columns = list(self._columns)
        else:
            columns = list((self._schema or schema(self.spec)).names)
        self._record_footers()
        manifest = Manifest(
            spec=self.spec,
            shards=sorted(self.shards, key=lambda s: s["path"]),
            errors=counts,
            columns=columns,
            label_counts=dict(sorted(self.label_counts.items(), key=lambda kv: int(kv[0]))),
            settings={**self.settings, "provenance": provenance()},
        )
        # The manifest is written last: a dataset without one is incomplete and readers refuse it.
        write_text(join(self.out, MANIFEST_NAME), manifest.to_json())
        if self._marker:
            fs, p = resolve(join(self.out, INGEST_DIR))
            fs.delete_dir(p)
        return manifest


def count_labels(table: pa.Table, counts: dict[str, int]) -> dict[str, int]:
    """Add the table's non-null labels to ``counts`` (class index as a string -> rows); returns ``counts``."""
    labels = table.column(LABEL)
    if labels.null_count < len(labels):
        for item in labels.drop_null().value_counts().to_pylist():
            key = str(item["values"])
            counts[key] = counts.get(key, 0) + int(item["counts"])
    return counts


def batched(items: Iterable, n: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch
