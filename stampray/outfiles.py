"""Named files that a verb writes into a directory which may also hold a user's own files: ``evaluate``'s
report, ``vet``'s page and ``occlude --png``'s pictures.

The files are drawn in a local staging directory first. Only once all of them are complete are they put in
place (:func:`publish`), one by one, each atomically (a temporary file beside it, then a rename; an object
store's PUT is atomic already), the page that marks the output complete last. ``DIR/_stampray.json`` lists
the files the verb wrote there, so a later run of the same verb replaces those, and removes the ones it no
longer writes; a file of the same name that the verb did not write is never replaced, and the run stops
before it replaces anything, naming it. Directories written before the marker existed are recognised by
each verb's own record (``legacy``).
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from typing import Callable, Iterable

import pyarrow.fs as pafs

from . import table as st

MARKER = "_stampray.json"


def _marker_doc(out: str) -> dict | None:
    path = st.join(out, MARKER)
    if not st.exists(path):
        return None
    try:
        doc = json.loads(st.read_text(path))
    except (OSError, ValueError, UnicodeDecodeError):
        doc = None
    if not (isinstance(doc, dict) and isinstance(doc.get("verb"), str) and isinstance(doc.get("files"), list)):
        msg = (f"{out}/{MARKER} exists but is not one stampray wrote, so nothing in {out} is replaced; choose "
               f"another directory")
        raise ValueError(msg)
    return doc


def owned(out: str, verb: str, flag: str, legacy: Callable[[str], set[str]] | None = None) -> set[str]:
    """The files in ``out`` that ``stampray VERB`` wrote there (from its marker, or ``legacy(out)`` for a
    directory written before the marker existed). Refuses an ``out`` that is a file, or whose marker another
    verb wrote (the two would share and overwrite the marker)."""
    fs, p = st.resolve(out)
    kind = fs.get_file_info(p).type
    if kind == pafs.FileType.File:
        msg = f"{flag} {out} is a file; give a directory"
        raise ValueError(msg)
    if kind == pafs.FileType.NotFound:
        return set()
    doc = _marker_doc(out)
    if doc is None:
        return set(legacy(out)) if legacy else set()
    if doc["verb"] != verb:
        msg = (f"{flag} {out} holds the output of 'stampray {doc['verb']}' (its {MARKER}); give 'stampray {verb}' "
               f"a directory of its own")
        raise ValueError(msg)
    return {str(n) for n in doc["files"]}


def check(out: str, verb: str, flag: str, names: Iterable[str],
          legacy: Callable[[str], set[str]] | None = None) -> set[str]:
    """Before any work: refuse ``out`` when one of the file ``names`` the verb will surely write is there and
    is not its own (see :func:`owned`); returns the files it owns."""
    mine = owned(out, verb, flag, legacy)
    _refuse_foreign(out, verb, flag, names, mine)
    return mine


def _refuse_foreign(out: str, verb: str, flag: str, names: Iterable[str], mine: set[str]) -> None:
    theirs = [n for n in dict.fromkeys(names) if n not in mine and st.exists(st.join(out, n))]
    if theirs:
        shown = ", ".join(theirs[:5]) + (" ..." if len(theirs) > 5 else "")
        msg = (f"{flag} {out} holds {shown}, which 'stampray {verb}' did not write there (not listed in its "
               f"{MARKER}), so nothing is replaced; choose another directory, or move those files away")
        raise ValueError(msg)


def _write_marker(out: str, verb: str, files: Iterable[str]) -> None:
    _put_bytes(st.join(out, MARKER), json.dumps({"verb": verb, "files": sorted(set(files))}, indent=1).encode())


def _put_bytes(dest: str, data: bytes) -> None:
    fs, p = st.resolve(dest)
    if not isinstance(fs, pafs.LocalFileSystem):  # one PUT: atomic already
        with fs.open_output_stream(p) as f:
            f.write(data)
        return
    tmp = posixpath.join(posixpath.dirname(p), f".{posixpath.basename(p)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def publish(staged: str, names: list[str], out: str, verb: str, flag: str,
            legacy: Callable[[str], set[str]] | None = None) -> list[str]:
    """Put the complete files ``names`` (in this order: the one that marks the output complete last) from the
    local directory ``staged`` into ``out``; remove the files an earlier run of the verb wrote there and this
    one did not. Returns their paths under ``out``."""
    names = list(dict.fromkeys(names))
    mine = owned(out, verb, flag, legacy)  # again: files may have appeared since the run began
    _refuse_foreign(out, verb, flag, names, mine)
    fs, p = st.resolve(out)
    fs.create_dir(p, recursive=True)
    _write_marker(out, verb, mine | set(names))  # first: a run killed while putting the files still owns them
    paths = []
    for name in names:
        with open(os.path.join(staged, name), "rb") as f:
            _put_bytes(st.join(out, name), f.read())
        paths.append(st.join(out, name))
    for name in sorted(mine - set(names) - {MARKER}):
        path = st.resolve(st.join(out, name))[1]
        if fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)
    _write_marker(out, verb, names)
    return paths


def check_file(path: str, flag: str, verb: str, ours: Callable[[str], bool], how: str, a_name: str) -> None:
    """Refuse a single-file output (``similar --out``, ``export --onnx``) that is a directory, or an existing
    file that ``stampray VERB`` did not write: ``ours(path)`` tells, ``how`` says how it tells, ``a_name``
    is an example of a file name to give instead of a directory."""
    fs, p = st.resolve(path)
    kind = fs.get_file_info(p).type
    if kind == pafs.FileType.Directory:
        msg = f"{flag} {path} is a directory; give a file name such as {a_name}"
        raise ValueError(msg)
    if kind == pafs.FileType.File and not ours(path):
        msg = (f"{flag} {path} exists and 'stampray {verb}' did not write it ({how}), so it is not replaced; "
               f"choose another file name, or delete that file first if you no longer need it")
        raise ValueError(msg)
