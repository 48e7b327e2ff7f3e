"""cluster.yaml against Ray's own schema; a job submitted to a real local Ray head; security defaults."""

import os
import re
import socket
import subprocess
import sys
import time

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cluster_yaml_validates_against_rays_schema():
    from ray.autoscaler._private.util import validate_config

    with open(os.path.join(ROOT, "cluster.yaml")) as f:
        config = yaml.safe_load(f)
    validate_config(config)  # raises on any key the cluster launcher does not know
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}  # the head runs no GPU or heavy work
    assert types["ray.worker.gpu"]["min_workers"] == 0 and types["ray.worker.gpu"]["node_config"]["InstanceType"] == "g5.xlarge"
    assert "ray.worker.cpu" in types
    assert any("pip install" in c and "stampray" in c for c in config["setup_commands"])
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE" not in open(os.path.join(ROOT, "cluster.yaml")).read()
    assert not re.search(r"aws_(access|secret)|AKIA", open(os.path.join(ROOT, "cluster.yaml")).read(), re.I)


RAY_IMAGE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d{3,})-(?P<kind>cpu|gpu)$")


def _installed(package: str) -> str:
    """The installed version without a local build tag (torch's ``2.13.0+cpu`` -> ``2.13.0``)."""
    from importlib.metadata import version

    return version(package).split("+")[0]


def test_cluster_yaml_pins_the_ray_and_torch_of_this_environment():
    """A node that joins late runs the driver's versions: one pinned Ray image tag for every node, equal to the
    Ray installed here, and exact pip pins (torch, Ray) equal to this environment's."""
    import ray

    with open(os.path.join(ROOT, "cluster.yaml")) as f:
        config = yaml.safe_load(f)
    images = [config["docker"]["image"]] + [config["docker"][k] for k in ("head_image", "worker_image")
                                            if k in config["docker"]]
    for name, t in config["available_node_types"].items():
        images += [t["docker"]["worker_image"]] if "worker_image" in t.get("docker", {}) else []
    tags = [RAY_IMAGE.match(i) for i in images]
    assert all(tags), images  # a pinned rayproject/ray:X.Y.Z-pyNNN-cpu|gpu tag, never :latest
    assert {t["ray"] for t in tags} == {ray.__version__} and len({t["py"] for t in tags}) == 1
    gpu = config["available_node_types"]["ray.worker.gpu"]["docker"]["worker_image"]
    assert gpu.endswith("-gpu") and config["docker"]["image"].endswith("-cpu")
    setup = " ".join(config["setup_commands"])
    assert f'"ray[default,data,train]=={ray.__version__}"' in setup
    assert f"torch=={_installed('torch')}" in setup
    for package in re.findall(r"\b([A-Za-z][\w-]*)(?:\[[\w,]+\])?[<>=~!]", setup):  # every pip pin is exact
        assert re.search(rf"\b{re.escape(package)}(\[[\w,]+\])?==", setup), package
    text = open(os.path.join(ROOT, "cluster.yaml")).read()
    assert "container image" in text.lower() and "late" in text  # the comment saying which pinning and why


def test_rayjob_manifest_runs_the_pipeline_on_an_autoscaled_pinned_cluster():
    import shlex

    import ray

    from stampray.cli import build_parser

    with open(os.path.join(ROOT, "jobs", "rayjob.yaml")) as f:
        job = yaml.safe_load(f)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True and cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no work on the head, as in cluster.yaml
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"gpu", "cpu"}
    for g in groups.values():
        assert g["minReplicas"] == 0 and g["maxReplicas"] >= max(1, g["replicas"]) >= 0
    containers = {"head": head["template"]["spec"]["containers"][0]}
    containers.update({name: g["template"]["spec"]["containers"][0] for name, g in groups.items()})
    limits = {name: c["resources"]["limits"] for name, c in containers.items()}
    assert int(limits["gpu"]["nvidia.com/gpu"]) == 1 and float(limits["gpu"]["cpu"]) >= 1
    assert "nvidia.com/gpu" not in limits["cpu"] and float(limits["cpu"]["cpu"]) >= 1
    assert "nvidia.com/gpu" not in limits["head"]
    tags = {name: RAY_IMAGE.match(c["image"]) for name, c in containers.items()}
    assert all(tags.values()), {n: c["image"] for n, c in containers.items()}
    assert {t["ray"] for t in tags.values()} == {ray.__version__}
    assert tags["gpu"]["kind"] == "gpu" and tags["cpu"]["kind"] == tags["head"]["kind"] == "cpu"
    with open(os.path.join(ROOT, "cluster.yaml")) as f:  # the same tags as the cluster launcher's nodes
        launcher = yaml.safe_load(f)
    assert containers["head"]["image"] == launcher["docker"]["image"]
    assert containers["gpu"]["image"] == launcher["available_node_types"]["ray.worker.gpu"]["docker"]["worker_image"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert f"torch=={_installed('torch')}" in runtime_env["pip"]["packages"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/pipeline.py"]
    flags = argv[2:]
    try:
        ns = build_parser().parse_args(["demo", *flags])
    except SystemExit:
        raise AssertionError(f"`stampray demo` does not take the entry point's flags {flags}") from None
    assert ns.verb == "demo" and ns.out.startswith("s3://") and ns.workers >= 1
    readme = open(os.path.join(ROOT, "jobs", "README.md")).read()
    examples = [shlex.split(line.split(" -- ", 1)[1]) for line in readme.splitlines() if "jobs/pipeline.py" in line
                and " -- " in line]
    assert [e[2:] for e in examples] == [flags]  # the README's pipeline example takes exactly these flags
    assert "rayjob.yaml" in readme


def test_every_key_of_cluster_yaml_has_a_comment():
    lines = open(os.path.join(ROOT, "cluster.yaml")).read().splitlines()
    missing = []
    for i, line in enumerate(lines):
        if re.match(r"^\s*[A-Za-z_][\w.]*:", line):
            prev = next((p for p in reversed(lines[:i]) if p.strip()), "")
            if not prev.strip().startswith("#") and "#" not in line:
                missing.append(line.strip())
    assert missing == []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_job_submitted_to_a_local_ray_head(tmp_path, stop_ray_head):
    """`ray start --head`, then `ray job submit --working-dir . -- python jobs/synth.py ...` as the README says."""
    import secrets
    import tempfile

    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    gcs, dash = free_port(), free_port()
    # Every port of its own: the test session's Ray (and its dashboard agent on Ray's default 52365) is up
    # beside this head, and an agent that cannot bind its port leaves the head with "No available agent".
    ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "node-manager-port", "object-manager-port", "ray-client-server-port")]
    # Token authentication on, with this test's own token for the head and the Jobs client.
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    short_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    head = subprocess.Popen(
        [ray_cli, "start", "--head", f"--port={gcs}", "--num-cpus=2", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", "--include-dashboard=true", "--block", f"--temp-dir={short_tmp}", *ports],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline, up = time.monotonic() + 120, None
        while time.monotonic() < deadline:
            up = subprocess.run([ray_cli, "job", "list", "--address", url], capture_output=True, text=True, env=env,
                                timeout=60)
            if up.returncode == 0:
                break
            time.sleep(1)
        assert up is not None and up.returncode == 0, "the local Ray head did not come up: " + up.stderr[-2000:]
        no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
        refused = subprocess.run([ray_cli, "job", "list", "--address", url], capture_output=True, text=True,
                                 env={**no_token, "HOME": str(tmp_path)}, timeout=60)
        assert refused.returncode != 0 and "auth" in (refused.stdout + refused.stderr).lower()
        out = str(tmp_path / "survey")
        for _ in range(30):  # the head's job agent may come up after its API server
            job = subprocess.run([ray_cli, "job", "submit", "--address", url, "--working-dir", ROOT, "--",
                                  sys.executable, "jobs/synth.py", "-n", "300", "--seed", "4", "--out", out],
                                 capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
            if "No available agent" not in job.stdout + job.stderr:
                break
            time.sleep(2)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "synth: wrote 300 tno stamps" in job.stdout + job.stderr
        assert "succeeded" in (job.stdout + job.stderr).lower()
        from stampray import table as st

        assert st.read_manifest(out).num_rows == 300
    finally:
        stop_ray_head(head, short_tmp)


@pytest.fixture
def ray_init_calls(monkeypatch):
    """``ray_session`` with Ray's API replaced at the boundary: ``ray.init`` records its keyword arguments and
    what it would see of the environment (``RAY_AUTH_MODE``, Ray's loopback-rewrite flag), and starts nothing.
    The test session's own Ray, if up, is neither used nor shut down."""
    import tempfile

    import ray
    from ray._private import ray_constants

    from stampray import runtime

    calls = []

    def init(**kwargs):
        calls.append({"kwargs": kwargs, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE"),
                      "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"),
                      "ENABLE_RAY_CLUSTER": getattr(ray_constants, "ENABLE_RAY_CLUSTER", None),
                      "RAY_API_SERVER_ADDRESS": os.environ.get("RAY_API_SERVER_ADDRESS")})

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(runtime, "check_cluster", lambda addr, named: None)  # the addresses here are made up
    monkeypatch.setattr(runtime, "_quiet_data_context", lambda *args, **kwargs: None)
    monkeypatch.setattr(runtime, "reap_orphans", lambda *args, **kwargs: [])
    root = tempfile.mkdtemp(prefix="sr", dir="/tmp")  # short: the private temp dir must fit Ray's socket paths
    monkeypatch.setenv("RAY_TMPDIR", root)
    monkeypatch.setenv("RAY_DATA_LOG_LEVEL", "WARNING")  # ray_session sets a default; restored afterwards
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)  # likewise (conftest sets one)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)  # the test session's Ray may have set it
    yield calls
    import shutil

    shutil.rmtree(root, ignore_errors=True)


def test_private_local_ray_is_loopback_only_and_keeps_token_auth(ray_init_calls, monkeypatch):
    """A private Ray starts on 127.0.0.1 (node IP and dashboard), without the per-node metrics export, and
    leaves Ray's token authentication as the user has it; a cluster given by address gets none of this."""
    from ray._private import ray_constants

    from stampray import runtime

    with runtime.ray_session():
        pass
    [call] = ray_init_calls
    kwargs = call["kwargs"]
    assert kwargs["address"] == "local" and kwargs["include_dashboard"] is True
    assert kwargs["dashboard_host"] == "127.0.0.1" and kwargs["_node_ip_address"] == "127.0.0.1"
    assert kwargs["_system_config"] == {"enable_metrics_collection": False,
                                        "idle_worker_killing_time_threshold_ms": 60_000}
    assert kwargs["_temp_dir"] == runtime.private_temp_dir()
    if hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):  # Linux: Ray keeps 127.0.0.1 only with this off
        assert call["ENABLE_RAY_CLUSTER"] is False
    assert call["RAY_AUTH_MODE"] is None  # stampray never turns Ray's token authentication off
    assert call["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"  # its workers inherit it: Train polls every 0.5 s
    assert not [k for k in [*kwargs, *kwargs["_system_config"]] if "auth" in k.lower()]

    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # the user's choice reaches Ray unchanged
    with runtime.ray_session(num_cpus=1):
        pass
    assert ray_init_calls[1]["RAY_AUTH_MODE"] == "token" and ray_init_calls[1]["kwargs"]["num_cpus"] == 1

    assert "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S" not in os.environ  # removed with the private Ray
    with runtime.ray_session(address="10.0.0.1:6379"):  # a cluster: connect, nothing of the private settings
        pass
    assert ray_init_calls[2]["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] is None
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")  # the user's own value is kept, and stays
    with runtime.ray_session():
        pass
    assert ray_init_calls[3]["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "3"
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "3"
    kwargs = ray_init_calls[2]["kwargs"]
    assert kwargs["address"] == "10.0.0.1:6379"
    assert not {"dashboard_host", "_node_ip_address", "_system_config", "_temp_dir", "num_cpus"} & set(kwargs)


def test_a_private_ray_names_its_own_api_server_to_its_processes(ray_init_calls, monkeypatch):
    """A private Ray's dashboard port is chosen before it starts and RAY_API_SERVER_ADDRESS names it while
    ray.init starts the raylet (whose workers inherit it: Ray's state API then asks this Ray, not the cluster
    named in Ray's ray_current_cluster file); once ray.init returns, or fails, the variable is as the user had
    it, so nothing else the verb starts inherits it. Without the dashboard (no state API), and for a cluster
    given by address, nothing is set."""
    import os

    import ray

    from stampray import runtime

    with runtime.ray_session():
        inside = os.environ.get("RAY_API_SERVER_ADDRESS")
    port = ray_init_calls[0]["kwargs"]["dashboard_port"]
    assert isinstance(port, int) and port > 0
    assert ray_init_calls[0]["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{port}"
    assert inside is None and "RAY_API_SERVER_ADDRESS" not in os.environ

    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://10.0.0.1:8265")  # the user's, for their cluster
    with runtime.ray_session():
        inside = os.environ.get("RAY_API_SERVER_ADDRESS")
    port = ray_init_calls[1]["kwargs"]["dashboard_port"]
    assert ray_init_calls[1]["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{port}"
    assert inside == os.environ["RAY_API_SERVER_ADDRESS"] == "http://10.0.0.1:8265"

    with runtime.ray_session(dashboard=False):
        pass
    assert ray_init_calls[2]["RAY_API_SERVER_ADDRESS"] == "http://10.0.0.1:8265"
    assert "dashboard_port" not in ray_init_calls[2]["kwargs"]

    def failing_init(**kwargs):
        raise RuntimeError("ray.init failed")

    monkeypatch.setattr(ray, "init", failing_init)
    with pytest.raises(RuntimeError, match="ray.init failed"), runtime.ray_session():
        pass
    assert os.environ["RAY_API_SERVER_ADDRESS"] == "http://10.0.0.1:8265"  # put back when the start fails too

    monkeypatch.delenv("RAY_API_SERVER_ADDRESS")
    monkeypatch.setattr(ray, "init", lambda **kwargs: ray_init_calls.append(
        {"kwargs": kwargs, "RAY_API_SERVER_ADDRESS": os.environ.get("RAY_API_SERVER_ADDRESS")}))
    with runtime.ray_session(address="10.0.0.1:6379"):
        pass
    assert ray_init_calls[-1]["RAY_API_SERVER_ADDRESS"] is None and "dashboard_port" not in ray_init_calls[-1]["kwargs"]


def test_a_dashboard_port_taken_before_ray_binds_it_is_replaced(ray_init_calls, monkeypatch):
    """The private Ray's dashboard port is free when chosen; if another process takes it before the
    dashboard binds it (Ray's ValueError "... already occupied ..."), the start is retried on a new port,
    at most runtime.DASHBOARD_PORT_TRIES times; any other failure of ray.init is not retried."""
    import os

    import ray

    from stampray import runtime

    attempts = []

    def init(**kwargs):
        attempts.append(dict(kwargs, api=os.environ.get("RAY_API_SERVER_ADDRESS")))
        if len(attempts) == 1:
            raise ValueError(f"Failed to bind to 127.0.0.1:{kwargs['dashboard_port']} because it's already "
                             "occupied. You can use `ray start --dashboard-port ...`")

    monkeypatch.setattr(ray, "init", init)
    with runtime.ray_session():
        pass
    assert len(attempts) == 2 and attempts[0]["dashboard_port"] != attempts[1]["dashboard_port"]
    assert attempts[1]["api"] == f"http://127.0.0.1:{attempts[1]['dashboard_port']}"
    assert "RAY_API_SERVER_ADDRESS" not in os.environ

    taken = []

    def always_taken(**kwargs):
        taken.append(kwargs["dashboard_port"])
        raise ValueError(f"Failed to bind to 127.0.0.1:{kwargs['dashboard_port']} because it's already occupied.")

    monkeypatch.setattr(ray, "init", always_taken)
    with pytest.raises(ValueError, match="already occupied"), runtime.ray_session():
        pass
    assert len(taken) == runtime.DASHBOARD_PORT_TRIES == 3
    assert "RAY_API_SERVER_ADDRESS" not in os.environ

    calls = []

    def other_failure(**kwargs):
        calls.append(kwargs)
        raise ValueError("Invalid address format")

    monkeypatch.setattr(ray, "init", other_failure)
    with pytest.raises(ValueError, match="Invalid address format"), runtime.ray_session():
        pass
    assert len(calls) == 1


@pytest.mark.slow
def test_the_private_rays_state_api_ignores_a_stale_current_cluster_file(tmp_path, run_scenario):
    """Ray's ray_current_cluster names a cluster whose GCS is gone (one that did not shut down cleanly): a
    task of stampray's private Ray still reads its own actor's state through Ray's state API, as Ray Train's
    placement-group cleaner does every few seconds of a run (it waited on the dead address, 10-12 s at the
    end of every fit)."""
    import tempfile

    root = tempfile.mkdtemp(prefix="sr", dir="/tmp")  # short: Ray's socket paths must fit
    try:
        os.makedirs(os.path.join(root, "ray"))
        with open(os.path.join(root, "ray", "ray_current_cluster"), "w") as f:
            f.write(f"127.0.0.1:{free_port()}")  # nothing listens there
        result, log = run_scenario("""
            import json, os, ray
            from stampray.runtime import ray_session
            with ray_session():
                @ray.remote(num_cpus=0)
                class Alive:
                    def ping(self):
                        return 1

                @ray.remote(num_cpus=0)
                def state_of(actor_id):
                    from ray.util.state import get_actor
                    return get_actor(actor_id, timeout=10).state

                a = Alive.remote()
                ray.get(a.ping.remote())
                state = ray.get(state_of.remote(a._actor_id.hex()), timeout=90)
                inside = os.environ.get("RAY_API_SERVER_ADDRESS")  # this process's own: never set
            print("RESULT", json.dumps({"state": state, "inside": inside,
                                        "left": os.environ.get("RAY_API_SERVER_ADDRESS")}))
        """, env={**os.environ, "RAY_ADDRESS": "", "RAY_TMPDIR": root, "PYTHONUNBUFFERED": "1"}, timeout=240)
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    assert result == {"state": "ALIVE", "inside": None, "left": None}, log[-3000:]


def test_a_verb_that_needs_less_starts_less(ray_init_calls, monkeypatch):
    """score's driver asks for no dashboard modules and no Ray Data (its coordinator task has its own)."""
    from stampray import runtime

    configured = []
    monkeypatch.setattr(runtime, "_quiet_data_context", lambda *args, **kwargs: configured.append(1))
    with runtime.ray_session(dashboard=False, data=False):
        pass
    assert ray_init_calls[0]["kwargs"]["include_dashboard"] is False and configured == []
    with runtime.ray_session():
        pass
    assert ray_init_calls[1]["kwargs"]["include_dashboard"] is True and configured == [1]


def test_the_cluster_asked_for_is_address_then_ray_address(monkeypatch):
    from stampray import runtime

    monkeypatch.setenv("RAY_ADDRESS", "ray://example:10001")
    assert runtime.target_address(None) == "ray://example:10001"
    assert runtime.target_address("10.0.0.1:6379") == "10.0.0.1:6379"
    monkeypatch.delenv("RAY_ADDRESS")
    assert runtime.target_address(None) is None


def test_an_address_where_no_cluster_answers_stops_at_once_naming_it(tmp_path, monkeypatch):
    """Ray would retry such an address for over ten minutes (20 attempts of about 40 s each); stampray
    tries a TCP connection to the GCS address Ray would use first and stops with the address and the fix."""
    from ray._private import services

    from stampray import runtime

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # A port nothing listens on: bound on every address, never listening (Ray may rewrite 127.0.0.1 to the
    # node's address, and connects there).
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        port = s.getsockname()[1]
        t = time.monotonic()
        with pytest.raises(RuntimeError) as e:
            runtime.check_cluster(f"127.0.0.1:{port}", f"--address 127.0.0.1:{port}")
        assert time.monotonic() - t < runtime.CONNECT_CHECK_S
        msg = str(e.value)
        assert msg.startswith(f"--address 127.0.0.1:{port}: no Ray cluster answers at ") and f":{port}" in msg
        assert "refused" in msg.lower() and "ray start --head" in msg and "\n" not in msg

        # auto: the cluster the last `ray start` on this machine recorded, gone since (and no other Ray
        # running here, which Ray's "auto" would take instead: the test session's own may be)
        monkeypatch.setattr(services, "find_gcs_addresses", lambda: [])
        monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
        (tmp_path / "ray").mkdir()
        (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}")
        with pytest.raises(RuntimeError, match=r"^RAY_ADDRESS=auto: no Ray cluster answers at .*the last "
                                               r"cluster 'ray start' started on this machine"):
            runtime.check_cluster("auto", "RAY_ADDRESS=auto")
    (tmp_path / "ray" / "ray_current_cluster").unlink()
    with pytest.raises(RuntimeError, match=r"^--address auto: Could not find any running Ray instance.* start a "
                                           r"cluster \(ray start --head\) or give the cluster's GCS address"):
        runtime.check_cluster("auto", "--address auto")
    # malformed: a usage error
    with pytest.raises(ValueError, match=r"^--address nonsense::x: Invalid address format: nonsense::x; give "
                                         r"the cluster's GCS address as host:port"):
        runtime.check_cluster("nonsense::x", "--address nonsense::x")
    with pytest.raises(ValueError, match=r"^--address myhost: has no port number; give the cluster's GCS address as host:port"):
        runtime.check_cluster("myhost:", "--address myhost:")
    # the README's RAY_ADDRESS for `ray job submit`, left set when a verb is run on this machine
    with pytest.raises(RuntimeError, match=r"^RAY_ADDRESS=http://127.0.0.1:8265 is a dashboard's address, the one "
                                           r"'ray job submit' takes; .* or unset RAY_ADDRESS for a private local Ray$"):
        runtime.check_cluster("http://127.0.0.1:8265", "RAY_ADDRESS=http://127.0.0.1:8265")
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # --address auto takes RAY_ADDRESS first, as Ray does
    with pytest.raises(RuntimeError, match=r"^--address auto is a dashboard's address.*python jobs/\.\.\.\)$"):
        runtime.check_cluster("auto", "--address auto")
    # A Ray Client address: Ray Data's streaming (every verb's results) does not run through Ray Client
    monkeypatch.setenv("RAY_ADDRESS", "ray://example:10001")
    with pytest.raises(ValueError, match=r"^--address auto is a Ray Client address, and stampray's verbs stream "
                                         r"their results with Ray Data, which Ray Client does not support: give the "
                                         r"cluster's GCS address .* \(ray job submit --working-dir \. -- python "
                                         r"jobs/\.\.\.\)$"):
        runtime.check_cluster("auto", "--address auto")
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(ValueError, match=r"^--address ray://example:10001 is a Ray Client address"):
        runtime.check_cluster("ray://example:10001", "--address ray://example:10001")
    runtime.check_cluster("anyscale://prod/x", "--address anyscale://prod/x")  # other schemes: Ray's own retries
    runtime.check_cluster("local", "--address local")  # a new local Ray: nothing to reach


def test_an_address_where_something_else_listens_stops_within_the_check_and_a_gcs_passes(ray_shared, monkeypatch):
    """A port that accepts connections but is no GCS (a dashboard's port given as host:port, another service):
    ray.init would retry it for many minutes, a warning every few seconds; the check names it at once."""
    import threading

    from ray._private import services

    from stampray import runtime

    monkeypatch.setattr(runtime, "CONNECT_CHECK_S", 1.0)
    here = services.resolve_ip_for_localhost("127.0.0.1")  # where Ray connects (it may rewrite 127.0.0.1)
    with socket.socket() as s:  # listens, never answers
        s.bind((here, 0))
        s.listen()
        port = s.getsockname()[1]
        t = time.monotonic()
        with pytest.raises(RuntimeError, match=rf"^--address 127.0.0.1:{port}: something listens at .*:{port}.*, but "
                                               r"it is not a Ray cluster's GCS \(no gRPC answer within 1 s; a "
                                               r"dashboard's port, 8265 by default, or another service\?\); start"):
            runtime.check_cluster(f"127.0.0.1:{port}", f"--address 127.0.0.1:{port}")
        assert time.monotonic() - t < 5

    with socket.socket() as s:  # answers as an HTTP/1.1 server does to what it cannot parse
        s.bind((here, 0))
        s.listen()

        def answer():
            conn, _ = s.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

        threading.Thread(target=answer, daemon=True).start()
        with pytest.raises(RuntimeError, match=r"it is not a Ray cluster's GCS \(its answer is not gRPC; "):
            runtime.check_cluster(f"127.0.0.1:{s.getsockname()[1]}", "--address x")

    gcs = ray_shared.get_runtime_context().gcs_address  # a real GCS: go ahead
    runtime.check_cluster(gcs, f"--address {gcs}")
    monkeypatch.setenv("RAY_USE_TLS", "1")  # a GCS with TLS wants a handshake first: the connection alone
    with socket.socket() as s:
        s.bind((here, 0))
        s.listen()
        runtime.check_cluster(f"127.0.0.1:{s.getsockname()[1]}", "--address x")


def test_a_cluster_that_refuses_the_connection_is_one_line_naming_where_the_address_came_from(monkeypatch):
    import ray

    from stampray import runtime

    def refused(**kwargs):
        raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refused)
    monkeypatch.setattr(runtime, "check_cluster", lambda addr, named: None)  # something listens there
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(RuntimeError, match=r"^--address 10.0.0.1:6379: could not connect to the Ray cluster "
                                           r"\(Failed to connect to Ray cluster at 10.0.0.1:6379\); check"):
        with runtime.ray_session(address="10.0.0.1:6379"):
            pass
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    with pytest.raises(RuntimeError, match=r"^RAY_ADDRESS=10.0.0.1:6379: could not connect"):
        with runtime.ray_session():
            pass


def test_the_cli_names_an_address_with_no_cluster_in_one_line(tmp_path, tno_small, make_checkpoint):
    model = make_checkpoint(tmp_path / "m.pt")
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))  # reserved on every address, never listening
        port = s.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "stampray", "score", "--model", model, "--data", tno_small,
                              "--out", str(tmp_path / "o"), "--address", f"127.0.0.1:{port}"],
                             capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": ""})
    assert out.returncode == 1, out.stderr
    [line] = [x for x in out.stderr.splitlines() if x.startswith("stampray score:")]
    assert line.startswith(f"stampray score: error: --address 127.0.0.1:{port}: no Ray cluster answers"), line
    assert not os.path.exists(tmp_path / "o" / "_manifest.json")


def test_a_small_synth_written_here_still_checks_the_address_it_was_given(tmp_path, capsys, monkeypatch):
    from stampray.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))  # reserved on every address, never listening
        port = s.getsockname()[1]
        assert main(["synth", "-n", "10", "--out", str(tmp_path / "o"), "--address", f"127.0.0.1:{port}"]) == 1
    assert capsys.readouterr().err.startswith(f"stampray synth: error: --address 127.0.0.1:{port}: no Ray cluster "
                                              f"answers at ")
    assert not (tmp_path / "o").exists()


class _Payload:
    """Unpickling this creates ``path``: a harmless stand-in for code a file can run when it is unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_nothing_in_stampray_unpickles_without_opt_in(tmp_path, write_stamps):
    """Checkpoints (loaded on the driver, in a replica, or by a verb) and ingest's array files: a file whose
    unpickling would run code is refused and the code never runs; with --allow-pickle, ingest does run it."""
    import pickle

    import numpy as np
    import torch

    from stampray import checkpoint as ck
    from stampray.inference import ModelActor
    from stampray.ingest import IngestError, IngestSettings, ingest
    from stampray.score import ScoreSettings, score

    ran = tmp_path / "ran"
    bundle = {"format": ck.FORMAT, "version": ck.VERSION, "payload": _Payload(ran)}
    torch.save(bundle, tmp_path / "evil.pt")
    evil_bytes = (tmp_path / "evil.pt").read_bytes()
    with pytest.raises(ValueError, match="is not a stampray checkpoint"):
        ck.load_bundle(str(tmp_path / "evil.pt"))
    threads = torch.get_num_threads()
    try:
        with pytest.raises(ValueError, match="is not a stampray checkpoint"):
            ModelActor(evil_bytes)  # a scoring or occlusion replica
    finally:
        torch.set_num_threads(threads)
    data = write_stamps(tmp_path / "stamps", np.zeros((2, 1, 21, 21), np.float32))
    with pytest.raises(ValueError, match="is not a stampray checkpoint"):
        score(ScoreSettings(model=str(tmp_path / "evil.pt"), data=data, out=str(tmp_path / "scores")))
    assert not ran.exists()

    images = np.array([np.zeros((21, 21)), _Payload(ran)], dtype=object)
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump(images, f)
    np.save(tmp_path / "evil.npy", images, allow_pickle=True)
    np.savez(tmp_path / "evil.npz", images=images)
    for source in (dict(pickle=str(tmp_path / "evil.pkl")), dict(pickle=f"file://{tmp_path / 'evil.pkl'}"),
                   dict(images=str(tmp_path / "evil.npy")), dict(images=str(tmp_path / "evil.npz"))):
        with pytest.raises(IngestError, match="refusing to unpickle"):
            ingest(IngestSettings(out=str(tmp_path / "out"), **source))
        assert not ran.exists(), source

    with pytest.raises(Exception):  # noqa: B017 - what the payload returns is no image; only its side effect counts
        ingest(IngestSettings(out=str(tmp_path / "opted-in"), pickle=str(tmp_path / "evil.pkl"), allow_pickle=True))
    assert ran.exists()  # the opt-in does unpickle: the refusals above are not for want of a working payload


def test_after_a_failure_tasks_in_flight_finish_or_are_cancelled(ray_shared):
    """end_tasks: a task that finishes within the wait is let finish (not cancelled as its result arrives,
    which can end the process on Ray 2.60); one still running after it is cancelled; after Ctrl-C nothing
    is waited for or cancelled."""
    from stampray.runtime import end_tasks

    ray = ray_shared

    @ray.remote(num_cpus=0)
    def nap(seconds):
        for _ in range(int(seconds * 10)):  # short sleeps: a cancel takes effect between them, as in a unit
            time.sleep(0.1)
        return seconds

    quick, slow = nap.remote(0.5), nap.remote(60)
    t0 = time.monotonic()
    end_tasks({quick: 0, slow: 1}, RuntimeError("a unit failed"), wait_s=3)
    assert 2.5 < time.monotonic() - t0 < 30
    assert ray.get(quick, timeout=10) == 0.5
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(slow, timeout=30)
    still = nap.remote(60)
    t0 = time.monotonic()
    end_tasks([still], KeyboardInterrupt(), wait_s=3)
    assert time.monotonic() - t0 < 1
    ready, running = ray.wait([still], timeout=1)
    assert running == [still]
    ray.cancel(still, force=True)
