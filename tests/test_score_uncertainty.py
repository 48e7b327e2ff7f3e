"""#16.1 and 16.3a: uncertainty (--tta, --mc-dropout) and embeddings (--features) at scoring time, through the
same passes as stampray.predict."""

import json
from dataclasses import fields

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import stampray
from stampray import checkpoint as ck
from stampray import table as st
from stampray.models import create_model
from stampray.provenance import provenance
from stampray.score import ScoreSettings, block_seed, read_scores, result_schema, score

SPEC = st.StampSpec((1, 21, 21), ("noise", "source"))


def _integer_stamps(n: int, seed: int) -> np.ndarray:
    """Small-integer pixels: every sum the invariant model below makes is exact in float32, whatever its order."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 2, size=(n, 1, 21, 21)) * rng.integers(0, 4, size=(n, 1, 1, 1))
    x[::3, 0, 5:9, 2:12] = 3  # a bar: not symmetric under quarter turns
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def stamps(tmp_path_factory, write_stamps):
    """96 stamps in two shards of 48, and a third shard of no rows; returns (table path, images)."""
    x = _integer_stamps(96, 0)
    path = write_stamps(tmp_path_factory.mktemp("data") / "d", x, labels=[0, 1] * 48, shard_rows=48)
    st.write_shard(st.join(path, "part-00002.parquet"), st.make_table(SPEC, [], x[:0], []))
    m = st.read_manifest(path)
    m.shards.append({"path": "part-00002.parquet", "rows": 0})
    st.write_text(st.join(path, st.MANIFEST_NAME), m.to_json())
    return path, x


@pytest.fixture(scope="module")
def cnn_ckpt(tmp_path_factory, make_checkpoint):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "cnn.pt")


@pytest.fixture(scope="module")
def tta_scores(stamps, cnn_ckpt, tmp_path_factory, ray_shared):
    """One scored output, shared: the cnn with --tta 8 --features."""
    out = str(tmp_path_factory.mktemp("scores") / "tta")
    r = score(ScoreSettings(model=cnn_ckpt, data=stamps[0], out=out, tta=8, features=True, progress=False))
    assert r.scored == 96 and r.set_aside == 0
    return out


def _by_id(table: pa.Table) -> pa.Table:
    """Rows in stamp order (s0, s1, ...)."""
    order = np.argsort([int(i[1:]) for i in table.column("stamp_id").to_pylist()])
    return table.take(pa.array(order))


@pytest.mark.slow
def test_score_with_tta_equals_predict_with_tta(tta_scores, stamps, cnn_ckpt):
    got = _by_id(read_scores(tta_scores))
    want = stampray.predict(cnn_ckpt, stamps[1], tta=8)
    for col in ("p_noise", "p_source", "p_noise_std", "p_source_std"):
        assert got.schema.field(col).type == pa.float32()
        np.testing.assert_allclose(got.column(col).to_numpy(), want.column(col).to_numpy(), atol=1e-5)
    std = got.column("p_source_std").to_numpy()
    assert (std[::3] > 0).all()  # the stamps with a bar: the cnn is not invariant under the flips and turns
    np.testing.assert_allclose(got.column("p_noise").to_numpy() + got.column("p_source").to_numpy(), 1.0, atol=1e-5)
    np.testing.assert_allclose(got.column("p_noise_std").to_numpy(), std, atol=1e-6)  # two classes: the same spread


@pytest.mark.slow
def test_features_are_the_forward_features_of_each_stamp(tta_scores, stamps, cnn_ckpt):
    got = _by_id(read_scores(tta_scores))
    net = ck.load_model(cnn_ckpt)
    from stampray import preprocess as pp

    with torch.no_grad():
        want = net.forward_features(torch.from_numpy(pp.get("course")(stamps[1]))).numpy()
    assert want.shape == (96, 16)  # 16 filters over a 1x1 map at 21x21
    assert got.schema.field("features").type == pa.list_(pa.float32(), 16)
    feats = np.array(got.column("features").to_pylist(), np.float32)
    np.testing.assert_allclose(feats, want, atol=1e-5)
    plain = stampray.predict(cnn_ckpt, stamps[1], features=True)
    np.testing.assert_allclose(feats, np.array(plain.column("features").to_pylist(), np.float32), atol=1e-5)


@pytest.mark.slow
def test_every_result_file_has_the_same_columns_and_the_manifest_records_the_passes(tta_scores, stamps):
    schema = result_schema(("noise", "source"), spread=True, feature_width=16)
    for name in ("part-00000.parquet", "part-00001.parquet", "part-00002.parquet"):  # the last holds no rows
        assert pq.read_schema(st.join(tta_scores, name)).remove_metadata() == schema, name
    assert pq.read_metadata(st.join(tta_scores, "part-00002.parquet")).num_rows == 0
    doc = json.loads(st.read_text(st.join(tta_scores, "_manifest.json")))
    assert (doc["tta"], doc["mc_dropout"], doc["features"], doc["feature_width"]) == (8, 0, True, 16)
    assert (doc["settings"]["tta"], doc["settings"]["mc_dropout"], doc["settings"]["features"]) == (8, 0, True)
    assert doc["settings"]["provenance"] == provenance()
    assert set(provenance()) == {"stampray", "ray", "torch", "python", "git_commit"}


@pytest.mark.slow
def test_a_rescore_with_other_passes_is_refused(tta_scores, stamps, cnn_ckpt):
    base = dict(model=cnn_ckpt, data=stamps[0], out=tta_scores, progress=False)
    for changed, said in [({"tta": 4, "features": True}, "tta: 8 vs 4"), ({"tta": 8}, "features: True vs False"),
                          ({"features": True}, "tta: 8 vs 0")]:
        with pytest.raises(ValueError, match=f"holds results of another job \\({said}\\); choose another --out, or "
                                             f"pass --overwrite"):
            score(ScoreSettings(**base, **changed))
    again = score(ScoreSettings(**base, tta=8, features=True))  # the same job: complete, no work
    assert again.nothing_to_do and again.scored == 96


@pytest.mark.slow
def test_tta_on_a_model_invariant_under_the_symmetries_has_no_spread(stamps, tmp_path, ray_shared):
    """A dense net whose head weighs every pixel alike sees a stamp's pixels as a set: the eight flips and
    turns give it the same numbers, bit for bit (integer pixels and dyadic weights keep every sum exact)."""
    g = torch.Generator().manual_seed(0)
    net = create_model("dense", 1, 21, 2)
    with torch.no_grad():
        c1, c2 = net.features[0], net.features[2]
        c1.weight.copy_(torch.randint(0, 2, c1.weight.shape, generator=g))
        c2.weight.copy_(torch.randint(-1, 2, c2.weight.shape, generator=g))
        k = torch.randint(-2, 3, (2, 30), generator=g).float() / 2 ** 17
        net.head.weight.copy_(k[:, :, None].expand(2, 30, 21 * 21).reshape(2, -1))
        for layer in (c1, c2, net.head):
            layer.bias.zero_()
    path = str(tmp_path / "invariant.pt")
    ck.save(ck.make_bundle(net, class_names=("noise", "source"), preprocess="none"), path)
    x = stamps[1]
    assert stampray.predict(path, x, tta=9)["p_source_std"].to_numpy().max() > 1e-4  # a shift is no symmetry
    out = str(tmp_path / "s")
    score(ScoreSettings(model=path, data=stamps[0], out=out, tta=8, progress=False))
    got = _by_id(read_scores(out))
    assert got.column("p_source_std").to_numpy().max() <= 1e-7
    assert got.column("p_noise_std").to_numpy().max() <= 1e-7
    plain = stampray.predict(path, x)
    p = got.column("p_source").to_numpy()
    np.testing.assert_allclose(p, plain.column("p_source").to_numpy(), atol=1e-6)
    assert p.max() - p.min() > 0.05  # the stamps do get different scores


def test_mc_dropout_is_refused_for_a_model_without_dropout_before_any_work(stamps, cnn_ckpt, tmp_path):
    out = tmp_path / "s"
    with pytest.raises(ValueError, match="--mc-dropout needs dropout layers, and StudioCNN has none; use --tta "
                                         "instead"):
        score(ScoreSettings(model=cnn_ckpt, data=stamps[0], out=str(out), mc_dropout=4))
    assert not out.exists()


@pytest.mark.slow
def test_mc_dropout_varies_the_passes_and_equals_predict_under_the_blocks_seed(tmp_path, make_checkpoint,
                                                                              write_stamps, ray_shared):
    """A block's dropout masks come from a generator seeded by its first row, so predict on the same stamps
    from the same seed draws the same masks (one shard of one row group: one block)."""
    ckpt = make_checkpoint(tmp_path / "vgg6.pt", name="vgg6")
    x = _integer_stamps(48, 1)
    data = write_stamps(tmp_path / "d", x)
    out = str(tmp_path / "s")
    score(ScoreSettings(model=ckpt, data=data, out=out, mc_dropout=4, progress=False))
    got = _by_id(read_scores(out))
    assert got.column_names == ["stamp_id", "label", "split", "pred", "pred_name", "p_noise", "p_source",
                                "p_noise_std", "p_source_std", "model"]
    p = np.stack([got.column("p_noise").to_numpy(), got.column("p_source").to_numpy()], 1)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-6)
    assert (got.column("p_source_std").to_numpy() > 0).all()
    model = stampray.load_model(ckpt)
    want = stampray.predict(model, x, mc_dropout=4, seed=block_seed("part-00000.parquet", 0))  # its one batch
    for col in ("p_noise", "p_source", "p_noise_std", "p_source_std"):
        np.testing.assert_allclose(got.column(col).to_numpy(), want.column(col).to_numpy(), atol=1e-5)


def test_pass_settings_are_checked_on_construction():
    base = dict(model="m.pt", data="d", out="o")
    for bad in ({"tta": -1}, {"mc_dropout": -2}, {"tta": True}, {"tta": 2.5}):
        name = "--tta" if "tta" in bad else "--mc-dropout"
        with pytest.raises(ValueError, match=f"{name} counts passes: an integer >= 0 \\(0: one plain pass\\), got"):
            ScoreSettings(**base, **bad)
    with pytest.raises(ValueError, match="--tta 8 and --mc-dropout 4: choose one"):
        ScoreSettings(**base, tta=8, mc_dropout=4)
    assert ScoreSettings(**base, tta=np.int64(8)).passes == 8 and ScoreSettings(**base).passes == 1


def test_every_score_setting_is_documented():
    from stampray.settings import field_help

    assert set(field_help(ScoreSettings)) == {f.name for f in fields(ScoreSettings)}


def test_tta_is_refused_on_stamps_that_are_not_square():
    from stampray.notebook import check_passes

    with pytest.raises(ValueError, match="--tta needs square stamps .* the model takes 21x30 stamps"):
        check_passes(create_model("dense", 1, (21, 30), 2), 8, 0)
    check_passes(create_model("dense", 1, (21, 30), 2), 1, 0)  # the identity alone turns nothing


def test_tta_is_refused_beyond_the_shifts_of_half_the_stamp():
    from stampray.notebook import check_passes, symmetry, tta_max

    net = create_model("cnn", 1, 21, 2)
    assert tta_max(21, 21) == 88 and tta_max(20, 20) == 80 and tta_max(1, 1) == 8
    check_passes(net, 88, 0)
    with pytest.raises(ValueError, match=r"^--tta 89: at most 88 for 21x21 stamps .* up to half the stamp, 10 "
                                         r"pixels, in 8 directions\); 8 is the usual choice$"):
        check_passes(net, 89, 0)
    x = torch.arange(441, dtype=torch.float32).reshape(1, 1, 21, 21)
    last = symmetry(x, 87)[0, 0]  # the last one allowed: 10 pixels up and left; 11 rows and columns of the stamp
    assert torch.equal(last[:11, :11], x[0, 0, 10:, 10:])
    assert torch.equal(last[11:, 11:], x[0, 0, 20:, 20:].expand(10, 10))  # the edge repeated


@pytest.mark.slow
def test_a_compiled_replica_scores_the_k_variants_in_its_one_shape(monkeypatch, tmp_path, make_checkpoint):
    """With --tta K a compiled replica takes chunk // K stamps per forward, so the K x rows variants keep the
    one compiled shape; its numbers are predict's."""
    from stampray.inference import ModelActor

    ckpt = make_checkpoint(tmp_path / "cnn.pt")
    monkeypatch.setattr("ray.get_runtime_context", lambda: type("C", (), {"get_node_id": lambda self: "n"})())
    shapes = []
    real = ModelActor._run

    def spy(self, part, eager=False):
        assert not eager  # a part of 1 stamp is half the shape of 2: padded, not run uncompiled
        shapes.append(len(part))
        return real(self, part, eager)

    monkeypatch.setattr(ModelActor, "_run", spy)
    actor = ModelActor(open(ckpt, "rb").read(), compile=True, chunk=16, tta=8, features=True)
    assert actor.compiled and actor.rows == 2
    x = _integer_stamps(5, 2)
    out = actor.predict(x)
    assert shapes == [2, 2, 2, 2]  # the warm-up, then 5 stamps in chunks of 2 (the last padded)
    want = stampray.predict(ckpt, x, tta=8, features=True)
    np.testing.assert_allclose(out.probs[:, 1], want.column("p_source").to_numpy(), atol=1e-5)
    np.testing.assert_allclose(out.std[:, 1], want.column("p_source_std").to_numpy(), atol=1e-5)
    np.testing.assert_allclose(out.features, np.array(want.column("features").to_pylist()), atol=1e-5)
