"""stampray.capacity: what the cluster can grow to (the autoscaler's node types), and what it has now."""

import math
import os
import subprocess
import sys
import time

import pytest
import yaml

from stampray import capacity
from stampray.capacity import (
    Capacity,
    cluster_capacity,
    max_resources_from_cluster_config,
    max_resources_from_config,
    node_types_from_cluster_config,
    node_types_from_config,
    request_gpus,
)

# Shaped like cluster.yaml: a head without work, GPU workers from zero, CPU workers for reading.
CONFIG = {
    "cluster_name": "c",
    "max_workers": 10,
    "head_node_type": "head",
    "available_node_types": {
        "head": {"resources": {"CPU": 0}, "node_config": {}},
        "gpu": {"resources": {"CPU": 4, "GPU": 1}, "min_workers": 0, "max_workers": 4, "node_config": {}},
        "cpu": {"resources": {"CPU": 8}, "min_workers": 1, "node_config": {}},  # max_workers: the global 10
    },
}


def test_node_types_of_a_config_get_the_autoscalers_defaults():
    assert node_types_from_config(CONFIG) == {
        "head": {"resources": {"CPU": 0.0}, "min_workers": 0, "max_workers": 0},
        "gpu": {"resources": {"CPU": 4.0, "GPU": 1.0}, "min_workers": 0, "max_workers": 4},
        "cpu": {"resources": {"CPU": 8.0}, "min_workers": 1, "max_workers": 10},
    }
    assert node_types_from_config({}) == {}
    assert node_types_from_config({"available_node_types": {"w": {"resources": {"CPU": 2}}}}) == {
        "w": {"resources": {"CPU": 2.0}, "min_workers": 0, "max_workers": 0}}  # no global max_workers either


def test_max_resources_of_a_config_respect_the_global_worker_cap():
    # 10 workers at most: the richest nodes in each resource first.
    assert max_resources_from_config(CONFIG) == {"CPU": 10 * 8.0, "GPU": 4.0}
    small = {**CONFIG, "max_workers": 3}
    assert max_resources_from_config(small) == {"CPU": 3 * 8.0, "GPU": 3.0}
    # The live head's resources replace its type's.
    assert max_resources_from_config(small, head_resources={"CPU": 2.0}) == {"CPU": 26.0, "GPU": 3.0}
    uncapped = {k: v for k, v in CONFIG.items() if k != "max_workers"}
    uncapped["available_node_types"] = {**CONFIG["available_node_types"],
                                        "cpu": {"resources": {"CPU": 8}, "max_workers": 2}}
    assert max_resources_from_config(uncapped) == {"CPU": 4 * 4.0 + 2 * 8.0, "GPU": 4.0}


def test_node_groups_of_a_gcs_cluster_config():
    from ray.core.generated import autoscaler_pb2

    cfg = autoscaler_pb2.ClusterConfig()
    for name, res, lo, hi in (("head", {"CPU": 2}, 1, 1), ("gpu", {"CPU": 4, "GPU": 1}, 0, 3),
                              ("cpu", {"CPU": 8}, 0, -1)):
        g = cfg.node_group_configs.add(name=name, min_count=lo, max_count=hi)
        g.resources.update(res)
    assert node_types_from_cluster_config(cfg)["cpu"] == {"resources": {"CPU": 8.0}, "min_workers": 0,
                                                          "max_workers": -1}
    assert max_resources_from_cluster_config(cfg) == {"CPU": math.inf, "GPU": 3.0}
    cfg.max_resources["CPU"] = 100
    assert max_resources_from_cluster_config(cfg) == {"CPU": 100.0, "GPU": 3.0}
    assert capacity._can_grow(node_types_from_cluster_config(cfg))
    fixed = {"w": {"resources": {"CPU": 1.0}, "min_workers": 2, "max_workers": 2}}
    assert not capacity._can_grow(fixed) and not capacity._can_grow({})


@pytest.mark.slow
def test_a_private_local_ray_has_no_autoscaler(ray_shared):
    t0 = time.time()
    cap = cluster_capacity()
    assert time.time() - t0 < 1.0
    now = ray_shared.cluster_resources()
    assert cap == Capacity(cpus_now=now["CPU"], gpus_now=now.get("GPU", 0.0), cpus_max=now["CPU"],
                           gpus_max=now.get("GPU", 0.0), autoscaling=False, node_types={}, source="none")


def test_an_unreadable_setup_degrades_to_no_autoscaler(ray_shared, monkeypatch):
    def broken():
        raise RuntimeError("no GCS here")

    monkeypatch.setattr(capacity, "_from_gcs_cluster_config", broken)
    cap = cluster_capacity()
    assert not cap.autoscaling and cap.cpus_max == cap.cpus_now == ray_shared.cluster_resources()["CPU"]


@pytest.fixture
def fake_monitor(tmp_path):
    """A process whose command line looks like an autoscaling monitor's (nothing else of a monitor)."""
    procs = []

    def start(gcs_address: str, config: dict) -> None:
        path = tmp_path / f"autoscaling-{len(procs)}.yaml"
        path.write_text(yaml.safe_dump(config))
        script = os.path.join("/fake", "ray", "autoscaler", "_private", "monitor.py")
        procs.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", script,
                                       f"--gcs-address={gcs_address}", f"--autoscaling-config={path}"]))

    yield start
    for p in procs:
        p.kill()
        p.wait(timeout=30)


def test_the_config_of_this_clusters_monitor_is_read(ray_shared, fake_monitor, wait_until):
    gcs = ray_shared.get_runtime_context().gcs_address
    host, port = gcs.rsplit(":", 1)
    config = {"max_workers": 3, "head_node_type": "ray.head.default",
              "available_node_types": {"ray.head.default": {"resources": {"CPU": 0}, "max_workers": 0},
                                       "cpu": {"resources": {"CPU": 1}, "min_workers": 0, "max_workers": 3}}}
    # Monitors of other clusters: another port, or the same port on another machine.
    fake_monitor(f"{host}:{int(port) + 1 if int(port) < 65535 else 1}", {**config, "max_workers": 9})
    fake_monitor(f"203.0.113.9:{port}", {**config, "max_workers": 9})
    wait_until(lambda: capacity.find_monitor_config(f"203.0.113.9:{port}") is not None, 30,
               "the fake monitors of other clusters to show in the process table", interval=0.1)
    cap = cluster_capacity()
    assert not cap.autoscaling and cap.cpus_max == cap.cpus_now  # neither is this cluster's

    fake_monitor(gcs, config)
    wait_until(lambda: capacity.find_monitor_config(gcs) is not None, 30,
               "this cluster's fake monitor to show in the process table", interval=0.1)
    t0 = time.time()
    cap = cluster_capacity()
    assert time.time() - t0 < 1.0
    head_cpus = ray_shared.cluster_resources()["CPU"]  # the head is the only node, and it is up
    assert cap.autoscaling and cap.source.startswith("monitor:")
    assert cap.cpus_now == head_cpus and cap.cpus_max == head_cpus + 3 and cap.gpus_max == 0.0
    assert cap.node_types["cpu"] == {"resources": {"CPU": 1.0}, "min_workers": 0, "max_workers": 3}


def test_request_gpus(ray_shared):
    with pytest.raises(ValueError, match="n must be >= 0"):
        request_gpus(-1)
    request_gpus(0)  # withdraws any request; without an autoscaler nothing happens
