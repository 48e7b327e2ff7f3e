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


# --------------------------------------------------------------------------------------------------
# #12.4: the split travels with the model
# --------------------------------------------------------------------------------------------------
def test_score_takes_the_checkpoints_split_and_refuses_another(stampray_log):
    from stampray.score import split_rule

    trained = {"split": {"fractions": [0.5, 0.2, 0.3], "column": False}}
    rule = split_rule(trained, None, False, "d")
    assert rule["fractions"] == [0.5, 0.2, 0.3] and rule["source"] == "checkpoint"
    assert split_rule(trained, (0.5, 0.2, 0.3), False, "d")["fractions"] == [0.5, 0.2, 0.3]
    with pytest.raises(ValueError, match=r"--fractions 0.7,0.1,0.2 differs from the split the model was trained "
                                         r"with \(0.5,0.2,0.3\)"):
        split_rule(trained, (0.7, 0.1, 0.2), False, "d")
    # a checkpoint from before the record: its training settings' fractions
    assert split_rule({"config": {"fractions": [0.6, 0.2, 0.2]}}, None, False, "d")["fractions"] == [0.6, 0.2, 0.2]
    assert stampray_log.text == ""
    # no record at all: the default, said loudly
    rule = split_rule({"config": {}}, None, False, "d")
    assert rule == {"fractions": [0.7, 0.1, 0.2], "source": "assumed", "column": False}
    assert "does not record the split it was trained with" in stampray_log.text
    stampray_log.clear()
    # trained on a fixed split column, scoring a table without one
    split_rule({"split": {"fractions": [0.7, 0.1, 0.2], "column": True}}, None, False, "d")
    assert "fixed 'split' column and d has none" in stampray_log.text


@pytest.mark.slow
def test_a_model_trained_with_other_fractions_is_tested_on_its_own_test_split(tmp_path, ray_shared):
    """Trained with --fractions 0.5,0.2,0.3, then scored and evaluated with no fractions given: the test
    ids evaluated are exactly training's test ids; other fractions are refused at scoring, and a --run
    whose fractions differ from the scores' at evaluation."""
    import json

    from stampray import table as st
    from stampray.cli import main
    from stampray.evaluate import EvaluateSettings, evaluate
    from stampray.score import read_scores

    data, runs = str(tmp_path / "t"), str(tmp_path / "runs")
    assert main(["synth", "--out", data, "-n", "500", "--seed", "4"]) == 0
    assert main(["train", "--model", "cnn", "--data", data, "--out", runs, "--epochs", "1", "--batch-size", "64",
                 "--cpus-per-worker", "0.5", "--fractions", "0.5,0.2,0.3"]) == 0
    summary = json.loads(open(f"{runs}/cnn/summary.json").read())
    scores = str(tmp_path / "scores")
    assert main(["score", "--model", f"{runs}/cnn", "--data", data, "--out", scores]) == 0
    t = read_scores(scores)
    ids = st.read_table(data, [st.ID]).column(st.ID)
    want = {i for i, s in zip(ids.to_pylist(), splits.assign(ids, (0.5, 0.2, 0.3))) if s == "test"}
    got = {i for i, s in zip(t.column(st.ID).to_pylist(), t.column(st.SPLIT).to_pylist()) if s == "test"}
    assert got == want and len(want) == summary["metrics"]["test_n"]
    r = evaluate(EvaluateSettings(scores=(scores,), out=str(tmp_path / "rep")))
    [table] = r.report["tables"].values()
    assert table["rows_evaluated"] == len(want)
    assert table["split"] == {"fractions": [0.5, 0.2, 0.3], "source": "checkpoint", "column": False,
                              "trained_with_column": False}
    assert main(["score", "--model", f"{runs}/cnn", "--data", data, "--out", str(tmp_path / "s2"),
                 "--fractions", "0.7,0.1,0.2"]) == 2
    other = json.loads(open(f"{runs}/cnn/settings.json").read())
    other["fractions"] = [0.7, 0.1, 0.2]
    fake_run = tmp_path / "other_run"
    fake_run.mkdir()
    (fake_run / "settings.json").write_text(json.dumps(other))
    (fake_run / "metrics.jsonl").write_text(open(f"{runs}/cnn/metrics.jsonl").read())
    with pytest.raises(ValueError, match="trained with split fractions"):
        evaluate(EvaluateSettings(scores=(scores,), out=str(tmp_path / "rep2"), run=str(fake_run)))
