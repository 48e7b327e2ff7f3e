"""Every path takes a URI: evaluate and demo against a loopback S3 server (moto, ``s3_env`` in conftest)."""

import json
import os
import re
import tempfile

import pytest

from stampray.evaluate import EvaluateSettings, evaluate

AWS_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")


@pytest.fixture
def s3(s3_env, monkeypatch):
    """This process talks to the loopback S3 server; returns a function making a fresh bucket."""
    import boto3

    for key in AWS_KEYS:
        monkeypatch.setenv(key, s3_env[key])
    client = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"])

    def bucket(name):
        client.create_bucket(Bucket=name)
        return name

    bucket.client = client
    return bucket


def keys(client, bucket, prefix=""):
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    # (pyarrow marks a directory it creates with an empty "dir/" object)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []) if not o["Key"].endswith("/"))


def numbers(report):
    """The report minus what legitimately differs between two runs (timing, the paths)."""
    return {k: v for k, v in report.items() if k not in ("seconds", "settings", "tables")}


@pytest.mark.slow
def test_evaluate_writes_a_complete_report_to_s3(tmp_path, s3, score_table, eight_stamps):
    """--out, --scores, --run and --tensorboard as s3:// URIs; the same numbers as a local run."""
    import pyarrow.fs as pafs

    from stampray import table as st

    bucket = s3("evalbucket")
    local_scores = score_table(tmp_path / "scores", eight_stamps.labels, eight_stamps.probs, eight_stamps.class_names,
                               extra={"snr": [0, 0, 0, 0, 5, 10, 3, 50]})
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(
        {"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "train_acc": 1 - 0.1 / e, "val_acc": 1 - 0.2 / e}) + "\n"
        for e in (1, 2, 3)))
    fs, _ = st.resolve(f"s3://{bucket}/x")
    local_fs = pafs.LocalFileSystem()
    pafs.copy_files(local_scores, f"{bucket}/scores", source_filesystem=local_fs, destination_filesystem=fs)
    pafs.copy_files(str(run), f"{bucket}/run", source_filesystem=local_fs, destination_filesystem=fs)

    here = evaluate(EvaluateSettings(scores=(local_scores,), out=str(tmp_path / "rep"), by=("snr",), run=str(run)))
    before = {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("stampray-report-")}
    there = evaluate(EvaluateSettings(scores=(f"s3://{bucket}/scores",), out=f"s3://{bucket}/report", by=("snr",),
                                      run=f"s3://{bucket}/run", tensorboard=f"s3://{bucket}/tb"))

    pngs = sorted(os.path.basename(p) for p in here.plots)
    assert "training_curves.png" in pngs and "accuracy_by_snr.png" in pngs and "roc.png" in pngs
    names = keys(s3.client, bucket, "report/")
    assert names == sorted(f"report/{n}" for n in [*pngs, "report.json", "report.html", "_stampray.json"])
    assert there.html == f"s3://{bucket}/report/report.html" and there.out == f"s3://{bucket}/report"
    assert sorted(there.plots) == [f"s3://{bucket}/report/{n}" for n in pngs]
    remote = json.loads(st.read_text(f"s3://{bucket}/report/report.json"))
    assert numbers(remote) == numbers(json.loads((tmp_path / "rep" / "report.json").read_text()))
    assert remote["results"]["scores"]["accuracy"] == 0.75 and len(remote["training"]) == 3
    page = st.read_text(there.html)
    assert page.count("<img") == len(pngs) and 'src="data:image/png;base64,' in page
    assert any(k.startswith("tb/evaluate/scores/events.out.tfevents") for k in keys(s3.client, bucket, "tb/"))
    after = {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("stampray-report-")}
    assert after <= before  # the local staging directories are gone


def test_evaluate_to_a_missing_bucket_is_one_clear_line(tmp_path, s3, capsys, score_table, eight_stamps):
    from stampray.cli import main

    s3("present")
    s = score_table(tmp_path / "s", eight_stamps.labels, eight_stamps.probs, eight_stamps.class_names)
    assert main(["evaluate", "--scores", s, "--out", "s3://no-such-bucket/report"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("stampray evaluate: error: --out s3://no-such-bucket/report")
    assert "bucket exists" in err and "AWS_ENDPOINT_URL" in err
    assert main(["evaluate", "--scores", s, "--out", str(tmp_path / "rep"), "--run", "s3://present/no-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("stampray evaluate: error: --run s3://present/no-run holds no metrics.jsonl; give a run "
                   "directory written by 'stampray train'")


def test_demo_starts_over_by_deleting_only_its_own_subdirectories(tmp_path, monkeypatch):
    """A demo replaces only what an earlier demo made (its run runs/cnn and the scores, maps and report
    directories, listed in its _demo.json); one of them it did not make is refused, and nothing is deleted;
    other runs beside runs/cnn stay."""
    import json

    from stampray import table as st
    from stampray.demo import DEMO_FILE, DemoSettings, _start_over

    settings = DemoSettings(out=str(tmp_path))
    for sub in ("survey", "runs/cnn", "report", "notes"):
        (tmp_path / sub).mkdir(parents=True)
        (tmp_path / sub / "f.txt").write_text("x")
    with pytest.raises(ValueError, match=f"--out {tmp_path} holds runs/cnn, report, which 'stampray demo' did not "
                                         f"make there \\(not listed in _demo.json\\), and a demo would replace "
                                         f"them; choose a new or empty directory"):
        _start_over(str(tmp_path), settings)
    assert sorted(os.listdir(tmp_path)) == ["notes", "report", "runs", "survey"]  # nothing deleted
    assert (tmp_path / "runs" / "cnn" / "f.txt").read_text() == "x"

    fresh = tmp_path / "fresh"
    _start_over(str(fresh), settings)  # a first run: nothing to delete; the marker names what it will make
    assert os.listdir(fresh) == [DEMO_FILE]
    assert json.loads((fresh / DEMO_FILE).read_text())["dirs"] == ["runs/cnn", "scores", "maps", "report"]
    for sub in ("survey", "runs/cnn", "runs/mine", "scores", "maps", "report", "notes"):
        (fresh / sub).mkdir(parents=True)
        (fresh / sub / "f.txt").write_text("x")
    _start_over(str(fresh), settings)  # a second demo: its own go aside until it completes, the rest stays
    assert sorted(os.listdir(fresh)) == ["_demo-previous", DEMO_FILE, "notes", "runs", "survey"]
    assert os.listdir(fresh / "runs") == ["mine"]  # a run of the user's too
    assert sorted(os.listdir(fresh / "_demo-previous")) == ["maps", "report", "runs", "scores"]
    import shutil

    shutil.rmtree(fresh / "_demo-previous")  # as the demo does once it is complete

    (fresh / "report").mkdir()
    real_resolve = st.resolve

    class NoDelete:
        def __init__(self, fs):
            self.fs = fs

        def __getattr__(self, name):
            return getattr(self.fs, name)

        def move(self, src, dst):
            raise PermissionError(f"[Errno 13] Permission denied: '{src}'")

    monkeypatch.setattr(st, "resolve", lambda path: (NoDelete(real_resolve(path)[0]), real_resolve(path)[1]))
    with pytest.raises(PermissionError, match=f"^--out {fresh}: cannot move {fresh}/report, an earlier demo's, "
                                              f"aside \\(.*Permission denied.*\\); delete it yourself or choose "
                                              f"another --out$"):
        _start_over(str(fresh), settings)
    monkeypatch.setattr(st, "resolve", real_resolve)

    (fresh / DEMO_FILE).write_text(json.dumps({"verb": "demo", "dirs": ["maps"]}))
    with pytest.raises(ValueError, match="holds report, which 'stampray demo' did not make there"):
        _start_over(str(fresh), settings)
    (fresh / DEMO_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="cannot read _demo.json .*remove it if an earlier demo left it damaged"):
        _start_over(str(fresh), settings)
    assert (fresh / "report").is_dir()


def test_demo_on_s3_replaces_only_its_own_and_names_a_missing_bucket(s3, tmp_path):
    from stampray.demo import DEMO_FILE, DemoSettings, _start_over

    bucket = s3("demo-own")
    s3.client.put_object(Bucket=bucket, Key="d/scores/part-00000.parquet", Body=b"someone's")
    s3.client.put_object(Bucket=bucket, Key="d/notes.txt", Body=b"keep")
    settings = DemoSettings(out=f"s3://{bucket}/d")
    with pytest.raises(ValueError, match="holds scores, which 'stampray demo' did not make there"):
        _start_over(f"s3://{bucket}/d", settings)
    assert keys(s3.client, bucket) == ["d/notes.txt", "d/scores/part-00000.parquet"]
    s3.client.delete_object(Bucket=bucket, Key="d/scores/part-00000.parquet")
    _start_over(f"s3://{bucket}/d", settings)
    s3.client.put_object(Bucket=bucket, Key="d/scores/part-00000.parquet", Body=b"the demo's")
    _start_over(f"s3://{bucket}/d", settings)
    assert keys(s3.client, bucket) == ["d/_demo-previous/scores/part-00000.parquet", f"d/{DEMO_FILE}", "d/notes.txt"]
    with pytest.raises(PermissionError, match="^--out s3://no-such-bucket/d: cannot write to it .*check that the bucket "
                                              "exists and that the AWS credentials allow reading and writing "
                                              "there$"):
        _start_over("s3://no-such-bucket/d", settings)


@pytest.mark.slow
def test_demo_writes_everything_to_s3(s3_env, run_scenario, tmp_path):
    """`stampray demo --out s3://...` end to end (small: 2,000 stamps, 1 epoch, 1 worker), in a fresh process
    so the Ray workers inherit the S3 credentials."""
    result, log = run_scenario(f"""
        import json, os, time, boto3
        os.chdir({str(tmp_path)!r})  # anything written to a local path by mistake lands here
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="demo")  # the server answers: s3_env waited for it
        s3.put_object(Bucket="demo", Key="d/report/stale.png", Body=b"old")  # an earlier demo's report
        s3.put_object(Bucket="demo", Key="d/_demo.json", Body=json.dumps({{"verb": "demo", "dirs": ["report"]}}))
        s3.put_object(Bucket="demo", Key="d/notes.txt", Body=b"mine")      # not the demo's: kept
        from stampray.cli import main
        t0 = time.time()
        rc = main(["demo", "-n", "2000", "--epochs", "1", "--workers", "1", "--out", "s3://demo/d"])
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket="demo")
        keys = sorted(o["Key"] for p in pages for o in p.get("Contents", []))
        report = json.loads(s3.get_object(Bucket="demo", Key="d/report/report.json")["Body"].read())
        print("RESULT", json.dumps({{"rc": rc, "keys": keys, "n": report["results"]["cnn"]["n"],
                                     "local": sorted(os.listdir(".")), "seconds": time.time() - t0}}))
    """, env=s3_env, timeout=600)
    keys = result["keys"]
    assert result["rc"] == 0, log[-3000:]
    for key in ("d/survey/_manifest.json", "d/runs/cnn/best.pt", "d/runs/cnn/metrics.jsonl", "d/scores/_manifest.json",
                "d/maps/part-00000.parquet", "d/report/report.html", "d/report/report.json", "d/report/roc.png",
                "d/report/training_curves.png", "d/notes.txt", "d/_demo.json"):
        assert key in keys, (key, keys)
    assert "d/report/stale.png" not in keys
    assert any(k.startswith("d/runs/cnn/tensorboard/evaluate/cnn/events.out.tfevents") for k in keys)
    assert any(k.startswith("d/runs/cnn/tensorboard/events.out.tfevents") for k in keys)  # training's own
    assert result["n"] > 200 and re.search(r"report: +s3://demo/d/report/report\.html", log)
    # occlusion.py's --png is made URI-capable separately: the overlays belong in the bucket, not in a local
    # directory named "s3:"
    assert "d/maps/png/occlusion_grid.png" in keys and result["local"] == [], (result["local"], keys)


@pytest.mark.slow
def test_score_and_occlude_write_from_the_workers_to_s3(s3_env, run_scenario, tmp_path):
    """Result pieces, commits, maps and PNGs all go through the S3 API; nothing is staged locally."""
    result, _ = run_scenario(f"""
        import json, os, boto3, torch
        from stampray import checkpoint as ck, table as st
        from stampray.models import create_model
        from stampray.synth import SynthSettings, synth
        from stampray.score import ScoreSettings, score, read_scores
        from stampray.occlusion import OccludeSettings, occlude, read_maps
        from stampray.runtime import ray_session
        boto3.client("s3").create_bucket(Bucket="res")
        data = {str(tmp_path / 'survey')!r}
        synth(SynthSettings(out=data, n=3000, seed=2, shard_rows=1000))
        torch.manual_seed(0)
        ck.save(ck.make_bundle(create_model("cnn", 1, 21, 2), class_names=["noise", "source"],
                               preprocess="course_scaled"), "s3://res/m.pt")
        with ray_session():
            sc = score(ScoreSettings(model="s3://res/m.pt", data=data, out="s3://res/scores", progress=False,
                                     compile="off"))
            again = score(ScoreSettings(model="s3://res/m.pt", data=data, out="s3://res/scores", progress=False))
            oc = occlude(OccludeSettings(model="s3://res/m.pt", data=data, out="s3://res/maps", limit=3,
                                         png="s3://res/png", progress=False))
        ids = read_scores("s3://res/scores", columns=["stamp_id"]).column("stamp_id").to_pylist()
        keys = sorted(o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="res")["Contents"])
        maps = read_maps("s3://res/maps")
        print("RESULT", json.dumps({{"scored": sc.scored, "ids": len(set(ids)), "again": again.nothing_to_do,
                                     "maps": maps.num_rows, "occluded": oc.rows, "pngs": len(oc.pngs),
                                     "parts": [k for k in keys if "_parts" in k or "_tmp" in k],
                                     "scores": [k for k in keys if k.startswith("scores/part-")],
                                     "png_index": "png/index.csv" in keys}}))
    """, env=s3_env, timeout=600)
    assert result == {"scored": 3000, "ids": 3000, "again": True, "maps": 3, "occluded": 3, "pngs": 4,
                      "parts": [], "png_index": True,
                      "scores": ["scores/part-00000.parquet", "scores/part-00001.parquet", "scores/part-00002.parquet"]}


def test_a_failed_run_on_s3_removes_only_its_own_bookkeeping(s3, capsys, failing_ingest):
    """On an object store a failed run deletes the bookkeeping files it wrote in an --out it created, and only
    those: a prefix that held objects before keeps them (and the failed run's files stay beside them)."""
    import numpy as np

    from stampray.cli import main

    bucket = s3("failing")
    args = failing_ingest(2, np.inf)
    assert main([*args, "--out", f"s3://{bucket}/new/table"]) == 2
    assert "x.npy row 2 has 1 non-finite pixels" in capsys.readouterr().err
    assert keys(s3.client, bucket) == []
    s3.client.put_object(Bucket=bucket, Key="mine/notes.txt", Body=b"mine")
    assert main([*args, "--out", f"s3://{bucket}/mine"]) == 2
    assert keys(s3.client, bucket) == ["mine/_ingest/writer.json", "mine/notes.txt"]


def test_a_table_on_s3_is_replaced_file_by_file_once_the_new_one_is_complete(s3, tmp_path, capsys):
    """The swap moves files (an object store has no directories to move); the user's object stays."""
    import numpy as np

    from stampray import table as st
    from stampray.cli import main

    bucket = s3("replace")
    out = f"s3://{bucket}/t"
    images = np.zeros((3, 21, 21), np.float32)
    images[1, 0, 0] = np.nan  # set aside: the new table has an _errors file
    np.save(tmp_path / "x.npy", images)
    assert main(["synth", "-n", "25", "--seed", "1", "--shard-rows", "10", "--out", out]) == 0
    s3.client.put_object(Bucket=bucket, Key="t/notes.txt", Body=b"mine")
    assert main(["ingest", "--images", str(tmp_path / "x.npy"), "--classes", "noise,source", "--out", out]) == 0
    assert keys(s3.client, bucket) == ["t/_errors/part-00000.parquet", "t/_manifest.json", "t/notes.txt",
                                       "t/part-00000.parquet"]
    assert st.read_manifest(out).num_rows == 2 and st.read_errors(out).num_rows == 1
    capsys.readouterr()
    assert main(["synth", "-n", "25", "--seed", "1", "--shard-rows", "10", "--out", out]) == 0
    assert keys(s3.client, bucket) == ["t/_manifest.json", "t/notes.txt", "t/part-00000.parquet",
                                       "t/part-00001.parquet", "t/part-00002.parquet"]
    assert st.read_manifest(out).num_rows == 25
