"""One run at a time per output: a lock file in ``--out``.

Two runs writing the same output would both do all the work and, with ``--overwrite``, delete each other's
files mid-job. Every verb that writes an output directory holds :func:`output_lock` on it while it runs:
``OUT/_lock.json`` names the verb, host, process, start time and a heartbeat the holder refreshes every
``BEAT_S`` seconds. A second run reads it and stops, saying who holds it.

A lock left by a run that died is taken over: on the same machine at once (its process is gone), from
another machine once its heartbeat is older than ``STALE_S``. Local files are created atomically
(``O_EXCL``); object stores have no create-if-absent in pyarrow, so there the lock is written and read
back after a short pause, and the run proceeds only if it still holds its own token (a race of two runs
started within that pause is not excluded there).

A run that fails leaves no directory it created and did not fill: where ``--out`` did not exist before the
run and the run stops with an error before writing anything there but its own bookkeeping (the ``scratch``
files a verb names, such as score's ``_job.json``), that directory is removed again (:func:`remove_if_unfilled`);
a directory that existed, or one holding anything else (a result, a piece a rerun resumes from), stays as
it is. Not after Ctrl-C (``KeyboardInterrupt``): tasks or threads the run did not wait for may still write.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from typing import Iterator

from . import table as st

LOCK_NAME = "_lock.json"
BEAT_S = 30.0  # the holder rewrites its heartbeat this often
STALE_S = 300.0  # a lock from another machine without a heartbeat for this long is taken over
SETTLE_S = 1.0  # object stores: pause between writing the lock and reading it back

log = logging.getLogger(__name__)
_held: dict[str, int] = {}  # lock paths this process holds -> depth (a verb calling another on the same out)


class OutputLocked(ValueError):
    """Another live run holds the output's lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(path: str) -> dict | None:
    try:
        return json.loads(st.read_text(path))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable or half-written: treat as held by an unknown run, stale by its file time


def _stale(doc: dict) -> bool:
    if doc.get("host") == socket.gethostname() and isinstance(doc.get("pid"), int):
        return not _pid_alive(doc["pid"])
    return time.time() - float(doc.get("beat", 0) or 0) > STALE_S


def _describe(doc: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(doc.get("started", 0) or 0)))
    return (f"'stampray {doc.get('verb', '?')}' started {started} by process {doc.get('pid', '?')} on "
            f"{doc.get('host', '?')}")


class _Lock:
    def __init__(self, out: str, verb: str):
        self.out, self.verb = out, verb
        self.path = st.join(out, LOCK_NAME)
        self.local = "://" not in str(out)
        self.doc = {"verb": verb, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                    "beat": time.time(), "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.created: list[str] = []  # --out and its parents that this run created, deepest first (_check_dir)

    def _create_local(self) -> bool:
        p = st.resolve(self.path)[1]
        os.makedirs(os.path.dirname(p), exist_ok=True)
        try:
            fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.doc, f)
        return True

    def _replace(self) -> None:
        """Write our doc over the lock (taking over a stale one, or refreshing our heartbeat)."""
        if self.local:
            p = st.resolve(self.path)[1]
            tmp = f"{p}.{self.doc['token'][:8]}"
            with open(tmp, "w") as f:
                json.dump(self.doc, f)
            os.replace(tmp, p)
        else:
            st.write_text(self.path, json.dumps(self.doc))

    def _ours(self) -> bool:
        doc = _read(self.path)
        return bool(doc) and doc.get("token") == self.doc["token"]

    def _check_dir(self) -> None:
        """The output must be a directory (or creatable as one): say so in one line, naming the flag."""
        fs, p = st.resolve(self.out)
        if fs.get_file_info(p).type == st.pafs.FileType.File:
            msg = f"--out {self.out} is a file; give a directory (a new one, or one stampray wrote)"
            raise ValueError(msg)
        uri, parent = "://" in str(self.out), p.rstrip("/")
        while fs.get_file_info(parent).type == st.pafs.FileType.NotFound:
            self.created.append(parent)
            up = posixpath.dirname(parent)
            if up in ("", parent) or (uri and "/" not in up):  # the root; a bucket is never removed
                break
            parent = up
        try:
            fs.create_dir(p, recursive=True)
        except (OSError, st.pa.ArrowException) as e:
            msg = f"--out {self.out}: cannot create that directory ({e}); give a directory you can write to"
            raise ValueError(msg) from None

    def acquire(self) -> None:
        self._check_dir()
        for _ in range(3):
            if self.local and self._create_local():
                break
            doc = _read(self.path)
            if doc is None and not self.local:
                self._replace()
                time.sleep(SETTLE_S)
                if self._ours():
                    break
                continue
            if doc is None:
                continue  # released between our create and our read: try again
            if not doc:  # empty or half-written: a run creating it right now, or one that died doing so
                info = st.resolve(self.path)[0].get_file_info(st.resolve(self.path)[1])
                mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
                doc = {} if time.time() - mtime > STALE_S else {"verb": "?", "beat": time.time()}
            if doc and not _stale(doc):
                msg = (f"{self.out} is in use by {_describe(doc)}; wait for it to finish, or choose another "
                       f"--out (a lock left by a run that died is taken over: on the same machine at once, "
                       f"from another after {STALE_S:.0f} s without its heartbeat; the lock is {self.path})")
                raise OutputLocked(msg)
            log.warning("%s: taking over the lock of a run that is gone (%s)", self.out,
                        _describe(doc) if doc else "unreadable lock file")
            self._replace()
            time.sleep(0 if self.local else SETTLE_S)
            if self._ours():
                break
        else:
            msg = f"{self.out}: could not take the lock {self.path}; another run is starting there"
            raise OutputLocked(msg)
        self._thread = threading.Thread(target=self._beat, name="stampray-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(BEAT_S):
            with contextlib.suppress(Exception):
                if self._ours():
                    self.doc["beat"] = time.time()
                    self._replace()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            if self._ours():
                fs, p = st.resolve(self.path)
                fs.delete_file(p)


def remove_if_unfilled(out: str, scratch: tuple[str, ...] = (), parents: list[str] = (),
                       before_dirs=lambda: None) -> bool:
    """Remove ``out`` (a directory this run created) when the only files under it are ``scratch`` (paths
    relative to ``out``) and the run's own lock file, then those of ``parents`` (its parent directories the
    run created, deepest first) left empty; True if ``out`` was removed. Anything else there keeps the
    whole directory. The scratch files are deleted one by one, ``before_dirs()`` runs (the caller releases
    its lock there), and then, locally, the directories are removed with ``rmdir``, which refuses one that
    someone has just written into. On an object store only the files are deleted: its directories are
    prefixes, and deleting one is recursive. Errors are logged, never raised: the run's own error is the
    one to report."""
    fs, p = st.resolve(out)
    root = p.rstrip("/") + "/"
    try:
        infos = fs.get_file_info(st.pafs.FileSelector(p, recursive=True, allow_not_found=True))
        files = [i.path[len(root):] for i in infos if i.type == st.pafs.FileType.File]
        if any(f not in (*scratch, LOCK_NAME) for f in files):
            before_dirs()
            return False
        for f in files:
            if f != LOCK_NAME:
                fs.delete_file(root + f)
        before_dirs()
        if not isinstance(fs, st.pafs.LocalFileSystem):
            return True
        dirs = sorted((i.path for i in infos if i.type == st.pafs.FileType.Directory), key=len, reverse=True)
        for d in [*dirs, p]:
            os.rmdir(d)
        for d in parents:
            with contextlib.suppress(OSError):  # not empty: something else lives there
                os.rmdir(d)
    except Exception as e:  # noqa: BLE001 - logged: the run's own error is the one raised
        before_dirs()
        log.warning("%s: kept this directory, which the failed run created (%s)", out, st.one_line(e))
        return False
    return True


@contextlib.contextmanager
def output_lock(out: str, verb: str, scratch: tuple[str, ...] = ()) -> Iterator[None]:
    """Hold ``OUT/_lock.json`` while the block runs (re-entrant within a process); see the module docs.
    ``scratch``: the verb's bookkeeping files (relative to ``out``) that do not keep a directory this run
    created from being removed when the run fails (:func:`remove_if_unfilled`)."""
    key = st.canonical(out)
    if _held.get(key):
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    lock = _Lock(out, verb)
    lock.acquire()
    _held[key] = 1
    failed = False
    try:
        yield
    except Exception:  # not Ctrl-C: tasks or threads the run did not wait for may still write there
        failed = True
        raise
    finally:
        _held.pop(key, None)
        if failed and lock.created:  # still holding the lock: a rerun cannot start in between
            remove_if_unfilled(out, scratch, lock.created[1:], before_dirs=lock.release)
        lock.release()
