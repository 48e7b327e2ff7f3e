import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from stampray import checkpoint as ck
from stampray.models import create_model
from stampray.train import Augment, TrainSettings, class_weights_from_counts, fit, resources


def history_epochs(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["epoch"] for line in f]


def small(tno_small, out, **kw):
    base = dict(model="cnn", data=tno_small, out=str(out), epochs=2, batch_size=64, seed=1)
    base.update(kw)
    return TrainSettings(**base)


@pytest.mark.slow
def test_one_worker_run_leaves_checkpoints_logs_and_metrics(tno_small, tmp_path, ray_shared):
    r = fit(small(tno_small, tmp_path))
    run = r.run_dir
    assert run == str(tmp_path / "cnn")
    assert history_epochs(run) == [1, 2]
    assert r.metrics["epochs_done"] == 2 and r.metrics["workers"] == 1
    assert r.metrics["test_n"] > 0 and 0.0 <= r.metrics["test_acc"] <= 1.0
    assert sum(map(sum, r.metrics["test_confusion"])) == r.metrics["test_n"]
    assert sorted(os.listdir(os.path.join(run, "tensorboard")))[0].startswith("events.out.tfevents")
    for name in ("best.pt", "last.pt", "settings.json", "summary.json", "epoch-0002"):
        assert os.path.exists(os.path.join(run, name)), name
    from stampray.provenance import provenance

    saved = json.load(open(os.path.join(run, "settings.json")))
    assert saved["provenance"] == provenance() and saved["model"] == "cnn" and saved["epochs"] == 2
    # the checkpoint describes itself and loads with weights_only=True
    bundle = torch.load(os.path.join(run, "best.pt"), weights_only=True)
    assert bundle["model"] == "cnn" and bundle["class_names"] == ["noise", "source"]
    assert bundle["preprocess"] == "course_scaled" and bundle["in_channels"] == 1 and bundle["image_size"] == [21, 21]
    assert bundle["epoch"] == r.metrics["best_epoch"]
    model = ck.load_model(run)  # a run directory resolves to its best.pt
    assert model.stampray["metrics"]["epoch"] == r.metrics["best_epoch"]
    # rerunning a finished run does no work
    again = fit(small(tno_small, tmp_path))
    assert again.metrics == r.metrics


def test_resume_refuses_other_settings(tno_small, tmp_path):
    run = tmp_path / "cnn"
    run.mkdir()
    (run / "settings.json").write_text(json.dumps({"model": "cnn", "data": "/elsewhere", "preprocess": "course_scaled"}))
    with pytest.raises(ValueError, match="was started with --data /elsewhere"):
        fit(small(tno_small, tmp_path))


@pytest.mark.slow
def test_early_stopping_stops(tno_small, tmp_path, ray_shared):
    # a learning rate so small that the validation loss cannot improve after the first epoch
    r = fit(small(tno_small, tmp_path, epochs=6, lr=1e-12, early_stopping=1, monitor="val_loss"))
    assert r.metrics["stopped_early"] is True
    assert r.metrics["epochs_done"] == 2 and r.metrics["best_epoch"] == 1
    assert history_epochs(r.run_dir) == [1, 2]


def keys_anywhere(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from keys_anywhere(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from keys_anywhere(v)


@pytest.mark.slow
def test_best_pt_is_the_best_epoch_kept_by_ray_and_checkpoints_hold_one_copy(tno_small, tmp_path, ray_shared):
    """Epoch 1 is the best, by construction: with an LR of 1e-12 the cnn's float32 weights cannot move, so
    epoch 2's validation loss equals epoch 1's and is not an improvement. With --keep-checkpoints 1, Ray
    keeps both: the best epoch's checkpoint and the latest (the old policy kept the latest only). best.pt is
    epoch 1's checkpoint (its weights and its own metrics), last.pt epoch 2's, each checkpoint holds only
    its own epoch's weights, and the test split was scored with the best weights."""
    from stampray import preprocess as pp
    from stampray import splits
    from stampray import table as st
    from stampray.train import classification_metrics

    r = fit(small(tno_small, tmp_path, epochs=2, lr=1e-12, early_stopping=1, keep_checkpoints=1, name="best"))
    assert r.metrics["best_epoch"] == 1 and r.metrics["epochs_done"] == 2 and r.metrics["stopped_early"] is True
    run = tmp_path / "best"
    epochs = {name: torch.load(run / name / "model.pt", weights_only=True) for name in ("epoch-0001", "epoch-0002")}
    for bundle in epochs.values():
        keys = list(keys_anywhere(bundle))
        assert "best_state_dict" not in keys and keys.count("state_dict") == 1
    best, last = (torch.load(run / name, weights_only=True) for name in ("best.pt", "last.pt"))
    assert best["epoch"] == 1 and last["epoch"] == 2 and "train_state" not in best and "optimizer" not in best
    for got, want in ((best, epochs["epoch-0001"]), (last, epochs["epoch-0002"])):
        assert got["metrics"] == want["metrics"] and got["metrics"]["epoch"] == got["epoch"]
        assert got["state_dict"].keys() == want["state_dict"].keys()
        assert all(torch.equal(got["state_dict"][k], want["state_dict"][k]) for k in want["state_dict"])
    assert best["metrics"] == r.history[0] and last["metrics"] == r.history[1]
    # the final test numbers are those of the best weights
    tbl = st.read_table(tno_small)
    m = splits.mask(tbl, "test") & tbl.column(st.LABEL).is_valid().to_numpy(zero_copy_only=False)
    images = pp.get("course_scaled")(st.decode_images(tbl.column(st.IMAGE), (1, 21, 21))[m])
    model = ck.build_model(best)
    with torch.no_grad():
        probs = torch.softmax(model(torch.from_numpy(images)), 1).numpy()
    want = classification_metrics(probs, tbl.column(st.LABEL).to_numpy(zero_copy_only=False)[m].astype(np.int64), 2)
    assert r.metrics["test_n"] == want["n"] and abs(r.metrics["test_loss"] - want["loss"]) < 1e-5


@pytest.mark.slow
def test_worker_killed_mid_run_is_restarted_from_checkpoint(tno_small, tmp_path, ray_shared):
    import psutil

    settings = small(tno_small, tmp_path, epochs=5, max_failures=2, name="fault")
    killed = []

    def killer():
        # Kill one of *this* run's Train workers (its pids are in the run's own metrics) once epoch 3 is logged.
        # A worker's report waits until Ray Train's controller has taken the one before (a queue of one,
        # polled every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), so by then epoch 1's checkpoint is registered and
        # the restart must begin from a checkpoint.
        metrics = tmp_path / "fault" / "metrics.jsonl"
        deadline = time.time() + 240
        while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            time.sleep(0.05)
        pid = json.loads(metrics.read_text().splitlines()[-1])["worker_pids"][0]
        if "RayTrainWorker" in " ".join(psutil.Process(pid).cmdline()):
            os.kill(pid, signal.SIGKILL)  # a real process death, mid-run
            killed.append(pid)

    t = threading.Thread(target=killer)
    t.start()
    r = fit(settings)
    t.join()
    assert killed, "no Train worker process was found to kill"
    assert r.metrics["epochs_done"] == 5 and r.metrics["resumed_from"][0] >= 1
    epochs = history_epochs(r.run_dir)
    assert epochs[-1] == 5 and sorted(set(epochs)) == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_killed_driver_rerun_resumes(tno_small, tmp_path):
    """A run killed with its driver resumes from its last checkpoint when rerun, and counts on from there.
    Every tensor of a checkpoint is on the CPU (a GPU run's checkpoint loads on a laptop) and the AMP scaler's
    and the optimizer's states are saved, so the resumed run restores the optimizer after the model's device
    move."""
    cmd = [sys.executable, "-m", "stampray", "train", "--model", "cnn", "--data", tno_small, "--out", str(tmp_path),
           "--epochs", "3", "--batch-size", "64"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    # Kill once Ray has registered epoch 1's checkpoint (its checkpoint manager's snapshot names it): a
    # checkpoint directory alone may still be uploading, and the rerun could not resume from it.
    snapshot = tmp_path / "cnn" / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 240
    while time.time() < deadline and not (snapshot.exists() and "epoch-0001" in snapshot.read_text()):
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before epoch 1's checkpoint was registered"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the private Ray it started
    proc.wait()
    assert not os.path.exists(tmp_path / "cnn" / "summary.json")
    bundle = torch.load(tmp_path / "cnn" / "epoch-0001" / "model.pt", map_location="cpu", weights_only=True)
    assert "scaler" in bundle and bundle["optimizer"]["state"]

    def devices(obj):
        if isinstance(obj, torch.Tensor):
            yield obj.device.type
        elif isinstance(obj, (dict, list, tuple)):
            for v in (obj.values() if isinstance(obj, dict) else obj):
                yield from devices(v)

    assert set(devices(bundle)) == {"cpu"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    metrics = json.loads((tmp_path / "cnn" / "summary.json").read_text())["metrics"]
    assert f"resuming cnn from epoch {metrics['resumed_from'][0]}" in out.stdout + out.stderr
    assert metrics["epochs_done"] == 3 and len(metrics["resumed_from"]) == 1 and metrics["resumed_from"][0] >= 1
    epochs = history_epochs(str(tmp_path / "cnn"))
    assert epochs[-1] == 3 and sorted(set(epochs)) == [1, 2, 3]


def test_checkpoint_round_trip_gives_identical_predictions(tmp_path):
    torch.manual_seed(0)
    model = create_model("vgg6", 3, 21, 2).eval()
    path = str(tmp_path / "model.pt")
    ck.save(ck.make_bundle(model, class_names=["bogus", "real"], preprocess="standardize"), path)
    import stampray

    again = stampray.load_model(path)
    x = torch.randn(5, 3, 21, 21)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    assert again.stampray["class_names"] == ["bogus", "real"] and again.stampray["preprocess"] == "standardize"


def test_non_checkpoints_are_refused(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not a stampray checkpoint"):
        ck.load_model(str(tmp_path / "other.pt"))

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt", _use_new_zipfile_serialization=True)
    with pytest.raises(ValueError, match="is not a stampray checkpoint: it holds objects other than") as e:
        ck.load_model(str(tmp_path / "evil.pt"))
    assert "weights_only" not in str(e.value) and "stampray train" in str(e.value)  # no advice to load unsafely

    # A file that is not a checkpoint at all, or one cut short, is named as such, not as unsafe
    good = (tmp_path / "good.pt")
    ck.save(ck.make_bundle(create_model("cnn", 1, 21, 2), class_names=("noise", "source"), preprocess="course"),
            str(good))
    for name, data in (("empty.pt", b""), ("notes.txt", b"hello\n"), ("model.onnx", b"\x08\x07\x12\x07pytorch"),
                       ("cut.pt", good.read_bytes()[:2000])):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError) as e:
            ck.load_model(str(tmp_path / name))
        assert str(e.value) == (f"{tmp_path / name} is not a stampray checkpoint: it is not the zip archive that "
                                f"torch.save writes ({len(data):,} bytes: empty, cut short in a copy, or another "
                                f"format such as ONNX). Checkpoints are written by 'stampray train' (best.pt, "
                                f"last.pt, epoch-NNNN/model.pt) or stampray.checkpoint.save")
    import zipfile

    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:  # a zip archive, but not torch.save's
        z.writestr("notes.txt", "not a model")
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'other.zip'} is damaged and cannot be read as a "
                                         rf"checkpoint \(RuntimeError: .*\)\. Checkpoints are written by"):
        ck.load_model(str(tmp_path / "other.zip"))


def test_class_weights_are_inverse_frequencies():
    assert class_weights_from_counts({"0": 30, "1": 10}, 2) == [40 / 60, 40 / 20]
    assert class_weights_from_counts({"0": 5, "2": 15}, 3) == [20 / 15, 0.0, 20 / 45]
    with pytest.raises(ValueError, match="needs labelled stamps"):
        class_weights_from_counts({}, 2)


def test_augmentation_keeps_shape_and_is_off_in_eval():
    x = torch.arange(4 * 1 * 21 * 21, dtype=torch.float32).reshape(4, 1, 21, 21)
    aug = Augment(seed=3)
    aug.eval()
    assert torch.equal(aug(x), x)
    aug.train()
    y = aug(x)
    assert y.shape == x.shape and not torch.equal(y, x)
    # flips and quarter turns only permute pixels
    exact = Augment(shift=0.0, zoom=0.0, seed=4).train()
    z = exact(x)
    for i in range(4):
        assert torch.equal(torch.sort(z[i].flatten()).values, torch.sort(x[i].flatten()).values)


def test_resource_rule():  # the LR schedule is tested in test_train_parts.py
    assert resources(2, False, 2.0) == {"CPU": 0.5}  # a 2-CPU laptop keeps a CPU for reading
    assert resources(1, False, 2.0) == {"CPU": 1.0}
    assert resources(4, False, 16.0) == {"CPU": 3.0}
    assert resources(2, True, 16.0) == {"CPU": 1.0, "GPU": 1.0}


def test_model_data_mismatch_is_caught_before_training(tmp_path):
    from stampray.ingest import IngestSettings, ingest

    np.save(tmp_path / "tiny.npy", np.zeros((4, 10, 10), np.float32))
    ingest(IngestSettings(out=str(tmp_path / "d"), class_files=(("a", str(tmp_path / "tiny.npy")),),
                          classes=("a", "b")))
    with pytest.raises(ValueError, match="model 'cnn' needs stamps of at least 18x18 pixels, got 10x10"):
        fit(TrainSettings(model="cnn", data=str(tmp_path / "d"), out=str(tmp_path / "runs")))
    assert not os.path.exists(tmp_path / "runs")
