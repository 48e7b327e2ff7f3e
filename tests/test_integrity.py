"""Nothing a user made is overwritten, nothing outside --out is written, nothing listed is skipped silently."""

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from stampray import checkpoint as ck
from stampray import table as st
from stampray.cli import main
from stampray.models import create_model
from stampray.synth import SynthSettings, synth


def tree_digest(root) -> dict:
    """Every file under ``root`` with its bytes' hash."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    data = str(root / "t4")
    synth(SynthSettings(out=data, n=400, seed=4, shard_rows=100))
    torch.manual_seed(0)
    model = str(root / "m.pt")
    ck.save(ck.make_bundle(create_model("cnn", 1, 21, 2), class_names=("noise", "source"), preprocess="course"),
            model)
    return data, model


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_score_refuses_an_out_that_is_inside_or_around_the_data_and_leaves_it_untouched(survey, tmp_path,
                                                                                       capsys, where):
    data, model = survey
    copy = str(tmp_path / "d9")
    os.system(f"cp -r {data} {copy}")
    before = tree_digest(copy)
    out = {"same": copy, "inside": os.path.join(copy, "scores"), "around": str(tmp_path)}[where]
    assert main(["score", "--model", model, "--data", copy, "--out", out]) == 2
    err = capsys.readouterr().err
    word = {"same": "is", "inside": "lies inside", "around": "contains"}[where]
    assert f"--out {out} {word} --data {copy}; write the output to a directory of its own" in err
    assert tree_digest(copy) == before


def test_every_verb_refuses_an_output_inside_its_input(survey, tmp_path, capsys):
    data, model = survey
    cases = [
        ["occlude", "--model", model, "--data", data, "--out", os.path.join(data, "maps")],
        ["occlude", "--model", model, "--data", data, "--out", str(tmp_path / "maps"), "--png", data],
        ["train", "--model", "cnn", "--data", data, "--out", data],
        ["evaluate", "--scores", data, "--out", os.path.join(data, "report")],
        ["ingest", "--fits", str(tmp_path), "--catalog", str(tmp_path / "c.csv"), "--out", str(tmp_path / "t")],
    ]
    before = tree_digest(data)
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "write the output to a directory of its own, outside every input" in err, (argv, err)
    assert tree_digest(data) == before
    assert not os.path.exists(tmp_path / "t") and not os.path.exists(tmp_path / "maps")


def test_score_and_occlude_keep_out_of_the_model_run_directory(survey, tmp_path, capsys):
    """A run directory given as --model is an input like --data; a checkpoint file may have outputs beside it."""
    data, model = survey
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(open(model, "rb").read())
    before = tree_digest(run)
    for verb, out, how in (["score", run, "is"], ["occlude", run / "maps", "lies inside"]):
        assert main([verb, "--model", str(run), "--data", data, "--out", str(out)]) == 2
        assert (f"--out {out} {how} --model {run}; write the output to a directory of its own, outside every "
                f"input") in capsys.readouterr().err
    assert tree_digest(run) == before
    assert main(["score", "--model", str(run / "best.pt"), "--data", data, "--out", str(tmp_path / "s"),
                 "--no-progress"]) == 0  # beside a checkpoint file: fine


def test_an_output_beside_input_files_is_fine(tmp_path):
    st.check_separate(str(tmp_path / "stamps"), {"--class a": str(tmp_path / "a.npy")}, files=True)
    with pytest.raises(ValueError, match="is --class a"):
        st.check_separate(str(tmp_path / "a.npy"), {"--class a": str(tmp_path / "a.npy")}, files=True)
    st.check_separate("s3://b/scores", {"--data": "s3://b/stamps"})
    with pytest.raises(ValueError, match="lies inside --data s3://b/stamps"):
        st.check_separate("s3://b/stamps/scores/", {"--data": "s3://b/stamps"})


def test_shard_names_that_escape_the_table_are_refused(survey, tmp_path, capsys):
    data, model = survey
    copy = str(tmp_path / "t")
    os.system(f"cp -r {data} {copy}")
    doc = json.loads(open(os.path.join(copy, st.MANIFEST_NAME)).read())
    doc["shards"][0]["path"] = "../../x/part.parquet"
    open(os.path.join(copy, st.MANIFEST_NAME), "w").write(json.dumps(doc))
    assert main(["score", "--model", model, "--data", copy, "--out", str(tmp_path / "s")]) == 2
    assert "lists shard '../../x/part.parquet', which is not a plain file name inside the table" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "s" / "part-00000.parquet") and not os.path.exists(tmp_path.parent / "x")


@pytest.mark.slow
def test_a_shard_the_manifest_does_not_list_is_named_in_a_warning(survey, tmp_path, ray_shared, capsys):
    data, model = survey
    copy = str(tmp_path / "t")
    os.system(f"cp -r {data} {copy} && cp {copy}/part-00000.parquet {copy}/part-00004.parquet")
    assert main(["score", "--model", model, "--data", copy, "--out", str(tmp_path / "s"), "--compile", "off",
                 "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert ("holds Parquet files its manifest does not list, which are not scored: part-00004.parquet (1 files)"
            in captured.err)
    assert "score: 400 stamps scored" in captured.out
    assert np.sum([json.load(open(tmp_path / "s" / "_manifest.json"))["num_rows"]]) == 400


def copy_table(src, dst) -> str:
    os.system(f"cp -r {src} {dst}")
    return str(dst)


def test_scores_of_a_table_that_changed_are_refused_as_stale_and_overwrite_starts_over(tmp_path, survey, capsys):
    """Scored in this process (--in-process on): the check and --overwrite are the driver's, either way."""
    _, model = survey
    data, out = str(tmp_path / "tR"), str(tmp_path / "sR")
    synth(SynthSettings(out=data, n=200, seed=1, shard_rows=100))
    args = ["score", "--model", model, "--data", data, "--out", out, "--compile", "off", "--no-progress",
            "--in-process", "on"]
    assert main(args) == 0
    first = st.read_parquet(os.path.join(out, "part-00000.parquet")).column("p_source").to_pylist()
    open(os.path.join(out, "notes.txt"), "w").write("mine")
    synth(SynthSettings(out=data, n=200, seed=2, shard_rows=100))  # same path, same shard names, new stamps
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{data} changed since {out} was scored: 2 of its shards (part-00000.parquet, part-00001.parquet)" in err
    assert "the scores there are stale; pass --overwrite" in err
    assert main(args + ["--overwrite"]) == 0
    assert "score: 200 stamps scored" in capsys.readouterr().out
    again = st.read_parquet(os.path.join(out, "part-00000.parquet")).column("p_source").to_pylist()
    assert again != first
    manifest = st.read_manifest(data)
    job = json.load(open(os.path.join(out, "_job.json")))
    assert job["data_shards"] == {s["path"]: s["footer"] for s in manifest.shards}
    assert open(os.path.join(out, "notes.txt")).read() == "mine"  # --overwrite removes only what score wrote
    assert not os.path.exists(os.path.join(out, "_lock.json"))


@pytest.mark.slow
def test_a_damaged_page_sets_its_rows_aside_naming_the_shard(survey, tmp_path, ray_shared, capsys):
    data, model = survey
    copy = copy_table(data, tmp_path / "t")
    shard = os.path.join(copy, "part-00001.parquet")
    raw = bytearray(open(shard, "rb").read())
    middle = len(raw) // 2
    raw[middle:middle + 2000] = np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    open(shard, "wb").write(bytes(raw))  # the footer is intact: only a data page is damaged
    out = str(tmp_path / "s")
    assert main(["score", "--model", model, "--data", copy, "--out", out, "--compile", "off", "--no-progress"]) == 0
    assert "score: 300 stamps scored into" in capsys.readouterr().out
    doc = json.load(open(os.path.join(out, "_manifest.json")))
    assert (doc["num_rows"], doc["set_aside"], doc["errors"]) == (300, 100, {"corrupt": 100})
    errors = st.read_parquet(os.path.join(out, "_errors", "part-00001.parquet"))
    assert errors.num_rows == 100 and errors.column("row").to_pylist() == list(range(100))
    assert set(errors.column("reason").to_pylist()) == {
        errors.column("reason")[0].as_py()} and "part-00001.parquet rows 0-99" in errors.column("reason")[0].as_py()
    assert "CRC checksum verification failed" in errors.column("reason")[0].as_py()
    with pytest.raises(ValueError, match="part-00001.parquet is damaged and cannot be read"):
        st.read_table(copy)


@pytest.mark.parametrize("damage", ["truncated", "random", "rows", "replaced", "missing"])
def test_a_table_that_does_not_match_its_manifest_is_refused_naming_the_shard(survey, tmp_path, capsys, damage):
    data, model = survey
    copy = copy_table(data, tmp_path / "t")
    shard = os.path.join(copy, "part-00002.parquet")
    mpath = os.path.join(copy, st.MANIFEST_NAME)
    if damage == "truncated":
        raw = open(shard, "rb").read()
        open(shard, "wb").write(raw[: len(raw) // 2])
    elif damage == "random":
        open(shard, "wb").write(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    elif damage == "rows":
        doc = json.load(open(mpath))
        doc["shards"][2]["rows"] = 99
        open(mpath, "w").write(json.dumps(doc))
    elif damage == "replaced":
        os.system(f"cp {copy}/part-00000.parquet {shard}")  # as many rows, other stamps
    else:
        os.remove(shard)
    assert main(["score", "--model", model, "--data", copy, "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    expected = {
        "truncated": f"{shard} is not a readable Parquet file (Parquet magic bytes not found in footer",
        "random": f"{shard} is not a readable Parquet file (Parquet magic bytes not found in footer",
        "rows": f"{mpath} is wrong about part-00002.parquet: it lists 99 rows, the file holds 100",
        "replaced": f"{shard} was changed after the table's manifest was written",
        "missing": f"{copy}: shard part-00002.parquet, listed in _manifest.json, is missing",
    }[damage]
    assert expected in err
    assert "Traceback" not in err and not os.path.exists(tmp_path / "s" / "part-00000.parquet")


@pytest.mark.slow
def test_a_second_run_on_a_locked_out_is_refused_and_a_dead_runs_lock_is_taken_over(survey, tmp_path, ray_shared,
                                                                                   capsys):
    import socket
    import subprocess
    import time

    data, model = survey
    out = tmp_path / "s"
    out.mkdir()
    lock = out / "_lock.json"
    holder = subprocess.Popen(["sleep", "60"])
    try:
        lock.write_text(json.dumps({"verb": "score", "host": socket.gethostname(), "pid": holder.pid,
                                    "started": time.time(), "beat": time.time(), "token": "t1"}))
        args = ["score", "--model", model, "--data", data, "--out", str(out), "--compile", "off", "--no-progress"]
        for verb_args in (args, args + ["--overwrite"]):
            assert main(verb_args) == 2
            err = capsys.readouterr().err
            assert f"{out} is in use by 'stampray score' started " in err
            assert f"by process {holder.pid} on {socket.gethostname()}; wait for it to finish" in err
        assert sorted(os.listdir(out)) == ["_lock.json"]
    finally:
        holder.kill()
        holder.wait()
    assert main(args) == 0  # the holder is gone: its lock is taken over
    assert "score: 400 stamps scored" in capsys.readouterr().out
    assert not lock.exists()


@pytest.mark.parametrize("verb", ["score", "occlude", "synth", "ingest"])
def test_a_verb_never_replaces_part_files_it_did_not_write(survey, tmp_path, capsys, verb):
    data, model = survey
    out = tmp_path / "mine"
    out.mkdir()
    (out / "part-00000.parquet").write_bytes(b"my own file")
    np.save(tmp_path / "a.npy", np.zeros((3, 21, 21), np.float32))
    args = {"score": ["score", "--model", model, "--data", data],
            "occlude": ["occlude", "--model", model, "--data", data, "--limit", "2"],
            "synth": ["synth", "-n", "10"],
            "ingest": ["ingest", "--class", f"noise={tmp_path / 'a.npy'}"]}[verb]
    assert main(args + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out {out} holds part-00000.parquet, which " in err and "choose a new or empty directory" in err
    assert (out / "part-00000.parquet").read_bytes() == b"my own file"
    assert sorted(os.listdir(out)) == ["part-00000.parquet"]


@pytest.mark.parametrize("verb", ["synth", "ingest", "cutout"])
@pytest.mark.parametrize("kind", ["scores", "foreign"])
def test_a_directory_with_a_manifest_that_is_not_a_stamp_tables_is_never_replaced(survey, tmp_path, capsys,
                                                                                  score_table, verb, kind):
    """Score results have a _manifest.json too: ingest, synth and cutout (even with --overwrite) must not take
    them, or a user's own _manifest.json, for a stamp table of theirs to replace."""
    out = tmp_path / "out"
    if kind == "scores":
        score_table(out, [0, 1], [[0.9, 0.1], [0.2, 0.8]], ("noise", "source"))
        why = "it holds the results of 'stampray score'"
    else:
        out.mkdir()
        (out / "_manifest.json").write_text("{}")
        (out / "part-00000.parquet").write_bytes(b"my own file")
        why = "its _manifest.json is not one stampray wrote for a stamp table"
    before = tree_digest(out)
    np.save(tmp_path / "a.npy", np.zeros((3, 21, 21), np.float32))
    (tmp_path / "cat.csv").write_text("id,ra,dec\ns1,150.0,2.0\n")
    args = {"synth": ["synth", "-n", "10"], "ingest": ["ingest", "--class", f"noise={tmp_path / 'a.npy'}"],
            "cutout": ["cutout", "--images", str(tmp_path / "m.fits"), "--catalog", str(tmp_path / "cat.csv"),
                       "--size", "11", "--overwrite"]}[verb]
    assert main(args + ["--out", str(out)]) == 2
    assert (f"--out {out} is not a stamp table stampray wrote ({why}), so nothing in it is replaced; choose a new "
            f"or empty directory") in capsys.readouterr().err
    assert tree_digest(out) == before


def test_score_output_given_as_data_is_named_as_such(survey, tmp_path, capsys, score_table):
    _, model = survey
    scores = score_table(tmp_path / "scores", [0, 1], [[0.9, 0.1], [0.2, 0.8]], ("noise", "source"))
    for verb in (["score", "--model", model, "--out", str(tmp_path / "s2")],
                 ["occlude", "--model", model, "--out", str(tmp_path / "m2")]):
        assert main(verb + ["--data", scores]) == 2
        assert (f"{scores} is not a stamp table (it holds the results of 'stampray score'); give a table written "
                f"by 'stampray ingest', 'synth' or 'cutout'") in capsys.readouterr().err
    assert not (tmp_path / "s2").exists() and not (tmp_path / "m2").exists()


def test_export_never_replaces_a_file_it_did_not_write(survey, tmp_path, capsys):
    """The checkpoint itself, a stamp shard or a user's file given as --onnx stays as it was; refused before the
    export's work."""
    pytest.importorskip("onnx")
    data, model = survey
    mine = tmp_path / "mine.onnx"
    mine.write_bytes(b"the user's own model")
    for target in (model, os.path.join(data, "part-00000.parquet"), str(mine)):
        before = open(target, "rb").read()
        assert main(["export", "--model", model, "--onnx", target]) == 2
        assert (f"--onnx {target} exists and 'stampray export' did not write it (no stampray.written_by in an ONNX "
                f"model's metadata), so it is not replaced; choose another file name") in capsys.readouterr().err
        assert open(target, "rb").read() == before
    assert main(["export", "--model", model, "--onnx", str(tmp_path)]) == 2
    assert (f"--onnx {tmp_path} is a directory; give a file name such as {tmp_path}/model.onnx"
            in capsys.readouterr().err)
    assert sorted(os.listdir(tmp_path)) == ["mine.onnx"]


def test_a_report_replaces_only_its_own_files_and_only_once_complete(survey, tmp_path, capsys, score_table,
                                                                     eight_stamps, refused_beside_a_users_file):
    s = score_table(tmp_path / "scores", list(eight_stamps.labels), eight_stamps.probs, eight_stamps.class_names)
    args = ["evaluate", "--scores", s, "--split", "all", "--no-progress"]
    refused_beside_a_users_file(args, "evaluate", "report.html")

    out = tmp_path / "rep"
    assert main(args + ["--out", str(out), "--names", "first"]) == 0
    assert "confusion_first.png" in os.listdir(out)
    (out / "notes.txt").write_text("the user's, beside the report")
    before = tree_digest(out)
    for bad in (["--run", str(tmp_path / "scores")], ["--data", str(tmp_path / "nowhere")], ["--data", s]):
        assert main(args + ["--out", str(out), "--names", "second"] + bad) == 2  # refused before any plot
        assert tree_digest(out) == before
    capsys.readouterr()
    assert main(args + ["--out", str(out), "--names", "second", "--data", survey[0]]) == 2  # another table
    err = capsys.readouterr().err
    assert f"--data {survey[0]} holds none of the 2 misclassified stamps of second (" in err
    assert err.endswith("); give the stamp table these scores came from, or leave --data out\n")
    assert tree_digest(out) == before
    assert main(args + ["--out", str(out), "--names", "second"]) == 0
    names = sorted(os.listdir(out))
    assert "confusion_second.png" in names and not [n for n in names if n.endswith("_first.png")]
    assert (out / "notes.txt").read_text() == "the user's, beside the report"
    assert json.loads((out / "_stampray.json").read_text()) == {
        "verb": "evaluate", "files": {n: [hashlib.sha256((out / n).read_bytes()).hexdigest()]
                                      for n in names if n not in ("notes.txt", "_stampray.json")}}

    # A file of the report that the user changed since is theirs now: refused where it would be replaced,
    # kept where the next report no longer draws it
    (out / "confusion_second.png").write_bytes(b"annotated by hand")
    (out / "report.html").write_text("my edits")
    before = tree_digest(out)
    assert main(args + ["--out", str(out), "--names", "third"]) == 2
    assert (f"--out {out} holds report.html, which 'stampray evaluate' did not write there or which changed since"
            in capsys.readouterr().err)
    assert tree_digest(out) == before
    (out / "report.html").unlink()
    assert main(args + ["--out", str(out), "--names", "third"]) == 0
    assert (out / "confusion_second.png").read_bytes() == b"annotated by hand"
    assert "confusion_third.png" in os.listdir(out) and not (out / "histograms_second.png").exists()


def test_occlude_png_never_replaces_a_users_file(survey, tmp_path, refused_beside_a_users_file):
    data, model = survey
    refused_beside_a_users_file(["occlude", "--model", model, "--data", data, "--out", str(tmp_path / "maps"),
                                 "--limit", "2", "--no-progress"], "occlude", "index.csv", flag="--png")
    assert not (tmp_path / "maps").exists()  # refused before the maps were made


@pytest.mark.parametrize("ids", [False, True])
def test_occlude_png_finds_a_users_file_named_as_a_stamps_png_before_the_maps(survey, tmp_path, capsys, ids):
    """A user's ``<stamp id>.png`` of a stamp the run may map (one of --ids, or any of the table's) is found
    before anything is computed; a PNG of another name is no obstacle and stays."""
    from stampray.occlusion import png_name

    data, model = survey
    first = st.read_parquet(str(st.join(data, st.read_manifest(data).shards[0]["path"]))).column(st.ID)[0].as_py()
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    (pngs / png_name(first)).write_text("the user's own")
    (pngs / "figure.png").write_text("the user's figure")
    argv = ["occlude", "--model", model, "--data", data, "--out", str(tmp_path / "maps"), "--png", str(pngs),
            "--no-progress", *(["--ids", first] if ids else ["--limit", "1"])]
    assert main(argv) == 2
    assert (f"--png {pngs} holds {png_name(first)}, which 'stampray occlude' did not write there or which "
            f"changed since") in capsys.readouterr().err
    assert not (tmp_path / "maps").exists()  # refused before the maps were made
    (pngs / png_name(first)).unlink()
    assert main(argv) == 0
    assert sorted(os.listdir(pngs)) == sorted(["_stampray.json", "figure.png", "index.csv", "occlusion_grid.png",
                                               png_name(first)])
    assert (pngs / "figure.png").read_text() == "the user's figure"


def test_train_refuses_an_out_that_is_a_file(survey, tmp_path, capsys):
    data, _ = survey
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["train", "--model", "cnn", "--data", data, "--out", str(afile)]) == 2
    assert f"--out {afile} is a file; give a directory for the runs" in capsys.readouterr().err
    assert afile.read_text() == "x"


@pytest.mark.parametrize("verb", ["score", "occlude", "evaluate", "synth"])
def test_an_out_under_a_file_is_one_clear_line(survey, tmp_path, capsys, verb):
    data, model = survey
    afile = tmp_path / "afile"
    afile.write_text("x")
    scores = str(tmp_path / "none")
    args = {"score": ["score", "--model", model, "--data", data],
            "occlude": ["occlude", "--model", model, "--data", data],
            "evaluate": ["evaluate", "--scores", scores],
            "synth": ["synth", "-n", "10"]}[verb]
    assert main(args + ["--out", str(afile)]) == 2
    assert f"--out {afile} is a file; give a directory" in capsys.readouterr().err
    assert main(args + ["--out", str(afile / "sub")]) == 2
    err = capsys.readouterr().err
    assert f"--out {afile / 'sub'}: cannot create that directory" in err and "Traceback" not in err
    assert afile.read_text() == "x"


def test_a_failed_run_removes_only_a_directory_it_created_and_left_unfilled(tmp_path, capsys, failing_ingest):
    """A refusal after --out was made (here: ingest stops at a non-finite row with --nonfinite fail, having
    written its writer mark and job file) leaves no directory behind; a directory that was there before, or
    one that holds anything besides the verb's bookkeeping, stays as it is."""
    from stampray.lock import output_lock

    args = failing_ingest(1, np.nan)
    new = tmp_path / "new" / "table"
    assert main([*args, "--out", str(new)]) == 2
    assert "x.npy row 1 has 1 non-finite pixels" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # --out and the parent the run made for it
    mine = tmp_path / "mine"
    mine.mkdir()
    assert main([*args, "--out", str(mine)]) == 2
    assert mine.is_dir()

    def fails(out, scratch=(), write=()):
        with pytest.raises(RuntimeError, match="stop"), output_lock(str(out), "score", scratch=scratch):
            for name in write:
                os.makedirs(os.path.dirname(out / name), exist_ok=True)
                (out / name).write_text("x")
            raise RuntimeError("stop")

    fails(tmp_path / "a", scratch=("_job.json",), write=("_job.json",))
    assert not (tmp_path / "a").exists()
    (tmp_path / "empty").mkdir()  # an empty parent that was there before the run stays
    fails(tmp_path / "empty" / "x" / "y", scratch=("_job.json",), write=("_job.json",))
    assert os.listdir(tmp_path / "empty") == []
    fails(tmp_path / "b", scratch=("_job.json",), write=("_job.json", "_parts/s/0-10.parquet"))
    assert tree_digest(tmp_path / "b").keys() == {"_job.json", os.path.join("_parts", "s", "0-10.parquet")}
    with output_lock(str(tmp_path / "c"), "score"):
        pass
    assert (tmp_path / "c").is_dir() and not os.listdir(tmp_path / "c")  # a run that succeeds keeps its --out
    # After Ctrl-C nothing is removed: threads or tasks the run did not wait for may still write there.
    with pytest.raises(KeyboardInterrupt), output_lock(str(tmp_path / "d"), "score", scratch=("_job.json",)):
        (tmp_path / "d" / "_job.json").write_text("x")
        raise KeyboardInterrupt
    assert os.listdir(tmp_path / "d") == ["_job.json"]


def test_a_table_is_replaced_only_once_the_new_one_is_complete(tmp_path, capsys, failing_ingest, monkeypatch):
    from stampray import replace

    out = tmp_path / "t"
    assert main(["synth", "-n", "30", "--seed", "1", "--shard-rows", "10", "--out", str(out)]) == 0
    (out / "notes.txt").write_text("the user's")
    before = tree_digest(out)
    # a run that fails, and one that can use no row, leave the old table as it was, and no staging area
    assert main(failing_ingest(1, float("nan")) + ["--out", str(out)]) == 2
    assert tree_digest(out) == before and sorted(os.listdir(out)) == sorted(["_manifest.json", "notes.txt"] + [
        f"part-0000{i}.parquet" for i in range(3)])
    np.save(tmp_path / "im.npy", np.zeros((3, 21, 21), np.float32))
    np.save(tmp_path / "neg.npy", np.full(3, -1, np.int64))
    capsys.readouterr()
    assert main(["ingest", "--out", str(out), "--images", str(tmp_path / "im.npy"), "--labels",
                 str(tmp_path / "neg.npy"), "--classes", "noise,source"]) == 2
    assert capsys.readouterr().err == (f"stampray ingest: error: none of the 3 input rows could be used (label 3), so "
                                       f"the table at {out} is left as it was; fix the input, or the flags that "
                                       f"select from it\n")
    assert tree_digest(out) == before

    # a swap killed once its plan is written is finished by the next verb that writes the table
    real = replace.roll_forward
    monkeypatch.setattr(replace, "roll_forward", lambda out: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert main(["synth", "-n", "12", "--seed", "2", "--shard-rows", "5", "--out", str(out)]) == 130
    monkeypatch.setattr(replace, "roll_forward", real)
    assert tree_digest(out).items() >= before.items()  # the old table whole; the plan and stage beside it
    (out / "_manifest.json").unlink()  # as if killed just after the swap began
    with pytest.raises(FileNotFoundError, match=f"^{out} is being replaced by a new stamp table"):
        st.read_manifest(str(out))
    assert main(["ingest", "--out", str(out), "--images", str(tmp_path / "im.npy"), "--classes", "noise,source"]) == 0
    assert st.read_manifest(str(out)).num_rows == 3
    assert sorted(os.listdir(out)) == ["_manifest.json", "notes.txt", "part-00000.parquet"]
    assert st.read_manifest(str(out)).settings["ingest"]["out"] == str(out)  # not the staging area's
    assert (out / "notes.txt").read_text() == "the user's"


def test_score_overwrite_replaces_the_earlier_results_only_once_the_new_ones_are_complete(survey, tmp_path, capsys,
                                                                                           monkeypatch):
    from stampray import score as score_module

    data, model = survey
    out = tmp_path / "scores"
    args = ["score", "--model", model, "--data", data, "--out", str(out), "--no-progress", "--in-process", "on"]
    assert main(args) == 0
    (out / "notes.txt").write_text("the user's")
    before = tree_digest(out)

    def fails(*a, **k):
        raise RuntimeError("the new job failed")

    monkeypatch.setattr(score_module, "run_here", fails)
    assert main(args + ["--overwrite", "--tta", "2"]) == 1
    assert "the new job failed" in capsys.readouterr().err
    assert tree_digest(out) == before  # the earlier results whole, no staging area left
    monkeypatch.undo()
    assert main(args + ["--overwrite", "--tta", "2"]) == 0
    doc = json.loads((out / "_manifest.json").read_text())
    assert doc["tta"] == 2 and doc["settings"]["out"] == str(out) and doc["num_rows"] == 400
    assert sorted(os.listdir(out)) == ["_job.json", "_manifest.json", "notes.txt"] + [
        f"part-0000{i}.parquet" for i in range(4)]
    assert (out / "notes.txt").read_text() == "the user's"

    # An --overwrite killed once its new results were committed in the stage resumes from them: rerun, it has
    # nothing left to score (run_here would fail) and only swaps them in.
    import shutil

    done = tmp_path / "done"
    assert main(args[:5] + ["--out", str(done), "--no-progress", "--in-process", "on", "--tta", "4"]) == 0
    stage = out / "_replace" / "stage"
    stage.mkdir(parents=True)
    for f in ["_job.json"] + [f"part-0000{i}.parquet" for i in range(4)]:
        shutil.copy(done / f, stage / f)
    monkeypatch.setattr(score_module, "run_here", fails)
    assert main(args + ["--overwrite", "--tta", "4"]) == 0
    assert json.loads((out / "_manifest.json").read_text())["tta"] == 4 and not (out / "_replace").exists()


def test_a_cleanup_that_fails_leaves_the_runs_own_error_to_be_reported(tmp_path, monkeypatch, caplog):
    from stampray import lock

    def broken(path):
        raise PermissionError(f"cannot remove {path}")

    monkeypatch.setattr(lock.os, "rmdir", broken)
    out = tmp_path / "new"
    with pytest.raises(ValueError, match="the run's own error"), lock.output_lock(str(out), "score"):
        raise ValueError("the run's own error")
    assert f"{out}: kept this directory, which the failed run created (cannot remove {out})" in caplog.text
    assert out.is_dir() and os.listdir(out) == []  # its lock released all the same
