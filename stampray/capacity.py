"""What the Ray cluster can grow to, not only what is up now.

:func:`cluster_capacity` reports the CPUs and GPUs up now (``ray.cluster_resources()``) and the most the
cluster's autoscaler can bring, read from the autoscaler's node types. Ray 2.60 gives a *driver* no public
call for that, so two places are tried, cheapest first:

1. The cluster config an autoscaler reports to the GCS (``ReportClusterConfig``), which the GCS keeps in
   its internal KV (namespace ``__autoscaler``, key ``__autoscaler_cluster_config``, an
   ``autoscaler_pb2.ClusterConfig``: node groups with resources and min/max counts, plus an optional
   cap on the total). Ray reads it with ``ray._private.state.state.get_cluster_config()`` (Ray Data's
   and Ray Train's own "max resources" logic use it). The open-source v1/v2 autoscalers of Ray 2.60 do
   not write it yet, hosted ones may; newer Ray's autoscaler does.
2. The autoscaling config file the cluster's monitor process (``ray/autoscaler/_private/monitor.py``, or
   ``ray/autoscaler/v2/monitor.py``) was started with: ``ray start --head --autoscaling-config=FILE``
   (the cluster launcher starts the head with ``~/ray_bootstrap_config.yaml``). It is found among this
   machine's processes by its ``--gcs-address`` (the driver's GCS) and its ``--autoscaling-config``
   argument, so this works wherever the driver runs on the head node (``ray job submit``, ``ray attach``,
   a notebook on the head), and it is what the autoscaler itself reads (raw YAML, per-type
   ``max_workers`` defaulting to the global ``max_workers``, 0 for the head's type).

Anything else (a private local Ray, a driver on another machine than the head, KubeRay's autoscaler in a
side container, an unreadable file) degrades to "no autoscaler": ``autoscaling=False`` and max == now.
:func:`cluster_capacity` never raises and takes a few tens of milliseconds.

A node type that may grow without bound (``max_count: -1`` in a GCS cluster config) makes the maximum
``math.inf``. A node type whose config names no resources (the cluster launcher fills AWS/GCP instance
types' resources in at run time) still makes ``autoscaling`` true but adds nothing to the maxima.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

MONITOR_SCRIPTS = ("autoscaler/_private/monitor.py", "autoscaler/v2/monitor.py")
HEAD_MARKER = "node:__internal_head__"  # a resource only the head node has


@dataclass(frozen=True)
class Capacity:
    """CPUs/GPUs up now and the most the autoscaler can bring (== now without an autoscaler)."""

    cpus_now: float
    gpus_now: float
    cpus_max: float
    gpus_max: float
    autoscaling: bool  # an autoscaler with node types that can launch more nodes
    # name -> {"resources": {...}, "min_workers": int, "max_workers": int (-1: unbounded)}; {} if unknown
    node_types: dict = field(default_factory=dict)
    source: str = "none"  # where node_types came from: "gcs", "monitor:<path>" or "none"


def cluster_capacity() -> Capacity:
    """The cluster's capacity now and at most (call with Ray initialised; never raises)."""
    now = _resources_now()
    cpus_now, gpus_now = float(now.get("CPU", 0.0)), float(now.get("GPU", 0.0))
    none = Capacity(cpus_now, gpus_now, cpus_now, gpus_now, False, {}, "none")
    try:
        found = _from_gcs_cluster_config()
        if found is None:
            found = _from_monitor_config()
        if found is None:
            return none
        node_types, maxima, source = found
        autoscaling = _can_grow(node_types)
        if not autoscaling:
            return Capacity(cpus_now, gpus_now, cpus_now, gpus_now, False, node_types, source)
        return Capacity(cpus_now, gpus_now, max(cpus_now, maxima.get("CPU", 0.0)),
                        max(gpus_now, maxima.get("GPU", 0.0)), True, node_types, source)
    except Exception as e:  # noqa: BLE001 - an unknown setup degrades to "no autoscaler"
        logger.debug("cluster_capacity: could not read the autoscaler's config: %r", e)
        return none


def request_gpus(n: int) -> None:
    """Ask the autoscaler for ``n`` one-GPU bundles (``ray.autoscaler.sdk.request_resources``).

    The request stays until the next call replaces it; ``request_gpus(0)`` withdraws it. Without an
    autoscaler it is a harmless no-op.
    """
    from ray.autoscaler.sdk import request_resources

    n = int(n)
    if n < 0:
        msg = f"request_gpus: n must be >= 0, got {n}"
        raise ValueError(msg)
    request_resources(bundles=[{"GPU": 1} for _ in range(n)])


# ---------------------------------------------------------------------------------------------- parsing


def node_types_from_config(config: dict) -> dict:
    """The node types of an autoscaling config (cluster-launcher YAML as a dict), with the autoscaler's
    defaults filled in: ``min_workers`` 0; ``max_workers`` the global ``max_workers`` (0 for the head's
    type, and 0 when there is no global value either)."""
    types = config.get("available_node_types") or {}
    head_type = config.get("head_node_type")
    global_max = config.get("max_workers")
    out = {}
    for name, spec in types.items():
        spec = spec or {}
        default_max = 0 if name == head_type or global_max is None else int(global_max)
        out[str(name)] = {"resources": {str(k): float(v) for k, v in (spec.get("resources") or {}).items()},
                          "min_workers": int(spec.get("min_workers", 0) or 0),
                          "max_workers": int(spec.get("max_workers", default_max))}
    return out


def max_resources_from_config(config: dict, head_resources: dict | None = None) -> dict:
    """The most of each resource a cluster with this autoscaling config can hold: the head node (its
    ``head_resources`` when given, else its type's resources) plus every worker type at its
    ``max_workers``, the total number of workers capped by the global ``max_workers`` (filled with the
    nodes richest in that resource first)."""
    types = node_types_from_config(config)
    head_type = config.get("head_node_type")
    if head_resources is None:
        head_resources = types.get(head_type, {}).get("resources", {})
    global_max = config.get("max_workers")
    cap = math.inf if global_max is None else max(0, int(global_max))
    keys = set(head_resources) | {k for t in types.values() for k in t["resources"]}
    out = {}
    for key in keys:
        total = float(head_resources.get(key, 0.0))
        left = cap
        for t in sorted(types.values(), key=lambda t: -t["resources"].get(key, 0.0)):
            per, count = t["resources"].get(key, 0.0), min(max(0, t["max_workers"]), left)
            if per <= 0 or count <= 0:
                continue
            total += per * count
            left -= count
        out[key] = total
    return out


def node_types_from_cluster_config(cluster_config) -> dict:
    """The node groups of a GCS ``autoscaler_pb2.ClusterConfig`` in :class:`Capacity`'s form."""
    out = {}
    for i, g in enumerate(cluster_config.node_group_configs):
        out[g.name or f"group-{i}"] = {"resources": {k: float(v) for k, v in g.resources.items()},
                                       "min_workers": int(g.min_count), "max_workers": int(g.max_count)}
    return out


def max_resources_from_cluster_config(cluster_config) -> dict:
    """Each resource summed over the node groups at their max counts (``math.inf`` for an unbounded
    group), capped by the config's ``max_resources`` (as Ray's ``state.get_max_resources_from_cluster_config``)."""
    totals: dict = {}
    for g in cluster_config.node_group_configs:
        for key, per in g.resources.items():
            if per <= 0 or g.max_count == 0:
                continue
            totals[key] = totals.get(key, 0.0) + (math.inf if g.max_count < 0 else float(per) * g.max_count)
    for key, limit in cluster_config.max_resources.items():
        if key in totals:
            totals[key] = min(totals[key], float(limit))
    return totals


def _can_grow(node_types: dict) -> bool:
    """Some node type can launch more nodes than it must keep (as Ray Data's ``is_autoscaling_enabled``,
    but a type whose resources the file leaves to the provider, e.g. AWS instance types, counts too)."""
    return any(t["max_workers"] < 0 or t["max_workers"] > t["min_workers"] for t in node_types.values())


# ---------------------------------------------------------------------------------------------- sources


def _resources_now() -> dict:
    try:
        import ray

        if not ray.is_initialized():
            return {}
        return dict(ray.cluster_resources())
    except Exception:  # noqa: BLE001
        return {}


def _from_gcs_cluster_config():
    """Source 1: the ClusterConfig an autoscaler reported to the GCS, or None."""
    import ray._private.state

    config = ray._private.state.state.get_cluster_config()
    if config is None or not config.node_group_configs:
        return None
    return node_types_from_cluster_config(config), max_resources_from_cluster_config(config), "gcs"


def _gcs_address() -> str:
    import ray

    return str(ray.get_runtime_context().gcs_address)


def _split_host_port(address: str) -> tuple[str, str]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), port


def _local_addresses() -> set[str]:
    import ray  # noqa: F401 - puts Ray's own psutil (ray/thirdparty_files) on sys.path
    import psutil

    addrs = {"127.0.0.1", "::1", "localhost"}
    with contextlib.suppress(Exception):
        for entries in psutil.net_if_addrs().values():
            addrs.update(e.address.split("%")[0] for e in entries)
    return addrs


def find_monitor_config(gcs_address: str) -> str | None:
    """Path of the autoscaling config file the monitor of the cluster at ``gcs_address`` runs with, if
    that monitor runs on this machine and was given one; else None."""
    import ray  # noqa: F401 - puts Ray's own psutil (ray/thirdparty_files) on sys.path
    import psutil

    host, port = _split_host_port(gcs_address)
    local = None
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if not any(str(a).replace(os.sep, "/").endswith(MONITOR_SCRIPTS) for a in cmd):
            continue
        args = dict(a.split("=", 1) for a in cmd if a.startswith("--") and "=" in a)
        path = args.get("--autoscaling-config")
        m_host, m_port = _split_host_port(args.get("--gcs-address", ""))
        if not path or m_port != port:
            continue
        if m_host != host:  # the same machine under two names (127.0.0.1 and its address), or another
            local = _local_addresses() if local is None else local
            if host not in local or m_host not in local:
                continue
        path = os.path.expanduser(path)
        if not os.path.isabs(path):
            with contextlib.suppress(Exception):
                path = os.path.join(proc.cwd(), path)
        return path
    return None


def _head_resources() -> dict | None:
    import ray

    for node in ray.nodes():
        if node.get("Alive") and HEAD_MARKER in (node.get("Resources") or {}):
            return {k: float(v) for k, v in node["Resources"].items()}
    return None


def _from_monitor_config():
    """Source 2: the YAML the cluster's monitor process was started with, or None."""
    import yaml

    path = find_monitor_config(_gcs_address())
    if path is None:
        return None
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    types = node_types_from_config(config)
    if not types:
        return None
    return types, max_resources_from_config(config, _head_resources()), f"monitor:{path}"
