"""Sound results or a clear stop (issue #18): duplicates, unknown ids, ambiguous labels, typed settings,
one-line errors."""

import json
import os

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from stampray import checkpoint as ck
from stampray import table as st
from stampray.cli import main
from stampray.evaluate import table_labels
from stampray.models import create_model
from stampray.synth import SynthSettings, synth

SPEC = st.StampSpec((1, 21, 21), ("noise", "source"), "another tool")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("sound") / "m.pt")
    ck.save(ck.make_bundle(create_model("cnn", 1, 21, 2), class_names=("noise", "source"), preprocess="course"),
            path)
    return path


def foreign_table(root, shards: list[list[str]]) -> str:
    """A stamp table as another tool would write it: plain pyarrow shards and a manifest without footers."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    entries = []
    for k, ids in enumerate(shards):
        images = rng.normal(size=(len(ids), 1, 21, 21)).astype(np.float32)
        t = st.make_table(SPEC, ids, images, labels=np.arange(len(ids)) % 2)
        pq.write_table(t, os.path.join(root, f"part-{k:05d}.parquet"))
        entries.append({"path": f"part-{k:05d}.parquet", "rows": len(ids)})
    st.write_text(os.path.join(root, st.MANIFEST_NAME),
                  st.Manifest(SPEC, entries, columns=list(t.schema.names)).to_json())
    return str(root)


@pytest.mark.slow
def test_repeated_ids_of_a_foreign_table_are_set_aside_with_their_reason(tmp_path, model, ray_shared, capsys):
    data = foreign_table(tmp_path / "t", [["a", "b", "a", "c"], ["d", "b", "e"]])
    out = str(tmp_path / "s")
    assert main(["score", "--model", model, "--data", data, "--out", out, "--compile", "off", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "score: 5 stamps scored" in printed and "set aside 2 (duplicate 2)" in printed
    doc = json.load(open(os.path.join(out, "_manifest.json")))
    assert (doc["num_rows"], doc["set_aside"], doc["errors"]) == (5, 2, {"duplicate": 2})
    ids = sorted(st.read_parquet(os.path.join(out, "part-00000.parquet")).column("stamp_id").to_pylist()
                 + st.read_parquet(os.path.join(out, "part-00001.parquet")).column("stamp_id").to_pylist())
    assert ids == ["a", "b", "c", "d", "e"]
    e0 = st.read_parquet(os.path.join(out, "_errors", "part-00000.parquet")).to_pylist()
    e1 = st.read_parquet(os.path.join(out, "_errors", "part-00001.parquet")).to_pylist()
    assert [(e["stamp_id"], e["row"]) for e in e0] == [("a", 2)]
    assert e0[0]["reason"] == "duplicate: stamp_id 'a' is also at part-00000.parquet row 0, which is scored"
    assert [(e["stamp_id"], e["row"], e["reason"]) for e in e1] == [
        ("b", 1, "duplicate: stamp_id 'b' is also at part-00000.parquet row 1, which is scored")]
    assert main(["score", "--model", model, "--data", data, "--out", out]) == 0  # a rerun: nothing to do
    assert "already complete (5 stamps scored, 2 set aside)" in capsys.readouterr().out


def test_score_tables_with_the_same_last_name_keep_their_own_labels():
    assert table_labels(["a/cnn/scores", "b/cnn/scores"]) == ["a/cnn/scores", "b/cnn/scores"]
    assert table_labels(["runs/a/scores", "runs/b/scores"]) == ["a/scores", "b/scores"]
    assert table_labels(["s1", "s2"]) == ["s1", "s2"]
    assert table_labels(["s1", "s2"], ("cnn", "vgg")) == ["cnn", "vgg"]
    with pytest.raises(ValueError, match="--scores a/s is given twice"):
        table_labels(["a/s", "a/s/"])
    with pytest.raises(ValueError, match="^--scores /data/s is given twice$"):  # as given, its leading / kept
        table_labels(["/data/s", "/data/s"])
    with pytest.raises(ValueError, match="--names gives 'x' twice"):
        table_labels(["a", "b"], ("x", "x"))


def test_evaluate_reports_both_tables_that_share_a_last_path_component(tmp_path, model, capsys):
    data = str(tmp_path / "t")
    synth(SynthSettings(out=data, n=200, seed=3, shard_rows=100))
    for run in ("a", "b"):  # scored in this process: the tables are a pool's (test_score)
        assert main(["score", "--model", model, "--data", data, "--out", str(tmp_path / run / "cnn" / "scores"),
                     "--compile", "off", "--no-progress", "--in-process", "on"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--scores", str(tmp_path / "a" / "cnn" / "scores"), "--scores",
                 str(tmp_path / "b" / "cnn" / "scores"), "--out", str(tmp_path / "rep"), "--split", "all"]) == 0
    report = json.load(open(tmp_path / "rep" / "report.json"))
    assert sorted(report["results"]) == ["a/cnn/scores", "b/cnn/scores"]
    assert [r["n"] for r in report["results"].values()] == [200, 200]


def test_occlude_names_the_ids_it_did_not_find(tmp_path, model, capsys):
    """In this process (--in-process on; the commit is the one a pool's committer runs)."""
    data = str(tmp_path / "t")
    synth(SynthSettings(out=data, n=100, seed=3, shard_rows=100))
    good = st.read_table(data, [st.ID]).column(st.ID)[0].as_py()
    out = str(tmp_path / "maps")
    assert main(["occlude", "--model", model, "--data", data, "--out", out, "--ids", f"{good},TYPO,nope",
                 "--no-progress", "--in-process", "on"]) == 0
    captured = capsys.readouterr()
    assert f"occlude: warning: 2 of the 3 --ids are not in {data}: TYPO, nope" in captured.err
    assert st.read_parquet(os.path.join(out, "part-00000.parquet")).column("stamp_id").to_pylist() == [good]
    before = {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out))}
    assert main(["occlude", "--model", model, "--data", data, "--out", out, "--ids", "TYPO", "--no-progress",
                 "--in-process", "on"]) == 2
    assert f"none of the 1 --ids is in {data} (TYPO); check the ids" in capsys.readouterr().err
    # refused before --out is touched: the earlier maps and their _maps.json stay as they were
    assert {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out))} == before
    assert main(["occlude", "--model", model, "--data", data, "--out", str(tmp_path / "new" / "maps"), "--ids",
                 "TYPO", "--no-progress", "--in-process", "on"]) == 2
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("doc, words", [
    ({"batch_size": "256"}, "--batch-size must be an integer, got '256' (a string)"),
    ({"epochs": 2.5}, "--epochs must be an integer, got 2.5 (a number)"),
    ({"augment": "yes"}, "--augment must be true or false, got 'yes' (a string)"),
    ({"fractions": [0.5, 0.5]}, "--fractions must be a list of 3 values, got [0.5, 0.5] (a list)"),
    ({"fractions": "0.5,x,0.5"}, "--fractions must be a number, got 'x' (a string)"),
    ({"bogus": 1}, "unknown settings bogus; known:"),
])
def test_config_values_are_checked_by_their_declared_type(tmp_path, capsys, doc, words):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(doc))
    assert main(["train", "--model", "cnn", "--data", str(tmp_path), "--out", str(tmp_path / "r"),
                 "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"stampray train: error: --config {cfg}: {words}" in err


def test_a_string_setting_list_is_split_at_commas_never_into_letters():
    from stampray.score import ScoreSettings
    from stampray.settings import coerce

    assert coerce(ScoreSettings, {"keep": "snr"})["keep"] == ("snr",)
    assert coerce(ScoreSettings, {"keep": "snr, mjd"})["keep"] == ("snr", "mjd")
    assert coerce(ScoreSettings, {"keep": ["snr"]})["keep"] == ("snr",)


@pytest.mark.parametrize("text, words", [
    ('{"epochs": 2,', "is not valid JSON (Expecting"),
    ("epochs = ", "is not valid TOML"),
    ("[1, 2]", "want a JSON object of settings, got [1, 2] (a list)"),
])
def test_a_config_file_that_does_not_parse_is_named_with_its_format(tmp_path, capsys, text, words):
    cfg = tmp_path / ("c.toml" if "=" in text else "c.json")
    cfg.write_text(text)
    assert main(["synth", "--out", str(tmp_path / "o"), "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"--config {cfg} {words}" in err or f"--config {cfg}: {words}" in err


def test_user_mistakes_end_in_one_line_naming_the_flag_or_file(tmp_path, model, capsys):
    data = str(tmp_path / "t")
    synth(SynthSettings(out=data, n=20, seed=3, shard_rows=20))
    h5 = tmp_path / "x.h5"
    with h5py.File(h5, "w") as f:
        f.create_group("grp").create_dataset("images", data=np.zeros((2, 21, 21), np.float32))
    gz = tmp_path / "g.npy"
    import gzip

    np.save(tmp_path / "plain.npy", np.zeros((2, 21, 21), np.float32))
    gz.write_bytes(gzip.compress((tmp_path / "plain.npy").read_bytes()))
    nostamp = tmp_path / "nostamp"
    nostamp.mkdir()
    pq.write_table(st.make_table(SPEC, ["x"], np.zeros((1, 1, 21, 21), np.float32)).drop_columns(["stamp_id"]),
                   nostamp / "part-00000.parquet")
    st.write_text(str(nostamp / st.MANIFEST_NAME), st.Manifest(SPEC, [{"path": "part-00000.parquet", "rows": 1}]).to_json())
    cases = [
        (["ingest", "--hdf5", str(h5), "--images-key", "grp", "--out", str(tmp_path / "o1")],
         f"{h5}: --images-key 'grp' names a group, not a dataset (it holds grp/images)"),
        (["ingest", "--class", f"noise={gz}", "--out", str(tmp_path / "o2")],
         f"{gz} is gzip-compressed, not a .npy file; decompress it first"),
        (["score", "--model", model, "--data", str(nostamp), "--out", str(tmp_path / "o3")],
         f"{nostamp / 'part-00000.parquet'} has no stamp_id column (it has: image, label)"),
        (["evaluate", "--scores", data, "--out", str(tmp_path / "o4")],
         f"--scores {data} is a stamp table, not scores; give the --out directory of 'stampray score'"),
        (["synth", "--seed", "-1", "--out", str(tmp_path / "o5")], "--seed must be an integer >= 0, got -1"),
        (["train", "--model", "cnn", "--data", data, "--out", str(tmp_path / "o8"), "--weight-decay", "-1"],
         "--weight-decay must be zero or more, got -1.0"),
        (["occlude", "--model", model, "--data", data, "--out", str(tmp_path / "o6"), "--batch-size", "-5"],
         "--batch-size must be a positive integer, got -5"),
        (["occlude", "--model", model, "--data", data, "--out", str(tmp_path / "o7"), "--actors", "-1"],
         "--actors must be a positive integer, got -1"),
    ]
    for argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert words in err, (argv, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_an_internal_error_is_one_line_with_the_traceback_saved(monkeypatch, tmp_path, capsys):
    import stampray.synth

    def broken(settings):
        raise KeyError("boom")

    monkeypatch.setattr(stampray.synth, "synth", broken)
    assert main(["synth", "-n", "5", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("stampray synth: internal error: KeyError: 'boom'; the full traceback is in ")
    path = err.split("the full traceback is in ")[1].split(" ")[0]
    assert "Traceback (most recent call last)" in open(path).read() and "KeyError: 'boom'" in open(path).read()
    os.remove(path)


def test_a_node_or_process_the_cluster_lost_is_one_line_saying_to_rerun(monkeypatch, tmp_path, capsys):
    """A raylet killed mid-run (a spot node reclaimed) is the cluster's state, not a defect to report."""
    import ray.exceptions

    import stampray.synth

    rerun = ("; rerun the same command once the cluster is up (score, occlude, ingest and train resume from what "
             "they completed)\n")
    lost = [(ray.exceptions.NodeDiedError("Task failed because the node where it ran crashed unexpectedly."),
             "NodeDiedError: Task failed because the node where it ran crashed unexpectedly."),
            (ray.exceptions.ActorUnavailableError("Socket closed", None), "ActorUnavailableError: The actor None is "
             "unavailable: Socket closed. The task may or may not have been executed on the actor."),
            (ray.exceptions.NodeDiedError("word " * 100), "NodeDiedError: " + "word " * 32 + "...")]
    for e, shown in lost:
        monkeypatch.setattr(stampray.synth, "synth", lambda settings, e=e: (_ for _ in ()).throw(e))
        assert main(["synth", "-n", "5", "--out", str(tmp_path / "o")]) == 1
        assert capsys.readouterr().err == (f"stampray synth: error: the Ray cluster lost a node or process this run "
                                           f"needed ({shown}){rerun}")


_SIGTERM_CHILD = r"""
import os, signal, sys, time
import stampray.synth
from stampray.cli import main

def waits(settings):
    if sys.argv[1] == "starting":  # SIGTERM once the private Ray's processes run, before ray.init returns
        import ray._private.worker as worker
        connect = worker.connect
        def stopped(*args, **kwargs):
            print("up", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
            return connect(*args, **kwargs)
        worker.connect = stopped
    if sys.argv[1] in ("ray", "starting"):  # a verb on the private Ray: Ray puts SIGTERM handlers in place
        from stampray.runtime import ray_session
        with ray_session():
            print("up", flush=True)
            time.sleep(120)
    print("up", flush=True)
    time.sleep(120)

stampray.synth.synth = waits
sys.exit(main(["synth", "-n", "5", "--out", sys.argv[2]]))
"""


@pytest.mark.parametrize("when", [pytest.param("ray", marks=pytest.mark.slow),
                                  pytest.param("starting", marks=pytest.mark.slow), "plain"])
def test_sigterm_ends_a_verb_as_ctrl_c_does_in_one_line(tmp_path, when):
    """`kill`, `ray job stop` or a scheduler's limit: one line, exit 143, no stack dump of Ray's, and nothing
    of the private Ray left running, whether it came before Ray, while Ray started or once it runs."""
    import signal
    import subprocess
    import sys

    from stampray.runtime import processes_in, ray_temp_root

    child = subprocess.Popen([sys.executable, "-c", _SIGTERM_CHILD, when, str(tmp_path / "o")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "up\n"
        if when != "starting":  # (the child sent its own)
            child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 143
    assert err.splitlines()[-1] == "stampray synth: terminated (SIGTERM); rerun the same command to resume"
    assert "SIGTERM received" not in err and "Traceback" not in err, err
    private = os.path.join(ray_temp_root(), f"stampray-{child.pid}")
    assert processes_in(private) == [] and not os.path.exists(os.path.join(private, "stampray_owner.json"))


def test_an_exit_from_rays_own_signal_handlers_inside_a_verb_is_one_line(monkeypatch, tmp_path, capsys):
    """Ray Train's Ctrl-C handler aborts the run and calls sys.exit(0) inside fit: it had ended the process
    with no word (exit 1); a SIGTERM while ray.init runs meets Ray's sys.exit(15)."""
    import stampray.synth

    for code, status, line in [(0, 130, "interrupted"), (15, 143, "terminated (SIGTERM)"),
                               (None, 130, "interrupted")]:
        monkeypatch.setattr(stampray.synth, "synth", lambda settings, c=code: (_ for _ in ()).throw(SystemExit(c)))
        assert main(["synth", "-n", "5", "--out", str(tmp_path / "o")]) == status
        assert capsys.readouterr().err == f"stampray synth: {line}; rerun the same command to resume\n"
    assert not (tmp_path / "o").exists()


def test_a_comma_list_in_a_config_file_reads_as_on_the_command_line():
    from stampray.settings import coerce
    from stampray.train import TrainSettings

    assert coerce(TrainSettings, {"fractions": "0.6, 0.2,0.2"})["fractions"] == (0.6, 0.2, 0.2)
    assert coerce(TrainSettings, {"fractions": [0.6, 0.2, 0.2]})["fractions"] == (0.6, 0.2, 0.2)
