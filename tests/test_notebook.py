"""#16.1, 16.4, 16.5: stampray.predict in a notebook (tta, mc-dropout, features) and stampray export --onnx."""

import json

import numpy as np
import pytest
import torch

import stampray
from stampray import checkpoint as ck
from stampray import preprocess as pp
from stampray import table as st
from stampray.models import create_model
from stampray.notebook import symmetry


def _checkpoint(tmp_path, name="cnn", size=21, classes=("noise", "source")):
    torch.manual_seed(0)
    path = str(tmp_path / f"{name}.pt")
    ck.save(ck.make_bundle(create_model(name, 1, size, len(classes)), class_names=list(classes),
                           preprocess="course_scaled"), path)
    return path


def _stamps(n, size=21, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, 1, size, size)).astype(np.float32)
    x[::2, 0, size // 2, size // 2] += 15.0
    return x


def _plain(model_path, x):
    m = ck.load_model(model_path)
    with torch.no_grad():
        return torch.softmax(m(torch.from_numpy(pp.get("course_scaled")(x))), 1).numpy()


def test_predict_applies_the_checkpoints_preprocessing(tmp_path):
    path = _checkpoint(tmp_path)
    x = _stamps(10)
    t = stampray.predict(path, x)
    assert t.column_names == ["p_noise", "p_source"]
    got = np.stack([t["p_noise"].to_numpy(), t["p_source"].to_numpy()], 1)
    np.testing.assert_allclose(got, _plain(path, x), atol=1e-6)
    t2 = stampray.predict(stampray.load_model(path), x[:, 0])  # a loaded model, (N, H, W)
    np.testing.assert_allclose(t2["p_source"].to_numpy(), got[:, 1], atol=1e-6)
    with pytest.raises(ValueError, match=r"images of shape \(3, 1, 20, 20\) do not fit the model's input \(1, 21, 21\)"):
        stampray.predict(path, np.zeros((3, 1, 20, 20), np.float32))
    with pytest.raises(ValueError, match="give a checkpoint path or a model from stampray.load_model"):
        stampray.predict(create_model("cnn", 1, 21, 2), x)


def test_the_tta_transforms_are_the_eight_symmetries_then_shifts():
    x = torch.arange(9, dtype=torch.float32).reshape(1, 1, 3, 3)
    seen = {tuple(symmetry(x, k).flatten().tolist()) for k in range(8)}
    assert len(seen) == 8 and torch.equal(symmetry(x, 0), x)
    assert symmetry(x, 8)[0, 0].tolist() == [[0, 0, 1], [3, 3, 4], [6, 6, 7]]  # one pixel right, edge repeated
    assert symmetry(x, 9)[0, 0].tolist() == [[0, 1, 2], [0, 1, 2], [3, 4, 5]]  # one pixel down


def test_tta_averages_the_transformed_passes_and_reports_their_spread(tmp_path):
    path = _checkpoint(tmp_path)
    x = _stamps(6)
    t = stampray.predict(path, x, tta=8)
    m = ck.load_model(path)
    with torch.no_grad():
        base = torch.from_numpy(pp.get("course_scaled")(x))
        each = np.stack([torch.softmax(m(symmetry(base, k)), 1).numpy() for k in range(8)])
    np.testing.assert_allclose(t["p_source"].to_numpy(), each[:, :, 1].mean(0), atol=1e-6)
    np.testing.assert_allclose(t["p_source_std"].to_numpy(), each[:, :, 1].std(0), atol=1e-6)
    plain = stampray.predict(path, x, tta=1)
    np.testing.assert_allclose(plain["p_source"].to_numpy(), _plain(path, x)[:, 1], atol=1e-6)


def test_mc_dropout_needs_dropout_and_varies_the_passes(tmp_path):
    with pytest.raises(ValueError, match=r"^predict: mc_dropout needs dropout layers, and StudioCNN has none; use tta"):
        stampray.predict(_checkpoint(tmp_path), _stamps(2), mc_dropout=4)
    path = _checkpoint(tmp_path, "vgg6")
    x = _stamps(5)
    t = stampray.predict(path, x, mc_dropout=16)
    assert (t["p_source_std"].to_numpy() > 0).all()
    model = stampray.load_model(path)
    assert not any(mod.training for mod in model.modules())  # back in eval mode after the passes
    again = stampray.predict(model, x)
    np.testing.assert_allclose(again["p_source"].to_numpy(), _plain(path, x)[:, 1], atol=1e-6)


def test_mc_dropout_passes_are_seeded_and_torchs_generator_left_as_it_was(tmp_path):
    model = stampray.load_model(_checkpoint(tmp_path, "vgg6"))
    x = _stamps(6)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = stampray.predict(model, x, mc_dropout=8)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is untouched
    b = stampray.predict(model, x, mc_dropout=8)
    assert a.equals(b)  # the same call, the same numbers
    c = stampray.predict(model, x, mc_dropout=8, seed=1)
    assert not np.array_equal(a["p_source"].to_numpy(), c["p_source"].to_numpy())
    torch.manual_seed(5)
    d = stampray.predict(model, x, mc_dropout=8, seed=None)  # torch's own generator, as seeded by the caller
    torch.manual_seed(5)
    assert d.equals(stampray.predict(model, x, mc_dropout=8, seed=None))


PASSES = "counts passes: an integer >= 0 (0: one plain pass), got"


@pytest.mark.parametrize("kw, shown", [({"tta": 2.5}, f"tta {PASSES} 2.5"), ({"tta": "8"}, f"tta {PASSES} '8'"),
                                       ({"tta": True}, f"tta {PASSES} True"),
                                       ({"mc_dropout": -1}, f"mc_dropout {PASSES} -1"),
                                       ({"seed": 1.5}, "seed is an integer, or None for torch's own generator; got "
                                                       "1.5")])
def test_pass_counts_and_seeds_of_another_type_are_refused(tmp_path, kw, shown):
    with pytest.raises(ValueError, match=f"^predict: {shown}$".replace("(", r"\(").replace(")", r"\)")):
        stampray.predict(_checkpoint(tmp_path), _stamps(2), **kw)
    assert stampray.predict(_checkpoint(tmp_path), _stamps(2), tta=np.int64(2)).num_rows == 2


def test_stamps_without_finite_probabilities_are_warned_of_and_the_rest_kept(tmp_path):
    path = _checkpoint(tmp_path)
    x = _stamps(6)
    x[2, 0, 3, 3] = np.nan
    x[5, 0, 0, 0] = np.inf
    with pytest.warns(RuntimeWarning, match=r"^predict: 2 of 6 stamps have no finite probabilities \(non-finite "
                                            r"pixels, or values too large"):
        t = stampray.predict(path, x)
    p = t["p_source"].to_numpy()
    assert np.isnan(p[[2, 5]]).all() and np.isfinite(p[[0, 1, 3, 4]]).all()
    np.testing.assert_allclose(p[[0, 1, 3, 4]], _plain(path, x[[0, 1, 3, 4]])[:, 1], atol=1e-6)


def test_features_are_the_forward_features_vector(tmp_path):
    path = _checkpoint(tmp_path)
    x = _stamps(4)
    t = stampray.predict(path, x, features=True)
    m = ck.load_model(path)
    with torch.no_grad():
        want = m.forward_features(torch.from_numpy(pp.get("course_scaled")(x))).numpy()
    got = np.array(t["features"].to_pylist(), np.float32)
    assert t.schema.field("features").type.list_size == want.shape[1]
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_predict_reads_a_stamp_table_by_path(tmp_path):
    path = _checkpoint(tmp_path)
    x = _stamps(30)
    spec = st.StampSpec((1, 21, 21), ("noise", "source"))
    w = st.StampWriter(str(tmp_path / "d"), spec, rows_per_shard=12)
    w.write(st.make_table(spec, [f"s{i}" for i in range(30)], x))
    w.close()
    t = stampray.predict(path, str(tmp_path / "d"))
    assert t["stamp_id"].to_pylist() == [f"s{i}" for i in range(30)]
    np.testing.assert_allclose(t["p_source"].to_numpy(), _plain(path, x)[:, 1], atol=1e-6)


@pytest.mark.slow
def test_export_writes_onnx_that_matches_pytorch(tmp_path, capsys):
    import onnx
    import onnxruntime as ort

    from stampray.cli import main

    path = _checkpoint(tmp_path, "cnn", classes=("noise", "source"))
    out = str(tmp_path / "m.onnx")
    assert main(["export", "--model", path, "--onnx", out]) == 0
    assert "onnxruntime matches PyTorch within" in capsys.readouterr().out
    meta = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert meta["stampray.preprocess"] == "course_scaled"
    assert json.loads(meta["stampray.class_names"]) == ["noise", "source"]
    assert json.loads(meta["stampray.input_shape"]) == [1, 21, 21]
    sess = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    for n in (1, 37):  # the batch axis is dynamic
        x = _stamps(n, seed=n)
        got = sess.run(["probabilities"], {"input": pp.get("course_scaled")(x)})[0]
        np.testing.assert_allclose(got, _plain(path, x), atol=1e-5)
