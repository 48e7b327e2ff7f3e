"""Named files that a verb writes into a directory which may also hold a user's own files: ``evaluate``'s
report, ``vet``'s page and ``occlude --png``'s pictures.

The files are drawn in a local staging directory first. Only once all of them are complete are they put in
place (:func:`publish`), one by one, each atomically (:func:`stampray.table.write_bytes`), the page that
marks the output complete last. ``DIR/_stampray.json`` lists the files the verb wrote there with their
SHA-256, so a later run of the same verb replaces those and removes the ones it no longer writes, while a
file of the same name that the verb did not write, or that changed since, is never replaced or removed:
the run stops before it replaces anything, naming it. Only plain file names of the kind the verb writes
(:class:`Files`) are ever taken from the list. Directories written before the list existed are recognised
by each verb's own record (``Files.legacy``); their files may be replaced, never removed.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from dataclasses import dataclass
from typing import Callable, Iterable

import pyarrow.fs as pafs

from . import table as st

MARKER = "_stampray.json"


@dataclass(frozen=True)
class Files:
    """What one verb writes into such a directory: ``fixed`` names it always writes (checked before any
    work), other names ending in ``suffix``; ``legacy(out)``: the names an output of an earlier stampray
    (before the marker) holds, or an empty set."""

    verb: str
    flag: str
    fixed: tuple[str, ...]
    suffix: str = ".png"
    legacy: Callable[[str], set[str]] | None = None

    def allows(self, name: str) -> bool:
        """A plain file name of this directory (no path, not hidden) of the kind the verb writes."""
        plain = (name == posixpath.basename(name) and "\\" not in name and not name.startswith(".")
                 and name != MARKER)
        return plain and (name in self.fixed or (name.endswith(self.suffix) and len(name) > len(self.suffix)))


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


def owned(out: str, kind: Files) -> dict[str, list]:
    """The files in ``out`` that the verb wrote there, each with the SHA-256 digests it may have (from the
    marker), or an empty list for a file of an earlier stampray's output (``kind.legacy``), whatever its
    content (such a file may be replaced, never removed). Refuses an ``out`` that is a file, or whose marker another verb wrote (the two would share and
    overwrite the marker)."""
    fs, p = st.resolve(out)
    what = fs.get_file_info(p).type
    if what == pafs.FileType.File:
        msg = f"{kind.flag} {out} is a file; give a directory"
        raise ValueError(msg)
    if what == pafs.FileType.NotFound:
        return {}
    doc = _marker_doc(out)
    if doc is None:
        return {n: [] for n in (kind.legacy(out) if kind.legacy else ()) if kind.allows(n)}
    if doc["verb"] != kind.verb:
        msg = (f"{kind.flag} {out} holds the output of 'stampray {doc['verb']}' (its {MARKER}); give "
               f"'stampray {kind.verb}' a directory of its own")
        raise ValueError(msg)
    return {str(n): [str(d) for d in v] for n, v in doc["files"].items() if kind.allows(str(n))}


def _still_ours(out: str, name: str, mine: dict[str, list]) -> bool:
    """Whether ``out/name`` is a file the verb wrote and nobody has changed since (its digest is listed)."""
    if name not in mine:
        return False
    return not mine[name] or sha256(st.join(out, name)) in mine[name]


def check(out: str, kind: Files, may_write: Callable[[set[str]], set[str]] | None = None) -> dict[str, list]:
    """Before any work: refuse ``out`` when one of the names the verb always writes is there and is not its
    own, unchanged (see :func:`owned`); returns the files it owns. ``may_write(names)``: of the files of the
    verb's kind found in ``out``, those the run may write (asked only when some are there); they are
    refused likewise, so that a user's file is found before the work, not once it is done."""
    mine = owned(out, kind)
    found: set[str] = set()
    if may_write is not None:
        from .pieces import list_files

        found = {n for n in list_files(out, kind.suffix) if kind.allows(n) and n not in kind.fixed}
    _refuse_foreign(out, kind, [*kind.fixed, *sorted(may_write(found) if found else ())], mine)
    return mine


def _refuse_foreign(out: str, kind: Files, names: Iterable[str], mine: dict[str, list]) -> None:
    theirs = [n for n in dict.fromkeys(names) if st.exists(st.join(out, n)) and not _still_ours(out, n, mine)]
    if theirs:
        shown = ", ".join(theirs[:5]) + (" ..." if len(theirs) > 5 else "")
        msg = (f"{kind.flag} {out} holds {shown}, which 'stampray {kind.verb}' did not write there or which "
               f"changed since (not as listed in its {MARKER}), so nothing is replaced; choose another directory, "
               f"or move those files away")
        raise ValueError(msg)


def _write_marker(out: str, verb: str, files: dict[str, list]) -> None:
    doc = {"verb": verb, "files": {n: sorted(set(files[n])) for n in sorted(files)}}
    _put_bytes(st.join(out, MARKER), json.dumps(doc, indent=1).encode())


def _put_bytes(dest: str, data: bytes) -> None:
    st.write_bytes(dest, data)


def _leftover_temporaries(out: str, names: Iterable[str]) -> list[str]:
    """Temporary files of ``names`` (and of the marker) that a run killed mid-write left in a local ``out``."""
    fs, p = st.resolve(out)
    if not isinstance(fs, pafs.LocalFileSystem) or fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    wanted = {*names, MARKER}
    pattern = re.compile(r"^\.(.+)\.[0-9a-f]{12}\.tmp$")
    return [i.path for i in fs.get_file_info(pafs.FileSelector(p))
            if i.type == pafs.FileType.File and (m := pattern.match(posixpath.basename(i.path)))
            and m.group(1) in wanted]


def publish(staged: str, names: list[str], out: str, kind: Files) -> list[str]:
    """Put the complete files ``names`` (in this order: the one that marks the output complete last) from the
    local directory ``staged`` into ``out``; remove the files an earlier run of the verb wrote there (and
    listed, unchanged since) that this one did not. Returns their paths under ``out``. Callers hold
    :func:`stampray.lock.output_lock` on ``out``."""
    names = list(dict.fromkeys(names))
    bad = [n for n in names if not kind.allows(n)]
    if bad:  # pragma: no cover - the verbs name their own files
        raise AssertionError(f"stampray {kind.verb} would write {bad} into {out}")
    mine = owned(out, kind)  # again: files may have appeared or changed since the run began
    _refuse_foreign(out, kind, names, mine)
    stale = [n for n in sorted(set(mine) - set(names)) if mine[n] and st.exists(st.join(out, n))
             and _still_ours(out, n, mine)]
    data = {}
    for name in names:
        with open(posixpath.join(staged, name), "rb") as f:
            data[name] = f.read()
    new = {n: [hashlib.sha256(b).hexdigest()] for n, b in data.items()}
    fs, p = st.resolve(out)
    fs.create_dir(p, recursive=True)
    for tmp in _leftover_temporaries(out, names):
        fs.delete_file(tmp)
    # First the marker lists both contents of every file about to be replaced (for an earlier stampray's
    # file, any: an empty list), so a run killed while putting them still owns each, old or new.
    _write_marker(out, kind.verb, {n: [] if mine.get(n) == [] else [*mine.get(n, []), *new.get(n, [])]
                                   for n in set(mine) | set(new)})
    for name in names:
        _put_bytes(st.join(out, name), data[name])
    for name in stale:
        fs.delete_file(st.resolve(st.join(out, name))[1])
    _write_marker(out, kind.verb, new)
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
