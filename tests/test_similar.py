"""#16.3b: stampray similar, the k nearest stamps by cosine distance of the features 'score --features' writes."""

import json
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from stampray import similar as sim
from stampray.similar import SimilarSettings, format_table, similar, summary

CLASSES = ("noise", "source")

# Hand-made 2-D vectors: each stamp's angle from the x axis (degrees) and length. Cosine distance is
# 1 - cos(angle between), whatever the lengths: from a (0°) b is 1 - cos 10° = 0.01519, c 1 - cos 30° = 0.13397,
# d 1 - cos 55°, e 1, f 2; g (-20°) lies between b and c.
ANGLES = {"a": (0, 1.0), "b": (10, 3.0), "c": (30, 0.5), "d": (55, 2.0), "e": (90, 1.0), "f": (180, 4.0),
          "g": (-20, 1.5)}


def vec(angle, length=1.0):
    r = math.radians(angle)
    return [length * math.cos(r), length * math.sin(r)]


def dist(a1, a2):
    return 1 - math.cos(math.radians(a1 - a2))


def write_scores(path, shards, dim=2, features=True, fixed=True):
    """A score directory as 'stampray score --features' writes it: ``shards`` is a list of result files, each a
    list of (stamp_id, vector or None, p_source)."""
    os.makedirs(path, exist_ok=True)
    docs = []
    for n, rows in enumerate(shards):
        name = f"part-{n:05d}.parquet"
        p = np.array([r[2] for r in rows], np.float32)
        cols = {"stamp_id": [r[0] for r in rows], "label": pa.nulls(len(rows), pa.int64()),
                "split": ["test"] * len(rows), "pred": (p > 0.5).astype(np.int64),
                "pred_name": [CLASSES[int(v > 0.5)] for v in p], "p_noise": 1 - p, "p_source": p,
                "model": ["m@000000000000"] * len(rows)}
        if features:
            kind = pa.list_(pa.float32(), dim) if fixed else pa.list_(pa.float32())
            cols["features"] = pa.array([r[1] for r in rows], kind)
        pq.write_table(pa.table(cols), os.path.join(path, name))
        docs.append({"path": name, "rows": len(rows), "errors": 0})
    doc = {"model": "m.pt", "model_tag": "m@000000000000", "data": "d", "keep": [], "preprocess": "course",
           "class_names": list(CLASSES), "num_rows": sum(d["rows"] for d in docs), "set_aside": 0, "errors": {},
           "shards": docs}
    with open(os.path.join(path, "_manifest.json"), "w") as f:
        json.dump(doc, f)
    return str(path)


def angle_rows(names, p=0.5):
    return [(n, vec(*ANGLES[n]), p) for n in names]


def run(scores, ids, k=20, out=None):
    return similar(SimilarSettings(scores=scores, ids=tuple(ids), k=k, out=out, progress=False))


def test_query_first_then_neighbours_in_order_across_files_and_batches(tmp_path, monkeypatch):
    # Three result files, and batches of 2 rows (16 bytes of float64 per 2-dim vector, 32 per batch): the
    # neighbours of a query are merged across every batch and file.
    monkeypatch.setattr(sim, "BATCH_BYTES", 32)
    scores = write_scores(tmp_path / "s", [angle_rows("fdb"), angle_rows("ae"), angle_rows("gc")])
    r = run(scores, ["a", "d"], k=4)
    t = r.table
    assert t.column_names == ["query_id", "rank", "stamp_id", "distance", "p_noise", "p_source"]
    assert t.column("query_id").to_pylist() == ["a"] * 4 + ["d"] * 4
    assert t.column("rank").to_pylist() == [0, 1, 2, 3] * 2
    assert t.column("stamp_id").to_pylist() == ["a", "b", "g", "c", "d", "c", "e", "b"]
    want = [0, dist(0, 10), dist(0, -20), dist(0, 30), 0, dist(55, 30), dist(55, 90), dist(55, 10)]
    np.testing.assert_allclose(t.column("distance").to_numpy(), want, atol=1e-12)
    assert t.column("distance")[0].as_py() <= 1e-6 and t.column("distance")[4].as_py() <= 1e-6
    assert (r.searched, r.dim, r.shards, r.set_aside.num_rows) == (7, 2, 3, 0)


def test_neighbours_carry_their_probabilities(tmp_path):
    rows = [("a", vec(0), 0.9), ("b", vec(10), 0.25), ("c", vec(30), 0.5)]
    r = run(write_scores(tmp_path / "s", [rows]), ["a"], k=3)
    assert r.table.column("stamp_id").to_pylist() == ["a", "b", "c"]
    np.testing.assert_allclose(r.table.column("p_source").to_numpy(), [0.9, 0.25, 0.5], atol=1e-7)
    np.testing.assert_allclose(r.table.column("p_noise").to_numpy(), [0.1, 0.75, 0.5], atol=1e-7)


def test_equal_distances_by_stamp_id_and_the_query_before_its_twins(tmp_path):
    # x, y and z point the same way as the query m (distance 0): m itself first, then the others by id.
    rows = [("z", vec(45, 2), 0.5), ("m", vec(45), 0.5), ("y", vec(45, 3), 0.5), ("x", vec(45, 0.5), 0.5),
            ("w", vec(50), 0.5)]
    r = run(write_scores(tmp_path / "s", [rows]), ["m"], k=5)
    assert r.table.column("stamp_id").to_pylist() == ["m", "x", "y", "z", "w"]
    np.testing.assert_allclose(r.table.column("distance").to_numpy()[:4], 0, atol=1e-12)


def test_equal_distances_in_16_dims_are_ordered_by_id_not_by_rounding_noise(tmp_path):
    # Five random directions, each also as a scaled copy: from a, its copies are at distance 0 up to the
    # arithmetic's ~1e-16, which must not decide their order.
    x = np.random.default_rng(0).normal(size=(5, 16))
    rows = [(f"{tag}{i}", (x[i] * s).tolist(), 0.5) for tag, s in (("a", 1.0), ("c", 0.7), ("b", 3.3))
            for i in range(5)]
    r = run(write_scores(tmp_path / "s", [rows], dim=16), ["a0", "a1"], k=3)
    assert r.table.column("stamp_id").to_pylist() == ["a0", "b0", "c0", "a1", "b1", "c1"]
    assert r.table.column("distance").to_pylist() == [0.0] * 6


def test_k_larger_than_the_table_lists_every_stamp(tmp_path, caplog):
    r = run(write_scores(tmp_path / "s", [angle_rows("abc"), angle_rows("d")]), ["c"], k=20)
    assert r.table.column("stamp_id").to_pylist() == ["c", "b", "d", "a"]  # 20°, 25° and 30° away
    assert r.table.column("rank").to_pylist() == [0, 1, 2, 3]
    assert "holds 4 stamps with a usable feature vector" in caplog.text
    assert "only 4 stamps to list" in summary(r)


def test_missing_features_column_is_refused_with_the_fix(tmp_path):
    scores = write_scores(tmp_path / "s", [angle_rows("abc")], features=False)
    with pytest.raises(ValueError, match=r"--scores .*/s has no 'features' column .*'stampray score --features'"):
        run(scores, ["a"])


def test_a_later_file_without_features_is_refused_before_any_search(tmp_path):
    scores = write_scores(tmp_path / "s", [angle_rows("abc"), angle_rows("d")])
    pq.write_table(pq.read_table(os.path.join(scores, "part-00001.parquet")).drop_columns(["features"]),
                   os.path.join(scores, "part-00001.parquet"))
    with pytest.raises(ValueError, match=r"no 'features' column \(result file part-00001.parquet lacks it\)"):
        run(scores, ["a"])


def test_a_damaged_result_file_is_named(tmp_path):
    scores = write_scores(tmp_path / "s", [angle_rows("abc"), angle_rows("d")])
    with open(os.path.join(scores, "part-00001.parquet"), "wb") as f:
        f.write(b"not parquet")
    with pytest.raises(ValueError, match=r"part-00001.parquet cannot be read .*'stampray score --features'"):
        run(scores, ["a"])


def test_unknown_ids_are_refused_by_name(tmp_path):
    scores = write_scores(tmp_path / "s", [angle_rows("abc")])
    with pytest.raises(ValueError, match=r"--ids names 2 stamp\(s\) that --scores .* does not hold: nope, gone;"):
        run(scores, ["a", "nope", "gone"])


def test_nonfinite_rows_are_set_aside_and_counted(tmp_path):
    rows = angle_rows("abcd") + [("n1", [float("nan"), 1.0], 0.5), ("n2", None, 0.5),
                                 ("n3", [float("inf"), 0.0], 0.5), ("z0", [0.0, 0.0], 0.5)]
    r = run(write_scores(tmp_path / "s", [rows[:5], rows[5:]]), ["a"], k=20)
    assert r.table.column("stamp_id").to_pylist() == ["a", "b", "c", "d"]  # none of the set-aside rows
    assert r.searched == 4
    aside = {x["stamp_id"]: (x["shard"], x["reason"].split(":")[0]) for x in r.set_aside.to_pylist()}
    assert aside == {"n1": ("part-00000.parquet", "nonfinite"), "n2": ("part-00001.parquet", "null"),
                     "n3": ("part-00001.parquet", "nonfinite"), "z0": ("part-00001.parquet", "zero")}
    assert r.set_aside_counts == {"nonfinite": 2, "null": 1, "zero": 1}
    assert "(4 set aside without a usable feature vector: 2 nonfinite, 1 null, 1 zero)" in summary(r)


def test_a_query_without_a_usable_vector_is_refused(tmp_path):
    rows = angle_rows("ab") + [("n1", [float("nan"), 1.0], 0.5)]
    with pytest.raises(ValueError, match=r"--ids: 1 query stamp\(s\) have no usable feature vector .*n1 \(nonfinite"):
        run(write_scores(tmp_path / "s", [rows]), ["a", "n1"])


def test_variable_size_list_column(tmp_path):
    rows = angle_rows("abc") + [("short", [1.0], 0.5)]
    r = run(write_scores(tmp_path / "s", [rows], fixed=False), ["a"], k=5)
    assert r.table.column("stamp_id").to_pylist() == ["a", "b", "c"]
    assert r.set_aside_counts == {"length": 1}


def test_out_parquet_and_csv_are_written_and_rewritten(tmp_path):
    scores = write_scores(tmp_path / "s", [angle_rows("abcdefg")])
    out = str(tmp_path / "nn.parquet")
    r = run(scores, ["a", "e"], k=3, out=out)
    t = pq.read_table(out)
    assert t.column("stamp_id").to_pylist() == ["a", "b", "g", "e", "d", "c"]
    record = json.loads(t.schema.metadata[b"stampray_similar"])
    assert record["settings"]["ids"] == ["a", "e"] and record["searched"] == 7
    assert f"wrote 6 rows to {out}" in summary(r)
    run(scores, ["b"], k=2, out=out)  # its own file: replaced
    assert pq.read_table(out).column("stamp_id").to_pylist() == ["b", "a"]
    csv = str(tmp_path / "nn.csv")
    run(scores, ["a"], k=2, out=csv)
    assert pcsv.read_csv(csv).column("stamp_id").to_pylist() == ["a", "b"]
    assert json.loads(open(csv + ".similar.json").read())["written_by"] == "stampray similar"
    run(scores, ["f"], k=2, out=csv)
    assert pcsv.read_csv(csv).column("stamp_id").to_pylist() == ["f", "e"]
    assert sorted(os.listdir(tmp_path)) == ["nn.csv", "nn.csv.similar.json", "nn.parquet", "s"]  # no temp files


def test_out_never_replaces_a_file_similar_did_not_write(tmp_path):
    scores = write_scores(tmp_path / "s", [angle_rows("abc")])
    theirs = str(tmp_path / "mine.parquet")
    pq.write_table(pa.table({"x": [1, 2]}), theirs)
    with pytest.raises(ValueError, match=r"--out .*mine.parquet exists and 'stampray similar' did not write it"):
        run(scores, ["a"], out=theirs)
    assert pq.read_table(theirs).column_names == ["x"]
    csv = str(tmp_path / "mine.csv")
    with open(csv, "w") as f:
        f.write("my,own\n1,2\n")
    with pytest.raises(ValueError, match=r"did not write it \(no mine.csv.similar.json beside it"):
        run(scores, ["a"], out=csv)
    run(scores, ["a"], out=str(tmp_path / "ours.csv"))
    os.replace(csv, str(tmp_path / "ours.csv"))  # the user's file in place of ours: its digest no longer matches
    with pytest.raises(ValueError, match=r"did not write it"):
        run(scores, ["a"], out=str(tmp_path / "ours.csv"))
    assert open(tmp_path / "ours.csv").read() == "my,own\n1,2\n"
    with pytest.raises(ValueError, match=r"--out .* lies inside --scores"):
        run(scores, ["a"], out=os.path.join(scores, "nn.parquet"))


def test_settings_are_validated_naming_the_flag():
    with pytest.raises(ValueError, match=r"^--k must be a positive integer, got 0$"):
        SimilarSettings(scores="s", ids=("a",), k=0)
    with pytest.raises(ValueError, match=r"--ids must name at least one stamp_id"):
        SimilarSettings(scores="s", ids=())
    with pytest.raises(ValueError, match=r"--out must end in .parquet or .csv .*'nn.txt'"):
        SimilarSettings(scores="s", ids=("a",), out="nn.txt")
    assert SimilarSettings(scores="s", ids="b, a,b").ids == ("b", "a")  # a comma list; each query once


def test_help_documents_every_field():
    from stampray.settings import field_help

    assert sorted(field_help(SimilarSettings)) == sorted(SimilarSettings.__dataclass_fields__)


def test_format_table(tmp_path):
    rows = [("a", vec(0), 0.9), ("b", vec(10), 0.25), ("c", vec(30), 0.5)]
    r = run(write_scores(tmp_path / "s", [rows]), ["a", "c"], k=2)
    assert format_table(r).splitlines() == [
        "query_id  rank  stamp_id  distance  p_noise  p_source",
        "a            0  a         0.000000   0.1000    0.9000",
        "a            1  b         0.015192   0.7500    0.2500",
        "",
        "c            0  c         0.000000   0.5000    0.5000",
        "c            1  b         0.060307   0.7500    0.2500",
    ]


@pytest.mark.slow
def test_end_to_end_with_score_features(tno_small, make_checkpoint, tmp_path, ray_shared):
    from stampray.score import ScoreSettings, read_scores, score

    if "features" not in ScoreSettings.__dataclass_fields__:
        pytest.skip("needs 'stampray score --features' (#16 item 3a)")
    ckpt = make_checkpoint(str(tmp_path / "model.pt"))
    scores = str(tmp_path / "scores")
    score(ScoreSettings(model=ckpt, data=tno_small, out=scores, features=True, progress=False))
    t = read_scores(scores, ["stamp_id", "features", "p_source"])
    ids = t.column("stamp_id").to_pylist()
    x = t.column("features").combine_chunks().values.to_numpy().reshape(t.num_rows, -1).astype(np.float64)
    usable = np.isfinite(x).all(1) & x.any(1)
    queries = [ids[i] for i in np.nonzero(usable)[0][[0, 17, -1]]]  # from the first and the last result file
    r = run(scores, queries, k=5)
    assert r.searched + r.set_aside.num_rows == t.num_rows == 600 and r.shards == 3
    unit = x / np.where(usable, np.linalg.norm(x, axis=1), 1)[:, None]
    for q in queries:
        got = r.table.filter(pc.equal(r.table.column("query_id"), q))
        d = 1 - unit[usable] @ unit[ids.index(q)]  # brute force over every usable stamp at once
        assert got.column("stamp_id")[0].as_py() == q and got.column("distance")[0].as_py() <= 1e-6
        np.testing.assert_allclose(got.column("distance").to_numpy()[1:], np.sort(d)[1:5], atol=1e-9)
        p = dict(zip(ids, t.column("p_source").to_pylist()))
        assert got.column("p_source").to_pylist() == [p[i] for i in got.column("stamp_id").to_pylist()]
