"""A stamp table replaced only once the new one is complete: ``ingest``, ``synth`` and ``cutout --overwrite``
into a directory that already holds a table (and, through :func:`swap`, ``score --overwrite``'s results).

The new table is written as a table of its own under ``TABLE/_replace/stage/`` by the verb's usual
machinery (a killed ingest resumes there like any other). Only when it is complete does the swap run:

1. its plan (the old table's files to remove, the staged ones to move in, the new manifest) is written to
   ``TABLE/_replace/plan.json``;
2. the old manifest goes first, so no reader ever pairs it with new shards; then the old shards, ``_errors``
   and bookkeeping; then the staged ones move in under the same names; the new manifest is written last
   (whole or not at all), and ``_replace/`` is removed.

A swap killed after step 1 is finished by the next verb that writes the table (:func:`roll_forward`), and a
reader that finds no manifest meanwhile is told so. A run that fails before the swap leaves the old table as
it was (its staging area is removed, unless it holds finished units of an ingest that a rerun resumes from,
or the run was interrupted); so does one that could use no input row at all, which stops saying why.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
from typing import Iterator

import pyarrow.fs as pafs

from . import table as st

REPLACE_DIR, PLAN_FILE = st.REPLACE_PLAN.split("/")
OLD_DIRS = (st.ERRORS_DIR, st.INGEST_DIR, "_append")  # the old table's directories (clear_dataset's)


def stage_dir(out: str) -> str:
    return st.join(out, REPLACE_DIR, "stage")


def pending(out: str) -> bool:
    """Whether a swap into ``out`` was planned and not finished."""
    return st.exists(st.join(out, REPLACE_DIR, PLAN_FILE))


def holds_table(out: str) -> bool:
    """Whether ``out`` holds a complete stamp table (its manifest a stamp table's)."""
    return st.exists(st.join(out, st.MANIFEST_NAME)) and st.not_a_stamp_manifest(out) is None


@contextlib.contextmanager
def replacing(out: str) -> Iterator[str]:
    """Where a verb writes its new table: ``out`` itself when it holds no table yet, else the staging area,
    swapped in when the block ends without an error (see the module docstring)."""
    if pending(out):
        roll_forward(out)
    if not holds_table(out):
        yield out
        new = st.read_manifest(out)
        if new.num_rows == 0:  # no table: its list of set-aside rows stays, marked as a writer's unfinished output
            st.write_text(st.join(out, st.WRITER_MARK), json.dumps({"writer": "stampray", "stamps": 0}))
            fs, p = st.resolve(st.join(out, st.MANIFEST_NAME))
            fs.delete_file(p)
            if not new.errors:
                raise ValueError(f"{_nothing(new)} at {out}; check that it is the input you meant")
            raise ValueError(f"{_nothing(new)}; they are listed with their reasons in {st.join(out, st.ERRORS_DIR)}, "
                             f"and no table was written (a rerun at {out} needs no --overwrite): fix the input, or "
                             f"the flags that select from it")
        return
    stage = stage_dir(out)
    try:
        yield stage
    except Exception:  # refused or failed: the old table is as it was
        if not any(n.startswith(f"{st.INGEST_DIR}/unit-") for n in files_under(stage)):
            _remove(st.join(out, REPLACE_DIR))  # else finished units of an ingest that a rerun resumes from
        raise
    new = st.read_manifest(stage)
    if new.num_rows == 0:
        _remove(st.join(out, REPLACE_DIR))
        msg = (f"{_nothing(new)}, so the table at {out} is left as it was; fix the input, or the flags that select "
               f"from it")
        raise ValueError(msg)
    swap(out)


def _nothing(new: st.Manifest) -> str:
    """Why a table of no stamps was not kept: the rows set aside, by reason, or an input of no rows."""
    if not new.errors:
        return "the input holds no rows, so no stamp could be written"
    n = sum(int(v) for v in new.errors.values())
    return f"none of the {n} input rows could be used ({', '.join(f'{k} {v}' for k, v in sorted(new.errors.items()))})"


def swap(out: str, old_files: list[str] | None = None) -> None:
    """Plan the swap of the complete staged output into ``out``, then carry it out: a stamp table's, or
    ``score --overwrite``'s results (``old_files``: the earlier job's files, relative to ``out``). Files, not
    directories, are listed and moved one by one: an object store has no directories to move."""
    doc = json.loads(st.read_text(st.join(stage_dir(out), st.MANIFEST_NAME)))
    recorded = doc.get("settings") or {}
    for verb_settings in [recorded, *recorded.values()]:  # the verb wrote to the stage: record --out
        if isinstance(verb_settings, dict) and verb_settings.get("out") == stage_dir(out):
            verb_settings["out"] = out
    plan = {"remove": _old_files(out) if old_files is None else old_files,
            "move": [n for n in files_under(stage_dir(out)) if n != st.MANIFEST_NAME],
            "manifest": json.dumps(doc, indent=2)}
    st.write_text(st.join(out, REPLACE_DIR, PLAN_FILE), json.dumps(plan))
    roll_forward(out)


def files_under(root: str) -> list[str]:
    """Every file under ``root``, as paths relative to it."""
    fs, p = st.resolve(root)
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=True, allow_not_found=True))
    base = p.rstrip("/") + "/"
    return sorted(i.path[len(base):] for i in infos if i.type == pafs.FileType.File and i.path.startswith(base))


def _old_files(out: str) -> list[str]:
    """The old table's files: its shards, and what lies under its own directories (clear_dataset's)."""
    return [n for n in files_under(out) if (("/" not in n and n.startswith("part-") and n.endswith(".parquet"))
                                       or n.split("/", 1)[0] in OLD_DIRS)]


def roll_forward(out: str) -> None:
    """Carry out a written swap plan (again, after a kill: each step is skipped once done)."""
    plan = json.loads(st.read_text(st.join(out, REPLACE_DIR, PLAN_FILE)))
    fs, root = st.resolve(out)
    _, sroot = st.resolve(stage_dir(out))
    manifest = posixpath.join(root, st.MANIFEST_NAME)
    if fs.get_file_info(manifest).type == pafs.FileType.File and not _is_new(out, plan):
        fs.delete_file(manifest)
    moving = set(plan["move"])
    for name in plan["remove"]:
        if name not in moving:  # one of the same name is replaced as the staged file moves in
            _remove_path(fs, posixpath.join(root, name))
    for name in plan["move"]:
        src, dst = posixpath.join(sroot, name), posixpath.join(root, name)
        if fs.get_file_info(src).type == pafs.FileType.File:
            fs.create_dir(posixpath.dirname(dst), recursive=True)
            _remove_path(fs, dst)
            fs.move(src, dst)
    for d in sorted({n.split("/", 1)[0] for n in plan["remove"] if "/" in n}):  # left empty: the old had them
        path = posixpath.join(root, d)
        if fs.get_file_info(path).type == pafs.FileType.Directory and not files_under(st.join(out, d)):
            fs.delete_dir(path)
    st.write_text(st.join(out, st.MANIFEST_NAME), plan["manifest"])
    _remove(st.join(out, REPLACE_DIR))


def _is_new(out: str, plan: dict) -> bool:
    return st.read_text(st.join(out, st.MANIFEST_NAME)) == plan["manifest"]


def _remove_path(fs: pafs.FileSystem, path: str) -> None:
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.File:
        fs.delete_file(path)
    elif kind == pafs.FileType.Directory:
        fs.delete_dir(path)


def _remove(path: str) -> None:
    fs, p = st.resolve(path)
    _remove_path(fs, p)
