import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from stampray import checkpoint as ck
from stampray import table as st
from stampray.score import ScoreSettings, read_scores, result_schema, score


@pytest.fixture(scope="module")
def cnn_ckpt(tmp_path_factory, make_checkpoint):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


@pytest.mark.slow
def test_scores_every_stamp_once_with_probabilities(tno_small, cnn_ckpt, tmp_path, ray_shared):
    out = str(tmp_path / "scores")
    r = score(ScoreSettings(model=cnn_ckpt, data=tno_small, out=out, keep=("snr",)))
    assert r.scored == 600 and r.set_aside == 0 and not r.nothing_to_do
    t = read_scores(out)
    src = st.read_table(tno_small, columns=["stamp_id", "label", "snr"])
    assert sorted(t.column("stamp_id").to_pylist()) == sorted(src.column("stamp_id").to_pylist())
    assert t.num_rows == len(set(t.column("stamp_id").to_pylist()))
    p = np.stack([t.column("p_noise").to_numpy(), t.column("p_source").to_numpy()], axis=1)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    assert (t.column("pred").to_numpy() == p.argmax(axis=1)).all()
    assert set(t.column("pred_name").to_pylist()) <= {"noise", "source"}
    tag = t.column("model").to_pylist()[0]
    assert tag.startswith("cnn@") and len(tag) == 16 and set(t.column("model").to_pylist()) == {tag}
    assert set(t.column("split").to_pylist()) == {"train", "val", "test"}
    by_id = dict(zip(src.column("stamp_id").to_pylist(), src.column("snr").to_pylist()))
    assert all(by_id[i] == s for i, s in zip(t.column("stamp_id").to_pylist(), t.column("snr").to_pylist()))
    # the same stamps through the model directly give the same probabilities
    from stampray import preprocess as pp

    model = ck.load_model(cnn_ckpt)
    first = st.read_table(tno_small).slice(0, 5)
    x = pp.get("course")(st.decode_images(first.column("image"), (1, 21, 21)))
    with torch.no_grad():
        direct = torch.softmax(model(torch.from_numpy(x)), 1).numpy()
    rows = {sid: i for i, sid in enumerate(t.column("stamp_id").to_pylist())}
    got = p[[rows[s] for s in first.column("stamp_id").to_pylist()]]
    np.testing.assert_allclose(got, direct, atol=1e-5)
    # a rerun of a finished job does no work
    again = score(ScoreSettings(model=cnn_ckpt, data=tno_small, out=out, keep=("snr",)))
    assert again.nothing_to_do and again.scored == 600


@pytest.mark.slow
def test_relative_paths_name_the_commands_directory_where_the_workers_run_in_another(tno_small, cnn_ckpt, tmp_path,
                                                                                   ray_shared, monkeypatch):
    """On a cluster Ray's workers run where `ray start` ran: here the session's Ray, whose workers run in the
    directory the tests started in. Relative names given in another directory still mean the files there."""
    import shutil

    from stampray.cli import main

    here = tmp_path / "elsewhere"
    shutil.copytree(tno_small, here / "t")
    shutil.copy(cnn_ckpt, here / "m.pt")
    monkeypatch.chdir(here)

    def cwd():
        return os.getcwd()

    assert ray_shared.get(ray_shared.remote(cwd).remote()) != str(here)  # the workers run elsewhere
    assert main(["score", "--model", "m.pt", "--data", "t", "--out", "s", "--in-process", "off", "--no-progress"]) == 0
    t = read_scores(str(here / "s"))
    assert sorted(t.column("stamp_id").to_pylist()) == sorted(st.read_table(tno_small, columns=["stamp_id"])
                                                              .column("stamp_id").to_pylist())
    assert json.loads((here / "s" / "_manifest.json").read_text())["data"] == str(here / "t")


@pytest.mark.slow
def test_bad_rows_go_to_the_errors_table(cnn_ckpt, tmp_path, ray_shared, write_stamps):
    images = np.random.default_rng(0).normal(size=(10, 1, 21, 21)).astype(np.float32)
    images[2, 0, 3, 3] = np.nan
    images[7, 0, 0, 0] = np.inf
    data = write_stamps(tmp_path / "d", images, labels=[0, 1] * 5, shard_rows=4)
    # a foreign shard whose images are 20x20: its rows cannot be scored
    spec20 = st.StampSpec((1, 20, 20), ("noise", "source"))
    st.write_shard(str(tmp_path / "d" / "part-00003.parquet"),
                   st.make_table(spec20, ["w0", "w1"], np.zeros((2, 1, 20, 20), np.float32), [0, 1]))
    m = st.read_manifest(data)
    m.shards.append({"path": "part-00003.parquet", "rows": 2})
    st.write_text(st.join(data, st.MANIFEST_NAME), m.to_json())
    out = str(tmp_path / "scores")
    r = score(ScoreSettings(model=cnn_ckpt, data=data, out=out))
    assert r.scored == 8 and r.set_aside == 4 and r.errors == {"nonfinite": 2, "shape": 2}
    errors = pq.read_table(str(tmp_path / "scores" / "_errors")).to_pylist()
    assert pq.read_schema(str(tmp_path / "scores" / "_errors" / "part-00000.parquet")) == st.ERROR_SCHEMA
    assert {(e["stamp_id"], e["source"], e["row"]) for e in errors} == {
        ("s2", "part-00000.parquet", 2), ("s7", "part-00001.parquet", 3),
        ("w0", "part-00003.parquet", 0), ("w1", "part-00003.parquet", 1)}
    reasons = {e["stamp_id"]: e["reason"] for e in errors}
    assert reasons["s2"] == "nonfinite: 1 non-finite pixels" and reasons["s7"] == "nonfinite: 1 non-finite pixels"
    assert reasons["w0"] == "shape: image of 400 float32 values, the model takes (1, 21, 21) = 441"
    assert sorted(read_scores(out).column("stamp_id").to_pylist()) == sorted(f"s{i}" for i in range(10) if i not in (2, 7))
    doc = json.loads((tmp_path / "scores" / "_manifest.json").read_text())
    assert doc["num_rows"] == 8 and doc["set_aside"] == 4


@pytest.mark.slow
def test_zero_and_one_row_inputs(cnn_ckpt, tmp_path, ray_shared, stampray_log, write_stamps):
    empty = write_stamps(tmp_path / "empty", np.zeros((0, 1, 21, 21), np.float32))
    r = score(ScoreSettings(model=cnn_ckpt, data=empty, out=str(tmp_path / "s0")))
    assert r.scored == 0 and r.set_aside == 0
    warned = [(rec.levelno, rec.getMessage()) for rec in stampray_log.records if "holds no stamps" in rec.getMessage()]
    assert warned[:1] == [(logging.WARNING, f"score: warning: {empty} holds no stamps; wrote an empty result")]
    nothing = read_scores(str(tmp_path / "s0"))
    assert nothing.num_rows == 0 and nothing.schema == result_schema(("noise", "source"))  # the columns of any
    one = write_stamps(tmp_path / "one", np.ones((1, 1, 21, 21), np.float32), ids=["only"])
    r = score(ScoreSettings(model=cnn_ckpt, data=one, out=str(tmp_path / "s1")))
    assert r.scored == 1
    t = read_scores(str(tmp_path / "s1"))
    assert t.column("stamp_id").to_pylist() == ["only"] and t.column("label").to_pylist() == [None]
    assert t.column("p_noise")[0].as_py() + t.column("p_source")[0].as_py() == pytest.approx(1.0, abs=1e-6)


def test_model_data_mismatches_are_caught_before_any_work(cnn_ckpt, tmp_path, write_stamps):
    three = write_stamps(tmp_path / "c3", np.zeros((2, 3, 21, 21), np.float32))
    with pytest.raises(ValueError, match="the model takes 1-channel stamps, .* holds 3-channel stamps"):
        score(ScoreSettings(model=cnn_ckpt, data=three, out=str(tmp_path / "o1")))
    small = write_stamps(tmp_path / "s20", np.zeros((2, 1, 20, 20), np.float32))
    with pytest.raises(ValueError, match="trained on 21x21 stamps, .* holds 20x20 stamps"):
        score(ScoreSettings(model=cnn_ckpt, data=small, out=str(tmp_path / "o2")))
    four = write_stamps(tmp_path / "k4", np.zeros((4, 1, 21, 21), np.float32), labels=[0, 1, 2, 3],
                         spec=st.StampSpec((1, 21, 21), ("a", "b", "c", "d")))
    with pytest.raises(ValueError, match="has labels up to 3 .* but the model predicts 2 classes"):
        score(ScoreSettings(model=cnn_ckpt, data=four, out=str(tmp_path / "o3")))
    ok = write_stamps(tmp_path / "ok", np.zeros((2, 1, 21, 21), np.float32))
    with pytest.raises(ValueError, match="--keep names columns \\['ra'\\] that .* does not have; it has: none"):
        score(ScoreSettings(model=cnn_ckpt, data=ok, out=str(tmp_path / "o4"), keep=("ra",)))
    for name in ("o1", "o2", "o3", "o4"):
        assert not os.path.exists(tmp_path / name)


def test_another_job_in_the_same_out_is_refused(tno_small, cnn_ckpt, tmp_path, make_checkpoint):
    """Scored in this process (--in-process on): the job check is the driver's, either way."""
    out = str(tmp_path / "scores")
    score(ScoreSettings(model=cnn_ckpt, data=tno_small, out=out, in_process="on"))
    other = make_checkpoint(tmp_path / "other.pt", name="dense")
    with pytest.raises(ValueError, match="holds results of another job"):
        score(ScoreSettings(model=other, data=tno_small, out=out, in_process="on"))
    r = score(ScoreSettings(model=other, data=tno_small, out=out, overwrite=True, in_process="on"))
    assert r.scored == 600
    tags = set(read_scores(out).column("model").to_pylist())
    assert len(tags) == 1 and tags.pop().startswith("dense@")


@pytest.mark.slow
@pytest.mark.parametrize("in_process", ["off", "on"])
def test_killed_driver_rerun_scores_every_stamp_exactly_once(cnn_ckpt, tmp_path, in_process):
    """Killed part way, through its private Ray (off) or scoring in its own process (on), a rerun of the
    same command finishes with every stamp once."""
    from stampray.synth import SynthSettings, synth

    data = str(tmp_path / "survey")
    synth(SynthSettings(out=data, n=40_000, seed=3, shard_rows=2000, progress=False))
    out = str(tmp_path / "scores")
    cmd = [sys.executable, "-m", "stampray", "score", "--model", cnn_ckpt, "--data", data, "--out", out,
           "--batch-size", "512", "--compile", "off", "--in-process", in_process]
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and len([f for f in os.listdir(out) if f.startswith("part-")] if os.path.exists(out) else []) < 4:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its private Ray, part way through
    proc.wait()
    done_before = [f for f in os.listdir(out) if f.startswith("part-")]
    assert 0 < len(done_before) < 20, done_before
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    # A commit already under way when the driver died may still land (atomically) before its task is
    # reaped: the rerun skips at least the shards that were there, and scores the rest.
    import re

    m = re.search(r"(\d+) shards were already done \((\d+) stamps\), (\d+) stamps scored now", rerun.stdout)
    assert m, rerun.stdout
    skipped, before, now = (int(g) for g in m.groups())
    assert len(done_before) <= skipped < 20 and before == 2000 * skipped and now == 40_000 - before
    ids = read_scores(out, columns=["stamp_id"]).column("stamp_id").to_pylist()
    assert len(ids) == 40_000 and len(set(ids)) == 40_000
    assert set(ids) == set(st.read_table(data, columns=["stamp_id"]).column("stamp_id").to_pylist())


NOISE = ("has constructor arguments in the object store", "Token authentication is enabled",
         "DeprecationWarning", "Progress bars disabled")


@pytest.mark.slow
def test_a_run_on_the_private_ray_prints_none_of_rays_notices(cnn_ckpt, tmp_path, run_scenario, write_stamps):
    """``stampray score`` and ``occlude`` on their private local Ray: no line of Ray's that a user cannot act
    on (the actor-restart notice every Ray Data pool gets, the token-authentication notice, DataContext
    DeprecationWarnings, shown here since the driver runs with ``-W default``), and their own lines kept."""
    data = write_stamps(tmp_path / "d", np.random.default_rng(1).normal(size=(40, 1, 21, 21)).astype(np.float32),
                         labels=[0, 1] * 20, shard_rows=20)
    result, output = run_scenario(f"""
        import json, sys, warnings
        warnings.simplefilter("default")  # as python -W default: DeprecationWarnings shown
        from stampray.cli import main
        codes = [main(["score", "--model", {cnn_ckpt!r}, "--data", {data!r}, "--out", {str(tmp_path / "s")!r},
                       "--in-process", "off"]),
                 main(["occlude", "--model", {cnn_ckpt!r}, "--data", {data!r}, "--out", {str(tmp_path / "m")!r},
                       "--limit", "2", "--kernel", "9", "--stride", "4", "--in-process", "off"])]
        print("RESULT", json.dumps(codes))
    """)
    assert result == [0, 0], output
    assert "40 stamps scored" in output and "occlude" in output
    assert [line for line in output.splitlines() if any(n in line for n in NOISE)] == []


def test_read_scores_can_leave_the_feature_vectors_unread(tmp_path, score_table, eight_stamps):
    import pyarrow as pa

    vectors = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(16, dtype=np.float32)), 2)
    out = score_table(tmp_path / "s", eight_stamps.labels, eight_stamps.probs, eight_stamps.class_names,
                      extra={"features": vectors})
    whole = read_scores(out)
    lean = read_scores(out, skip=("features",))
    assert "features" in whole.column_names and lean.column_names == [c for c in whole.column_names if c != "features"]
    assert lean.equals(whole.drop_columns(["features"]))


def test_a_small_job_scores_in_this_process_with_the_same_books(cnn_ckpt, tno_small, tmp_path):
    """--in-process on: no Ray at all, the same result files, manifest and exactly-once books as a pool."""
    from stampray import preprocess as pp

    out = str(tmp_path / "scores")
    r = score(ScoreSettings(model=cnn_ckpt, data=tno_small, out=out, keep=("snr",), in_process="on",
                            progress=False))
    assert (r.scored, r.set_aside, r.nodes) == (600, 0, {"local": 600})
    manifest = json.loads(open(os.path.join(out, "_manifest.json")).read())
    assert manifest["nodes"] == {"local": 600} and manifest["num_rows"] == 600
    assert sorted(f for f in os.listdir(out) if f.startswith("part-")) == \
        sorted(s["path"] for s in st.read_manifest(tno_small).shards)
    assert not os.path.exists(os.path.join(out, "_parts"))
    t = read_scores(out)
    src = st.read_table(tno_small)
    assert t.column("stamp_id").to_pylist() == src.column("stamp_id").to_pylist()  # shard and row order
    assert t.column("snr").to_pylist() == src.column("snr").to_pylist()
    with torch.no_grad():
        x = pp.get("course")(st.decode_images(src.column("image"), (1, 21, 21)))
        direct = torch.softmax(ck.load_model(cnn_ckpt)(torch.from_numpy(x)), 1).numpy()
    np.testing.assert_allclose(t.column("p_source").to_numpy(), direct[:, 1], atol=1e-5)
    assert t.column("pred").to_pylist() == direct.argmax(1).tolist()
    assert score(ScoreSettings(model=cnn_ckpt, data=tno_small, out=out, keep=("snr",), in_process="on",
                               progress=False)).nothing_to_do
    with pytest.raises(ValueError, match="--in-process on scores without Ray; it cannot run on the cluster at"):
        ScoreSettings(model=cnn_ckpt, data=tno_small, out=out, in_process="on", address="ray://h:10001")


def test_a_result_file_changed_since_is_found_not_taken_as_complete(cnn_ckpt, tno_small, tmp_path):
    """A result file cut short by hand: its stamps would go unscored while the job said it was complete."""
    out = tmp_path / "scores"
    args = dict(model=cnn_ckpt, data=tno_small, out=str(out), in_process="on", progress=False)
    score(ScoreSettings(**args))
    name = st.read_manifest(tno_small).shards[0]["path"]
    rows = st.read_manifest(tno_small).shards[0]["rows"]
    whole = pq.read_table(out / name)
    pq.write_table(whole.slice(0, 10), out / name)
    with pytest.raises(RuntimeError, match=rf"^{out}/{name} holds 10 results where 'stampray score' wrote {rows} "
                                           rf"\(its _manifest.json\): the file was changed since; move it out of "
                                           rf"{out} \(or delete it\) and rerun the same 'stampray score'"):
        read_scores(str(out))
    with pytest.raises(RuntimeError, match=rf"^{out}/{name} holds 10 results and 0 set-aside rows, but the shard "
                                           rf"{tno_small}/{name} has {rows} stamps: the file was changed since"):
        score(ScoreSettings(**args))
    assert pq.read_table(out / name).num_rows == 10  # refused, not replaced
    os.remove(out / name)
    r = score(ScoreSettings(**args))  # the shard scored again, the others kept
    assert r.scored == 600 and not r.nothing_to_do
    assert pq.read_table(out / name).equals(whole)
    ids = read_scores(str(out)).column("stamp_id").to_pylist()
    assert len(ids) == len(set(ids)) == 600


def test_in_process_threads_share_the_cores_evenly_up_to_four():
    from stampray.score import HERE_WORKERS, here_workers

    assert HERE_WORKERS == 4
    assert [here_workers(cores, False, 50) for cores in range(1, 9)] == \
        [(1, 1), (2, 1), (3, 1), (4, 1), (1, 5), (3, 2), (1, 7), (4, 2)]
    assert here_workers(16, False, 50) == (4, 4)
    assert here_workers(8, False, 3) == (2, 4)  # no more threads than work items
    assert here_workers(2, False, 1) == (1, 2)
    assert here_workers(8, False, 0) == (1, 8)
    assert here_workers(8, True, 50) == (1, 8)  # a GPU job: one thread
    assert here_workers(8, False, 50, mc_dropout=True) == (1, 8)  # seeded passes share torch's generator


@pytest.fixture
def eight_groups(tmp_path_factory):
    """400 stamps in 8 shards of one row group each: 8 work items."""
    from stampray.synth import SynthSettings, synth

    out = str(tmp_path_factory.mktemp("eight_groups"))
    synth(SynthSettings(out=out, n=400, seed=11, shard_rows=50, progress=False))
    return out


def _here_threads() -> list:
    import threading

    from stampray.score import HERE_THREAD

    return [t for t in threading.enumerate() if t.name.startswith(HERE_THREAD)]


def test_in_process_threads_score_at_once_and_a_failing_one_stops_the_job(cnn_ckpt, eight_groups, tmp_path,
                                                                          monkeypatch, caplog):
    """Two scoring threads, each its own replica compiled rather than loaded from a package, run items at the
    same time (both reach a barrier); an item that fails stops the job with its error, the other thread
    after its current item: no more than three items are begun, the failed item's shard is not committed,
    no thread is left running, and a rerun scores every stamp once."""
    import threading

    from stampray import score as sc

    monkeypatch.setattr(sc, "here_workers", lambda cores, use_gpu, items, mc_dropout=False: (2, 1))
    made = []
    init = sc.Scorer.__init__
    monkeypatch.setattr(sc.Scorer, "__init__", lambda self, *a, **k: made.append(k["use_package"]) or
                        init(self, *a, **k))
    both = threading.Barrier(2, timeout=60)
    seen: list[tuple[str, str]] = []
    call = sc.Scorer.__call__

    def flaky(self, batch):
        shard = batch.column("shard")[0].as_py()
        seen.append((threading.current_thread().name, shard))
        if len(seen) <= 2:
            both.wait()  # raises BrokenBarrierError unless a second thread gets here too
        if shard == "part-00001.parquet":
            raise RuntimeError("disk gone while scoring part-00001")
        return call(self, batch)

    monkeypatch.setattr(sc.Scorer, "__call__", flaky)
    out = str(tmp_path / "scores")
    settings = ScoreSettings(model=cnn_ckpt, data=eight_groups, out=out, in_process="on", progress=False)
    with pytest.raises(RuntimeError, match="disk gone while scoring part-00001"):
        score(settings)
    stopping = "scoring thread(s) to finish their current work item"
    assert [r.message for r in caplog.records if stopping in r.message] == \
        [f"score: stopping; waiting for 2 {stopping}"]
    caplog.clear()
    assert made == [False, False]
    assert {name for name, _ in seen[:2]} == {"stampray-score-0", "stampray-score-1"}
    assert len(seen) <= 3 and _here_threads() == []
    committed = sorted(f for f in os.listdir(out) if f.startswith("part-"))
    # What the other thread finished is committed, not thrown away; the failed shard is not.
    assert committed == sorted(shard for _, shard in seen if shard != "part-00001.parquet")
    monkeypatch.setattr(sc.Scorer, "__call__", call)
    r = score(settings)
    assert (r.scored, r.scored_now) == (400, 400 - 50 * len(committed))
    assert not [rec for rec in caplog.records if stopping in rec.message]  # a run that ends normally: no line
    ids = read_scores(out, columns=["stamp_id"]).column("stamp_id").to_pylist()
    assert sorted(ids) == sorted(st.read_table(eight_groups, columns=["stamp_id"]).column("stamp_id").to_pylist())


def test_in_process_on_one_thread_scores_here_with_a_package(cnn_ckpt, eight_groups, tmp_path, monkeypatch):
    """One scorer scores in the calling thread, with a package; the job first ends what a killed stampray
    left of a private Ray (without importing Ray when nothing is left: see test_security)."""
    import threading

    from stampray import runtime
    from stampray import score as sc

    reaped = []
    monkeypatch.setattr(runtime, "reap_if_orphaned", lambda: reaped.append(True) or [])

    monkeypatch.setattr(sc, "here_workers", lambda cores, use_gpu, items, mc_dropout=False: (1, 2))
    made, where = [], set()
    init, call = sc.Scorer.__init__, sc.Scorer.__call__
    monkeypatch.setattr(sc.Scorer, "__init__", lambda self, *a, **k: made.append(k["use_package"]) or
                        init(self, *a, **k))
    monkeypatch.setattr(sc.Scorer, "__call__", lambda self, b: where.add(threading.current_thread().name) or
                        call(self, b))
    r = score(ScoreSettings(model=cnn_ckpt, data=eight_groups, out=str(tmp_path / "s"), in_process="on",
                            progress=False))
    assert (r.scored, made, where, reaped) == (400, [True], {threading.current_thread().name}, [True])


@pytest.mark.slow
def test_compiled_threads_give_the_one_thread_numbers(cnn_ckpt, eight_groups, tmp_path, monkeypatch):
    """--compile on in-process: two threads (torch.compile, no package) score what one thread does."""
    from stampray import score as sc

    tables = {}
    for workers in (1, 2):
        monkeypatch.setattr(sc, "here_workers", lambda cores, use_gpu, items, mc_dropout=False, w=workers: (w, 1))
        out = str(tmp_path / f"s{workers}")
        assert score(ScoreSettings(model=cnn_ckpt, data=eight_groups, out=out, in_process="on", compile="on",
                                   batch_size=64, progress=False)).scored == 400
        tables[workers] = read_scores(out)
    assert tables[2].column("stamp_id").equals(tables[1].column("stamp_id"))
    np.testing.assert_allclose(tables[2].column("p_source").to_numpy(), tables[1].column("p_source").to_numpy(),
                               atol=1e-6)


def test_replicas_sharing_a_process_compile_rather_than_load_a_package(cnn_ckpt, monkeypatch):
    """A package's forward holds the GIL: threads of one process (use_package=False) use torch.compile."""
    from stampray import aot
    from stampray.inference import ModelActor

    asked = []
    monkeypatch.setattr(aot, "forward_for", lambda *a, **k: asked.append(a) or (None, "not built"))
    monkeypatch.setattr(torch, "compile", lambda model, **k: model)
    model_bytes = open(cnn_ckpt, "rb").read()
    shared = ModelActor(model_bytes, compile=True, chunk=64, use_package=False)
    assert (shared.compiled_how, asked) == ("torch.compile", [])
    alone = ModelActor(model_bytes, compile=True, chunk=64)
    assert alone.compiled_how == "torch.compile" and [a[1] for a in asked] == [(64, 1, 21, 21)]


def test_in_process_auto_is_for_small_jobs_that_would_start_a_ray_of_their_own(monkeypatch):
    import types

    from stampray.score import IN_PROCESS_ROWS, in_process

    ray_up = types.SimpleNamespace(is_initialized=lambda: True)
    ray_down = types.SimpleNamespace(is_initialized=lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    s = ScoreSettings(model="m", data="d", out="o")
    monkeypatch.setitem(sys.modules, "ray", ray_down)
    assert in_process(s, IN_PROCESS_ROWS - 1) and not in_process(s, IN_PROCESS_ROWS)
    assert not in_process(ScoreSettings(model="m", data="d", out="o", tta=8), IN_PROCESS_ROWS // 8)
    assert in_process(ScoreSettings(model="m", data="d", out="o", tta=8), IN_PROCESS_ROWS // 8 - 1)
    assert not in_process(ScoreSettings(model="m", data="d", out="o", address="auto"), 10)
    assert not in_process(ScoreSettings(model="m", data="d", out="o", use_gpu=True), 10)
    assert not in_process(ScoreSettings(model="m", data="d", out="o", actors=2), 10)
    assert not in_process(ScoreSettings(model="m", data="d", out="o", in_process="off"), 10)
    assert in_process(ScoreSettings(model="m", data="d", out="o", in_process="on"), 10 ** 9)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert not in_process(s, 10)
    with pytest.raises(ValueError, match="--in-process on scores without Ray, but RAY_ADDRESS names the cluster "
                                         "10.0.0.1:6379; unset RAY_ADDRESS or use --in-process auto\\|off"):
        in_process(ScoreSettings(model="m", data="d", out="o", in_process="on"), 10)
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setitem(sys.modules, "ray", ray_up)  # a Ray this process already runs (a notebook's): used
    assert not in_process(s, 10)
    monkeypatch.delitem(sys.modules, "ray")
    assert in_process(s, 10)
