"""Growing a stamp table by a night: ``ingest --append`` (and ``synth --append``).

The new stamps are first written as a table of their own under ``TABLE/_append/stage/`` by the verb's
usual machinery (so a killed append resumes like any ingest). The merge then

1. checks that the new stamps fit the table: image shape, class names, columns and their types;
2. sets aside every new row whose id the table already holds (``duplicate_id: ... already in the table``),
   rewriting only the staged shards that hold one;
3. writes its plan (files to move, the new manifest) to ``TABLE/_append/plan.json``;
4. moves the staged shards and their ``_errors`` files in under names no earlier shard has
   (``part-aNNNN-KKKKK.parquet``: append NNNN, staged shard KKKKK; they sort after every earlier shard,
   so the manifest lists shards in the order they arrived);
5. replaces ``_manifest.json`` in one step (a rename on a local disk, one PUT on an object store), so a
   reader sees the table before or after the append, never half of it; then removes ``_append/``.

A merge killed after step 3 is rolled forward by the next ``--append`` into the table. The manifest's
``settings.appends`` lists every append: its verb settings, its shards and what made it.
"""

from __future__ import annotations

import json
import posixpath
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import table as st
from .provenance import provenance

APPEND_DIR = "_append"
PLAN_FILE = "plan.json"
_APPENDED = re.compile(r"^part-a(\d{4,})-")


class AppendError(ValueError):
    """The new stamps do not fit the table (one line naming what differs and the fix)."""


def stage_dir(out: str) -> str:
    """Where the new stamps are written as a table of their own before the merge."""
    return st.join(out, APPEND_DIR, "stage")


def discard_stage(out: str) -> None:
    """Remove the staging area of an append that was refused (no plan was written: nothing else changed)."""
    fs, p = st.resolve(st.join(out, APPEND_DIR))
    if fs.get_file_info(p).type == pafs.FileType.Directory and not st.exists(st.join(out, APPEND_DIR, PLAN_FILE)):
        fs.delete_dir(p)


def existing_table(out: str, flag: str = "--append") -> st.Manifest:
    """The manifest of the table ``out`` grows, after rolling forward a merge (or a replacement of the whole
    table, :mod:`stampray.replace`) a kill interrupted."""
    from .replace import pending, roll_forward

    if pending(out):
        roll_forward(out)
    if not st.exists(st.join(out, st.MANIFEST_NAME)):
        msg = f"{flag}: {out} holds no stamp table (no {st.MANIFEST_NAME}); drop {flag} to create one"
        raise AppendError(msg)
    if st.exists(st.join(out, APPEND_DIR, PLAN_FILE)):
        _roll_forward(out)
    return st.read_manifest(out)


def check_fits(old: st.Manifest, new: st.Manifest, out: str) -> None:
    """Refuse new stamps whose shape, classes or columns differ from the table's."""
    if tuple(old.spec.shape) != tuple(new.spec.shape):
        fits = str(new.spec.source).startswith(("FITS cutouts", "cutouts of"))  # where --size crops or pads
        msg = (f"--append: the new stamps are {'x'.join(map(str, new.spec.shape))}, the table {out} holds "
               f"{'x'.join(map(str, old.spec.shape))} stamps; ingest them into a table of their own"
               + (" (or give FITS cutouts --size to crop or pad them)" if fits else ""))
        raise AppendError(msg)
    if list(old.spec.class_names) != list(new.spec.class_names):
        msg = (f"--append: the new stamps' classes {list(new.spec.class_names)} differ from the table's "
               f"{list(old.spec.class_names)}; pass --classes {','.join(old.spec.class_names)}")
        raise AppendError(msg)
    if new.shards and list(old.columns) != list(new.columns):
        msg = (f"--append: the new stamps have columns {list(new.columns)}, the table {out} "
               f"{list(old.columns)}; give the same metadata columns")
        raise AppendError(msg)


def _types(root: str, shards: list[dict]) -> pa.Schema | None:
    if not shards:
        return None
    fs, p = st.resolve(st.join(root, shards[0]["path"]))
    return pq.read_schema(p, filesystem=fs).remove_metadata()


def _ids(root: str, shards: list[dict]) -> pa.Array:
    tables = [st.read_parquet(st.join(root, s["path"]), [st.ID]) for s in shards]
    if not tables:
        return pa.array([], pa.string())
    return pa.concat_tables(tables).column(st.ID).combine_chunks()


def _next_index(old: st.Manifest, out: str) -> int:
    """The number of this append: past every earlier one's shards and set-aside files (an append whose every
    row was set aside added files to _errors/ only), so no file of an earlier append is overwritten."""
    names = [str(s["path"]) for s in old.shards] + _error_files(out)
    found = [int(m.group(1)) for n in names if (m := _APPENDED.match(n))]
    return max([*found, len(old.settings.get("appends", []))], default=0) + 1


def merge(out: str, verb: str, settings: dict) -> tuple[st.Manifest, int, dict[str, int]]:
    """Merge the staged table into ``out``: (the new manifest, stamps appended, rows set aside by kind)."""
    old, staged_root = st.read_manifest(out), stage_dir(out)
    new = st.read_manifest(staged_root)
    check_fits(old, new, out)
    if old.shards and new.shards and _types(out, old.shards) != _types(staged_root, new.shards):
        msg = (f"--append: the new stamps' column types differ from the table's ({_types(staged_root, new.shards)} "
               f"vs {_types(out, old.shards)}); give the metadata columns the same types")
        raise AppendError(msg)
    held = _ids(out, old.shards)
    index = _next_index(old, out)
    moves, shards, label_counts = [], [], {k: int(v) for k, v in old.label_counts.items()}
    errors = {k: int(v) for k, v in old.errors.items()}
    for kind, n in new.errors.items():
        errors[kind] = errors.get(kind, 0) + int(n)
    duplicates, new_counts = [], {}
    for k, s in enumerate(new.shards):
        src = st.join(staged_root, s["path"])
        tbl = st.read_parquet(src)
        dup = pc.is_in(tbl.column(st.ID), value_set=held).to_numpy(zero_copy_only=False) if len(held) else \
            np.zeros(tbl.num_rows, bool)
        if dup.any():
            ids = tbl.column(st.ID).filter(pa.array(dup)).to_pylist()
            duplicates += [{"stamp_id": i, "source": f"{verb} --append", "row": None,
                            "reason": f"duplicate_id: {i!r} is already in the table {out}"} for i in ids]
            tbl = tbl.filter(pa.array(~dup))
            if tbl.num_rows:
                st.write_shard(src, tbl)  # rewritten in the staging area: the table is untouched so far
        if not tbl.num_rows:
            continue
        st.count_labels(tbl, label_counts)
        st.count_labels(tbl, new_counts)
        dst = f"part-a{index:04d}-{k:05d}.parquet"
        rows, digest = st.footer_digest(src)
        moves.append((src, st.join(out, dst)))
        shards.append({"path": dst, "rows": rows, "footer": digest})
    if duplicates:
        errors["duplicate_id"] = errors.get("duplicate_id", 0) + len(duplicates)
        st.write_errors(staged_root, "duplicates.parquet", duplicates)
    for j, name in enumerate(_error_files(staged_root)):
        moves.append((st.join(staged_root, st.ERRORS_DIR, name),
                      st.join(out, st.ERRORS_DIR, f"part-a{index:04d}-{j:05d}.parquet")))
    appended = sum(int(s["rows"]) for s in shards)
    record = {verb: settings, "shards": [s["path"] for s in shards], "stamps": appended,
              "label_counts": dict(sorted(new_counts.items(), key=lambda kv: int(kv[0]))),
              "set_aside": sum(int(v) for v in new.errors.values()) + len(duplicates), "provenance": provenance()}
    manifest = st.Manifest(spec=old.spec, shards=list(old.shards) + shards, errors=errors,
                           columns=list(old.columns) if old.shards else list(new.columns),
                           label_counts=dict(sorted(label_counts.items(), key=lambda kv: int(kv[0]))),
                           settings={**old.settings, "appends": list(old.settings.get("appends", [])) + [record]})
    plan = {"moves": moves, "manifest": manifest.to_json()}
    st.write_text(st.join(out, APPEND_DIR, PLAN_FILE), json.dumps(plan))
    _roll_forward(out)
    set_aside = st.reason_counts(e["reason"] for e in duplicates)
    for kind, n in new.errors.items():
        set_aside[kind] = set_aside.get(kind, 0) + int(n)
    return st.read_manifest(out), appended, set_aside


def _error_files(root: str) -> list[str]:
    fs, p = st.resolve(st.join(root, st.ERRORS_DIR))
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    return sorted(posixpath.basename(i.path) for i in fs.get_file_info(pafs.FileSelector(p))
                  if i.path.endswith(".parquet"))


def _roll_forward(out: str) -> None:
    """Carry out a written plan: move what is still in the staging area, replace the manifest, tidy up."""
    plan = json.loads(st.read_text(st.join(out, APPEND_DIR, PLAN_FILE)))
    for src, dst in plan["moves"]:
        fs, s = st.resolve(src)
        if fs.get_file_info(s).type == pafs.FileType.File:
            _, d = st.resolve(dst)
            fs.create_dir(posixpath.dirname(d), recursive=True)
            fs.move(s, d)
    replace_text(st.join(out, st.MANIFEST_NAME), plan["manifest"])
    fs, p = st.resolve(st.join(out, APPEND_DIR))
    fs.delete_dir(p)


def replace_text(path: str, text: str) -> None:
    """Replace a small file in one step: write beside it and rename on a local disk (readers see the old
    file or the new one); an object store's single PUT is already atomic."""
    fs, p = st.resolve(path)
    if not isinstance(fs, pafs.LocalFileSystem):
        st.write_text(path, text)
        return
    tmp = p + ".tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(text.encode())
    fs.move(tmp, p)
