"""The GPU path on a machine without CUDA (issue #19): what a CPU can show."""

import numpy as np
import pytest
import torch


@pytest.mark.slow
def test_use_gpu_on_a_node_whose_torch_has_no_cuda_stops_with_one_line(tmp_path, run_scenario):
    """A Ray node that advertises a GPU while its torch cannot use CUDA (here: a private Ray started with
    num_gpus=1 and the CPU wheel) must not score or train on the CPU: score, occlude and train stop with one
    line naming the node, before any work."""
    import torch

    from stampray import checkpoint as ck
    from stampray.models import create_model
    from stampray.synth import SynthSettings, synth

    data, model = str(tmp_path / "t"), str(tmp_path / "m.pt")
    synth(SynthSettings(out=data, n=50, seed=1, shard_rows=50))
    ck.save(ck.make_bundle(create_model("cnn", 1, 21, 2), class_names=("noise", "source"), preprocess="course"),
            model)
    result, _ = run_scenario(f"""
        import contextlib, io, json, os, ray
        ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="ERROR")
        from stampray.cli import main
        out = {{}}
        for verb in ("score", "occlude", "train"):
            err = io.StringIO()
            args = (["--model", {model!r}, "--no-progress"] if verb != "train" else ["--model", "cnn", "--epochs", "1"])
            with contextlib.redirect_stderr(err):
                code = main([verb, *args, "--data", {data!r}, "--out", {str(tmp_path)!r} + "/" + verb, "--use-gpu"])
            out[verb] = [code, err.getvalue(), sorted(os.listdir({str(tmp_path)!r} + "/" + verb))
                         if os.path.isdir({str(tmp_path)!r} + "/" + verb) else None]
        print("RESULT " + json.dumps(out))
    """, timeout=300)
    for verb in ("score", "occlude", "train"):
        code, err, files = result[verb]
        assert code == 2, err
        assert "--use-gpu: node 1" in err and "was given a GPU by Ray but its torch" in err
        assert f"torch {torch.__version__} cannot use CUDA (a CPU-only build (torch.version.cuda is None)" in err
        assert "install a CUDA build of torch matching the node's driver" in err
        assert "Traceback" not in err and len([x for x in err.splitlines() if "stampray" in x]) == 1
        assert not any(f.startswith("part-") for f in files or [])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine whose torch has no CUDA")
@pytest.mark.parametrize("verb", ["score", "occlude"])
def test_use_gpu_in_process_without_cuda_is_one_line_naming_this_machine(verb, tno_small, make_checkpoint,
                                                                          tmp_path, capsys, monkeypatch):
    """--in-process on --use-gpu where torch has no CUDA: one line that speaks of this machine, not of a Ray
    node (there is no Ray), and nothing scored or mapped: the --out it created is gone again."""
    import socket

    import ray

    from stampray.cli import main

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a process that never started Ray
    out = tmp_path / verb
    code = main([verb, "--model", make_checkpoint(tmp_path / "m.pt"), "--data", tno_small, "--out", str(out),
                 "--use-gpu", "--in-process", "on", "--no-progress"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("stampray ")]
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"stampray {verb}: error: --use-gpu: this machine ({socket.gethostname()}) has no "
                             f"GPU that its torch {torch.__version__} can use (a CPU-only build"), err
    assert err[0].endswith("install a CUDA build of torch matching its driver, or run without --use-gpu")
    assert not out.exists()


@pytest.mark.slow
def test_compile_warm_up_takes_the_path_real_batches_take(monkeypatch):
    """The compiled model is warmed up through ``_run`` (device copy, autocast, channels-last), the one
    place real batches call the model, so the first real batch does not recompile."""
    import io

    import torch

    from stampray import checkpoint as ck
    from stampray.inference import ModelActor
    from stampray.models import create_model

    bundle = ck.make_bundle(create_model("cnn", 1, 21, 2), class_names=("a", "b"), preprocess="course")
    buf = io.BytesIO()
    torch.save(bundle, buf)
    calls = []
    real = ModelActor._run

    def spy(self, part, eager=False):
        calls.append((len(part), self.compiled and not eager))  # (rows, ran compiled)
        return real(self, part, eager)

    monkeypatch.setattr(ModelActor, "_run", spy)
    monkeypatch.setattr("ray.get_runtime_context", lambda: type("C", (), {"get_node_id": lambda self: "n"})())
    actor = ModelActor(buf.getvalue(), compile=True, chunk=8)
    assert calls == [(8, True)] and actor.compiled
    probs = actor.probabilities(np.zeros((3, 1, 21, 21), np.float32))
    assert calls[1] == (8, True) and probs.shape == (3, 2)  # padded to the compiled shape, same path
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_epoch_sums_live_on_the_training_device():
    """all_reduce under NCCL takes CUDA tensors only: the sums are made on the worker's device."""
    import torch

    from stampray.train import epoch_sums

    assert epoch_sums(torch.device("meta")).device.type == "meta"
    assert epoch_sums(torch.device("cpu")).dtype == torch.float64


@pytest.mark.parametrize("name", ["course", "course_scaled", "none", "standardize"])
@pytest.mark.parametrize("size", [21, 64])
def test_the_torch_preprocessing_equals_the_numpy_one(name, size):
    """A GPU replica normalises raw pixels on the device with the torch version of the checkpoint's step:
    the same numbers as the numpy step (constant and all-zero stamps included)."""
    import torch

    from stampray import preprocess as pp

    x = np.random.default_rng(size).normal(3.0, 2.0, size=(40, 2, size, size)).astype(np.float32)
    x[3] = 1.0
    x[5, 1] = 0.0
    x[7, 0, :4] = 50.0
    expected = pp.get(name)(x)
    got = pp.get_torch(name)(torch.from_numpy(x))
    assert got.dtype == torch.float32 and tuple(got.shape) == x.shape
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-7)


def test_the_default_training_batch_is_chosen_per_device():
    from stampray.train import BATCH_CPU, BATCH_GPU, TrainSettings

    assert (BATCH_CPU, BATCH_GPU) == (128, 512)
    assert TrainSettings(model="cnn", data="d", out="o").batch_size == 128
    assert TrainSettings(model="cnn", data="d", out="o", use_gpu=True).batch_size == 512
    assert TrainSettings(model="cnn", data="d", out="o", use_gpu=True, batch_size=64).batch_size == 64


def test_validation_parts_are_disjoint_and_cover_the_split():
    """Each worker predicts its own part of validation and test: the parts of 3 workers are disjoint,
    together hold every id, and are close to even."""
    from stampray.batches import part_mask

    ids = [f"tno-{i:06d}" for i in range(3000)]
    parts = [part_mask(ids, (r, 3)) for r in range(3)]
    assert (sum(p.astype(int) for p in parts) == 1).all()
    assert all(900 < p.sum() < 1100 for p in parts)
    assert part_mask(ids, (0, 1)).all() and part_mask(ids, None).all()


@pytest.mark.slow
def test_raw_batches_set_aside_the_same_rows_as_normalised_ones(ray_shared):
    """With normalisation on the device, the read tasks pass raw pixels but set aside exactly the stamps
    that are non-finite before or after normalisation, with the same reasons; the device's normalisation of
    the raw batch equals the read tasks' one."""
    import torch

    from stampray import preprocess as pp
    from stampray import splits
    from stampray import table as st
    from stampray.batches import SetAside, prepare_batch

    rng = np.random.default_rng(0)
    images = rng.normal(size=(12, 1, 21, 21)).astype(np.float32)
    images[3, 0, 2, 2] = np.nan
    images[5, 0, :10] = 3e38  # finite, but the normalisation overflows
    images[5, 0, 10:] = -3e38
    spec = st.StampSpec((1, 21, 21), ("a", "b"))
    batch = st.make_table(spec, [f"s{i}" for i in range(12)], images, list(np.arange(12) % 2), split=["train"] * 12)
    listings = []
    outs = []
    for raw in (False, True):
        ledger = ray_shared.remote(num_cpus=0)(SetAside).remote()
        outs.append(prepare_batch(batch, "train", splits.DEFAULT_FRACTIONS, spec.shape, "course_scaled",
                                  ledger=ledger, raw=raw))
        listings.append(ray_shared.get(ledger.listing.remote()))
        ray_shared.kill(ledger)
    assert listings[0] == listings[1] and [r["stamp_id"] for r in listings[0]] == ["s3", "s5"]
    assert listings[1][1]["reason"].startswith("nonfinite: ") and "after course_scaled" in listings[1][1]["reason"]
    normalised, raw = outs
    assert raw["y"].tolist() == normalised["y"].tolist() and len(raw["y"]) == 10
    keep = [i for i in range(12) if i not in (3, 5)]
    assert np.array_equal(raw["x"], images[keep])
    on_device = pp.get_torch("course_scaled")(torch.from_numpy(raw["x"])).numpy()
    np.testing.assert_allclose(on_device, normalised["x"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_two_workers_share_validation_and_normalise_on_the_device(tmp_path, ray_shared):
    """Two workers, normalisation on the device (the GPU default, run here on the CPU): validation and
    test are each predicted in two disjoint parts, no row lost or counted twice, and the metrics equal
    those of the saved best checkpoint recomputed in one piece with the read tasks' numpy normalisation."""
    import torch

    from stampray import checkpoint as ck
    from stampray import preprocess as pp
    from stampray import splits
    from stampray import table as st
    from stampray.synth import SynthSettings, synth
    from stampray.train import TrainSettings, classification_metrics, fit

    data = str(tmp_path / "t")
    synth(SynthSettings(out=data, n=600, seed=3, shard_rows=300))
    r = fit(TrainSettings(model="cnn", data=data, out=str(tmp_path / "runs"), epochs=1, batch_size=64, workers=2,
                          cpus_per_worker=0.5, preprocess_on="device"))
    tbl = st.read_table(data)
    images = st.decode_images(tbl.column(st.IMAGE), (1, 21, 21))
    labels = tbl.column(st.LABEL).to_numpy()
    bundle = ck.load_bundle(r.best)
    model = ck.build_model(bundle).eval()
    for split, n_key, loss_key, acc_key in (("val", "val_n", "val_loss", "val_acc"),
                                            ("test", "test_n", "test_loss", "test_acc")):
        m = splits.mask(tbl, split)
        with torch.no_grad():
            probs = torch.softmax(model(torch.from_numpy(pp.get("course_scaled")(images[m]))), 1).numpy()
        want = classification_metrics(probs, labels[m].astype(np.int64), 2)
        got = r.history[0] if split == "val" else r.metrics
        assert got[n_key] == int(m.sum())
        assert abs(got[loss_key] - want["loss"]) < 1e-4 and abs(got[acc_key] - want["acc"]) < 1e-9
