"""Multi-node behaviour on ray.cluster_utils.Cluster.

Each test runs its scenario in a fresh Python process: the simulated cluster must not mix with the test
session's own Ray instance.
"""

import contextlib
import os
import signal
import subprocess
import sys
import textwrap

import pytest


def result_parts(out: str) -> list[str]:
    """The result shards a scoring run has committed to ``out`` so far."""
    return [f for f in os.listdir(out) if f.startswith("part-")] if os.path.exists(out) else []


@pytest.mark.slow
def test_scoring_survives_the_loss_of_a_worker_node(tmp_path, run_scenario):
    result, _ = run_scenario(f"""
        import json, os, threading, time, ray, torch
        from ray.cluster_utils import Cluster
        from stampray import checkpoint as ck, table as st
        from stampray.models import create_model
        from stampray.synth import SynthSettings, synth
        from stampray.score import ScoreSettings, score, read_scores
        data, out = {str(tmp_path / 'survey')!r}, {str(tmp_path / 'scores')!r}
        synth(SynthSettings(out=data, n=30000, seed=1, shard_rows=1000))
        ck.save(ck.make_bundle(create_model("cnn", 1, 21, 2), class_names=["noise", "source"],
                               preprocess="course_scaled"), {str(tmp_path / 'm.pt')!r})
        cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1}})
        victim = cluster.add_node(num_cpus=1)
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, logging_level="ERROR")
        killed, errors = [], []
        def killer():
            deadline = time.monotonic() + 300
            while len([f for f in os.listdir(out) if f.startswith("part-")] if os.path.exists(out) else []) < 5:
                if time.monotonic() > deadline:
                    errors.append("score committed fewer than 5 shards in 300 s: no node was removed")
                    return
                time.sleep(0.05)
            cluster.remove_node(victim)  # a worker node dies mid-job
            killed.append(time.time())
        threading.Thread(target=killer, daemon=True).start()
        r = score(ScoreSettings(model={str(tmp_path / 'm.pt')!r}, data=data, out=out, actors=3, batch_size=500,
                                compile="off", progress=False))
        ids = read_scores(out, columns=["stamp_id"]).column("stamp_id").to_pylist()
        src = st.read_table(data, columns=["stamp_id"]).column("stamp_id").to_pylist()
        print("RESULT", json.dumps({{"killed": bool(killed), "n": len(ids), "unique": len(set(ids)),
                                     "same": set(ids) == set(src), "scored": r.scored, "errors": errors}}),
              flush=True)
        os._exit(0)
    """)
    assert result == {"killed": True, "n": 30000, "unique": 30000, "same": True, "scored": 30000, "errors": []}


@pytest.mark.slow
def test_training_survives_the_loss_of_a_node(tmp_path, run_scenario, scenario_env):
    # Ray Train's default 2 s poll: the run must still be going when the node's death is noticed.
    env = {**scenario_env, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2"}
    result, log = run_scenario(f"""
        import json, os, threading, time, ray
        from ray.cluster_utils import Cluster
        from stampray.synth import SynthSettings, synth
        from stampray.train import TrainSettings, fit
        data, runs = {str(tmp_path / 'survey')!r}, {str(tmp_path / 'runs')!r}
        synth(SynthSettings(out=data, n=2000, seed=2, shard_rows=500))
        cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 0}})
        nodes = [cluster.add_node(num_cpus=1) for _ in range(3)]
        ray.init(address=cluster.address, logging_level="ERROR")
        killed, errors, spread = [], [], []
        def killer():
            hosts = None
            metrics = os.path.join(runs, "cnn", "metrics.jsonl")
            # Epoch 3 logged: epoch 1's checkpoint is registered (see test_train's worker-kill test).
            deadline = time.monotonic() + 300
            while not os.path.exists(metrics) or len(open(metrics).read().splitlines()) < 3:
                if time.monotonic() > deadline:
                    errors.append("fewer than 3 epochs logged in 300 s: no node was removed")
                    return
                time.sleep(0.05)
            try:
                hosts = set(json.loads(open(metrics).readline())["node_ids"])  # where the Train workers run
                spread.append(len(hosts))
                victim = next(n for n in nodes if n.node_id in hosts)
                cluster.remove_node(victim)  # a node holding a Train worker dies mid-run
                killed.append(True)
            except Exception as e:
                errors.append(repr(e) + " " + repr(hosts) + " " + repr([n.node_id for n in nodes]))
        threading.Thread(target=killer, daemon=True).start()
        r = fit(TrainSettings(model="cnn", data=data, out=runs, workers=2, epochs=6, batch_size=64,
                              placement="SPREAD", cpus_per_worker=0.5, max_failures=3))
        print("RESULT", json.dumps({{"killed": bool(killed), "epochs": [h["epoch"] for h in r.history],
                                     "done": r.metrics["epochs_done"], "workers": r.metrics["workers"],
                                     "resumed_from": r.metrics["resumed_from"], "errors": errors,
                                     "spread": spread, "nodes": r.metrics["nodes"]}}), flush=True)
        os._exit(0)
    """, env=env)
    assert result["killed"], result["errors"]
    # placement="SPREAD": the two Train workers on two nodes before the loss. After it Ray places the group again;
    # SPREAD is its best effort, not a rule (STRICT_SPREAD is): in a CI run under load both workers landed on one
    # of the two nodes left, and the run was sound all the same.
    assert result["spread"] == [2] and result["nodes"] in (1, 2), result
    assert result["done"] == 6 and result["workers"] == 2, result
    assert len(result["resumed_from"]) >= 1 and result["resumed_from"][0] >= 1, result  # from a checkpoint
    assert result["epochs"][-1] == 6 and sorted(set(result["epochs"])) == [1, 2, 3, 4, 5, 6], result


@pytest.mark.slow
def test_killed_driver_rerun_completes_scoring_on_a_cluster(tmp_path, make_checkpoint, scenario_env, wait_until):
    from stampray.score import read_scores
    from stampray.synth import SynthSettings, synth

    data, out = str(tmp_path / "survey"), str(tmp_path / "scores")
    synth(SynthSettings(out=data, n=30000, seed=5, shard_rows=1000))
    model = make_checkpoint(tmp_path / "m.pt", preprocess="course_scaled")
    address_file = tmp_path / "address"
    # The simulated cluster lives in a process of its own, until its stdin closes.
    with open(tmp_path / "cluster.log", "w") as log:
        holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import os, sys, ray
            from ray.cluster_utils import Cluster
            cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1}})
            cluster.add_node(num_cpus=1)
            cluster.add_node(num_cpus=1)
            with open({str(address_file)!r} + ".tmp", "w") as f:
                f.write(cluster.address)
            os.replace({str(address_file)!r} + ".tmp", {str(address_file)!r})
            sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=scenario_env,
                                  start_new_session=True)
    driver = None
    try:
        def cluster_address():
            assert holder.poll() is None, "the simulated cluster's process ended:\n" + \
                (tmp_path / "cluster.log").read_text()[-3000:]
            return address_file.exists() and address_file.read_text()

        address = wait_until(cluster_address, 180, "the simulated cluster to start")
        cmd = [sys.executable, "-m", "stampray", "score", "--model", model, "--data", data, "--out", out,
               "--address", address, "--batch-size", "500", "--compile", "off", "--no-progress"]
        driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=scenario_env,
                                  start_new_session=True)

        def five_shards():
            assert driver.poll() is None, "the scoring driver ended before it committed 5 result shards"
            return len(result_parts(out)) >= 5

        wait_until(five_shards, 200, "the scoring driver to commit 5 result shards")
        os.killpg(driver.pid, signal.SIGKILL)  # only the driver: the cluster lives on
        driver.wait()
        before = len(result_parts(out))
        assert 0 < before < 30
        rerun = subprocess.run(cmd, capture_output=True, text=True, env=scenario_env, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        ids = read_scores(out, columns=["stamp_id"]).column("stamp_id").to_pylist()
        assert len(ids) == 30000 and len(set(ids)) == 30000
    finally:
        if driver is not None and driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
        # Closing its stdin ends the holder, which shuts its cluster down in about a second; a SIGTERM made
        # each of Ray's nodes drain for its full 30 s first.
        holder.stdin.close()
        try:
            holder.wait(timeout=30)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(holder.pid, signal.SIGKILL)  # whatever of the group is left
            holder.wait()
