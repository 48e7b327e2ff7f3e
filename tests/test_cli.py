import json
import logging
import os
import subprocess
import sys

import pytest

import numpy as np

from stampray import table as st
from stampray.cli import main


def test_python_m_stampray_help():
    out = subprocess.run([sys.executable, "-m", "stampray", "--help"], capture_output=True, text=True, check=True)
    for verb in ("synth", "ingest", "models", "demo"):
        assert verb in out.stdout


def test_models_lists_every_model(capsys):
    assert main(["models", "--shape", "1,21,21", "--classes", "2"]) == 0
    out = capsys.readouterr().out
    assert "cnn                9,666" in out.replace("cnn               9,666", "cnn                9,666")
    for name, count in [("dense", "27,452"), ("vgg6", "25,394"), ("resnet50", "23,532,418")]:
        line = next(l for l in out.splitlines() if l.startswith(name + " "))
        assert count in line


@pytest.mark.parametrize("args, words", [
    (["--classes", "0"], "--classes wants a number of classes, at least 2, got '0'"),
    (["--classes", "-1"], "--classes wants a number of classes, at least 2, got '-1'"),
    (["--shape", "1,0,21"], "--shape wants C,H,W such as 1,21,21 (each at least 1), got '1,0,21'"),
    (["--shape", "1,100000,100000"], "--shape 1,100000,100000: stamps of at most 4096x4096 pixels"),
])
def test_models_refuses_shapes_and_class_counts_no_model_has(args, words, capsys):
    with pytest.raises(SystemExit) as e:
        main(["models"] + args)
    assert e.value.code == 2 and words in capsys.readouterr().err


def test_synth_then_ingest_cli(tmp_path, capsys):
    assert main(["synth", "-n", "300", "--seed", "2", "--out", str(tmp_path / "s"), "--shard-rows", "100"]) == 0
    assert "synth: wrote 300 tno stamps (1, 21, 21) in 3 shards" in capsys.readouterr().out
    tbl = st.read_table(str(tmp_path / "s"))
    img = st.decode_images(tbl.column("image"), (1, 21, 21))[:, 0]
    np.save(tmp_path / "noise.npy", img[:5])
    assert main(["ingest", "--out", str(tmp_path / "i"), "--class", f"noise={tmp_path / 'noise.npy'}"]) == 0
    assert "ingested 5 stamps" in capsys.readouterr().out


def test_errors_are_one_line_with_nonzero_exit(tmp_path, capsys):
    assert main(["ingest", "--out", str(tmp_path / "o"), "--images", str(tmp_path / "missing.npy")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"stampray ingest: error: {tmp_path / 'missing.npy'} does not exist"


def test_config_file_then_flags(tmp_path, capsys):
    cfg = tmp_path / "synth.json"
    cfg.write_text('{"n": 120, "seed": 9, "kind": "tno"}')
    assert main(["synth", "--config", str(cfg), "-n", "50", "--out", str(tmp_path / "s")]) == 0
    m = st.read_manifest(str(tmp_path / "s"))
    assert m.num_rows == 50 and m.settings["synth"]["seed"] == 9


def test_a_config_file_may_give_the_required_settings_and_what_neither_gives_is_named(tmp_path, capsys):
    cfg = tmp_path / "synth.toml"
    cfg.write_text(f'out = "{tmp_path / "s"}"\nn = 60\n')
    assert main(["synth", "--config", str(cfg)]) == 0
    assert st.read_manifest(str(tmp_path / "s")).num_rows == 60
    capsys.readouterr()
    cfg_score = tmp_path / "score.toml"
    cfg_score.write_text('data = "tno"\n')
    assert main(["score", "--config", str(cfg_score), "--keep", "ra"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"stampray score: error: --model, --out: required, neither on the command line nor in --config "
        f"{cfg_score}; give them as flags or in a --config file (model, out)")
    assert main(["score", "--model", "m.pt"]) == 2
    assert capsys.readouterr().err.strip() == (
        "stampray score: error: --data, --out: required, missing; give them as flags or in a --config file "
        "(data, out)")


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline_at_reduced_size(tmp_path, ray_shared, caplog):
    from stampray.demo import OWN_DIRS, DemoSettings, _start_over, demo
    from stampray.synth import SynthSettings, synth

    # In the place of an earlier demo (what a second `stampray demo` there finds): its marker, its survey
    # (another size and seed, written by synth as a demo writes it) and a file in each directory it made.
    # The run replaces them all. (A whole second demo here took 41 s of the suite; the directories an
    # earlier demo made are deleted whole before anything runs, and `_start_over` has tests of its own.)
    out = tmp_path / "demo"
    _start_over(str(out), DemoSettings(out=str(out), n=1000, seed=1))
    synth(SynthSettings(out=str(out / "survey"), n=1000, seed=1, shard_rows=200, progress=False))  # 5 shards
    for sub in OWN_DIRS:
        (out / sub).mkdir(parents=True, exist_ok=True)
        (out / sub / "earlier.txt").write_text("an earlier demo's")
    caplog.set_level(logging.INFO, logger="stampray")
    r = demo(DemoSettings(out=str(out), n=3000, epochs=2))
    assert not [sub for sub in OWN_DIRS if (out / sub / "earlier.txt").exists()]
    assert not (out / "_demo-previous").exists()  # the earlier demo's directories, set aside, are gone now
    assert st.read_manifest(str(out / "survey")).num_rows == 3000  # one shard of 5000 rows: no part left over
    assert sorted(f for f in os.listdir(out / "survey") if f.startswith("part-")) == ["part-00000.parquet"]
    assert r["scored"] == 3000 and 0.5 < r["test_acc"] <= 1.0
    assert abs(r["eval_acc"] - r["test_acc"]) < 1e-9  # the report's test split is training's test split
    assert os.path.exists(r["report"]) and r["occluded"] <= 10
    log_text = caplog.text
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]", "report:", "TensorBoard:"):
        assert step in log_text


def test_a_demo_that_fails_puts_the_earlier_demos_results_back(tmp_path, capsys, monkeypatch):
    from stampray.demo import OWN_DIRS, DemoSettings, _start_over

    out = tmp_path / "demo"
    _start_over(str(out), DemoSettings(out=str(out), n=1000, seed=1))
    for sub in OWN_DIRS:
        (out / sub).mkdir(parents=True, exist_ok=True)
        (out / sub / "earlier.txt").write_text("an earlier demo's")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name != "_demo.json")
    assert main(["demo", "--out", str(out), "-n", "10"]) == 2  # refused before anything is touched
    assert capsys.readouterr().err == ("stampray demo: error: -n 10: a demo needs at least 200 stamps, so that its "
                                       "validation and test splits hold some of each class\n")
    def no_ray(address):
        raise RuntimeError("no Ray there")

    monkeypatch.setattr("stampray.demo.ray_session", no_ray)
    assert main(["demo", "--out", str(out), "-n", "300"]) == 1
    assert capsys.readouterr().err == "stampray demo: error: no Ray there\n"
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name != "_demo.json") == before
    assert all((out / sub / "earlier.txt").read_text() == "an earlier demo's" for sub in OWN_DIRS)


def test_a_demo_refuses_to_replace_directories_holding_a_file_the_earlier_demo_did_not_write(tmp_path, capsys):
    from stampray.demo import ASIDE, OWN_DIRS, DemoSettings, _own_files, _set_phase, _start_over

    out = tmp_path / "demo"
    _start_over(str(out), DemoSettings(out=str(out), n=1000, seed=1))
    for sub in OWN_DIRS:
        (out / sub / "deep").mkdir(parents=True, exist_ok=True)
        (out / sub / "deep" / "made.txt").write_text("an earlier demo's")
    _set_phase(str(out), "done", files=_own_files(str(out)))  # as a complete demo ends
    (out / "scores" / "MY_NOTES.txt").write_text("mine")
    (out / "report" / "deep" / "made.txt").write_text("an earlier demo's, edited by me")
    (out / "runs" / "other").mkdir()  # beside runs/cnn: not a demo's directory, no obstacle
    (out / "runs" / "other" / "x.txt").write_text("mine")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert main(["demo", "--out", str(out), "-n", "300"]) == 2
    assert capsys.readouterr().err == (
        f"stampray demo: error: --out {out}: report/deep/made.txt, scores/MY_NOTES.txt in the directories a demo "
        f"replaces (runs/cnn, scores, maps, report) are not the earlier demo's files (added or changed since; "
        f"_demo.json lists its own), so nothing is replaced; move them out, or choose a new --out\n")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    (out / "scores" / "MY_NOTES.txt").unlink()
    (out / "report" / "deep" / "made.txt").write_text("an earlier demo's")
    _start_over(str(out), DemoSettings(out=str(out), n=1000, seed=2))  # now the earlier directories go aside
    assert sorted(os.listdir(out / ASIDE)) == ["maps", "report", "runs", "scores"]
    assert (out / "runs" / "other" / "x.txt").read_text() == "mine"


def test_a_killed_demo_is_undone_or_finished_as_its_phase_says(tmp_path):
    from stampray.demo import ASIDE, DEMO_FILE, OWN_DIRS, DemoSettings, _set_phase, _start_over

    out = tmp_path / "demo"
    settings = DemoSettings(out=str(out))
    _start_over(str(out), settings)
    for sub in OWN_DIRS:
        (out / sub).mkdir(parents=True, exist_ok=True)
        (out / sub / "earlier.txt").write_text("an earlier demo's")
    _start_over(str(out), settings)  # a demo begins: the earlier results wait aside
    assert json.loads((out / DEMO_FILE).read_text())["phase"] == "running"
    (out / "scores").mkdir()
    (out / "scores" / "half.parquet").write_text("the killed demo's")  # ... and is killed
    _start_over(str(out), settings)  # the next demo puts the earlier results back first, then sets them aside
    assert sorted(p.name for p in (out / ASIDE / "scores").iterdir()) == ["earlier.txt"]
    assert not (out / "scores").exists()

    for sub in OWN_DIRS:  # that demo completes: its results, then killed while removing the earlier ones
        (out / sub).mkdir(parents=True, exist_ok=True)
        (out / sub / "newer.txt").write_text("the complete demo's")
    _set_phase(str(out), "done")
    _start_over(str(out), settings)  # the earlier ones are not put back over the complete demo's
    assert sorted(p.name for p in (out / ASIDE / "scores").iterdir()) == ["newer.txt"]

    import shutil

    shutil.rmtree(out / ASIDE)
    (out / ASIDE).mkdir()
    (out / DEMO_FILE).write_text(json.dumps({"verb": "demo", "dirs": list(OWN_DIRS)}))  # no phase: not a demo's
    with pytest.raises(ValueError, match=f"^--out {out} holds {ASIDE}, which no demo there set aside"):
        _start_over(str(out), settings)
