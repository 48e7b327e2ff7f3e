"""Starting and connecting to Ray the same way for every verb.

Default: a private local Ray instance (``ray.init(address="local")``), so a stale
``/tmp/ray/ray_current_cluster`` from a crashed run never hijacks the session. A running cluster is used
only when the user asks for it with ``--address`` or ``RAY_ADDRESS``.

The private instance is reachable from this machine only: its node IP is the loopback address, so the GCS,
raylet, workers and agents listen on 127.0.0.1 (the dashboard was already bound there), Ray's token
authentication stays on, and the per-node metrics export (Prometheus text, unauthenticated) is switched
off. Each private instance lives in a Ray temp dir of its own, ``<ray temp>/stampray-<driver pid>``, with a
marker naming its driver; a later private session ends what is left of instances whose driver died
(``reap_orphans``). Nothing of this applies to a cluster given with ``--address``/``RAY_ADDRESS``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from typing import Iterator

log = logging.getLogger(__name__)

# A private Ray's own settings: no per-node metrics export (see ray_session), and idle workers kept for a
# minute. Ray ends a worker idle for 1 s once a node has more workers than CPUs, and it counts actors: a Train
# run or a scoring pool is a dozen actors on a 2-CPU laptop, so every task worker was ended a second after its
# task and each next task (an epoch's reads, a commit) started a fresh Python importing Ray, pyarrow and
# torch, 1-3 s of CPU each. Measured on the development machine: a 600-stamp 2-epoch `fit` 65 s -> 55 s,
# and a second one in the same session 64 s -> 34 s. Workers idle for longer still end, so memory is bounded.
PRIVATE_SYSTEM_CONFIG = {"enable_metrics_collection": False, "idle_worker_killing_time_threshold_ms": 60_000}
TRAIN_POLL_S = "0.5"  # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S of a private Ray, unless the user set one (ray_session)
# The environment of a private Ray (_private_env), where the user has not set these:
# - Ray Data's per-dataset INFO lines in its workers would interleave with stampray's own progress lines;
# - Ray Train's controller polls its workers every 2 s by default: a run's end (and every epoch's report)
#   waited for the next poll. Polling every TRAIN_POLL_S, a 600-stamp 2-epoch fit ended 1.0-1.7 s after its
#   last epoch, against 4.8-5.0 s (a worker whose poll is late is still given Ray's 10 minutes).
PRIVATE_ENV = {"RAY_DATA_LOG_LEVEL": "WARNING", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": TRAIN_POLL_S}
CONNECT_CHECK_S = 10.0  # the TCP connection to a cluster's GCS tried before ray.init (check_cluster)
OWNER_FILE = "stampray_owner.json"  # in a private instance's temp dir: the driver that owns it
TEMP_PREFIX = "stampray-"  # <ray temp root>/stampray-<driver pid>
# AF_UNIX socket paths are limited to 107 bytes (103 on macOS, Ray's validate_socket_filepath); Ray's
# longest one under the temp dir is session_<date>_<time>_<usec>_<pid>/sockets/plasma_store.
_SOCKET_PATH_MAX = 103 if sys.platform == "darwin" else 107
_SESSION_SOCKET_TAIL = len("/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store")


def _quiet_data_context(private: bool = False) -> None:
    """Ray Data without its per-dataset lines; with ``private`` (stampray's own local Ray, never a user's
    cluster) also without Ray's own DeprecationWarnings: Ray Data 2.60 warns about ``use_push_based_shuffle``,
    ``use_polars`` and ``use_arrow_tensor_v2`` whenever a DataContext is made or unpickled, though nothing
    sets them (shown under ``-W default``, pytest, ``PYTHONWARNINGS``)."""
    import warnings

    if private:  # before the DataContext below is made
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray(\.|$)")
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-dataset INFO lines in the driver
    # Nor "Progress bars disabled. To enable, ...": stampray turns them off to print one progress line itself.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    if os.environ.get("STAMPRAY_PROGRESS", "1") == "0":
        ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    with contextlib.suppress(AttributeError):
        ctx.enable_operator_progress_bars = ctx.enable_progress_bars


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``ray job stop``, a scheduler's time limit): raised in the main thread, so a verb ends
    as on Ctrl-C, its completed work kept for a rerun, and the command line says so in one line."""


_TERMINATED: list[int] = []  # the SIGTERMs this process received: code that catches and re-raises an interrupt
# (Ray Data's iterator raises a plain KeyboardInterrupt of its own) still lets main tell them from Ctrl-C


def _terminate(signum, frame) -> None:
    _TERMINATED.append(signum)
    raise Terminated()


def was_terminated() -> bool:
    """Whether this process received SIGTERM since :func:`on_sigterm`."""
    return bool(_TERMINATED)


def on_sigterm() -> None:
    """Make SIGTERM raise :class:`Terminated` in this process (from the main thread only, as Python allows).
    Called as a verb starts and again once ``ray.init`` returns: Ray puts handlers of its own in place as it
    connects (``sys.exit``, and a C++ one that prints a stack dump)."""
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)


def target_address(address: str | None) -> str | None:
    """The cluster the user asked for: ``--address`` first, then ``RAY_ADDRESS``; None for a private one."""
    return address or os.environ.get("RAY_ADDRESS") or None


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, *, dashboard: bool = True,
                data: bool = True) -> Iterator[None]:
    """Make sure Ray is initialised for the duration of a verb.

    Reuses an already-initialised Ray (a notebook, a test session, a Ray job); otherwise connects to the
    requested cluster or starts a private local one, and shuts down only what it started.

    Two switches let a verb that needs less start less (both for a verb run in a fresh process; neither
    changes a cluster given by address, nor a Ray that was already up):

    * ``dashboard=False``: a private Ray's dashboard process starts without its modules, among them the
      state and job APIs that Ray Train uses; for a verb that runs only tasks, actors and Ray Data.
    * ``data=False``: Ray Data is neither imported nor configured in this process, for a verb whose
      datasets run in a Ray task that configures its own (:func:`_quiet_data_context`).

    On the 2-core development machine (shared, 3 runs each, interleaved), ``ray.init`` of a private Ray took
    6.3 s with ``dashboard=False`` against 8.7 s, and ``data=False`` saves the driver's ~0.9 s CPU
    ``import ray.data``.
    """
    import ray

    if ray.is_initialized():
        _quiet_data_context()
        yield
        return
    addr = target_address(address)
    with _private_env(enabled=not addr), _ray_up(ray, addr, num_cpus, dashboard, data,
                                                 f"--address {addr}" if address else f"RAY_ADDRESS={addr}"):
        yield


def check_cluster(addr: str, named: str) -> None:
    """Before ``ray.init(address=addr)``: where nothing listens at the cluster's address, one line naming it
    (as the user gave it: ``named``) and the fix, within seconds. Ray itself retries a GCS that does not
    answer 20 times, each attempt waiting up to about 40 s (measured: an --address with nothing behind it, or
    RAY_ADDRESS=auto on a machine whose ``ray_current_cluster`` names a cluster that is gone, waited over ten
    minutes). So the GCS address Ray would use is resolved first (``auto`` through Ray's own lookup) and a
    TCP connection to it is tried (a host that does not answer at all: ``CONNECT_CHECK_S``), then whether it
    answers as a GCS (:func:`_not_a_gcs`). A Ray Client address (``ray://``) is refused: Ray Data's streaming
    does not run through it; other ``scheme://`` addresses keep Ray's own, bounded, retries; a dashboard's
    ``http(s)://`` address is named as such. A malformed address is a ValueError (a usage error)."""
    import socket

    from ray._private.services import canonicalize_bootstrap_address

    from .table import one_line

    asked = addr
    if addr == "auto" and os.environ.get("RAY_ADDRESS"):  # Ray's "auto" takes RAY_ADDRESS first
        addr = os.environ["RAY_ADDRESS"]
    if addr.startswith(("http://", "https://")):
        msg = (f"{named} is a dashboard's address, the one 'ray job submit' takes; a verb run on this machine "
               f"connects to the cluster's GCS address (host:port, port 6379 by default): give that, or submit "
               f"the verb as a job (ray job submit --working-dir . -- python jobs/...)"
               f"{', or unset RAY_ADDRESS for a private local Ray' if 'RAY_ADDRESS' in named else ''}")
        raise RuntimeError(msg)
    if addr.startswith("ray://"):
        msg = (f"{named} is a Ray Client address, and stampray's verbs stream their results with Ray Data, which "
               f"Ray Client does not support: give the cluster's GCS address (host:port, port 6379 by default) "
               f"from a machine that reaches it, or submit the verb as a job (ray job submit --working-dir . -- "
               f"python jobs/...)")
        raise ValueError(msg)
    if "://" in addr:
        return
    form = "give the cluster's GCS address as host:port (port 6379 by default; ray start prints it)"
    try:
        gcs = canonicalize_bootstrap_address(addr)
    except ConnectionError as e:  # auto, and no cluster found
        msg = f"{named}: {one_line(e)}; start a cluster (ray start --head) or {form}"
        raise RuntimeError(msg) from None
    except ValueError as e:
        msg = f"{named}: {one_line(e)}; {form}"
        raise ValueError(msg) from None
    if not gcs:  # "local": a new local Ray
        return
    host, _, port = gcs.rpartition(":")
    if not port.isdigit():
        msg = f"{named} has no port number; {form}"
        raise ValueError(msg)
    where = ("the address Ray found for auto: RAY_ADDRESS, the last cluster 'ray start' started on this "
             "machine, or a Ray running here" if asked == "auto" else f"where Ray looks for {addr}")
    at = gcs if gcs == asked else f"{gcs} ({where})"
    fix = ("start the cluster (ray start --head, or ray up cluster.yaml) or name the address of a running one (its "
           "GCS host:port, printed by ray start; ray status shows the cluster)")
    try:
        wrong = _not_a_gcs(host.strip("[]"), int(port), CONNECT_CHECK_S)
    except OSError as e:
        msg = f"{named}: no Ray cluster answers at {at}: {one_line(e)}; {fix}"
        raise RuntimeError(msg) from None
    if wrong:
        msg = (f"{named}: something listens at {at}, but it is not a Ray cluster's GCS ({wrong}; a dashboard's "
               f"port, 8265 by default, or another service?); {fix}")
        raise RuntimeError(msg)


# HTTP/2's client preface and an empty SETTINGS frame: a gRPC server (a Ray GCS) answers with its SETTINGS.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _not_a_gcs(host: str, port: int, timeout: float) -> str | None:
    """Connect to ``host:port`` (an OSError where nothing listens) and say why it is not a GCS, or None.

    Ray's GCS is a gRPC server: sent HTTP/2's preface it answers at once with a SETTINGS frame (measured:
    1 ms on a local Ray). A service that never answers, or answers otherwise, would have ``ray.init`` retry
    for many minutes, printing a warning every few seconds. With TLS (``RAY_USE_TLS``) the GCS wants a
    handshake first: only the connection is tried."""
    import socket

    with socket.create_connection((host, port), timeout=timeout) as conn:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return None
        try:
            conn.sendall(_H2_PREFACE)
            head = b""
            while len(head) < 9:
                part = conn.recv(9 - len(head))
                if not part:
                    break
                head += part
        except socket.timeout:
            return f"no gRPC answer within {timeout:.0f} s"
        except OSError as e:
            return f"it closed the connection ({e.strerror or e})"
    if len(head) == 9 and head[3] == 0x04:  # a frame header whose type is SETTINGS
        return None
    return "it closed the connection without a gRPC answer" if not head else "its answer is not gRPC"


@contextlib.contextmanager
def _private_env(enabled: bool) -> Iterator[None]:
    """``PRIVATE_ENV``'s variables that the user has not set, set while a private Ray runs (its raylet and
    workers inherit them; Ray Train also passes the driver's to its controller at each fit) and removed
    when it ends, so that a later session on a cluster given by address gets none of them."""
    with _environ({k: v for k, v in PRIVATE_ENV.items() if enabled and k not in os.environ}):
        yield


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """``values`` in this process's environment for the block; each variable put back as it was after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _ray_up(ray, addr: str | None, num_cpus: int | None, dashboard: bool, data: bool,
            named: str) -> Iterator[None]:
    """:func:`ray_session`'s start and end of a Ray it starts or connects to (``addr``, as the user gave it:
    ``named``)."""
    kwargs = dict(logging_level=logging.WARNING, log_to_driver=True, configure_logging=True)
    marker = None
    try:
        try:
            if addr:
                _connect(ray, addr, named, kwargs)
            else:
                reap_orphans()
                temp_dir = private_temp_dir()
                if temp_dir:
                    marker = _mark_instance(temp_dir)
                    kwargs["_temp_dir"] = temp_dir
                _start_private(ray, num_cpus, dashboard, kwargs, marker)
        except SystemExit as e:  # SIGTERM while ray.init ran: Ray's own handler (sys.exit) was in place
            if e.code != signal.SIGTERM:
                raise
            _TERMINATED.append(signal.SIGTERM)
            raise Terminated() from None
        on_sigterm()
        if data:
            _quiet_data_context(private=not addr)
        yield
    finally:  # also after a start that failed or was stopped midway: what it started is ended
        if not addr:
            _stop_monitor()
        ray.shutdown()
        if marker:
            try:
                _end_leftovers(os.path.dirname(marker))
            except Exception as e:  # noqa: BLE001 - never instead of the verb's own outcome; the next session reaps
                log.debug("stampray: could not look for leftovers of the private Ray: %s", e)
            with contextlib.suppress(OSError):
                os.remove(marker)


def _connect(ray, addr: str, named: str, kwargs: dict) -> None:
    """``ray.init`` of the cluster at ``addr`` (as the user gave it: ``named``), checked first."""
    check_cluster(addr, named)
    try:
        ray.init(address=addr, **kwargs)
    except ConnectionError as e:
        from .table import one_line

        msg = (f"{named}: could not connect to the Ray cluster ({one_line(e)}); check that it is up (ray "
               f"status) and, if it uses token authentication (Ray's default), that this shell sets "
               f"RAY_AUTH_MODE=token and has the cluster's token (RAY_AUTH_TOKEN, or ~/.ray/auth_token)")
        raise RuntimeError(msg) from None


def _start_private(ray, num_cpus: int | None, dashboard: bool, kwargs: dict, marker: str | None) -> None:
    """``ray.init`` of a private local Ray.

    Loopback only: node IP 127.0.0.1 (GCS, raylet, workers, agents), the dashboard (Ray's state API, which
    Ray Train uses) on 127.0.0.1, and no per-node Prometheus endpoint (it answers without the token and names
    datasets, the node and the session). Token authentication stays on (Ray's default); only its "is enabled
    ... opt out" notice is not shown. With the dashboard (Ray's state API): its address named to the Ray's own
    processes (own_api_server). The port is free when chosen; should another process take it before the
    dashboard binds it, the start is retried on a new one (what the failed start left of the instance is
    ended first)."""
    for attempt in range(1, DASHBOARD_PORT_TRIES + 1):
        if dashboard:
            kwargs["dashboard_port"] = free_loopback_port()
        try:
            with _loopback_node_ip(), own_api_server(kwargs.get("dashboard_port")), _logger_level(
                    "ray._private.authentication.authentication_token_setup", logging.ERROR):
                ray.init(address="local", num_cpus=num_cpus or os.cpu_count(),
                         include_dashboard=bool(dashboard), dashboard_host="127.0.0.1",
                         _node_ip_address="127.0.0.1", _system_config=dict(PRIVATE_SYSTEM_CONFIG), **kwargs)
            return
        except ValueError as e:
            if not dashboard or "already occupied" not in str(e) or attempt == DASHBOARD_PORT_TRIES:
                raise
            log.warning("stampray: the private Ray's dashboard port %s was taken as it started (%s); "
                        "starting it again on another", kwargs["dashboard_port"], e)
            ray.shutdown()
            if marker:
                _end_leftovers(os.path.dirname(marker))


def _end_leftovers(temp_dir: str, term_wait: float = 2.0, kill_wait: float = 2.0) -> None:
    """End what is left of this driver's private Ray after ``ray.shutdown``: its workers are told to exit
    when their raylet goes, but a pool replica was seen to outlive it by over a minute on the development
    machine, spinning at half a core. Only processes of this instance (:func:`processes_in`) are touched."""
    procs = processes_in(temp_dir)
    left = _end(procs, term_wait, kill_wait) if procs else []
    if procs:
        log.debug("stampray: ended %d processes of the private Ray left after its shutdown", len(procs) - len(left))
    if left:
        log.warning("stampray: %d processes of the private Ray in %s did not end: %s", len(left), temp_dir,
                    ", ".join(str(p.pid) for p in left))


def _stop_monitor() -> None:
    """End a private Ray's autoscaler monitor at once, before ``ray.shutdown``.

    ``ray.shutdown`` stops the raylet and the GCS first and then sends the monitor SIGTERM; the monitor's
    handler tries to report its end to the GCS that is already gone, and Ray SIGKILLs it after a 1 s grace
    period. That second was 1.0 of the 1.3-1.5 s that a private Ray's shutdown took on the development machine,
    every time. A private instance has no autoscaler to wind down, so the monitor gets SIGKILL first and
    ``ray.shutdown`` finds it gone. This reaches into Ray's node object; on a Ray without it, nothing is done.
    """
    import subprocess

    try:
        from ray._private import ray_constants, worker

        infos = list(worker._global_node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []))
    except Exception:  # noqa: BLE001 - a Ray that moved these: its own shutdown still ends the monitor
        return
    for info in infos:
        proc = getattr(info, "process", None)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1.0)


API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
DASHBOARD_PORT_TRIES = 3  # starts of a private Ray whose chosen dashboard port another process took first


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 now (Ray picks its own ports the same way)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def own_api_server(port: int | None) -> Iterator[None]:
    """``RAY_API_SERVER_ADDRESS`` naming a private Ray's API server (``http://127.0.0.1:<port>``, its dashboard
    port) while ``ray.init`` starts it: the raylet copies this process's environment as it starts and every
    worker inherits the raylet's. Put back as it was as soon as ``ray.init`` returns (or fails), so that
    nothing else this process starts inherits it (the variable overrides any address a Jobs or state-API
    client is given). ``port=None`` (no dashboard, so no state API): nothing is set.

    Ray's state API (``ray.util.state``) finds the cluster it asks from that variable, else from
    ``RAY_ADDRESS``, else from Ray's ``<temp>/ray_current_cluster`` file, which names the last cluster
    ``ray start`` or ``ray.cluster_utils`` started on the machine, not the private one. Ray Train's
    placement-group cleaner asks the state API, every few seconds of a run, whether the run's controller is
    alive: with a stale file (a cluster that did not shut down cleanly) each ask waited on the dead address
    and every ``stampray train`` ended 10-12 s late (600 stamps, 2 epochs: 40.9 s against 30.8 s without the
    file). With a file naming another live cluster the controller would, by Ray Train's code, be looked up
    there, not found, and the run's placement group removed as an orphan's."""
    with _environ({} if port is None else {API_SERVER_ENV: f"http://127.0.0.1:{int(port)}"}):
        yield


@contextlib.contextmanager
def _logger_level(name: str, level: int) -> Iterator[None]:
    """``logging.getLogger(name)`` at ``level`` for the duration of the block (a private Ray's start)."""
    logger = logging.getLogger(name)
    saved = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(saved)


@contextlib.contextmanager
def _loopback_node_ip() -> Iterator[None]:
    """Let ``ray.init(_node_ip_address="127.0.0.1")`` keep the loopback address.

    On Linux, Ray replaces a loopback node IP by the machine's routable address (``resolve_ip_for_localhost``)
    unless ``ray_constants.ENABLE_RAY_CLUSTER`` is false, as it is on macOS and Windows; that flag is read
    when the node starts, so it is cleared for the duration of the start only.
    """
    from ray._private import ray_constants

    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        yield
        return
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def ray_temp_root() -> str:
    """Ray's default temp root, worked out as Ray does (``ray._common.utils.get_default_ray_temp_dir``)
    without importing Ray: ``$RAY_TMPDIR/ray``; on Linux ``$TMPDIR/ray``; on Linux and macOS ``/tmp/ray``;
    elsewhere the system temp dir's ``ray``. (A run that scores in-process looks for orphans here, and
    imports Ray only when there is one.)"""
    if "RAY_TMPDIR" in os.environ:
        base = os.environ["RAY_TMPDIR"]
    elif sys.platform.startswith("linux") and "TMPDIR" in os.environ:
        base = os.environ["TMPDIR"]
    elif sys.platform.startswith(("darwin", "linux")):
        base = os.path.join(os.sep, "tmp")
    else:
        import tempfile

        base = tempfile.gettempdir()
    return os.path.join(base, "ray")


def private_temp_dir() -> str | None:
    """This driver's Ray temp dir, ``<ray temp root>/stampray-<pid>``; None (Ray's default temp dir, no
    orphan clean-up for this run) where Ray's socket paths under it would be too long."""
    temp_dir = os.path.join(ray_temp_root(), f"{TEMP_PREFIX}{os.getpid()}")
    if len(temp_dir.encode()) + _SESSION_SOCKET_TAIL > _SOCKET_PATH_MAX:
        log.warning("Ray temp dir %s too long for a private stampray temp dir; leftovers of this run "
                    "will not be cleaned up by the next one", ray_temp_root())
        return None
    return temp_dir


def _started(pid: int) -> float | None:
    """The start time of a live process (psutil's create_time), None when it is gone or a zombie."""
    import ray  # noqa: F401 - puts Ray's own psutil (ray/thirdparty_files) on sys.path
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _mark_instance(temp_dir: str) -> str:
    """Write the owner marker (this driver's pid and start time) into ``temp_dir``; return its path."""
    os.makedirs(temp_dir, mode=0o700, exist_ok=True)
    marker = os.path.join(temp_dir, OWNER_FILE)
    tmp = f"{marker}.tmp"
    with open(tmp, "w") as f:
        json.dump({"pid": os.getpid(), "started": _started(os.getpid())}, f)
    os.replace(tmp, marker)
    return marker


def _owner(marker: str) -> tuple[int, float | None] | None:
    """(pid, start time) of the driver a marker names; None when it cannot be read."""
    try:
        with open(marker) as f:
            owner = json.load(f)
        return int(owner["pid"]), owner.get("started")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _owner_alive(marker: str) -> bool:
    """Whether the driver a marker names still runs (same pid and same start time: no reused pid)."""
    owner = _owner(marker)
    if owner is None:
        return True  # unreadable (being written, or not ours to judge): leave it alone
    pid, started = owner
    now = _started(pid)
    if now is None:
        return False
    return started is None or abs(now - float(started)) < 0.5


def processes_in(temp_dir: str) -> list:
    """This user's processes that belong to the Ray instance in ``temp_dir``: every process that holds a
    file in the dir open for writing (each Ray process writes its logs there; Ray's agents and workers
    rename themselves, so neither name nor command line tells), and their descendants. Not a process that
    only reads there (``tail -f`` of a log), and never this process."""
    import ray  # noqa: F401 - puts Ray's own psutil (ray/thirdparty_files) on sys.path
    import psutil

    temp_dir = os.path.realpath(temp_dir)
    inside = temp_dir + os.sep
    uid = os.getuid()
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["pid", "uids"]):
        try:
            if proc.pid == os.getpid() or proc.info["uids"] is None or proc.info["uids"].real != uid:
                continue
            if any(_writes(f) and f.path.startswith(inside) for f in proc.open_files()):
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    if child.pid != os.getpid():
                        found.setdefault(child.pid, child)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return list(found.values())


def _writes(open_file) -> bool:
    """Whether a psutil open file is open for writing (where the platform does not tell: assume so)."""
    mode = getattr(open_file, "mode", None)
    return mode is None or any(c in mode for c in "wa+")


def _end(procs: list, term_wait: float, kill_wait: float) -> list:
    """SIGTERM, at most ``term_wait`` s, then SIGKILL and at most ``kill_wait`` s; return the survivors."""
    import ray  # noqa: F401
    import psutil

    for sig, wait in ((signal.SIGTERM, term_wait), (signal.SIGKILL, kill_wait)):
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                proc.send_signal(sig)
        deadline = time.monotonic() + wait
        while procs and time.monotonic() < deadline:
            procs = [p for p in procs if _alive(p)]
            if procs:
                time.sleep(0.1)
        procs = [p for p in procs if _alive(p)]
        if not procs:
            break
    return procs


def _alive(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def reap_if_orphaned(root: str | None = None) -> list[int]:
    """:func:`reap_orphans` for a run that starts no Ray of its own (a job scored in-process): Ray (for its
    psutil) is imported only when a private instance's owner marker names a driver whose pid no longer
    exists. (A pid since reused by another process is left to the next verb that starts Ray.)"""
    root = root or ray_temp_root()
    for _, marker in _instances(root):
        owner = _owner(marker)
        try:
            if owner is not None:
                os.kill(owner[0], 0)
        except ProcessLookupError:
            return reap_orphans(root)
        except OSError:  # a process of another user's: its driver runs
            continue
    return []


def reap_before(verb: str) -> None:
    """End what a killed stampray left of a private Ray (:func:`reap_if_orphaned`), as every verb does first,
    whether it starts a Ray or not (evaluate, vet, a job scored in-process): never instead of the verb."""
    try:
        reap_if_orphaned()
    except Exception as e:  # noqa: BLE001 - leftovers are the next verb's to end; the verb goes on
        log.debug(f"{verb}: could not look for leftovers of a private Ray: {e}")


def _instances(root: str) -> Iterator[tuple[str, str]]:
    """(temp dir, owner marker) of every private instance under ``root`` (``stampray-*`` dirs of this user's
    that hold a marker), in name order."""
    try:
        names = sorted(n for n in os.listdir(root) if n.startswith(TEMP_PREFIX))
    except OSError:
        return
    for name in names:
        temp_dir = os.path.join(root, name)
        marker = os.path.join(temp_dir, OWNER_FILE)
        try:
            ours = os.stat(temp_dir).st_uid == os.getuid() and os.path.isfile(marker)
        except OSError:
            continue
        if ours:
            yield temp_dir, marker


def reap_orphans(root: str | None = None, term_wait: float = 3.0, kill_wait: float = 3.0) -> list[int]:
    """End the leftovers of earlier private Ray instances that stampray started and whose driver died.

    An instance is one ``<root>/stampray-<pid>`` dir (``root``: Ray's temp root) holding an owner marker;
    its processes are found by that dir (:func:`processes_in`), never by name. Instances whose driver still
    runs, and Ray instances stampray did not start, are not touched. The marker is removed once nothing of
    the instance is left (the logs stay). Returns the pids that were ended.
    """
    ended: list[int] = []
    for temp_dir, marker in _instances(root or ray_temp_root()):
        if _owner_alive(marker):
            continue
        procs = processes_in(temp_dir)
        left = _end(procs, term_wait, kill_wait) if procs else []
        # Processes the first pass missed (a raylet still starting workers as it went down).
        more = [p for p in processes_in(temp_dir) if p.pid not in {q.pid for q in procs}]
        if more:
            left += _end(more, term_wait, kill_wait)
        gone = [p.pid for p in procs + more if p.pid not in {q.pid for q in left}]
        ended += gone
        if gone:
            log.warning("stampray: ended %d leftover processes of an earlier private Ray (driver gone, %s)",
                        len(gone), temp_dir)
        if left:
            log.warning("stampray: %d processes of %s did not end: %s", len(left), temp_dir,
                        ", ".join(str(p.pid) for p in left))
        else:
            with contextlib.suppress(OSError):
                os.remove(marker)
    return ended


FINISH_S = 60.0  # end_tasks: how long tasks in flight may take to finish before they are cancelled


def end_tasks(refs, error: BaseException, wait_s: float = FINISH_S) -> None:
    """After ``error`` stopped a job of Ray tasks: leave none of ``refs`` running on a shared cluster.

    On Ray 2.60, cancelling a task at the moment its result arrives can end the calling process in a failed
    internal check ("Tried to complete task that was not pending", ray-project/ray#54846; seen once in this
    project's CI, in a test whose ingest stopped at a bad row). So the tasks in flight (bounded units of
    work) are first given ``wait_s`` to finish, their results ignored, and only those still running then are
    cancelled. After Ctrl-C nothing is waited for: the process is on its way out, and Ray ends the tasks of
    an owner that has exited."""
    import ray

    refs = list(refs)
    if not refs or isinstance(error, KeyboardInterrupt):
        return
    try:
        _, running = ray.wait(refs, num_returns=len(refs), timeout=wait_s)
    except KeyboardInterrupt:
        return
    for ref in running:
        ray.cancel(ref)


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
