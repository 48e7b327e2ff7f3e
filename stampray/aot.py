"""Compiled model packages: a replica's compiled forward built once per node and loaded by every later replica.

A CPU replica that compiles (``--compile``) spent most of its start in ``torch.compile``: importing Dynamo and
Inductor and tracing the model, 5-7 s per replica on the 2-core development machine even when Inductor's
on-disk cache already held the graph (15 s with a cold cache), on both cores at once, every job. An
AOTInductor package of the same graph (the model with its weights, the replica's one input shape,
channels-last, its thread count) is a shared library that loads in milliseconds without importing the
compiler, and runs as fast as ``torch.compile``'s code (measured here: 24-30k stamps/s for ``cnn`` on one
thread, against 27k).

* **Where.** ``$STAMPRAY_COMPILE_CACHE`` (``off``: no packages, every compiling replica runs
  ``torch.compile`` as before), else ``$XDG_CACHE_HOME/stampray/compiled`` (``~/.cache/stampray/compiled``),
  on each node's own disk. A directory that cannot be written means no packages, not a failed job.
* **Which.** A package is named by a hash of everything its code depends on: the model's architecture and
  every weight and buffer, the input shape, the thread count, the torch version, the machine and its CPU
  instruction set. Another checkpoint, or the same one on another machine, never loads the wrong code.
* **Who builds.** On a miss the first replica on the node takes a lock (``flock``, released if it dies)
  and builds the package (about 20-25 s here for ``cnn``, against 15 s for a cold ``torch.compile``); the
  others, finding the lock taken, compile with ``torch.compile`` meanwhile and nobody waits. The package is
  written under a temporary name and renamed when complete, so a killed build leaves no half package.
* **Housekeeping.** A package used is touched; after a build, packages beyond the ``KEEP`` most recently
  used are removed (only files of this module's own naming, in its own directory).
* **Failure.** Any error while building or loading gives ``None`` and a warning: the replica compiles as
  before. A failed build leaves ``<package>.failed`` (the error) and is not tried again for a day. GPU
  replicas keep ``torch.compile`` (with autocast), which this module does not replace.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import platform
import time
import warnings
from typing import Callable, Iterator

logger = logging.getLogger(__name__)

CACHE_ENV = "STAMPRAY_COMPILE_CACHE"
PREFIX = "stampray-aot-"  # every file this module writes in the cache directory starts so
SUFFIX = ".pt2"
KEEP = 16  # packages kept per node (the most recently used)
FAILED = ".failed"  # beside a package's name: its build failed (the error inside)
RETRY_S = 86400.0  # a failed build is not tried again for this long (a day: a compiler installed since)


def cache_dir() -> str | None:
    """The package directory (created), or None when packages are off or the directory cannot be made."""
    asked = os.environ.get(CACHE_ENV, "").strip()
    if asked.lower() == "off":
        return None
    root = asked or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                 "stampray", "compiled")
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        logger.warning(f"[stampray] compiled-model cache {root} cannot be made ({e}); compiling in each replica")
        return None
    return root if os.access(root, os.W_OK) else None


def package_key(module, shape: tuple[int, ...], tag: str = "") -> str:
    """The name of ``module``'s package for inputs of ``shape``: a hash of its architecture, weights and
    buffers, the shape, ``tag`` (what else changes the graph), the thread count, torch, the machine and its
    CPU instruction set."""
    import torch

    h = hashlib.sha256()
    for part in (torch.__version__, platform.machine(), torch.backends.cpu.get_cpu_capability(),
                 str(torch.get_num_threads()), repr(tuple(int(s) for s in shape)), tag,
                 f"{type(module).__module__}.{type(module).__qualname__}", repr(module)):
        h.update(part.encode() + b"\0")
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode() + b"\0")
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def forward_for(module, shape: tuple[int, ...], tag: str = "") -> tuple[Callable | None, str]:
    """``module``'s compiled forward for channels-last CPU inputs of ``shape`` from its package, built here
    first when no replica has and none is building it: ``(forward, how)`` with ``how`` ``"loaded"`` or
    ``"built"``; ``(None, why)`` when the caller should ``torch.compile`` instead (packages off, another
    replica building it, an error). ``forward(x)`` returns the tuple of outputs ``module`` returns."""
    root = cache_dir()
    if root is None:
        return None, "off"
    path = os.path.join(root, PREFIX + package_key(module, shape, tag) + SUFFIX)
    if os.path.exists(path):
        return _loaded(path, "loaded")
    if _failed_recently(path):
        return None, "its build failed recently"
    with _build_lock(path + ".lock") as mine:
        if not mine:
            return None, "another replica is building it"
        if not os.path.exists(path):  # a replica may have finished it between the check and the lock
            try:
                t = time.time()
                build(module, shape, path)
                logger.info(f"[stampray] compiled package built in {time.time() - t:.1f} s: {path}")
            except Exception as e:  # noqa: BLE001 - export or the C++ compiler failed: torch.compile may not
                logger.warning(f"[stampray] no compiled package ({type(e).__name__}: {e}); using torch.compile")
                with contextlib.suppress(OSError), open(path + FAILED, "w") as f:
                    f.write(f"{type(e).__name__}: {e}\n")  # not tried again for RETRY_S (see _failed_recently)
                return None, "build failed"
            prune(root)
            return _loaded(path, "built")
    return _loaded(path, "loaded")


def build(module, shape: tuple[int, ...], path: str) -> None:
    """Export ``module`` for channels-last inputs of ``shape`` and write its AOTInductor package to
    ``path``, complete or not at all (a temporary name in the same directory, renamed)."""
    import torch
    import torch._inductor

    example = torch.zeros(shape).contiguous(memory_format=torch.channels_last)
    tmp = f"{path}.{os.getpid()}.tmp{SUFFIX}"
    try:
        # torch's own deprecation notes from inside export (a user can do nothing about them) stay off the
        # console a replica's stderr goes to.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            program = torch.export.export(module, (example,))
            torch._inductor.aoti_compile_and_package(program, package_path=tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def load(path: str) -> Callable:
    """The package at ``path`` as a callable on one input tensor, returning its outputs as a tuple. Through
    the package loader itself where this torch has it (no compiler import: milliseconds), else through
    ``torch._inductor.aoti_load_package``."""
    import torch

    loader_cls = getattr(getattr(torch._C, "_aoti", None), "AOTIModelPackageLoader", None)
    if loader_cls is not None:
        with contextlib.suppress(TypeError):  # another signature in another torch release
            loader = loader_cls(path, "model", False, 1, -1)
            return lambda x: tuple(loader.run([x]))
    from torch._inductor import aoti_load_package

    compiled = aoti_load_package(path)

    def run(x):
        out = compiled(x)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    return run


def _loaded(path: str, how: str) -> tuple[Callable | None, str]:
    try:
        run = load(path)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file: compile instead (a later build replaces it)
        logger.warning(f"[stampray] compiled package {path} does not load ({type(e).__name__}: {e}); "
                       f"using torch.compile")
        with contextlib.suppress(OSError):
            os.unlink(path)  # ours (its name says so) and useless: the next replica builds it afresh
        return None, "load failed"
    with contextlib.suppress(OSError):
        os.utime(path)  # most recently used: kept by prune
    return run, how


def _failed_recently(path: str) -> bool:
    """Whether the package's build failed less than ``RETRY_S`` ago (every replica of every job would
    otherwise spend the build's time again on a node that cannot build it)."""
    try:
        return time.time() - os.stat(path + FAILED).st_mtime < RETRY_S
    except OSError:
        return False


@contextlib.contextmanager
def _build_lock(path: str) -> Iterator[bool]:
    """Whether this process holds the build lock ``path`` (non-blocking; the OS drops it if we die)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def prune(root: str, keep: int = KEEP, stale_s: float = 3600.0) -> list[str]:
    """Remove this module's packages beyond the ``keep`` most recently used (with their lock files),
    temporary files of builds killed over ``stale_s`` ago and failure notes past ``RETRY_S``; returns the
    packages removed."""
    names = os.listdir(root)
    mine = [os.path.join(root, f) for f in names if f.startswith(PREFIX) and f.endswith(SUFFIX) and ".tmp" not in f]
    mine.sort(key=lambda p: os.stat(p).st_mtime, reverse=True)
    gone = []
    for p in mine[keep:]:
        for f in (p, p + ".lock"):
            with contextlib.suppress(OSError):
                os.unlink(f)
        gone.append(p)
    for f in names:
        p = os.path.join(root, f)
        with contextlib.suppress(OSError):
            age = time.time() - os.stat(p).st_mtime
            if f.startswith(PREFIX) and ((".tmp" in f and age > stale_s) or (f.endswith(FAILED) and age > RETRY_S)):
                os.unlink(p)
    return gone
