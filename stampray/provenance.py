"""What made an output: recorded in every output's saved settings (``provenance`` key), so a result found
months later says which stampray, Ray, PyTorch and Python wrote it, and the git commit when stampray runs
from a checkout."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from importlib import metadata


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """The checkout's commit (``+dirty`` with uncommitted changes), or None outside a git checkout."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(here, ".git")):
        return None
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "") if head else None


@functools.lru_cache(maxsize=1)
def provenance() -> dict:
    """``{"stampray": ..., "ray": ..., "torch": ..., "python": ..., "git_commit": ...}`` (versions of the
    installed distributions; None for one that is absent)."""
    from . import __version__

    return {"stampray": __version__, "ray": _version("ray"), "torch": _version("torch"),
            "python": platform.python_version(), "git_commit": _git_commit()}
