"""Shared fixtures: one Ray instance per test session, small data, progress bars off.

Test modules share helpers only through the fixtures here, never by importing one another.
"""

import contextlib
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import pytest

os.environ.setdefault("STAMPRAY_PROGRESS", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Keep idle Ray worker processes (torch already imported) for reuse by the next Ray Data task instead of
# killing them after a second: every test's Ray instance, in this process or a scenario's subprocess,
# then skips most process start-ups. Saves several seconds per training run in the suite.
os.environ.setdefault("RAY_num_workers_soft_limit", "16")
os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "600000")
# Ray Train's controller collects each epoch's report when it polls (every 2 s by default); the tests'
# epochs take a fraction of that. stampray's private Ray polls as often (runtime.TRAIN_POLL_S); this covers
# the test session's Ray and the simulated clusters too.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# No compiled-model packages (stampray.aot) unless a test asks for them: a package build takes 15-25 s per
# model and shape, and the tests that compile check what torch.compile gives; tests/test_aot.py turns them on.
os.environ["STAMPRAY_COMPILE_CACHE"] = "off"  # not a developer's own cache either


@pytest.fixture(scope="module", autouse=True)
def _no_stale_current_cluster():
    """A module whose clusters end by being killed leaves Ray's ``/tmp/ray/ray_current_cluster`` pointing
    at a dead GCS; Ray's address lookup (Ray Train's PlacementGroupCleaner among others) then waits on it
    and prints a traceback in later tests. The file is put back as the module found it."""
    from stampray.runtime import ray_temp_root

    path = os.path.join(ray_temp_root(), "ray_current_cluster")
    try:
        with open(path) as f:
            before = f.read()
    except OSError:
        before = None
    yield
    try:
        with open(path) as f:
            after = f.read()
    except OSError:
        after = None
    if after != before:
        with contextlib.suppress(OSError):
            if before is None:
                os.remove(path)
            else:
                with open(path, "w") as f:
                    f.write(before)


@pytest.fixture(scope="session")
def ray_shared():
    """A private local Ray with 2 CPUs, started once for the whole session (Ray's ray_start_regular_shared)."""
    import ray

    from stampray.runtime import PRIVATE_SYSTEM_CONFIG, _quiet_data_context, free_loopback_port, own_api_server

    if not ray.is_initialized():  # idle workers kept as in stampray's own private Ray
        # With the dashboard (Ray's state API, which Ray Train's placement-group cleaner asks about every run),
        # named to the Ray's own processes as stampray's private Ray does (runtime.own_api_server): a
        # scenario's simulated cluster leaves Ray's ray_current_cluster naming a dead GCS, on which the
        # cleaner waited 10-12 s at the end of every later fit.
        port = free_loopback_port()
        with own_api_server(port):
            ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
                     dashboard_port=port, logging_level="ERROR", _system_config=dict(PRIVATE_SYSTEM_CONFIG))
    _quiet_data_context(private=True)  # the session Ray is private: no deprecation noise
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tno_small(tmp_path_factory):
    """A 600-stamp tno survey in 3 shards, shared by tests that only read it."""
    from stampray.synth import SynthSettings, synth

    out = str(tmp_path_factory.mktemp("tno_small"))
    synth(SynthSettings(out=out, n=600, seed=7, shard_rows=250))
    return out


# Scenario clusters (ray.cluster_utils, `ray start`) keep idle workers for a minute as stampray's private Ray
# does (stampray.runtime.PRIVATE_SYSTEM_CONFIG): with 0-1 CPUs a node, Ray ended each task's worker a second
# after it, and the next task started a fresh Python.
SCENARIO_ENV = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1",
                "RAY_idle_worker_killing_time_threshold_ms": "60000"}


def _run_scenario(code: str, timeout: int = 420, env=None) -> tuple[dict, str]:
    """Run ``code`` in a fresh Python process; return the JSON after its last ``RESULT `` line and its output.

    Scenarios that start their own Ray (a simulated cluster, workers that must inherit S3 credentials)
    run apart from the test session's Ray instance, in a process group of their own: whatever of it is left
    when the scenario ends is killed (a simulated cluster's dashboard and runtime-env agents outlive the
    scenario's ``os._exit``, 140 MB and a little CPU each, for the rest of the suite).
    """
    import json
    import signal
    import subprocess
    import sys
    import textwrap

    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env or SCENARIO_ENV, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"the scenario ran past {timeout} s:\n{stdout[-4000:]}{stderr[-4000:]}") from None
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group is the scenario's own (start_new_session)
        proc.wait()
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, stdout[-4000:] + stderr[-4000:]
    return json.loads(lines[-1][7:]), stdout + stderr


@pytest.fixture
def scenario_env():
    """The environment of a scenario's fresh process (a copy: add to it freely): no inherited RAY_ADDRESS."""
    return dict(SCENARIO_ENV)


@pytest.fixture
def run_scenario():
    """``run_scenario(code, timeout=420, env=None)``: see :func:`_run_scenario`."""
    return _run_scenario


def _processes_naming(temp_dir: str) -> list:
    """The processes of a test's own Ray head: every one whose command line names its temp dir."""
    import ray  # noqa: F401 - puts Ray's own psutil (ray/thirdparty_files) on sys.path
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        with_dir = any(temp_dir in str(a) for a in (p.info.get("cmdline") or []))
        if with_dir and p.pid != os.getpid():
            found.append(p)
    return found


def _stop_ray_head(head, temp_dir: str, grace_s: float = 3.0) -> None:
    """Stop a test's own ``ray start --head --block`` (started with ``start_new_session=True`` and its own
    ``--temp-dir``) and only what it started: its process group and every process naming its temp dir (an
    autoscaler's fake worker nodes, started by its monitor, outlive the group); then remove the temp dir.

    SIGTERM, then SIGKILL for whatever is left after ``grace_s``: `ray start --block` takes 30-35 s to wind
    down after a SIGTERM (measured: 33 s), time a throw-away test cluster need not be given."""
    import shutil
    import signal
    import subprocess

    import ray  # noqa: F401 - puts Ray's own psutil (ray/thirdparty_files) on sys.path
    import psutil

    def signal_all(procs, sig):
        if head.poll() is None:  # not reaped yet, so its process group id is still ours
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, sig)
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(sig)

    procs = [p for p in _processes_naming(temp_dir) if p.pid != head.pid]
    signal_all(procs, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.wait(timeout=grace_s)
    procs += [p for p in _processes_naming(temp_dir) if p.pid != head.pid and p not in procs]
    signal_all(procs, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.wait(timeout=10)
    psutil.wait_procs(procs, timeout=10)
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def stop_ray_head():
    """``stop_ray_head(head, temp_dir)``: see :func:`_stop_ray_head`."""
    return _stop_ray_head


@pytest.fixture
def processes_naming():
    """``processes_naming(temp_dir)``: see :func:`_processes_naming`."""
    return _processes_naming


def free_port() -> int:
    from stampray.runtime import free_loopback_port

    return free_loopback_port()


@pytest.fixture(scope="session")
def s3_env():
    """A loopback S3 server (moto) for the whole session; yields the environment a scenario needs to use it
    (credentials and endpoint). Each test makes its own bucket."""
    import signal
    import subprocess
    import sys
    import urllib.request

    pytest.importorskip("moto")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2)
            break
        except Exception:  # noqa: BLE001 - not up yet
            if time.monotonic() > deadline or server.poll() is not None:
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


def _wait_until(condition, timeout: float, what: str, interval: float = 0.05):
    """Poll ``condition()`` until it returns something truthy (returned); fail naming ``what`` after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = condition()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


@pytest.fixture
def wait_until():
    """``wait_until(condition, timeout, what, interval=0.05)``: every polling wait in the tests is bounded."""
    return _wait_until


# ------------------------------------------------------------------------------------------ score tables
SPLIT_RECORD = {"fractions": [0.7, 0.1, 0.2], "source": "checkpoint", "column": False, "trained_with_column": False}


def _write_scores(path, labels, probs, class_names, extra=None, split=None, split_record=SPLIT_RECORD, ids=None):
    """A score directory as 'stampray score' writes it, from literal values (``split_record=None``: as
    score wrote it before it recorded the split it used; ``ids``: stamp ids, default ``id0``, ``id1``...)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(path, exist_ok=True)
    probs = np.asarray(probs, np.float32)
    n = len(labels)
    cols = {"stamp_id": list(ids) if ids is not None else [f"id{i}" for i in range(n)],
            "label": pa.array(labels, pa.int64()), "split": split or ["test"] * n, "pred": probs.argmax(1),
            "pred_name": [class_names[i] for i in probs.argmax(1)]}
    for j, c in enumerate(class_names):
        cols[f"p_{c}"] = probs[:, j]
    cols["model"] = ["m@000000000000"] * n
    cols.update(extra or {})
    pq.write_table(pa.table(cols), os.path.join(path, "part-00000.parquet"))
    doc = {"model": "m.pt", "model_tag": "m@000000000000", "data": "d", "keep": [], "preprocess": "course",
           "class_names": list(class_names), "num_rows": n, "set_aside": 0, "errors": {},
           "shards": [{"path": "part-00000.parquet", "rows": n, "errors": 0}]}
    if split_record is not None:
        doc["split"] = split_record
    with open(os.path.join(path, "_manifest.json"), "w") as f:
        json.dump(doc, f)
    return str(path)


@pytest.fixture
def score_table():
    """``score_table(path, labels, probs, class_names, extra=None, split=None, split_record=..., ids=None)``:
    writes a score directory from literal values and returns its path (see :func:`_write_scores`)."""
    return _write_scores


@dataclass(frozen=True)
class EightStamps:
    """8 hand-checked binary scores: ``labels`` (0 noise, 1 source) and ``p_source``, p(source).

    At threshold 0.5 the predictions are [0,0,1,0,1,1,0,1]: TN=3 FP=1 FN=1 TP=3. Of the 16 (source, noise)
    pairs the source scores higher in 15 (0.4 < 0.6 is the one lost): AUC 15/16.
    """

    labels: tuple = (0, 0, 0, 0, 1, 1, 1, 1)
    p_source: tuple = (0.005, 0.2, 0.6, 0.3, 0.995, 0.7, 0.4, 0.9)
    class_names: tuple = ("noise", "source")

    @property
    def probs(self) -> np.ndarray:
        """The (8, 2) probabilities, p(noise) = 1 - p(source)."""
        p = np.array(self.p_source)
        return np.stack([1 - p, p], axis=1)


@pytest.fixture
def eight_stamps():
    """The 8 hand-checked binary scores of :class:`EightStamps`."""
    return EightStamps()


# ------------------------------------------------------------------------------ checkpoints and stamps
def _make_checkpoint(path, name="cnn", channels=1, size=21, classes=("noise", "source"), preprocess="course"):
    """An untrained, seeded model saved as a stampray checkpoint at ``path``; returns the path."""
    import torch

    from stampray import checkpoint as ck
    from stampray.models import create_model

    torch.manual_seed(0)
    model = create_model(name, channels, size, len(classes))
    ck.save(ck.make_bundle(model, class_names=classes, preprocess=preprocess), str(path))
    return str(path)


@pytest.fixture(scope="session")
def make_checkpoint():
    """``make_checkpoint(path, name="cnn", channels=1, size=21, classes=(...), preprocess="course")``."""
    return _make_checkpoint


def _write_stamps(path, images, ids=None, labels=None, spec=None, shard_rows=1000):
    """A stamp table at ``path`` from literal images (N, C, H, W); returns the path."""
    from stampray import table as st

    spec = spec or st.StampSpec(images.shape[1:], ("noise", "source"))
    w = st.StampWriter(str(path), spec, shard_rows)
    ids = ids or [f"s{i}" for i in range(len(images))]
    if len(images):
        w.write(st.make_table(spec, ids, images, labels))
    w.close()
    return str(path)


@pytest.fixture(scope="session")
def write_stamps():
    """``write_stamps(path, images, ids=None, labels=None, spec=None, shard_rows=1000)``."""
    return _write_stamps


@pytest.fixture
def failing_ingest(tmp_path):
    """``failing_ingest(row, value) -> argv``: an ingest of three 21x21 npy stamps whose ``row`` has one pixel
    ``value`` (NaN, inf), with ``--nonfinite fail``: it stops at that row, after making its --out (give one)."""

    def args(row: int, value: float) -> list[str]:
        images, labels = tmp_path / "x.npy", tmp_path / "y.npy"
        bad = np.zeros((3, 21, 21), np.float32)
        bad[row, row, row] = value
        np.save(images, bad)
        np.save(labels, np.zeros(3, np.int64))
        return ["ingest", "--images", str(images), "--labels", str(labels), "--nonfinite", "fail"]

    return args


@pytest.fixture
def refused_beside_a_users_file(tmp_path, capsys):
    """``refused(argv, verb, name, flag="--out") -> dir``: runs ``argv`` with ``flag DIR``, where DIR holds only
    the user's own file ``name``; asserts the run exits 2 naming it and leaves DIR exactly as it was."""
    from stampray.cli import main

    def refused(argv: list[str], verb: str, name: str, flag: str = "--out"):
        mine = tmp_path / "mine"
        mine.mkdir()
        (mine / name).write_text("the user's own")
        assert main(argv + [flag, str(mine)]) == 2
        assert (f"{flag} {mine} holds {name}, which 'stampray {verb}' did not write there or which changed since "
                f"(not as listed in its _stampray.json), so nothing is replaced") in capsys.readouterr().err
        assert os.listdir(mine) == [name] and (mine / name).read_text() == "the user's own"
        return mine

    return refused


# ------------------------------------------------------------------------------ HTML pages in Chromium
def _chromium():
    import shutil

    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture
def images_in_chromium(tmp_path):
    """``images_in_chromium(html_text) -> (images, broken)``: the page opened in headless Chromium, its
    <img> elements counted once loaded, and those that did not decode. Skipped without Debian's chromium
    (never in CI, which installs it)."""
    import subprocess

    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI")
        pytest.skip("Debian's chromium is not installed")

    def render(page: str) -> tuple[int, int]:
        probe = tmp_path / "probe.html"
        probe.write_text(page.replace("</body>", "<script>window.addEventListener('load',()=>{const b=[...document"
                                      ".images].filter(i=>!i.complete||i.naturalWidth===0).length;document.title="
                                      "'images:'+document.images.length+' broken:'+b;});</script></body>"))
        out = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                              "--disable-background-networking", "--disable-component-update", "--disable-sync",
                              f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
                              "--dump-dom", f"file://{probe}"], capture_output=True, text=True, timeout=120)
        title = out.stdout.split("<title>")[1].split("</title>")[0]
        images, broken = title.split()
        return int(images.split(":")[1]), int(broken.split(":")[1])

    return render



@pytest.fixture
def stampray_log(caplog):
    """What the library logs on the "stampray" loggers (INFO and above), as pytest's ``caplog``."""
    import logging

    caplog.set_level(logging.INFO, logger="stampray")
    return caplog
