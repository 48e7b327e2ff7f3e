"""Distributed, resumable, URI-capable ingest: Ray tasks write the shards; the table equals the in-process one."""

import glob
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from astropy.io import fits

from stampray import table as st
from stampray.ingest import IngestError, IngestSettings, ingest

N_FITS = 2000
CLASSES = ("noise", "source")


def write_fits(path, data):
    fits.PrimaryHDU(np.asarray(data).astype(">f4")).writeto(path)


@pytest.fixture(scope="module")
def fits_survey(tmp_path_factory):
    """2,000 21x21 cutouts and their catalogue, with bad rows of every kind."""
    root = tmp_path_factory.mktemp("fits_survey")
    cut = root / "cutouts"
    cut.mkdir()
    rng = np.random.default_rng(11)
    lines = ["file,label,id,snr"]
    for i in range(N_FITS):
        a = rng.normal(size=(21, 21))
        if i == 700:
            a[3, 3] = np.nan
        write_fits(cut / f"c{i:05d}.fits", a)
        sid = {1500: "obj10", 1600: "obj42"}.get(i, f"obj{i}")  # 42 is unreadable yet owns its id
        label = "comet" if i == 1234 else CLASSES[i % 2]
        lines.append(f"c{i:05d}.fits,{label},{sid},{i / 2}")
    (cut / "c00042.fits").write_bytes(b"this is not a FITS file" * 10)
    lines.append("missing.fits,noise,gone,1.0")
    (root / "cat.csv").write_text("\n".join(lines) + "\n")
    return {"fits": str(cut), "catalog": str(root / "cat.csv"), "classes": CLASSES}


@pytest.fixture(scope="module")
def reference(fits_survey, tmp_path_factory):
    """The in-process ingest of the survey."""
    out = str(tmp_path_factory.mktemp("reference"))
    r = ingest(IngestSettings(out=out, parallel="off", **fits_survey))
    assert r.units == 0
    return out


def assert_same_table(a, b):
    """Same rows in the same order (ids, image bytes, labels, metadata), set-aside rows and counts."""
    ma, mb = st.read_manifest(a), st.read_manifest(b)
    assert (ma.num_rows, ma.errors, ma.label_counts, ma.columns, ma.spec) == \
        (mb.num_rows, mb.errors, mb.label_counts, mb.columns, mb.spec)
    ta, tb = st.read_table(a), st.read_table(b)
    assert ta.column_names == tb.column_names
    for name in ta.column_names:
        assert ta.column(name).combine_chunks().equals(tb.column(name).combine_chunks()), name
    assert st.read_errors(a).to_pylist() == st.read_errors(b).to_pylist()


def assert_clean(out):
    """Every shard on disk is in the manifest, and the job state is gone."""
    on_disk = sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "part-*.parquet")))
    assert on_disk == [s["path"] for s in st.read_manifest(out).shards]
    assert not os.path.exists(os.path.join(out, "_ingest"))


def test_parallel_setting_is_validated():
    with pytest.raises(ValueError, match="--parallel must be one of auto, on, off"):
        IngestSettings(out="o", class_files=(("a", "a.npy"),), parallel="yes")
    with pytest.raises(ValueError, match="--parallel on distributes --fits and --class inputs"):
        IngestSettings(out="o", images="a.npy", parallel="on")
    with pytest.raises(ValueError, match="unit_files must be a positive integer"):
        IngestSettings(out="o", fits="d", catalog="c.csv", unit_files=0)


@pytest.mark.slow
def test_distributed_fits_equals_in_process(fits_survey, reference, ray_shared, tmp_path):
    out = str(tmp_path / "on")
    r = ingest(IngestSettings(out=out, parallel="on", unit_files=450, shard_rows=200, **fits_survey))
    assert r.units == 5 and r.resumed == 0 and r.rows_in == N_FITS + 1
    assert r.ingested == N_FITS - 5
    assert r.set_aside == {"unreadable": 2, "nonfinite": 1, "label": 1, "duplicate_id": 2}
    assert_same_table(reference, out)
    assert_clean(out)
    names = [s["path"] for s in st.read_manifest(out).shards]
    assert names[:3] == ["part-00000-000.parquet", "part-00000-001.parquet", "part-00000-002.parquet"]
    reasons = {e["stamp_id"]: e["reason"] for e in st.read_errors(out).to_pylist() if e["row"] >= 1500}
    assert reasons["obj10"] == f"duplicate_id: 'obj10' already used by {fits_survey['catalog']} row 10"
    assert reasons["obj42"] == f"duplicate_id: 'obj42' already used by {fits_survey['catalog']} row 42"
    # A complete table is not resumed: the same command starts over and gives the same table.
    again = ingest(IngestSettings(out=out, parallel="on", unit_files=450, shard_rows=200, **fits_survey))
    assert again.resumed == 0 and again.units == 5
    assert_same_table(reference, out)


def _session_pids(sid):
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except (ProcessLookupError, PermissionError):
                continue
    return pids


def _kill_session(proc):
    """SIGKILL the ingest's process group, then any process of its session that left the group (Ray
    workers make their own groups), by pid; wait until none is left."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 60
    while True:
        left = _session_pids(proc.pid)
        if not left:
            return
        assert time.monotonic() < deadline, f"processes of the killed ingest still running: {left}"
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


def _start_and_kill(settings, log_path) -> bool:
    """Run the ingest in its own session and SIGKILL it once a unit has finished. False when Ray itself
    failed to start (its start-up timeout is fixed at 30 s, which a loaded machine can miss)."""
    out = settings["out"]
    code = f"from stampray.ingest import IngestSettings, ingest\ningest(IngestSettings(**{settings!r}))\n"
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while not glob.glob(os.path.join(out, "_ingest", "unit-*.json")):
                if proc.poll() is not None:
                    text = open(log_path).read()
                    assert "timed out during startup" in text, "the ingest ended early:\n" + text[-3000:]
                    return False
                assert time.monotonic() < deadline, "no unit finished within 300 s"
                time.sleep(0.02)
        finally:
            _kill_session(proc)
    return True


@pytest.mark.slow
def test_killed_ingest_resumes_to_the_same_table(fits_survey, reference, ray_shared, tmp_path):
    out = tmp_path / "killed"
    settings = dict(out=str(out), parallel="on", unit_files=40, shard_rows=25, progress=False, **fits_survey)
    for attempt in range(3):
        if _start_and_kill(settings, tmp_path / f"ingest-{attempt}.log"):
            break
    else:
        pytest.fail("Ray did not start in 3 attempts (is the machine overloaded?)")
    assert not (out / "_manifest.json").exists(), "the ingest finished before it could be killed"
    markers = glob.glob(str(out / "_ingest" / "unit-*.json"))
    units = -(-(N_FITS + 1) // 40)
    assert 1 <= len(markers) < units and (out / "_ingest" / "_job.json").exists()
    finished = {int(os.path.basename(m)[5:10]) for m in markers}
    unfinished = min(set(range(units)) - finished)
    stale = out / f"part-{unfinished:05d}-007.parquet"  # a partial shard the rerun must delete
    stale.write_bytes(b"partial")

    r = ingest(IngestSettings(**{**settings, "progress": True}))
    assert 1 <= r.resumed <= len(markers) and r.units == units
    assert not stale.exists()
    ids = st.read_table(str(out), columns=["stamp_id"]).column("stamp_id").to_pylist()
    assert len(ids) == len(set(ids)) == N_FITS - 5
    assert_same_table(reference, str(out))
    assert_clean(str(out))


@pytest.fixture
def class_inputs(tmp_path):
    """Three class files, two with the same stem (their ids collide row by row), one NaN row, one .npz."""
    rng = np.random.default_rng(3)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    noise = rng.normal(size=(130, 21, 21)).astype(np.float32)
    noise[77, 1, 1] = np.inf
    np.save(tmp_path / "a" / "stamps.npy", noise)
    np.save(tmp_path / "b" / "stamps.npy", rng.normal(size=(90, 21, 21)).astype(np.float32))
    np.savez(tmp_path / "extra.npz", images=rng.normal(size=(40, 21, 21)).astype(np.float32))
    return (("noise", str(tmp_path / "a" / "stamps.npy")), ("source", str(tmp_path / "b" / "stamps.npy")),
            ("noise", str(tmp_path / "extra.npz")))


def test_distributed_class_files_equal_in_process(class_inputs, ray_shared, tmp_path):
    base = dict(class_files=class_inputs, classes=CLASSES, shard_rows=30, chunk_rows=16, progress=False)
    off = ingest(IngestSettings(out=str(tmp_path / "off"), parallel="off", unit_rows=50, **base))
    auto = ingest(IngestSettings(out=str(tmp_path / "on"), unit_rows=50, **base))
    # 130 rows: 50+50+30; 90 rows: 20 (sharing the third unit) + 50 + 20; the .npz whole in a unit of its own.
    assert off.units == 0 and auto.units == 6
    assert auto.set_aside == {"nonfinite": 1, "duplicate_id": 90} and auto.ingested == 130 + 90 + 40 - 91
    assert_same_table(str(tmp_path / "off"), str(tmp_path / "on"))
    assert_clean(str(tmp_path / "on"))
    dup = st.read_errors(str(tmp_path / "on")).to_pylist()[-1]
    assert dup["reason"] == f"duplicate_id: 'stamps-000000089' already used by {class_inputs[0][1]} row 89"
    # One unit's worth stays in-process under auto.
    small = ingest(IngestSettings(out=str(tmp_path / "small"), **base))
    assert small.units == 0


def test_other_settings_or_a_stale_job_start_over(class_inputs, ray_shared, tmp_path):
    out = tmp_path / "o"
    base = dict(out=str(out), class_files=class_inputs[:1], classes=CLASSES, parallel="on", unit_rows=50,
                progress=False)
    (out / "_ingest").mkdir(parents=True)
    (out / "_ingest" / "_job.json").write_text(json.dumps({"version": 1, "settings": {}}))
    (out / "_ingest" / "unit-00000.json").write_text(json.dumps({"unit": 0, "shards": []}))
    (out / "part-00009-000.parquet").write_bytes(b"stale")
    (out / "notes.txt").write_text("mine")  # not written by stampray: kept
    r = ingest(IngestSettings(**base))
    assert r.resumed == 0 and r.units == 3 and r.ingested == 129
    clean = ingest(IngestSettings(**{**base, "out": str(tmp_path / "clean"), "class_files": class_inputs[1:2]}))
    assert clean.set_aside == {} and not (tmp_path / "clean" / "_errors").exists()  # as in-process
    assert not (out / "part-00009-000.parquet").exists() and (out / "notes.txt").read_text() == "mine"
    assert_clean(str(out))
    # A failing unit stops the ingest with the input's own one-line message; the table it would have replaced
    # stays as it was, and so does a new --out's lack of a manifest.
    before = (out / "_manifest.json").read_text()
    with pytest.raises(IngestError, match=r"stamps.npy row 77 has 1 non-finite pixels .* --nonfinite set-aside"):
        ingest(IngestSettings(**base, nonfinite="fail"))
    assert (out / "_manifest.json").read_text() == before
    assert not (out / "_replace").exists() or os.listdir(out / "_replace") == ["stage"]  # units a rerun resumes
    assert st.read_manifest(str(out)).num_rows == 129
    with pytest.raises(IngestError, match=r"stamps.npy row 77 has 1 non-finite pixels .* --nonfinite set-aside"):
        ingest(IngestSettings(**{**base, "out": str(tmp_path / "new")}, nonfinite="fail"))
    assert not (tmp_path / "new" / "_manifest.json").exists()


def test_file_uris_read_like_local_paths(tmp_path):
    """The URI code paths (bytes, byte ranges, local copies) through file:// URIs, in-process."""
    rng = np.random.default_rng(5)
    cut = tmp_path / "cut"
    cut.mkdir()
    imgs = rng.normal(size=(4, 21, 21)).astype(np.float32)
    for i in range(3):
        write_fits(cut / f"c{i}.fits", imgs[i])
    buf = tmp_path / "tmp.fits"
    write_fits(buf, imgs[3])
    (cut / "c3.fits.gz").write_bytes(gzip.compress(buf.read_bytes()))
    (tmp_path / "cat.csv").write_text("file,label\nc0.fits,0\nc1.fits,1\nc2.fits,0\nc3.fits.gz,1\nnone.fits,0\n")
    r = ingest(IngestSettings(out=str(tmp_path / "f"), fits=f"file://{cut}", catalog=f"file://{tmp_path}/cat.csv"))
    tbl = st.read_table(str(tmp_path / "f"))
    np.testing.assert_array_equal(st.decode_images(tbl.column("image"), (1, 21, 21))[:, 0], imgs)
    assert r.set_aside == {"unreadable": 1}
    assert st.read_errors(str(tmp_path / "f")).column("reason").to_pylist() == \
        [f"unreadable: file://{cut}/none.fits does not exist"]

    np.save(tmp_path / "x.npy", imgs)
    np.savez(tmp_path / "x.npz", images=imgs, labels=np.array([0, 1, 0, 1]))
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["images"] = imgs
        f["labels"] = np.array([1, 1, 0, 0])
    for i, kw in enumerate([dict(class_files=(("noise", f"file://{tmp_path}/x.npy"),), chunk_rows=3),
                            dict(images=f"file://{tmp_path}/x.npz"), dict(hdf5=f"file://{tmp_path}/x.h5")]):
        out = str(tmp_path / f"o{i}")
        ingest(IngestSettings(out=out, **kw))
        tbl = st.read_table(out)
        assert tbl.column("stamp_id").to_pylist() == [f"x-{k:09d}" for k in range(4)]
        np.testing.assert_array_equal(st.decode_images(tbl.column("image"), (1, 21, 21))[:, 0], imgs)
    with pytest.raises(IngestError, match=f"file://{tmp_path}/nope.npy does not exist"):
        ingest(IngestSettings(out=str(tmp_path / "o"), images=f"file://{tmp_path}/nope.npy"))


@pytest.mark.slow
def test_ingest_from_and_to_s3(s3_env, run_scenario, tmp_path):
    result, _ = run_scenario(f"""
        import glob, gzip, io, json, os, tempfile, time
        import boto3, numpy as np
        from astropy.io import fits
        from stampray import table as st
        from stampray.ingest import IngestSettings, ingest

        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="ingest")
        rng = np.random.default_rng(9)
        lines = ["file,label,id,snr"]
        for i in range(60):
            b = io.BytesIO()
            fits.PrimaryHDU(rng.normal(size=(21, 21)).astype(">f4")).writeto(b)
            name, body = (f"c{{i}}.fits.gz", gzip.compress(b.getvalue())) if i == 5 else (f"c{{i}}.fits", b.getvalue())
            s3.put_object(Bucket="ingest", Key=f"cutouts/{{name}}", Body=body)
            lines.append(f"{{name}},{{i % 2}},s{{i}},{{i}}")
        s3.put_object(Bucket="ingest", Key="cutouts/c7.fits", Body=b"not fits")
        lines.append("gone.fits,0,gone,0")
        s3.put_object(Bucket="ingest", Key="cat.csv", Body="\\n".join(lines).encode())
        b = io.BytesIO()
        np.save(b, rng.normal(size=(150, 21, 21)).astype(np.float32))
        s3.put_object(Bucket="ingest", Key="noise.npy", Body=b.getvalue())
        b = io.BytesIO()
        np.savez(b, images=rng.normal(size=(30, 21, 21)).astype(np.float32))
        s3.put_object(Bucket="ingest", Key="source.npz", Body=b.getvalue())

        before = set(glob.glob(os.path.join(tempfile.gettempdir(), "stampray-ingest-*")))
        fits_in = dict(fits="s3://ingest/cutouts", catalog="s3://ingest/cat.csv", progress=False)
        on = ingest(IngestSettings(out="s3://ingest/fits-on", parallel="on", unit_files=25, **fits_in))
        off = ingest(IngestSettings(out="s3://ingest/fits-off", parallel="off", **fits_in))
        cls = ingest(IngestSettings(out="s3://ingest/class", parallel="on", unit_rows=40, progress=False,
                                    class_files=(("noise", "s3://ingest/noise.npy"),
                                                 ("source", "s3://ingest/source.npz"))))
        ids = st.read_table("s3://ingest/fits-on").column("stamp_id").to_pylist()
        cls_ids = st.read_table("s3://ingest/class").column("stamp_id").to_pylist()
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="ingest")["Contents"]]
        print("RESULT", json.dumps({{
            "units": [on.units, off.units, cls.units], "rows": [on.ingested, off.ingested, cls.ingested],
            "aside": on.set_aside, "same_ids": ids == st.read_table("s3://ingest/fits-off").column("stamp_id").to_pylist(),
            "first_ids": ids[:6], "unique": len(set(ids)) == len(ids),
            "errors": [e["stamp_id"] for e in st.read_errors("s3://ingest/fits-on").to_pylist()],
            "class_ids": [cls_ids[0], cls_ids[149], cls_ids[150], cls_ids[-1]],
            "manifests": [k for k in keys if k.endswith("_manifest.json")],
            "job_state": [k for k in keys if "/_ingest/" in k],
            "temp_left": sorted(set(glob.glob(os.path.join(tempfile.gettempdir(), "stampray-ingest-*"))) - before),
        }}))
    """, env=s3_env, timeout=600)
    assert result["units"] == [3, 0, 5]
    assert result["rows"] == [59, 59, 180] and result["aside"] == {"unreadable": 2}
    assert result["same_ids"] and result["unique"]
    assert result["first_ids"] == ["s0", "s1", "s2", "s3", "s4", "s5"]  # s5 is the gzip'd cutout
    assert result["errors"] == ["s7", "gone"]
    assert result["class_ids"] == ["noise-000000000", "noise-000000149", "source-000000000", "source-000000029"]
    assert result["manifests"] == ["class/_manifest.json", "fits-off/_manifest.json", "fits-on/_manifest.json"]
    assert result["job_state"] == [] and result["temp_left"] == []


def test_progress_line(monkeypatch, capsys):
    from stampray.ingest import _Progress

    monkeypatch.setenv("STAMPRAY_PROGRESS", "1")
    p = _Progress(2000, "files", True)
    p.t0 -= 2.0
    p.update(1234, 1200)
    p.close()
    err = capsys.readouterr().err
    assert re.search(r"^ingest: 1,234/2,000 files \(61\.7%\), (5\d\d|600) stamps/s$", err, re.M), err
    monkeypatch.setenv("STAMPRAY_PROGRESS", "0")
    p = _Progress(2000, "files", True)
    p.update(5, 5)
    p.close()
    assert capsys.readouterr().err == ""
    assert not _Progress(10, "files", False).enabled
