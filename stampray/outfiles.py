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

import hashlib
import json
import os
import posixpath
import uuid
from typing import Callable, Iterable

import pyarrow.fs as pafs

from . import table as st

MARKER = "_stampray.json"


def sha256(path: str) -> str:
    """SHA-256 of a file's bytes (a local path or a URI), read in 1 MiB chunks."""
    fs, p = st.resolve(path)
    h = hashlib.sha256()
    with fs.open_input_stream(p) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _marker_doc(out: str) -> dict | None:
    path = st.join(out, MARKER)
    if not st.exists(path):
        return None
    try:
        doc = json.loads(st.read_text(path))
    except (OSError, ValueError, UnicodeDecodeError):
        doc = None
    files = doc.get("files") if isinstance(doc, dict) else None
    if not (isinstance(doc.get("verb") if isinstance(doc, dict) else None, str) and isinstance(files, dict)
            and all(isinstance(v, list) for v in files.values())):
        msg = (f"{out}/{MARKER} exists but is not one stampray wrote, so nothing in {out} is replaced; choose "
               f"another directory")
        raise ValueError(msg)
    return doc


def owned(out: str, verb: str, flag: str, legacy: Callable[[str], set[str]] | None = None) -> dict[str, list]:
    """The files in ``out`` that ``stampray VERB`` wrote there, each with the SHA-256 digests it may have
    (from its marker; an empty list, for any content, for a directory written before the marker existed,
    from ``legacy(out)``). Refuses an ``out`` that is a file, or whose marker another verb wrote (the two
    would share and overwrite the marker)."""
    fs, p = st.resolve(out)
    kind = fs.get_file_info(p).type
    if kind == pafs.FileType.File:
        msg = f"{flag} {out} is a file; give a directory"
        raise ValueError(msg)
    if kind == pafs.FileType.NotFound:
        return {}
    doc = _marker_doc(out)
    if doc is None:
        return {n: [] for n in legacy(out)} if legacy else {}
    if doc["verb"] != verb:
        msg = (f"{flag} {out} holds the output of 'stampray {doc['verb']}' (its {MARKER}); give 'stampray {verb}' "
               f"a directory of its own")
        raise ValueError(msg)
    return {str(n): [str(d) for d in v] for n, v in doc["files"].items()}


def _still_ours(out: str, name: str, mine: dict[str, list]) -> bool:
    """Whether ``out/name`` is a file the verb wrote and nobody has changed since (its digest is listed)."""
    if name not in mine:
        return False
    return not mine[name] or sha256(st.join(out, name)) in mine[name]


def check(out: str, verb: str, flag: str, names: Iterable[str],
          legacy: Callable[[str], set[str]] | None = None) -> dict[str, list]:
    """Before any work: refuse ``out`` when one of the file ``names`` the verb will surely write is there and
    is not its own, unchanged (see :func:`owned`); returns the files it owns."""
    mine = owned(out, verb, flag, legacy)
    _refuse_foreign(out, verb, flag, names, mine)
    return mine


def _refuse_foreign(out: str, verb: str, flag: str, names: Iterable[str], mine: dict[str, list]) -> None:
    theirs = [n for n in dict.fromkeys(names) if st.exists(st.join(out, n)) and not _still_ours(out, n, mine)]
    if theirs:
        shown = ", ".join(theirs[:5]) + (" ..." if len(theirs) > 5 else "")
        msg = (f"{flag} {out} holds {shown}, which 'stampray {verb}' did not write there or which changed since "
               f"(not as listed in its {MARKER}), so nothing is replaced; choose another directory, or move those "
               f"files away")
        raise ValueError(msg)


def _write_marker(out: str, verb: str, files: dict[str, list]) -> None:
    doc = {"verb": verb, "files": {n: sorted(set(files[n])) for n in sorted(files)}}
    _put_bytes(st.join(out, MARKER), json.dumps(doc, indent=1).encode())


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
    local directory ``staged`` into ``out``; remove the files an earlier run of the verb wrote there, unchanged
    since, that this one did not. Returns their paths under ``out``."""
    names = list(dict.fromkeys(names))
    mine = owned(out, verb, flag, legacy)  # again: files may have appeared or changed since the run began
    _refuse_foreign(out, verb, flag, names, mine)
    stale = [n for n in sorted(set(mine) - set(names) - {MARKER}) if st.exists(st.join(out, n))
             and _still_ours(out, n, mine)]
    data = {}
    for name in names:
        with open(os.path.join(staged, name), "rb") as f:
            data[name] = f.read()
    new = {n: [hashlib.sha256(b).hexdigest()] for n, b in data.items()}
    fs, p = st.resolve(out)
    fs.create_dir(p, recursive=True)
    # First the marker lists both contents of every file about to be replaced, so a run killed while putting
    # them still owns each, old or new.
    interim = {n: [*mine.get(n, []), *new.get(n, [])] if mine.get(n) != [] else [] for n in set(mine) | set(new)}
    _write_marker(out, verb, interim)
    for name in names:
        _put_bytes(st.join(out, name), data[name])
    for name in stale:
        fs.delete_file(st.resolve(st.join(out, name))[1])
    _write_marker(out, verb, new)
    return [st.join(out, n) for n in names]


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
