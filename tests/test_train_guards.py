"""Training refuses what cannot work and sets aside what would poison it (issues #18 and #19)."""

import json
import os
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from stampray import splits
from stampray import table as st
from stampray.batches import SetAside, prepare_batch
from stampray.cli import main
from stampray.train import TrainSettings, fit, read_reserve, resources


def train_ids(path, fractions=splits.DEFAULT_FRACTIONS):
    """Ids of the labelled stamps that fall in the train split (computed here, apart from stampray.train)."""
    t = st.read_table(path, columns=[st.ID, st.LABEL])
    ids = t.column(st.ID).to_pylist()
    names = splits.assign(ids, fractions)
    return [i for i, n in zip(ids, names) if n == "train"]


# --------------------------------------------------------------------------------------------------
# #18.8: workers and reads are sized together, or refused with the numbers
# --------------------------------------------------------------------------------------------------
def test_workers_that_would_starve_the_reads_are_refused_with_the_numbers():
    assert resources(4, False, 2.0) == {"CPU": 0.25}  # the most a 2-CPU Ray holds beside its readers
    with pytest.raises(ValueError) as e:
        resources(8, False, 2.0)
    msg = str(e.value)
    assert msg.startswith("--workers 8 needs at least 3 CPUs (0.25 CPU per Train worker, plus 1 left to Ray Data's")
    assert "this Ray has 2." in msg and "use at most --workers 4" in msg and "--address" in msg
    with pytest.raises(ValueError, match=r"--workers 2 with --cpus-per-worker 1 needs at least 3 CPUs .* this Ray "
                                         r"has 2\. .*lower --cpus-per-worker \(at most 0\.50 for 2 workers\)"):
        resources(2, False, 2.0, cpus_per_worker=1.0)
    with pytest.raises(ValueError, match=r"--workers 4 with --use-gpu needs at least 6 CPUs"):
        resources(4, True, 4.0)


@pytest.mark.parametrize("cpus", [0.5, 1.0, 2.0, 3.0, 4.0, 8.0, 16.0, 96.0])
def test_the_read_reserve_holds_for_every_worker_count(cpus):
    """Whatever --workers is, either the readers keep their reserve (at least one half-CPU read task) or
    training is refused."""
    refused = []
    for workers in range(1, 400):
        try:
            per = resources(workers, False, cpus)["CPU"]
        except ValueError:
            refused.append(workers)
            continue
        assert per >= 0.25
        assert workers * per + read_reserve(cpus) <= cpus + 1e-9
    assert read_reserve(cpus) >= 0.5
    # refused from the first count whose quarter-CPU workers no longer fit beside the readers, and above
    assert refused == list(range(int((cpus - read_reserve(cpus)) / 0.25) + 1, 400))


@pytest.mark.timeout(120)
def test_train_with_8_workers_on_a_2_cpu_ray_is_refused_before_starting(tno_small, tmp_path, ray_shared, capsys):
    assert ray_shared.cluster_resources()["CPU"] == 2.0
    t0 = time.time()
    rc = main(["train", "--model", "cnn", "--data", tno_small, "--out", str(tmp_path / "runs"), "--workers", "8",
               "--epochs", "1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert ("stampray train: error: --workers 8 needs at least 3 CPUs (0.25 CPU per Train worker, plus 1 left to "
            "Ray Data's half-CPU read tasks so that reading never starves); this Ray has 2. Fix: use at most "
            "--workers 4") in err
    assert time.time() - t0 < 30
    assert not os.path.exists(tmp_path / "runs")  # nothing started, nothing written


# --------------------------------------------------------------------------------------------------
# #18.4: an empty train or validation split is refused before any worker starts
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def published_test_set(tmp_path_factory):
    """1,000 labelled stamps ingested with --split test (the README's recipe for a published test set)."""
    from stampray.ingest import IngestSettings, ingest

    d = tmp_path_factory.mktemp("published")
    rng = np.random.default_rng(0)
    for name in ("noise", "source"):
        np.save(d / f"{name}.npy", rng.normal(size=(500, 21, 21)).astype(np.float32))
    out = str(d / "stamps_test")
    ingest(IngestSettings(out=out, class_files=(("noise", str(d / "noise.npy")), ("source", str(d / "source.npy"))),
                          classes=("noise", "source"), split="test"))
    return out


def test_split_counts_are_the_same_read_in_the_driver_or_by_tasks(tno_small, ray_shared, monkeypatch):
    """A table of up to COUNT_HERE_ROWS rows is counted in the driver, a bigger one by one task per shard
    (the driver then reads no shard): the same counts, those of the labelled rows' hash split."""
    from stampray import train

    tbl = st.read_table(tno_small, columns=[st.ID, st.LABEL])
    names = splits.assign(tbl.column(st.ID), splits.DEFAULT_FRACTIONS, None)
    expected = {name: int((names == name).sum()) for name in st.SPLIT_NAMES}
    assert sum(expected.values()) == 600 and min(expected.values()) > 0
    manifest = st.read_manifest(tno_small)
    read_here = []
    count = train.count_splits
    monkeypatch.setattr(train, "count_splits", lambda *a: read_here.append(a[1]) or count(*a))
    assert train.split_counts(tno_small, manifest, splits.DEFAULT_FRACTIONS) == expected
    assert sorted(read_here) == sorted(s["path"] for s in manifest.shards)
    read_here.clear()
    assert train.split_counts(tno_small, manifest, splits.DEFAULT_FRACTIONS, here=False) == expected
    assert read_here == []  # a cluster's: the tasks read the shards, in their own processes
    monkeypatch.setattr(train, "COUNT_HERE_ROWS", 599)
    assert train.split_counts(tno_small, manifest, splits.DEFAULT_FRACTIONS) == expected
    assert read_here == []  # too big to read here


def test_a_damaged_shard_is_named_when_the_splits_are_counted(tno_small, tmp_path):
    import shutil

    from stampray.batches import count_splits

    data = str(tmp_path / "t")
    shutil.copytree(tno_small, data)
    shard = st.read_manifest(data).shards[1]["path"]
    path = os.path.join(data, shard)
    ids = pq.ParquetFile(path).metadata.row_group(0).column(0)
    assert ids.path_in_schema == st.ID
    raw = bytearray(open(path, "rb").read())
    at = ids.data_page_offset + 24  # inside the stamp_id page the count reads, past its header
    raw[at:at + 32] = bytes(b ^ 0xFF for b in raw[at:at + 32])
    open(path, "wb").write(bytes(raw))
    with pytest.raises(ValueError, match=f"^{path} is damaged and cannot be read \\(.*\\); restore it, or "
                                         f"re-create it with 'stampray ingest'$"):
        count_splits(data, shard, splits.DEFAULT_FRACTIONS, [st.ID, st.LABEL])


def test_the_read_tasks_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, stampray.batches; print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"


def test_a_table_of_test_stamps_only_is_refused_naming_the_split_counts(published_test_set, tmp_path, ray_shared,
                                                                         capsys):
    rc = main(["train", "--model", "cnn", "--data", published_test_set, "--out", str(tmp_path / "runs"),
               "--epochs", "1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert (f"stampray train: error: the train split of {published_test_set} holds 0 stamps "
            f"(train 0, val 0, test 1000): ") in err
    assert "train on a table ingested without --split" in err
    assert not os.path.exists(tmp_path / "runs")


def test_an_empty_validation_split_is_refused(tno_small, tmp_path, ray_shared):
    with pytest.raises(ValueError) as e:
        fit(TrainSettings(model="cnn", data=tno_small, out=str(tmp_path / "runs"), epochs=1, fractions=(1.0, 0.0, 0.0)))
    assert str(e.value).startswith(f"the val split of {tno_small} holds 0 stamps (train 600, val 0, test 0): "
                                   f"the split fractions (1,0,0) give it none of 600 labelled stamps; fix: ")
    assert not os.path.exists(tmp_path / "runs")


# --------------------------------------------------------------------------------------------------
# #18.3: a NaN stamp is set aside, not trained on
# --------------------------------------------------------------------------------------------------
def test_the_read_tasks_set_aside_rows_with_non_finite_pixels(ray_shared):
    spec = st.StampSpec((1, 21, 21), ("noise", "source"))
    images = np.ones((6, 1, 21, 21), np.float32)
    images[1, 0, 3, 4] = np.nan
    images[4] = np.inf
    ids = [f"s{i}" for i in range(6)]
    batch = st.make_table(spec, ids, images, [0, 1, 0, 1, 0, 1], split=["train"] * 6)
    ledger = ray_shared.remote(num_cpus=0)(SetAside).remote()
    out = prepare_batch(batch, "train", splits.DEFAULT_FRACTIONS, spec.shape, "course_scaled", ledger=ledger)
    assert out["y"].tolist() == [0, 0, 1, 1] and out["x"].shape == (4, 1, 21, 21)
    assert np.isfinite(out["x"]).all()
    assert ray_shared.get(ledger.listing.remote()) == [
        {"stamp_id": "s1", "split": "train", "reason": "nonfinite: 1 non-finite pixels"},
        {"stamp_id": "s4", "split": "train", "reason": "nonfinite: 441 non-finite pixels"}]
    # a retried task or the next epoch reads the same rows: they count once
    prepare_batch(batch, "train", splits.DEFAULT_FRACTIONS, spec.shape, "course_scaled", ledger=ledger)
    assert ray_shared.get(ledger.counts.remote()) == {"train": 2, "val": 0, "test": 0}
    ray_shared.kill(ledger)


@pytest.fixture(scope="module")
def table_with_one_nan(tmp_path_factory):
    """1,000 stamps whose shard was rewritten by "another tool": plain pyarrow, the stampray schema and
    metadata, and one stamp of the train split all NaN (ingest would have set it aside)."""
    from stampray.synth import SynthSettings, synth

    out = str(tmp_path_factory.mktemp("nan_table"))
    synth(SynthSettings(out=out, n=1000, seed=3, shard_rows=1000))
    [shard] = st.shard_paths(out)
    t = pq.read_table(shard)
    spec = st.spec_from_schema(t.schema)
    nan_id = train_ids(out)[0]
    row = t.column(st.ID).to_pylist().index(nan_id)
    images = st.decode_images(t.column(st.IMAGE), spec.shape).copy()
    images[row] = np.nan
    t = t.set_column(t.schema.get_field_index(st.IMAGE), t.schema.field(st.IMAGE), st.encode_images(images, spec))
    pq.write_table(t, shard)
    assert st.spec_from_schema(pq.read_schema(shard)) == spec
    manifest = st.read_manifest(out)  # another tool's manifest records no footer digests
    manifest.shards = [{k: v for k, v in sh.items() if k != "footer"} for sh in manifest.shards]
    st.write_text(st.join(out, st.MANIFEST_NAME), manifest.to_json())
    return out, nan_id


@pytest.mark.slow
def test_a_nan_stamp_is_set_aside_and_counted_not_trained_on(table_with_one_nan, tmp_path, ray_shared, capsys):
    data, nan_id = table_with_one_nan
    rc = main(["train", "--model", "cnn", "--data", data, "--out", str(tmp_path), "--epochs", "1",
               "--batch-size", "64"])
    out = capsys.readouterr().out
    assert rc == 0
    assert (f"train: set aside 1 stamp with non-finite pixels, not trained on (train 1, val 0, test 0); "
            f"listed in {tmp_path / 'cnn'}/_errors") in out
    summary = json.loads((tmp_path / "cnn" / "summary.json").read_text())
    m, [epoch] = summary["metrics"], summary["history"]
    assert m["set_aside"] == {"train": 1, "val": 0, "test": 0} and m["set_aside_reasons"] == {"nonfinite": 1}
    assert epoch["train_set_aside"] == 1 and epoch["val_set_aside"] == 0
    assert epoch["train_n"] == len(train_ids(data)) - 1
    assert np.isfinite(epoch["train_loss"]) and np.isfinite(epoch["val_loss"]) and np.isfinite(m["test_acc"])
    best = torch.load(tmp_path / "cnn" / "best.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in best["state_dict"].values() if v.is_floating_point())
    errors = pq.read_table(tmp_path / "cnn" / "_errors").to_pylist()
    assert errors == [{"stamp_id": nan_id, "source": f"{data} (train split)", "row": None,
                       "reason": "nonfinite: 441 non-finite pixels"}]


# --------------------------------------------------------------------------------------------------
# #19.3: no training batch holds one stamp
# --------------------------------------------------------------------------------------------------
def test_a_worker_batch_of_one_stamp_is_refused_in_the_settings(tmp_path):
    with pytest.raises(ValueError, match=r"--batch-size \(3\) must be at least twice the number of workers \(2\)"):
        TrainSettings(model="cnn", data="d", out=str(tmp_path), workers=2, batch_size=3)
    TrainSettings(model="cnn", data="d", out=str(tmp_path), workers=2, batch_size=4)


@pytest.mark.slow
def test_resnet50_trains_when_the_last_batch_would_hold_one_stamp(tmp_path, ray_shared, capsys):
    from stampray.synth import SynthSettings, synth

    data = str(tmp_path / "tno")
    synth(SynthSettings(out=data, n=120, seed=5))
    n_train = len(train_ids(data))
    assert n_train > 20
    rc = main(["train", "--model", "resnet50", "--data", data, "--out", str(tmp_path / "runs"), "--epochs", "1",
               "--workers", "1", "--batch-size", str(n_train - 1)])  # batches of n_train - 1 and 1 stamps
    assert rc == 0, capsys.readouterr().err[-3000:]
    [epoch] = json.loads((tmp_path / "runs" / "resnet50" / "summary.json").read_text())["history"]
    assert epoch["train_dropped"] == 1 and epoch["train_n"] == n_train - 1
    assert np.isfinite(epoch["train_loss"])


def test_a_table_with_labelled_stamps_of_one_class_is_refused_before_ray(tmp_path, capsys, write_stamps):
    data = write_stamps(tmp_path / "one", np.zeros((6, 1, 21, 21), np.float32), labels=[0] * 6)
    assert main(["train", "--model", "cnn", "--data", data, "--out", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err == (
        f"stampray train: error: {data} has labelled stamps of 1 class(es) only; classes source have none, and a "
        f"classifier needs examples of at least two: ingest stamps of those classes, or declare only the classes "
        f"the table holds (--classes)\n")
    assert not (tmp_path / "runs").exists()


def test_an_out_that_is_a_runs_own_directory_or_a_table_is_refused_before_ray(tno_small, tmp_path, capsys):
    """--out holds runs (each in --out/NAME): --out runs/cnn --model jet_cnn would nest a run in the cnn run."""
    run = tmp_path / "runs" / "cnn"
    run.mkdir(parents=True)
    (run / "settings.json").write_text(json.dumps({"model": "cnn", "data": tno_small, "epochs": 3}))
    for out, where in [(run, "is"), (run / "more", "lies inside")]:
        assert main(["train", "--model", "jet_cnn", "--data", tno_small, "--out", str(out)]) == 2
        assert capsys.readouterr().err == (
            f"stampray train: error: --out {out} {where} the directory of a cnn run ({run}); --out is where runs "
            f"go, each in a directory of its own named by --name (default: the model): give the directory that "
            f"holds the runs ({tmp_path / 'runs'})\n")
    assert main(["train", "--model", "cnn", "--data", tno_small, "--out", tno_small]) == 2
    assert capsys.readouterr().err.startswith(f"stampray train: error: --out {tno_small} ")  # is --data
    table = tmp_path / "scores"
    table.mkdir()
    (table / "_manifest.json").write_text("{}")
    assert main(["train", "--model", "cnn", "--data", tno_small, "--out", str(table)]) == 2
    assert capsys.readouterr().err == (f"stampray train: error: --out {table} holds a _manifest.json (a stamp table, "
                                       f"or score output); give a directory for the runs\n")
    assert sorted(os.listdir(run)) == ["settings.json"] and os.listdir(table) == ["_manifest.json"]


def test_a_run_is_resumed_only_with_the_optimizer_rate_schedule_and_batch_it_was_started_with(tno_small, tmp_path,
                                                                                              capsys):
    """A resume under another optimizer crashed in its restored state (sgd has no adamw's moments) after
    rewriting settings.json; another --lr or --schedule silently mixed the two. More epochs or other
    --workers (the batch is the global one) resume."""
    from dataclasses import asdict

    from stampray.train import _check_resume

    started = TrainSettings(model="cnn", data=tno_small, out=str(tmp_path / "runs"), epochs=4, workers=2)
    run = tmp_path / "runs" / "cnn"
    run.mkdir(parents=True)
    (run / "settings.json").write_text(json.dumps(asdict(started)))
    before = (run / "settings.json").read_text()
    for flags, said in [(["--optimizer", "sgd"], "--optimizer adamw, not sgd"),
                        (["--lr", "0.01"], "--lr 0.001, not 0.01"),
                        (["--schedule", "cosine"], f"--schedule {started.schedule}, not cosine"),
                        (["--batch-size", "64"], f"--batch-size {started.batch_size}, not 64"),
                        (["--class-weights", "auto"], "--class-weights None, not auto")]:
        assert main(["train", "--model", "cnn", "--data", tno_small, "--out", str(tmp_path / "runs"), "--epochs", "5",
                     *flags]) == 2
        assert capsys.readouterr().err == (f"stampray train: error: run {run} was started with {said}; rerun with the "
                                           f"same settings to resume it, or choose another --name\n")
    assert (run / "settings.json").read_text() == before
    _check_resume(str(run), TrainSettings(model="cnn", data=tno_small, out=str(tmp_path / "runs"), epochs=9, workers=1))


def test_a_run_is_resumed_only_with_the_split_and_inputs_it_was_started_with(tno_small, tmp_path, monkeypatch,
                                                                              capsys):
    """Other --fractions would move stamps the first epochs trained on into the test split: refused before Ray.
    A relative --data naming the same table is the same table."""
    run = tmp_path / "runs" / "cnn"
    run.mkdir(parents=True)
    preprocess = TrainSettings(model="cnn", data=tno_small, out=str(tmp_path)).preprocess  # the model's default
    (run / "settings.json").write_text(json.dumps({"model": "cnn", "data": tno_small, "preprocess": preprocess,
                                                   "fractions": [0.8, 0.1, 0.1]}))
    args = ["train", "--model", "cnn", "--out", str(tmp_path / "runs"), "--fractions", "0.2,0.1,0.7"]
    assert main(args + ["--data", tno_small]) == 2
    assert capsys.readouterr().err == (f"stampray train: error: run {run} was started with --fractions 0.8,0.1,0.1, "
                                       f"not 0.2,0.1,0.7; rerun with the same settings to resume it, or choose "
                                       f"another --name\n")
    monkeypatch.chdir(os.path.dirname(tno_small))
    from stampray.train import _check_resume

    _check_resume(str(run), TrainSettings(model="cnn", data=os.path.basename(tno_small), out=str(tmp_path / "runs"),
                                          fractions=(0.8, 0.1, 0.1)))  # the same table, named relatively: no error
