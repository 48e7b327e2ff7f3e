"""Scoring on an autoscaling cluster: Ray's fake multi-node provider on this machine.

``ray start --head --autoscaling-config=CFG`` with ``RAY_FAKE_CLUSTER=1`` runs Ray's real autoscaler
(the v1 monitor) with a provider that "launches" a worker node by starting another raylet on this
machine. The head has no CPUs, so every task and actor needs a worker node the autoscaler brings.

The cluster is private to the test: loopback only (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, or Ray
rewrites 127.0.0.1 to the machine's address), ports of its own, a short temp dir, authentication off
for this throw-away cluster only, and at the end only its own processes are stopped: the head's process
group and every process whose command line names its temp dir (the fake worker nodes' raylets and
workers, which the monitor starts).
"""

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
import yaml

N_STAMPS = 50_000
MAX_WORKERS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def autoscaling_config(gcs_address: str) -> dict:
    """A fake-multinode cluster: a 0-CPU head and up to three 1-CPU workers (from the fields of Ray's
    ``fake_multi_node/example.yaml``; the v1 autoscaler reads the file as it is, with no defaults)."""
    return {
        "cluster_name": "stampray-autoscale-test",
        "max_workers": MAX_WORKERS,
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": {
            # The fake provider names the head's type ray.head.default.
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu": {"resources": {"CPU": 1, "object_store_memory": 300 * 1024**2}, "node_config": {},
                    "min_workers": 0, "max_workers": MAX_WORKERS},
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 1.0,
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


def cluster_env() -> dict:
    return {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1", "RAY_FAKE_CLUSTER": "1",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "STAMPRAY_PROGRESS": "0"}


def start_fake_cluster(workdir: str, env: dict) -> tuple[subprocess.Popen, str, str]:
    """Start the head (blocking ``ray start`` in its own process group); returns it, its GCS address and
    its temp dir. The caller stops it with the ``stop_ray_head`` fixture."""
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    gcs = free_port()
    address = f"127.0.0.1:{gcs}"
    cfg = os.path.join(workdir, "autoscaling.yaml")
    with open(cfg, "w") as f:
        yaml.safe_dump(autoscaling_config(address), f)
    temp_dir = tempfile.mkdtemp(prefix="rayas", dir="/tmp")  # Ray's socket paths must stay short
    ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "node-manager-port", "object-manager-port", "ray-client-server-port")]
    with open(os.path.join(workdir, "head.log"), "w") as log:
        head = subprocess.Popen(
            [ray_cli, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=0",
             "--num-gpus=0", f"--autoscaling-config={cfg}", "--include-dashboard=false",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}",
             "--object-store-memory=200000000", f"--temp-dir={temp_dir}", "--block", *ports],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return head, address, temp_dir




def driver(address: str, code: str, env: dict, timeout: float) -> dict:
    """Run ``code`` in a short-lived driver connected to ``address``; it sets ``result`` (JSON)."""
    script = textwrap.dedent("""
        import json, logging, ray
        ray.init(address={address!r}, logging_level=logging.ERROR, log_to_driver=False)
        result = None
    """).format(address=address) + textwrap.dedent(code) + '\nprint("RESULT " + json.dumps(result), flush=True)\n'
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(lines[-1][7:])


CAPACITY = """
    from dataclasses import asdict
    from stampray.capacity import cluster_capacity
    result = asdict(cluster_capacity())
"""

NODES = """
    result = [{"id": n["NodeID"], "alive": n["Alive"], "cpus": n["Resources"].get("CPU", 0.0),
               "head": "node:__internal_head__" in n["Resources"]} for n in ray.nodes()]
"""


def launches(temp_dir: str) -> list[str]:
    """The autoscaler's launch lines from the head's monitor log."""
    lines = []
    logs = os.path.join(temp_dir, "session_latest", "logs")
    for name in sorted(os.listdir(logs)) if os.path.isdir(logs) else []:
        if name.startswith("monitor") and name.endswith((".log", ".out", ".err")):
            with open(os.path.join(logs, name), errors="replace") as f:
                lines += [line.strip() for line in f if re.search(r"Adding \d+ node|Removing \d+ node", line)]
    return lines


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_score_on_an_autoscaling_cluster_uses_the_nodes_it_brings(tmp_path, stop_ray_head, processes_naming):
    from stampray import checkpoint as ck
    from stampray import table as st
    from stampray.models import create_model
    from stampray.score import read_scores
    from stampray.synth import SynthSettings, synth

    env = cluster_env()
    t0 = time.time()
    head, address, temp_dir = start_fake_cluster(str(tmp_path), env)
    try:
        # While the head starts: the survey and an untrained model.
        data, model, out = str(tmp_path / "survey"), str(tmp_path / "m.pt"), str(tmp_path / "scores")
        synth(SynthSettings(out=data, n=N_STAMPS, seed=3, shard_rows=2000))
        ck.save(ck.make_bundle(create_model("cnn", 1, 21, 2), class_names=["noise", "source"],
                               preprocess="course_scaled"), model)

        # The head is up and stampray sees what the autoscaler can bring.
        deadline, cap, err = time.monotonic() + 120, None, ""
        while time.monotonic() < deadline and cap is None:
            assert head.poll() is None, open(tmp_path / "head.log").read()[-3000:]
            try:
                cap = driver(address, CAPACITY, env, timeout=max(10.0, deadline - time.monotonic()))
            except (AssertionError, subprocess.TimeoutExpired) as e:
                err = str(e)
                time.sleep(2)
        assert cap is not None, "the fake cluster's head did not come up: " + err[-3000:]
        t_up = time.time() - t0
        assert cap["autoscaling"] and cap["cpus_now"] == 0.0, cap
        assert cap["cpus_max"] == MAX_WORKERS and cap["gpus_max"] == 0.0, cap
        assert cap["node_types"]["cpu"] == {"resources": {"CPU": 1.0, "object_store_memory": 300.0 * 1024**2},
                                            "min_workers": 0, "max_workers": MAX_WORKERS}, cap

        t1 = time.time()
        proc = subprocess.run(
            # --tta 8: eight passes per stamp, so the job outlasts the autoscaler's launches (the nodes came
            # 10-25 s into the job; one replica scored the plain job alone in less than that).
            [sys.executable, "-m", "stampray", "score", "--model", model, "--data", data, "--out", out,
             "--address", address, "--compile", "off", "--no-progress", "--tta", "8"],
            capture_output=True, text=True, timeout=400, env=env)
        t_score = time.time() - t1
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

        nodes = driver(address, NODES, env, timeout=60)
        workers = [n for n in nodes if not n["head"]]
        log = launches(temp_dir)
        print(f"\nautoscale: head up after {t_up:.0f} s; score took {t_score:.0f} s; "
              f"{len(workers)} worker node(s) launched ({sum(n['alive'] for n in workers)} alive at the end); "
              f"score started at {time.strftime('%H:%M:%S', time.localtime(t1))}")
        print("\n".join(log))
        print("score's output (tail):\n" + (proc.stdout + proc.stderr)[-2500:])
        assert 1 <= len(workers) <= MAX_WORKERS, nodes

        ids = read_scores(out, columns=["stamp_id"]).column("stamp_id").to_pylist()
        src = st.read_table(data, columns=["stamp_id"]).column("stamp_id").to_pylist()
        assert len(ids) == N_STAMPS and len(set(ids)) == N_STAMPS and set(ids) == set(src)

        with open(os.path.join(out, "_manifest.json")) as f:
            manifest = json.load(f)
        assert "nodes" in manifest, "score's manifest does not say which nodes scored (no 'nodes' key)"
        assert sum(manifest["nodes"].values()) == N_STAMPS, manifest["nodes"]
        assert len(manifest["nodes"]) >= 2, manifest["nodes"]  # the pool grew onto the nodes the autoscaler brought
    finally:
        t2 = time.time()
        stop_ray_head(head, temp_dir)
        print(f"autoscale: the cluster stopped in {time.time() - t2:.0f} s; the test took {time.time() - t0:.0f} s")
    assert processes_naming(temp_dir) == []  # nothing of this cluster is left running
