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
  on each node's own disk. A package is native code that the replica runs: the directory must be this
  user's own, writable by no one else (made ``0700``), and an absolute path; otherwise there are no
  packages (a warning), never a failed job.
* **Which.** A package is named by a hash of everything its code depends on: the model's architecture, the
  source of its classes and every weight and buffer, the input shape, the thread count, torch and
  stampray, the machine, its CPU model and instruction flags (Inductor builds with ``-march=native``). On
  every load it is also run once on random stamps and compared with the model's own outputs on a few of
  them: a package that answers otherwise (stale, foreign) is removed and the replica compiles.
* **Who builds.** On a miss, in a job long enough for the build to land before the pool ends
  (:func:`stampray.inference.build_packages`; in a shorter one every replica compiles), the first replica
  on the node takes a lock (``flock``, released if it dies) and builds the package (about 20-25 s here
  for ``cnn``, against 15 s for a cold ``torch.compile``); the others, finding the lock taken, compile
  with ``torch.compile`` meanwhile and nobody waits. The package is written under a temporary name and
  renamed when complete, so a killed build leaves no half package.
* **Housekeeping.** A package used is touched; after a build, packages beyond the ``KEEP`` most recently
  used are removed (only files of this module's own naming, in its own directory).
* **Failure.** Any error while building, loading or checking gives ``None`` and a warning, never an
  exception: the replica compiles as before. The packaged forward refuses an input of any other shape,
  dtype or layout (the package's code does not check). A failed build leaves ``<package>.failed`` (the
  error) and is not tried again for a day. GPU replicas keep ``torch.compile`` (with autocast), which this
  module does not replace.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import inspect
import logging
import os
import platform
import stat
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
    """The package directory (created), or None: packages off, no absolute home for it, or a directory that
    is not this user's own and writable by this user only (a package is native code the replica runs)."""
    asked = os.environ.get(CACHE_ENV, "").strip()
    if asked.lower() == "off":
        return None
    root = asked or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                 "stampray", "compiled")
    if not os.path.isabs(root):  # no HOME (a container's arbitrary user): never a directory relative to here
        return None
    try:
        os.makedirs(root, mode=0o700, exist_ok=True)
        info = os.lstat(root)
    except OSError as e:
        logger.warning(f"[stampray] compiled-model cache {root} cannot be made ({e}); compiling in each replica")
        return None
    if (not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022
            or not os.access(root, os.W_OK)):
        logger.warning(f"[stampray] compiled-model cache {root} is not a directory of this user's that only this "
                       f"user can write; compiling in each replica (set {CACHE_ENV} to such a directory)")
        return None
    return root


def _cpu_model() -> str:
    """The CPU's model name and feature flags (Inductor builds for the machine it runs on, -march=native):
    two CPUs with the same torch capability level but other instructions get other packages."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f.read().splitlines() if ln.split(":")[0].strip() in ("model name", "flags")]
        return "\n".join(dict.fromkeys(lines))  # one processor's lines (they repeat per core)
    except OSError:
        return platform.processor()


def _code_of(module) -> str:
    """The source of every class in ``module`` outside torch itself (torch's own come with its version):
    a change to a model's ``forward`` with the same layers and weights names another package."""
    parts = []
    for cls in dict.fromkeys(type(m) for m in module.modules()):
        if cls.__module__.split(".")[0] == "torch":
            continue
        try:
            parts.append(inspect.getsource(cls))
        except (OSError, TypeError):  # no source at hand (a frozen or generated class): its name only
            parts.append(f"{cls.__module__}.{cls.__qualname__}")
    return "\n".join(parts)


def package_key(module, shape: tuple[int, ...], tag: str = "") -> str:
    """The name of ``module``'s package for inputs of ``shape``: a hash of its architecture, code, weights
    and buffers, the shape, ``tag`` (what else changes the graph), the thread count, torch and stampray, the
    machine and its CPU."""
    import torch

    from . import __version__

    h = hashlib.sha256()
    for part in (torch.__version__, __version__, platform.machine(), torch.backends.cpu.get_cpu_capability(),
                 _cpu_model(), str(torch.get_num_threads()), repr(tuple(int(s) for s in shape)), tag,
                 f"{type(module).__module__}.{type(module).__qualname__}", repr(module), _code_of(module)):
        h.update(part.encode() + b"\0")
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode() + b"\0")
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def forward_for(module, shape: tuple[int, ...], tag: str = "", may_build: bool = True) -> tuple[Callable | None, str]:
    """``module``'s compiled forward for channels-last float32 CPU inputs of exactly ``shape`` from its
    package, built here first when no replica has and none is building it, and checked against ``module``
    itself: ``(forward, how)`` with ``how`` ``"loaded"`` or ``"built"``; ``(None, why)`` when the caller
    should ``torch.compile`` instead (packages off, another replica building it, any error). ``forward(x)``
    returns the tuple of outputs ``module`` returns. ``may_build``: False to only load a package that exists
    (``(None, "not built")`` otherwise). Never raises."""
    try:
        return _forward_for(module, tuple(int(s) for s in shape), tag, may_build)
    except Exception as e:  # noqa: BLE001 - the cache is an optimisation: no error of its may fail a replica
        logger.warning(f"[stampray] compiled package unavailable ({type(e).__name__}: {e}); using torch.compile")
        return None, "error"


def _forward_for(module, shape: tuple[int, ...], tag: str, may_build: bool) -> tuple[Callable | None, str]:
    root = cache_dir()
    if root is None:
        return None, "off"
    path = os.path.join(root, PREFIX + package_key(module, shape, tag) + SUFFIX)
    if os.path.exists(path):
        return _checked(module, shape, path, "loaded")
    if not may_build:
        return None, "not built"
    if _failed_recently(path):
        return None, "its build failed recently"
    with _build_lock(path + ".lock") as mine:
        if not mine:
            return None, "another replica is building it"
        if os.path.exists(path):  # a replica finished it between the check and the lock
            return _checked(module, shape, path, "loaded")
        if _failed_recently(path):
            return None, "its build failed recently"
        try:
            t = time.time()
            build(module, shape, path)
            logger.info(f"[stampray] compiled package built in {time.time() - t:.1f} s: {path}")
        except Exception as e:  # noqa: BLE001 - export or the C++ compiler failed: torch.compile may not
            return _failed(path, f"no compiled package ({type(e).__name__}: {e})", "build failed")
        prune(root)
        return _checked(module, shape, path, "built")


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


def load(path: str, shape: tuple[int, ...]) -> Callable:
    """The package at ``path`` as a callable on one input tensor, returning its outputs as a tuple. Through
    the package loader itself where this torch has it (no compiler import: milliseconds), else through
    ``torch._inductor.aoti_load_package``. The callable refuses any input but a channels-last float32 CPU
    tensor of ``shape``: the package's code does not check its input, and reads out of bounds."""
    import torch

    shape = tuple(int(s) for s in shape)
    run = _package_runner(path)

    def forward(x):
        if (tuple(x.shape) != shape or x.dtype != torch.float32 or x.device.type != "cpu"
                or not x.is_contiguous(memory_format=torch.channels_last)):
            msg = (f"compiled package {os.path.basename(path)} takes channels-last float32 CPU input of shape "
                   f"{shape}, got {x.dtype} {tuple(x.shape)} on {x.device}")
            raise ValueError(msg)
        return run(x)

    return forward


def _package_runner(path: str) -> Callable:
    """``x -> tuple of outputs`` for the package at ``path``: torch's C++ package loader where this torch
    has it with the signature known here, else ``torch._inductor.aoti_load_package``."""
    import torch

    loader_cls = getattr(getattr(torch._C, "_aoti", None), "AOTIModelPackageLoader", None)
    if loader_cls is not None:
        try:
            loader = loader_cls(path, "model", False, 1, -1)
        except TypeError:  # another signature in another torch release
            loader = None
        if loader is not None:
            return lambda x: tuple(loader.run([x]))
    from torch._inductor import aoti_load_package

    compiled = aoti_load_package(path)

    def run(x):
        out = compiled(x)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    return run


def _checked(module, shape: tuple[int, ...], path: str, how: str) -> tuple[Callable | None, str]:
    """The package loaded and run once on random stamps, its outputs compared with ``module``'s own on a few
    of them (the same number of outputs, the same values to 1e-3): a package that does not load, or answers
    otherwise (a stale or foreign file), is removed and the caller compiles; one just built that fails so is
    noted as a failed build."""
    import torch

    try:
        forward = load(path, shape)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).contiguous(
            memory_format=torch.channels_last)
        with torch.inference_mode():
            got, want = forward(x), module(x[:8])
        want = tuple(want) if isinstance(want, (tuple, list)) else (want,)
        if len(got) != len(want) or not all(
                torch.allclose(g[:8].float(), w.float(), rtol=1e-3, atol=1e-3) for g, w in zip(got, want)):
            msg = "its outputs differ from the model's own"
            raise ValueError(msg)
    except Exception as e:  # noqa: BLE001 - a damaged, stale or foreign file: compile instead
        with contextlib.suppress(OSError):
            os.unlink(path)  # ours (its name says so) and unusable: the next replica builds it afresh
        why = f"compiled package {path} is unusable ({type(e).__name__}: {e}); removed"
        if how == "built":
            return _failed(path, why, "build unusable")
        logger.warning(f"[stampray] {why}; using torch.compile")
        return None, "unusable"
    with contextlib.suppress(OSError):
        os.utime(path)  # most recently used: kept by prune
    return forward, how


def _failed(path: str, why: str, how: str) -> tuple[None, str]:
    """A build that failed: warned, and noted beside the package's name so that it is not tried again for
    ``RETRY_S``."""
    logger.warning(f"[stampray] {why}; using torch.compile")
    with contextlib.suppress(OSError), open(path + FAILED, "w") as f:
        f.write(why + "\n")
    return None, how


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
    """Remove this module's packages beyond the ``keep`` most recently used (with their lock files);
    temporary files of builds killed over ``stale_s`` ago; failure notes, and lock files without a package,
    older than ``RETRY_S``. Only files named by this module; a file another replica removes first is
    skipped. Returns the packages removed."""
    def age(p: str) -> float | None:
        try:
            return time.time() - os.stat(p).st_mtime
        except OSError:
            return None

    names = [f for f in os.listdir(root) if f.startswith(PREFIX)]
    packages = [(a, os.path.join(root, f)) for f in names if f.endswith(SUFFIX) and ".tmp" not in f
                for a in [age(os.path.join(root, f))] if a is not None]
    packages.sort()  # youngest (most recently used) first
    gone = []
    for _, p in packages[keep:]:
        for f in (p, p + ".lock"):
            with contextlib.suppress(OSError):
                os.unlink(f)
        gone.append(p)
    for f in names:
        p = os.path.join(root, f)
        a = age(p)
        if a is None:
            continue
        old = ((".tmp" in f and a > stale_s) or (f.endswith(FAILED) and a > RETRY_S)
               or (f.endswith(".lock") and a > RETRY_S and not os.path.exists(p[:-5])))
        if old:
            with contextlib.suppress(OSError):
                os.unlink(p)
    return gone
