"""Starting and connecting to Ray the same way for every verb.

Default: a private local Ray instance (``ray.init(address="local")``), so a stale
``/tmp/ray/ray_current_cluster`` from a crashed run never hijacks the session. A running cluster is used
only when the user asks for it with ``--address`` or ``RAY_ADDRESS``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator


def _quiet_data_context() -> None:
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-dataset INFO lines in the driver
    ctx = ray.data.DataContext.get_current()
    if os.environ.get("STAMPRAY_PROGRESS", "1") == "0":
        ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    with contextlib.suppress(AttributeError):
        ctx.enable_operator_progress_bars = ctx.enable_progress_bars


def target_address(address: str | None) -> str | None:
    """The cluster the user asked for: ``--address`` first, then ``RAY_ADDRESS``; None for a private one."""
    return address or os.environ.get("RAY_ADDRESS") or None


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Make sure Ray is initialised for the duration of a verb.

    Reuses an already-initialised Ray (a notebook, a test session, a Ray job); otherwise connects to the
    requested cluster or starts a private local one, and shuts down only what it started.
    """
    import ray

    if ray.is_initialized():
        _quiet_data_context()
        yield
        return
    addr = target_address(address)
    kwargs = dict(logging_level=logging.WARNING, log_to_driver=True, configure_logging=True)
    if addr:
        ray.init(address=addr, **kwargs)
    else:
        # Workers of a private cluster inherit this environment: Ray Data's per-dataset INFO lines would
        # interleave with stampray's own progress lines.
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
        # The dashboard (Ray's state API, which Ray Train uses) listens on localhost only.
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=True,
                 dashboard_host="127.0.0.1", **kwargs)
    try:
        _quiet_data_context()
        yield
    finally:
        ray.shutdown()


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def ensure_gpus(verb: str, needed: int, wait_s: float, say=None) -> None:
    """Make sure at least ``needed`` GPUs are in the cluster, asking the autoscaler for them if it can
    bring them, waiting at most ``wait_s`` seconds; refuse at once where no GPU can ever come.

    ``say`` (a callable taking one line) reports the wait; the default prints to stderr.
    """
    import sys
    import time

    from .capacity import cluster_capacity, request_gpus

    say = say or (lambda line: print(f"{verb}: {line}", file=sys.stderr, flush=True))
    cap = cluster_capacity()
    if cap.gpus_now >= needed:
        return
    gpu_types = [n for n, t in cap.node_types.items() if float(t.get("resources", {}).get("GPU", 0)) > 0]
    if not cap.autoscaling or (cap.node_types and not gpu_types):
        msg = (f"--use-gpu: the Ray cluster has {cap.gpus_now:g} GPUs and no autoscaler node type that can add "
               f"one; run without --use-gpu, or connect (--address) to a cluster with GPU nodes")
        raise ValueError(msg)
    request_gpus(needed)
    t0 = last = time.time()
    say(f"waiting for the autoscaler to start GPU nodes ({needed} GPU{'s' if needed > 1 else ''} asked for"
        + (f", node types {', '.join(gpu_types)}" if gpu_types else "") + ")")
    while True:
        gpus = cluster_gpus()
        if gpus >= needed:
            say(f"{gpus:g} GPUs up after {time.time() - t0:.0f} s")
            return
        if time.time() - t0 > wait_s:
            msg = (f"--use-gpu: no GPU node came up within {wait_s:.0f} s (GPUs now: {gpus:g}); check the "
                   f"autoscaler with 'ray status', or raise --wait-gpu")
            raise RuntimeError(msg)
        if time.time() - last > 30:
            say(f"still waiting for GPU nodes ({time.time() - t0:.0f} s of at most {wait_s:.0f} s)")
            last = time.time()
        time.sleep(2)
