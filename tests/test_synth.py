import numpy as np
import pytest

from stampray import synth as sy
from stampray import table as st
from stampray.synth import SynthSettings, synth


def test_same_seed_same_survey_whatever_the_sharding(tmp_path):
    synth(SynthSettings(out=str(tmp_path / "a"), n=2500, seed=3, shard_rows=1000))
    synth(SynthSettings(out=str(tmp_path / "b"), n=2500, seed=3, shard_rows=777))
    synth(SynthSettings(out=str(tmp_path / "c"), n=2500, seed=4, shard_rows=1000))
    a, b, c = (st.read_table(str(tmp_path / k)) for k in "abc")
    assert a.column("stamp_id").to_pylist() == b.column("stamp_id").to_pylist()
    assert a.column("stamp_id").to_pylist()[:2] == ["tno-s3-000000000", "tno-s3-000000001"]
    np.testing.assert_array_equal(st.decode_images(a.column("image"), (1, 21, 21)),
                                  st.decode_images(b.column("image"), (1, 21, 21)))
    assert a.column("snr").to_pylist() == b.column("snr").to_pylist()
    assert not np.array_equal(st.decode_images(a.column("image"), (1, 21, 21)),
                              st.decode_images(c.column("image"), (1, 21, 21)))


def test_tno_snr_range_balance_and_lookalikes(tmp_path):
    m = synth(SynthSettings(out=str(tmp_path), n=6000, seed=0))
    tbl = st.read_table(str(tmp_path))
    label = tbl.column("label").to_numpy()
    snr = tbl.column("snr").to_numpy()
    assert m.spec.shape == (1, 21, 21) and m.spec.class_names == ("noise", "source")
    assert snr[label == 1].min() >= 3.0 and snr[label == 1].max() <= 100.0
    assert snr[label == 1].min() < 3.5 and snr[label == 1].max() > 80  # the whole range is covered
    assert (snr[label == 0] == 0).all()
    assert abs(label.mean() - 0.45) < 0.03
    kinds = set(tbl.filter(tbl.column("label").to_numpy() == 0).column("artifact").to_pylist())
    assert kinds == set(sy.TNO_ARTIFACTS)
    fwhm = tbl.column("fwhm").to_numpy()[label == 1]
    assert fwhm.min() >= 2.0 and fwhm.max() <= 4.0


def test_positive_fraction_is_configurable(tmp_path):
    synth(SynthSettings(out=str(tmp_path), n=3000, positive_fraction=0.2))
    assert abs(st.read_table(str(tmp_path)).column("label").to_numpy().mean() - 0.2) < 0.03


def test_sources_are_brighter_in_the_centre(tmp_path):
    synth(SynthSettings(out=str(tmp_path), n=3000, seed=2))
    tbl = st.read_table(str(tmp_path))
    img = st.decode_images(tbl.column("image"), (1, 21, 21))[:, 0]
    label = tbl.column("label").to_numpy()
    snr = tbl.column("snr").to_numpy()
    centre = img[:, 9:12, 9:12].mean(axis=(1, 2))
    assert centre[(label == 1) & (snr > 20)].mean() > centre[label == 0].mean() + 1.0


def test_radio_four_morphologies(tmp_path):
    m = synth(SynthSettings(out=str(tmp_path), kind="radio", n=400, seed=1))
    tbl = st.read_table(str(tmp_path))
    assert m.spec.shape == (1, 64, 64)
    assert m.spec.class_names == ("extended", "point", "double", "triple")
    assert sorted(set(tbl.column("label").to_pylist())) == [0, 1, 2, 3]


def test_parallel_ray_generation_matches_local(tmp_path, ray_shared, monkeypatch):
    synth(SynthSettings(out=str(tmp_path / "local"), n=1200, seed=5, shard_rows=500))
    monkeypatch.setattr(sy, "LOCAL_LIMIT", 100)
    m = synth(SynthSettings(out=str(tmp_path / "ray"), n=1200, seed=5, shard_rows=500))
    assert [s["rows"] for s in m.shards] == [500, 500, 200]
    a, b = st.read_table(str(tmp_path / "local")), st.read_table(str(tmp_path / "ray"))
    assert a.equals(b)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="--kind must be one of tno, radio"):
        SynthSettings(out="x", kind="sdss")
    with pytest.raises(ValueError, match="--positive-fraction must lie in"):
        SynthSettings(out="x", positive_fraction=1.5)


def test_max_offset_and_trail_move_and_smear_the_sources():
    from stampray.synth import generate

    def peaks(**kw):
        d = generate("tno", 5, 0, 2000, **kw)
        keep = (d["label"] == 1) & (d["metadata"]["snr"] > 40) & (d["metadata"]["artifact"] == "none")
        img = d["images"][keep, 0]
        flat = img.reshape(len(img), -1).argmax(axis=1)
        return np.hypot(flat // 21 - 10, flat % 21 - 10), img

    near, _ = peaks()
    assert near.max() <= 1.5  # the default: sub-pixel offsets, the brightest pixel next to the centre
    far, _ = peaks(max_offset=4.0)
    assert far.max() > 2.5 and far.max() <= 4.0 + 1.5 and np.median(far) > 1.5
    # the same stamps smeared: the same noise and look-alikes, only the sources differ
    plain, trailed = generate("tno", 5, 0, 50), generate("tno", 5, 0, 50, trail=4.0)
    noise = plain["label"] == 0
    assert np.array_equal(plain["images"][noise], trailed["images"][noise])
    assert not np.array_equal(plain["images"][~noise], trailed["images"][~noise])
    with pytest.raises(ValueError, match="--max-offset must lie in"):
        SynthSettings(out="x", max_offset=9)
