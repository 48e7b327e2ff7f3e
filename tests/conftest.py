"""Shared fixtures: one Ray instance per test session, small data, progress bars off."""

import os

import pytest

os.environ.setdefault("STAMPRAY_PROGRESS", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Keep idle Ray worker processes (torch already imported) for reuse by the next Ray Data task instead of
# killing them after a second: every test's Ray instance, in this process or a scenario's subprocess,
# then skips most process start-ups. Saves several seconds per training run in the suite.
os.environ.setdefault("RAY_num_workers_soft_limit", "16")
os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "600000")
# Ray Train's controller collects each epoch's report when it polls (every 2 s by default); the tests'
# epochs take a fraction of that.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="session")
def ray_shared():
    """A private local Ray with 2 CPUs, started once for the whole session (Ray's ray_start_regular_shared)."""
    import ray

    from stampray.runtime import _quiet_data_context

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    _quiet_data_context()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tno_small(tmp_path_factory):
    """A 600-stamp tno survey in 3 shards, shared by tests that only read it."""
    from stampray.synth import SynthSettings, synth

    out = str(tmp_path_factory.mktemp("tno_small"))
    synth(SynthSettings(out=out, n=600, seed=7, shard_rows=250))
    return out


SCENARIO_ENV = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}


def _run_scenario(code: str, timeout: int = 420, env=None) -> tuple[dict, str]:
    """Run ``code`` in a fresh Python process; return the JSON after its last ``RESULT `` line and its output.

    Scenarios that start their own Ray (a simulated cluster, workers that must inherit S3 credentials)
    run apart from the test session's Ray instance.
    """
    import json
    import subprocess
    import sys
    import textwrap

    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=timeout, env=env or SCENARIO_ENV)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stdout[-4000:] + out.stderr[-4000:]
    return json.loads(lines[-1][7:]), out.stdout + out.stderr


@pytest.fixture
def run_scenario():
    """``run_scenario(code, timeout=420, env=None)``: see :func:`_run_scenario`."""
    return _run_scenario


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_env():
    """A loopback S3 server (moto) for the whole session; yields the environment a scenario needs to use it
    (credentials and endpoint). Each test makes its own bucket."""
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    pytest.importorskip("moto")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2)
            break
        except Exception:  # noqa: BLE001 - not up yet
            if time.time() > deadline or server.poll() is not None:
                os.killpg(server.pid, signal.SIGTERM)
                raise RuntimeError("the loopback S3 server did not start") from None
            time.sleep(0.2)
    env = {**SCENARIO_ENV, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
    try:
        yield env
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
