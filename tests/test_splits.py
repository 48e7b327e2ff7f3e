import numpy as np
import pyarrow as pa
import pytest

from stampray import splits, table as st


def test_fnv1a_reference_values():
    # published FNV-1a 64-bit test vectors
    assert splits.fnv1a64(["", "a", "foobar"]).tolist() == [
        0xCBF29CE484222325, 0xAF63DC4C8601EC8C, 0x85944171F73967E8]


def test_split_is_a_function_of_the_id_alone():
    ids = [f"tno-s0-{i:09d}" for i in range(5000)]
    whole = splits.assign(ids)
    parts = np.concatenate([splits.assign(ids[a:a + 333]) for a in range(0, 5000, 333)])
    assert (whole == parts).all()
    reversed_ids = splits.assign(ids[::-1])[::-1]
    assert (whole == reversed_ids).all()


def test_splits_are_disjoint_and_near_their_fractions():
    ids = [f"id{i}" for i in range(20000)]
    s = splits.assign(ids, (0.7, 0.1, 0.2))
    sets = {name: {i for i, x in zip(ids, s) if x == name} for name in st.SPLIT_NAMES}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert sum(len(v) for v in sets.values()) == 20000
    assert abs(len(sets["train"]) / 20000 - 0.7) < 0.02
    assert abs(len(sets["val"]) / 20000 - 0.1) < 0.02
    assert abs(len(sets["test"]) / 20000 - 0.2) < 0.02


def test_same_split_under_different_shardings(tmp_path):
    from stampray.synth import SynthSettings, synth

    synth(SynthSettings(out=str(tmp_path / "a"), n=700, seed=1, shard_rows=100))
    synth(SynthSettings(out=str(tmp_path / "b"), n=700, seed=1, shard_rows=333))
    got = {}
    for name in ("a", "b"):
        for batch in st.iter_batches(str(tmp_path / name), batch_size=50, columns=["stamp_id"]):
            for sid, sp in zip(batch.column("stamp_id").to_pylist(), splits.assign(batch.column("stamp_id"))):
                assert got.setdefault(sid, sp) == sp
    assert len(got) == 700


def test_fixed_split_column_wins():
    ids = ["a", "b", "c"]
    hashed = splits.assign(ids)
    fixed = splits.assign(ids, fixed=pa.array(["test", None, "train"]))
    assert fixed.tolist() == ["test", hashed[1], "train"]
    with pytest.raises(ValueError, match="split column holds 'training' at row 0"):
        splits.assign(ids, fixed=["training", None, None])


def test_mask_and_fraction_validation():
    tbl = pa.table({"stamp_id": ["a", "b", "c", "d"]})
    total = sum(splits.mask(tbl, name).astype(int) for name in st.SPLIT_NAMES)
    assert total.tolist() == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="summing to 1"):
        splits.assign(["a"], (0.5, 0.1, 0.1))
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        splits.mask(tbl, "dev")
