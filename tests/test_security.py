"""Issue #11, items 9 and 10: the private local Ray listens on loopback only, and the leftovers of a private
Ray whose driver was killed are ended by the next private session (found by their temp dir, never by name).

Every private Ray started here lives under a Ray temp root of this module's own (``RAY_TMPDIR``), so the
clean-up under test never sees, and never touches, the instances of other test runs on this machine.
"""

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from stampray import runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASET = "srsec_secret_dataset"

# A driver: a private ray_session (1 CPU); with "hold", a named dataset runs first (so metrics would name
# it) and the driver stays up after its READY line until killed; with "once" it leaves at once.
DRIVER = textwrap.dedent(f"""
    import json, os, sys, time, urllib.error, urllib.request
    import ray
    from stampray.runtime import ray_session

    def status(url, headers):
        try:
            return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=20).status
        except urllib.error.HTTPError as e:
            return e.code

    with ray_session(num_cpus=1):
        node = ray._private.worker._global_node
        info = {{"pid": os.getpid(), "temp_dir": node.get_temp_dir_path(), "ip": node.node_ip_address}}
        if sys.argv[1] == "hold":
            import ray.data
            from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled
            ds = ray.data.range(50).map(lambda r: r)
            ds.set_name({DATASET!r})
            ds.materialize()
            time.sleep(2)  # a few metrics report intervals (RAY_metrics_report_interval_ms below)
            url = f"http://{{node.webui_url}}/api/version"
            info.update(dashboard=node.webui_url, anonymous=status(url, {{}}),
                        with_token=status(url, get_auth_headers_if_auth_enabled({{}})))
        print("READY " + json.dumps(info), flush=True)
        if sys.argv[1] == "hold":
            time.sleep(600)
""")


def _psutil():
    import ray  # noqa: F401 - puts Ray's own psutil (ray/thirdparty_files) on sys.path
    import psutil

    return psutil


def _alive(pid: int) -> bool:
    psutil = _psutil()
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _env(root: str) -> dict:
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": root,
           "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p),
           "RAY_metrics_report_interval_ms": "500"}
    env.pop("RAY_AUTH_MODE", None)  # Ray's default for a new local cluster: token authentication on
    return env


def _start_driver(root: str, mode: str, timeout: float = 240) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, mode], cwd=REPO, env=_env(root), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, t0 = [], time.monotonic()
    for line in proc.stdout:  # READY comes within timeout, or the driver ends
        if line.startswith("READY "):
            return proc, json.loads(line[6:])
        out.append(line)
        if time.monotonic() - t0 > timeout:
            break
    proc.kill()
    proc.wait()
    raise AssertionError("driver never got ready:\n" + "".join(out[-60:]))


def _descendants(pid: int) -> set[int]:
    psutil = _psutil()
    with contextlib.suppress(psutil.NoSuchProcess):
        return {c.pid for c in psutil.Process(pid).children(recursive=True)}
    return set()


def _listeners(pids: set[int]) -> list[tuple[str, int, str]]:
    """(host, port, owner) of every listening TCP socket of ``pids``, from ``ss -ltnpH``."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        owners = fields[5] if len(fields) > 5 else ""
        if not any(f"pid={pid}," in owners for pid in pids):
            continue
        host, port = fields[3].rsplit(":", 1)
        found.append((host.strip("[]").split("%")[0], int(port), owners))
    return found


def _is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:  # "*": every interface
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def _http_get(port: int, path: str) -> tuple[int, str] | None:
    import http.client

    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read(2_000_000).decode(errors="replace")
    except (OSError, http.client.HTTPException):
        return None  # not HTTP (a gRPC port)


@pytest.fixture(scope="module")
def root():
    """A Ray temp root of this module's own, short (Ray's socket paths stay under 107 bytes)."""
    path = tempfile.mkdtemp(prefix="srsec", dir="/tmp")
    yield path
    env_root = os.path.join(path, "ray")
    for pid in runtime.reap_orphans(env_root, term_wait=1, kill_wait=3):
        assert not _alive(pid)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def first_driver(root):
    """A private Ray in a driver process that stays up (until a test kills it)."""
    proc, info = _start_driver(root, "hold")
    info["descendants"] = sorted(_descendants(proc.pid))
    yield proc, info
    if proc.poll() is None:
        proc.kill()
    proc.wait()


# ------------------------------------------------------------------------------------------------ item 9


@pytest.mark.slow
def test_private_ray_listens_on_loopback_only(first_driver):
    """9. Every TCP socket the private Ray's processes listen on is bound to loopback (127.0.0.1, or
    ::ffff:127.0.0.1 for Ray's gRPC servers); the dashboard refuses a request without the token and
    answers one with it; no unauthenticated HTTP endpoint of the instance exports the dataset metrics."""
    proc, info = first_driver
    assert info["ip"] == "127.0.0.1"
    pids = {proc.pid} | _descendants(proc.pid) | {p.pid for p in runtime.processes_in(info["temp_dir"])}
    listening = _listeners(pids)
    owners = " ".join(o for _, _, o in listening)
    # GCS, raylet, driver and worker core workers, the agents and the dashboard are all there.
    for component in ("gcs_server", "raylet", "DashboardA", "RuntimeEnv", f"pid={proc.pid},"):
        assert component in owners, listening
    beyond = [entry for entry in listening if not _is_loopback(entry[0])]
    assert not beyond, f"listening beyond loopback: {beyond}"

    assert info["dashboard"].startswith("127.0.0.1:")
    assert info["anonymous"] in (401, 403), info
    assert info["with_token"] == 200, info

    leaked = []
    for _, port, owner in listening:
        got = _http_get(port, "/metrics")
        if got and got[0] == 200 and (DATASET in got[1] or "ray_data_" in got[1]):
            leaked.append((port, owner))
    assert not leaked, f"unauthenticated metrics name the dataset: {leaked}"


# ----------------------------------------------------------------------------------------------- item 10


@pytest.mark.slow
def test_killed_driver_leftovers_end_at_next_session(first_driver, root):
    """10. After SIGKILL of a private session's driver, processes of its Ray live on (found here by pid:
    the driver's descendants while it ran). The next private ray_session ends them before it starts its own
    Ray and removes the dead instance's owner marker; a process that only looks like Ray's (same name), a
    process writing into a live stampray instance's dir and one writing into a Ray dir stampray did not
    start are untouched. The second session, left normally, leaves nothing running and no marker."""
    proc, info = first_driver
    temp_dir = info["temp_dir"]
    marker = os.path.join(temp_dir, runtime.OWNER_FILE)
    assert os.path.isfile(marker)
    env_root = os.path.dirname(temp_dir)
    assert env_root == os.path.join(root, "ray")

    live_dir = os.path.join(env_root, f"{runtime.TEMP_PREFIX}{os.getpid()}")  # owner: this (live) process
    runtime._mark_instance(live_dir)
    foreign_dir = os.path.join(env_root, "session_not_stampray", "logs")
    os.makedirs(foreign_dir)
    decoys = []
    with open(os.path.join(live_dir, "decoy.log"), "w") as live_log, \
            open(os.path.join(foreign_dir, "decoy.log"), "w") as foreign_log:
        decoys.append(subprocess.Popen(["bash", "-c", "exec -a ray::DashboardAgent sleep 300"]))
        decoys.append(subprocess.Popen(["sleep", "300"], stdout=live_log))
        decoys.append(subprocess.Popen(["sleep", "300"], stdout=foreign_log))
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        time.sleep(5)  # what goes down with the driver goes down within seconds
        leftovers = [pid for pid in info["descendants"] if _alive(pid)]
        assert leftovers, "nothing of the killed driver's Ray lived on: the scenario did not happen"

        second, info2 = _start_driver(root, "once")
        # ray_session ended the leftovers before starting its own Ray, i.e. before READY.
        alive = [pid for pid in leftovers if _alive(pid)]
        assert not alive, f"leftovers of the killed driver still running: {alive}"
        assert not os.path.exists(marker)
        assert os.path.isdir(temp_dir)  # its logs stay
        for decoy in decoys:
            assert decoy.poll() is None, decoy.args
        assert os.path.isfile(os.path.join(live_dir, runtime.OWNER_FILE))

        assert second.wait(timeout=120) == 0
        assert not os.path.exists(os.path.join(info2["temp_dir"], runtime.OWNER_FILE))
        # The session ended its own Ray's leftovers before it returned (runtime._end_leftovers).
        assert not runtime.processes_in(info2["temp_dir"])
    finally:
        for decoy in decoys:
            decoy.kill()
            decoy.wait()
        with contextlib.suppress(OSError):
            os.remove(os.path.join(live_dir, runtime.OWNER_FILE))


# ---------------------------------------------------------------------------------------- without Ray


def _dead_drivers_instance(root: str) -> str:
    """A stampray temp dir under ``root`` whose owner marker names a driver that has exited."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    dead_dir = os.path.join(root, f"{runtime.TEMP_PREFIX}{dead.pid}")
    os.makedirs(dead_dir)
    with open(os.path.join(dead_dir, runtime.OWNER_FILE), "w") as f:
        json.dump({"pid": dead.pid, "started": 1.0}, f)
    return dead_dir


def test_reap_orphans_ends_only_dead_drivers_writers(tmp_path):
    """10 (the rule, no Ray started): in a stampray temp dir whose owner is dead, the processes writing
    there, and their children, are ended; a reader of the same dir (``tail -f`` of a log), a name-alike,
    writers in a live owner's dir and in a dir without marker are not."""
    root = str(tmp_path)
    dead_dir = _dead_drivers_instance(root)
    live_dir = os.path.join(root, f"{runtime.TEMP_PREFIX}{os.getpid()}")
    runtime._mark_instance(live_dir)
    unmarked_dir = os.path.join(root, f"{runtime.TEMP_PREFIX}999999")
    os.makedirs(unmarked_dir)
    log = os.path.join(dead_dir, "agent.out")
    procs = {}
    try:
        with open(log, "w") as w, open(os.path.join(live_dir, "x.out"), "w") as lw, \
                open(os.path.join(unmarked_dir, "x.out"), "w") as uw:
            # a writer that ignores SIGTERM (as Ray's agents did) and has a child
            procs["writer"] = subprocess.Popen(["bash", "-c", "trap '' TERM; sleep 300 >/dev/null & wait"], stdout=w)
            procs["live"] = subprocess.Popen(["sleep", "300"], stdout=lw)
            procs["unmarked"] = subprocess.Popen(["sleep", "300"], stdout=uw)
        procs["reader"] = subprocess.Popen(["tail", "-f", log], stdout=subprocess.DEVNULL)
        procs["namesake"] = subprocess.Popen(["bash", "-c", "exec -a ray::RuntimeEnvAgent sleep 300"])
        time.sleep(0.5)
        child = _descendants(procs["writer"].pid)
        assert child

        ended = runtime.reap_orphans(root, term_wait=0.5, kill_wait=3)

        assert set(ended) == {procs["writer"].pid} | child
        assert procs["writer"].wait(timeout=5) == -signal.SIGKILL
        assert not any(_alive(pid) for pid in child)
        for name in ("live", "unmarked", "reader", "namesake"):
            assert procs[name].poll() is None, name
        assert not os.path.exists(os.path.join(dead_dir, runtime.OWNER_FILE))
        assert os.path.isfile(os.path.join(live_dir, runtime.OWNER_FILE))
        assert runtime.reap_orphans(root) == []  # nothing left to do
    finally:
        for p in procs.values():
            p.kill()
            p.wait()


def test_ray_temp_root_is_rays_own_default_without_importing_ray(monkeypatch):
    from ray._common.utils import get_default_ray_temp_dir

    for ray_tmpdir, tmpdir in ((None, None), (None, "/tmp/t1"), ("/tmp/r1", "/tmp/t1"), ("/tmp/r2", None)):
        for name, value in (("RAY_TMPDIR", ray_tmpdir), ("TMPDIR", tmpdir)):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        assert runtime.ray_temp_root() == get_default_ray_temp_dir(), (ray_tmpdir, tmpdir)
    monkeypatch.delenv("RAY_TMPDIR")
    monkeypatch.delenv("TMPDIR", raising=False)
    assert runtime.ray_temp_root() == "/tmp/ray"


def test_a_run_without_ray_reaps_only_when_an_owner_is_gone(tmp_path, monkeypatch):
    """reap_if_orphaned (a job scored in-process): reap_orphans runs only when a stampray instance's owner pid
    no longer exists; live owners and dirs without a marker leave Ray unimported (checked in a fresh Python)."""
    root = str(tmp_path)
    runtime._mark_instance(os.path.join(root, f"{runtime.TEMP_PREFIX}{os.getpid()}"))
    os.makedirs(os.path.join(root, f"{runtime.TEMP_PREFIX}999999"))  # no marker
    with open(os.path.join(root, "other-dir-of-ray"), "w") as f:
        f.write("x")
    code = ("import sys; from stampray import runtime; "
            f"print(runtime.reap_if_orphaned({root!r}), 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] False"
    calls = []
    monkeypatch.setattr(runtime, "reap_orphans", lambda r: calls.append(r) or [4242])
    assert runtime.reap_if_orphaned(root) == [] and calls == []
    _dead_drivers_instance(root)
    assert runtime.reap_if_orphaned(root) == [4242] and calls == [root]


def test_private_temp_dir_and_loopback_switch(monkeypatch):
    """The private temp dir is <Ray temp root>/stampray-<pid>, or none where Ray's socket paths would pass
    the AF_UNIX limit; the loopback switch for ray.init restores Ray's flag afterwards."""
    from ray._private import ray_constants

    monkeypatch.setenv("RAY_TMPDIR", "/tmp/x")
    assert runtime.private_temp_dir() == f"/tmp/x/ray/{runtime.TEMP_PREFIX}{os.getpid()}"
    monkeypatch.setenv("RAY_TMPDIR", "/tmp/" + "d" * 60)
    assert runtime.private_temp_dir() is None
    before = ray_constants.ENABLE_RAY_CLUSTER
    with runtime._loopback_node_ip():
        assert ray_constants.ENABLE_RAY_CLUSTER is False
    assert ray_constants.ENABLE_RAY_CLUSTER == before


def test_a_session_ends_what_its_private_ray_left_running(tmp_path):
    """After ``ray.shutdown`` a private session ends the processes still writing in its own instance dir
    (a replica seen to outlive its raylet by a minute), and nothing else."""
    mine = str(tmp_path / f"{runtime.TEMP_PREFIX}{os.getpid()}")
    other = str(tmp_path / "elsewhere")
    os.makedirs(mine)
    os.makedirs(other)
    with open(os.path.join(mine, "worker.out"), "w") as w, open(os.path.join(other, "x.out"), "w") as o:
        stuck = subprocess.Popen(["bash", "-c", "trap '' TERM; sleep 300"], stdout=w)
        bystander = subprocess.Popen(["sleep", "300"], stdout=o)
    try:
        time.sleep(0.3)
        runtime._end_leftovers(mine, term_wait=0.3, kill_wait=3)
        assert stuck.wait(timeout=5) == -signal.SIGKILL
        assert bystander.poll() is None
    finally:
        for p in (stuck, bystander):
            p.kill()
            p.wait()


def test_every_verb_first_ends_a_killed_stampray_s_leftovers(tmp_path, monkeypatch, capsys):
    """The CLI ends a dead driver's private Ray before any verb, one that starts no Ray too (here `models`);
    a failure to look is no reason to stop the verb."""
    from stampray.cli import main

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    root = os.path.join(str(tmp_path), "ray")
    _dead_drivers_instance(root)
    calls = []
    monkeypatch.setattr(runtime, "reap_orphans", lambda r: calls.append(r) or [4242])
    assert main(["models", "--shape", "1,21,21", "--classes", "2"]) == 0 and calls == [root]
    monkeypatch.setattr(runtime, "reap_orphans", lambda r: 1 / 0)
    assert main(["models", "--shape", "1,21,21", "--classes", "2"]) == 0
    assert "cnn" in capsys.readouterr().out
