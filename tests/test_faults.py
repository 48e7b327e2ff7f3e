"""Multi-node behaviour on ray.cluster_utils.Cluster, object storage on a loopback S3 server.

Each test runs its scenario in a fresh Python process: the simulated cluster (or the S3 credentials
the Ray workers inherit) must not mix with the test session's own Ray instance.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

ENV = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}


def run_script(code: str, timeout: int = 420, env=None) -> tuple[dict, str]:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=timeout, env=env or ENV)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stdout[-4000:] + out.stderr[-4000:]
    return json.loads(lines[-1][7:]), out.stdout + out.stderr


@pytest.mark.slow
def test_scoring_survives_the_loss_of_a_worker_node(tmp_path):
    result, _ = run_script(f"""
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
        killed = []
        def killer():
            while len([f for f in os.listdir(out) if f.startswith("part-")] if os.path.exists(out) else []) < 5:
                time.sleep(0.05)
            cluster.remove_node(victim)  # a worker node dies mid-job
            killed.append(time.time())
        threading.Thread(target=killer, daemon=True).start()
        r = score(ScoreSettings(model={str(tmp_path / 'm.pt')!r}, data=data, out=out, actors=3, batch_size=500,
                                compile="off", progress=False))
        ids = read_scores(out, columns=["stamp_id"]).column("stamp_id").to_pylist()
        src = st.read_table(data, columns=["stamp_id"]).column("stamp_id").to_pylist()
        print("RESULT", json.dumps({{"killed": bool(killed), "n": len(ids), "unique": len(set(ids)),
                                     "same": set(ids) == set(src), "scored": r.scored}}), flush=True)
        os._exit(0)
    """)
    assert result == {"killed": True, "n": 30000, "unique": 30000, "same": True, "scored": 30000}


@pytest.mark.slow
def test_training_survives_the_loss_of_a_node(tmp_path):
    # Ray Train's default 2 s poll: the run must still be going when the node's death is noticed.
    env = {**ENV, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2"}
    result, log = run_script(f"""
        import json, os, threading, time, ray
        from ray.cluster_utils import Cluster
        from stampray.synth import SynthSettings, synth
        from stampray.train import TrainSettings, fit
        data, runs = {str(tmp_path / 'survey')!r}, {str(tmp_path / 'runs')!r}
        synth(SynthSettings(out=data, n=2000, seed=2, shard_rows=500))
        cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 0}})
        nodes = [cluster.add_node(num_cpus=1) for _ in range(3)]
        ray.init(address=cluster.address, logging_level="ERROR")
        killed, errors = [], []
        def killer():
            hosts = None
            metrics = os.path.join(runs, "cnn", "metrics.jsonl")
            # Epoch 3 logged: epoch 1's checkpoint is registered (see test_train's worker-kill test).
            while not os.path.exists(metrics) or len(open(metrics).read().splitlines()) < 3:
                time.sleep(0.05)
            try:
                hosts = set(json.loads(open(metrics).readline())["node_ids"])  # where the Train workers run
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
                                     "resumed_from": r.metrics["resumed_from"], "errors": errors}}), flush=True)
        os._exit(0)
    """, env=env)
    assert result["killed"], result["errors"]
    assert result["done"] == 6 and result["workers"] == 2, result
    assert len(result["resumed_from"]) >= 1 and result["resumed_from"][0] >= 1, result  # from a checkpoint
    assert result["epochs"][-1] == 6 and sorted(set(result["epochs"])) == [1, 2, 3, 4, 5, 6], result


@pytest.mark.slow
def test_killed_driver_rerun_completes_scoring_on_a_cluster(tmp_path):
    from stampray.score import read_scores
    from stampray.synth import SynthSettings, synth

    data, out = str(tmp_path / "survey"), str(tmp_path / "scores")
    synth(SynthSettings(out=data, n=30000, seed=5, shard_rows=1000))
    from stampray import checkpoint as ck
    from stampray.models import create_model

    ck.save(ck.make_bundle(create_model("cnn", 1, 21, 2), class_names=["noise", "source"],
                           preprocess="course_scaled"), str(tmp_path / "m.pt"))
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, ray
        from ray.cluster_utils import Cluster
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        cluster.add_node(num_cpus=1)
        cluster.add_node(num_cpus=1)
        print("ADDRESS", cluster.address, flush=True)
        sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV, start_new_session=True)
    try:
        line = ""
        while not line.startswith("ADDRESS"):
            line = holder.stdout.readline()
            assert line, "the cluster did not start"
        address = line.split()[1]
        cmd = [sys.executable, "-m", "stampray", "score", "--model", str(tmp_path / "m.pt"), "--data", data,
               "--out", out, "--address", address, "--batch-size", "500", "--compile", "off", "--no-progress"]
        driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
                                  start_new_session=True)
        deadline = time.time() + 200
        while time.time() < deadline and len([f for f in os.listdir(out) if f.startswith("part-")] if os.path.exists(out) else []) < 5:
            time.sleep(0.05)
        os.killpg(driver.pid, signal.SIGKILL)  # only the driver: the cluster lives on
        driver.wait()
        before = len([f for f in os.listdir(out) if f.startswith("part-")])
        assert 0 < before < 30
        rerun = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        ids = read_scores(out, columns=["stamp_id"]).column("stamp_id").to_pylist()
        assert len(ids) == 30000 and len(set(ids)) == 30000
    finally:
        os.killpg(holder.pid, signal.SIGTERM)
        holder.wait(timeout=60)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ingest_train_score_through_a_loopback_s3_server(tmp_path):
    pytest.importorskip("moto")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    env = {**ENV, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    try:
        result, _ = run_script(f"""
            import json, time, numpy as np, boto3, ray
            for _ in range(100):
                try:
                    boto3.client("s3").create_bucket(Bucket="survey")
                    break
                except Exception:
                    time.sleep(0.2)
            from stampray import table as st
            from stampray.ingest import IngestSettings, ingest
            from stampray.synth import SynthSettings, synth
            from stampray.train import TrainSettings, fit
            from stampray.score import ScoreSettings, score, read_scores
            from stampray.runtime import ray_session
            local = {str(tmp_path / 'local')!r}
            synth(SynthSettings(out=local, n=1500, seed=3, shard_rows=500))
            t = st.read_table(local)
            img = st.decode_images(t.column("image"), (1, 21, 21))[:, 0]
            lab = t.column("label").to_numpy()
            np.save({str(tmp_path / 'noise.npy')!r}, img[lab == 0])
            np.save({str(tmp_path / 'source.npy')!r}, img[lab == 1])
            r = ingest(IngestSettings(out="s3://survey/stamps", shard_rows=400, class_files=(
                ("noise", {str(tmp_path / 'noise.npy')!r}), ("source", {str(tmp_path / 'source.npy')!r}))))
            with ray_session():
                tr = fit(TrainSettings(model="cnn", data="s3://survey/stamps", out="s3://survey/runs", epochs=1,
                                       batch_size=64))
                sc = score(ScoreSettings(model="s3://survey/runs/cnn", data="s3://survey/stamps",
                                         out="s3://survey/scores", progress=False))
            ids = read_scores("s3://survey/scores", columns=["stamp_id"]).column("stamp_id").to_pylist()
            keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="survey")["Contents"]]
            print("RESULT", json.dumps({{"ingested": r.ingested, "best": tr.best, "scored": sc.scored,
                                         "ids": len(set(ids)), "tb": any("tensorboard/events" in k for k in keys),
                                         "manifest": "stamps/_manifest.json" in keys}}))
        """, env=env)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert result == {"ingested": 1500, "best": "s3://survey/runs/cnn/best.pt", "scored": 1500, "ids": 1500,
                      "tb": True, "manifest": True}
