"""Class names: their score columns, their validation at ingest, and how a model's classes meet a table's
(issue #18 items 1 and 2, issue #11 item 7)."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from stampray import checkpoint as ck
from stampray import table as st
from stampray.classes import (NEGATIVE, ClassMatch, check_class_names, match_classes, positive_classes, prob_column,
                              std_column)
from stampray.cli import main
from stampray.models import create_model
from stampray.score import read_scores, score_manifest

P_HIGH = float(torch.softmax(torch.tensor([0.0, 10.0]), 0)[1])  # the constant model's top probability


# --------------------------------------------------------------------------------------------------
# Column names
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, column", [
    ("noise", "p_noise"), ("source", "p_source"), ("0", "p_0"), ("real_bogus", "p_real_bogus"),  # unchanged
    ("high-z", "p_high_z"), ("pi0 (decay)", "p_pi0__decay_"),  # unchanged: no sign of their own
    ("e+", "p_e_plus"), ("e-", "p_e_minus"), ("gamma", "p_gamma"), ("K+ meson", "p_K_plus_meson"),
    ("-1", "p_minus_1"), ("+", "p_plus"),
])
def test_prob_column(name, column):
    assert prob_column(name) == column


def test_std_column_follows_prob_column():
    assert [std_column(c) for c in ("noise", "e+", "high-z")] == ["p_noise_std", "p_e_plus_std", "p_high_z_std"]


# --------------------------------------------------------------------------------------------------
# Which classes are positive (issue #13 item 4)
# --------------------------------------------------------------------------------------------------
def test_positive_classes_one_rule():
    assert NEGATIVE == 0
    assert positive_classes(2) == [1]  # detection: class 1 against the negative class 0
    assert positive_classes(3) == [0, 1, 2] and positive_classes(4) == [0, 1, 2, 3]  # one-vs-rest
    assert positive_classes(1) == [0]
    assert positive_classes(np.int64(2)) == [1]  # a NumPy count too


@pytest.mark.parametrize("bad", [0, -2, 2.0, "2", True, None])
def test_positive_classes_refuses_what_is_not_a_class_count(bad):
    with pytest.raises(ValueError, match="the number of classes must be a positive integer"):
        positive_classes(bad)


def test_particle_labels_get_a_column_each():
    names = ["e+", "e-", "gamma"]
    check_class_names(names, "--classes")
    assert [prob_column(c) for c in names] == ["p_e_plus", "p_e_minus", "p_gamma"]


@pytest.mark.parametrize("names, words", [
    (["noise", "noise"], ["'noise' is named twice"]),
    (["e+", "e_plus"], ["'e+'", "'e_plus'", "'p_e_plus'"]),
    (["a-b", "a_b"], ["'a-b'", "'a_b'", "'p_a_b'"]),
    (["noise", ""], ["class 1 has an empty name ('')"]),
    (["  ", "source"], ["class 0 has an empty name ('  ')"]),
])
def test_check_class_names_refuses_naming_both(names, words):
    with pytest.raises(ValueError) as e:
        check_class_names(names, "--classes")
    assert str(e.value).startswith("--classes: ")
    for w in words:
        assert w in str(e.value)


def test_synthetic_surveys_have_valid_class_names():
    from stampray.synth import KINDS, spec_for

    for kind in KINDS:
        check_class_names(spec_for(kind).class_names, kind)


# --------------------------------------------------------------------------------------------------
# Matching a model's classes to a table's
# --------------------------------------------------------------------------------------------------
def test_same_names_same_order_match_silently():
    assert match_classes(["noise", "source"], ("noise", "source"), "D") == ClassMatch(("noise", "source"))
    assert match_classes(["noise", "source"], (), "D") == ClassMatch(("noise", "source"))  # unlabelled


def test_same_names_other_order_are_matched_by_name():
    m = match_classes(["noise", "source"], ("source", "noise"), "D")
    assert m.names == ("source", "noise") and m.order == (1, 0)
    assert "another order" in m.note and "0=source, 1=noise" in m.note
    m = match_classes(["a", "b", "c"], ("c", "a", "b"), "D")
    assert m.names == ("c", "a", "b") and m.order == (2, 0, 1)


def test_other_names_are_refused_unless_renamed():
    with pytest.raises(ValueError) as e:
        match_classes(["noise", "source"], ("0", "1"), "D")
    msg = str(e.value)
    assert "D names its classes 0, 1; the model predicts noise, source" in msg
    assert "--rename-classes" in msg and "0 -> noise, 1 -> source" in msg
    m = match_classes(["noise", "source"], ("0", "1"), "D", rename=True)
    assert m.names == ("noise", "source") and m.order is None and "--rename-classes" in m.note
    with pytest.raises(ValueError, match="D declares 3 classes .* but the model predicts 2"):
        match_classes(["noise", "source"], ("a", "b", "c"), "D", rename=True)


# --------------------------------------------------------------------------------------------------
# Ingest
# --------------------------------------------------------------------------------------------------
def _stamps(n, level, seed=0):
    return (np.random.default_rng(seed).normal(size=(n, 21, 21)) + level).astype(np.float32)


@pytest.fixture
def arrays(tmp_path):
    paths = {}
    for name, n, level in (("A", 30, 5.0), ("B", 10, 0.0), ("C", 4, 1.0)):
        paths[name] = str(tmp_path / f"{name}.npy")
        np.save(paths[name], _stamps(n, level, seed=n))
    return paths


def _ingest(out, *args):
    return main(["ingest", "--out", str(out), "--parallel", "off", "--no-progress", *args])


@pytest.mark.parametrize("args, words", [
    (["--class", "noise={A}", "--class", "noise={B}"], ["--class noise is given twice", "A.npy", "B.npy",
                                                        "--classes"]),
    (["--class", "={A}"], ["the class name is empty", "A.npy"]),
    (["--class", "e+={A}", "--class", "e_plus={B}"], ["'e+'", "'e_plus'", "'p_e_plus'"]),
    (["--images", "{A}", "--classes", "noise,noise"], ["--classes: class 'noise' is named twice"]),
])
def test_ingest_refuses_class_names_that_collide(arrays, tmp_path, capsys, args, words):
    out = tmp_path / "out"
    assert _ingest(out, *[a.format(**arrays) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stampray ingest: error: ")
    for w in words:
        assert w in err
    assert not os.path.exists(out / st.MANIFEST_NAME)


def test_ingest_refuses_label_values_that_collide(arrays, tmp_path, capsys):
    labels = str(tmp_path / "labels.npy")
    np.save(labels, np.array(["e+", "e_plus"] * 15))
    assert _ingest(tmp_path / "out", "--images", arrays["A"], "--labels", labels) == 2
    err = capsys.readouterr().err
    assert "the labels of" in err and "'e+'" in err and "'e_plus'" in err and "--classes" in err


def test_ingest_keeps_particle_labels_apart(arrays, tmp_path):
    out = tmp_path / "out"
    assert _ingest(out, "--class", f"e+={arrays['A']}", "--class", f"e-={arrays['B']}",
                   "--class", f"gamma={arrays['C']}") == 0
    m = st.read_manifest(str(out))
    assert m.spec.class_names == ("e+", "e-", "gamma") and m.num_rows == 44
    assert {int(k): v for k, v in m.label_counts.items()} == {0: 30, 1: 10, 2: 4}


def test_several_files_of_one_class_with_classes(arrays, tmp_path):
    out = tmp_path / "out"
    assert _ingest(out, "--classes", "noise,source", "--class", f"noise={arrays['B']}",
                   "--class", f"noise={arrays['C']}", "--class", f"source={arrays['A']}") == 0
    m = st.read_manifest(str(out))
    assert m.spec.class_names == ("noise", "source")
    assert {int(k): v for k, v in m.label_counts.items()} == {0: 14, 1: 30}


# --------------------------------------------------------------------------------------------------
# Score, evaluate and occlude against a table whose classes differ from the model's
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def always_source(tmp_path_factory):
    """A checkpoint of classes (noise, source) that answers p(source) = P_HIGH for every stamp."""
    torch.manual_seed(0)
    model = create_model("cnn", 1, 21, 2)
    with torch.no_grad():
        model.head[2].weight.zero_()
        model.head[2].bias.copy_(torch.tensor([0.0, 10.0]))
    path = str(tmp_path_factory.mktemp("ckpt") / "model.pt")
    ck.save(ck.make_bundle(model, class_names=("noise", "source"), preprocess="course"), path)
    return path


@pytest.fixture(scope="module")
def source_first(tmp_path_factory):
    """Issue #18's table: ``--class source=SRC --class noise=NOISE`` (source is label 0); 30 + 10 stamps."""
    d = tmp_path_factory.mktemp("source_first")
    np.save(d / "src.npy", _stamps(30, 5.0, 1))
    np.save(d / "noise.npy", _stamps(10, 0.0, 2))
    out = d / "table"
    assert _ingest(out, "--class", f"source={d / 'src.npy'}", "--class", f"noise={d / 'noise.npy'}") == 0
    return str(out)


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
    """Issue #11's table: integer labels, so classes named '0', '1'; 30 of class 1, 10 of class 0."""
    d = tmp_path_factory.mktemp("numbered")
    np.save(d / "images.npy", np.concatenate([_stamps(30, 5.0, 1), _stamps(10, 0.0, 2)]))
    np.save(d / "labels.npy", np.array([1] * 30 + [0] * 10))
    out = d / "table"
    assert _ingest(out, "--images", str(d / "images.npy"), "--labels", str(d / "labels.npy")) == 0
    return str(out)


@pytest.mark.slow
def test_score_and_evaluate_match_classes_by_name(always_source, source_first, tmp_path, capsys, ray_shared):
    out, rep = str(tmp_path / "scores"), str(tmp_path / "report")
    assert main(["score", "--model", always_source, "--data", source_first, "--out", out, "--compile", "off"]) == 0
    err = capsys.readouterr().err
    assert "another order (source, noise; the model: noise, source)" in err and "0=source, 1=noise" in err
    t = read_scores(out)
    assert t.num_rows == 40
    assert score_manifest(out)["class_names"] == ["source", "noise"]
    assert set(t.column("pred").to_pylist()) == {0} and set(t.column("pred_name").to_pylist()) == {"source"}
    np.testing.assert_allclose(t.column("p_source").to_numpy(), P_HIGH, rtol=1e-6)
    np.testing.assert_allclose(t.column("p_noise").to_numpy(), 1 - P_HIGH, rtol=1e-3)
    labels = t.column("label").to_numpy()
    assert (labels == 0).sum() == 30 and (labels == 1).sum() == 10  # the table's own labels
    # every stamp called source: 30 of 40 right (issue #18 reported 0.156 for a model that was right)
    assert main(["evaluate", "--scores", out, "--out", rep, "--split", "all"]) == 0
    report = json.load(open(os.path.join(rep, "report.json")))
    res = report["results"]["scores"]
    assert report["class_names"] == ["source", "noise"]
    assert res["n"] == 40 and res["accuracy"] == pytest.approx(0.75)
    assert res["confusion"]["counts"] == [[30, 0], [10, 0]]


def test_score_refuses_other_class_names(always_source, numbered, tmp_path, capsys):
    out = tmp_path / "scores"
    assert main(["score", "--model", always_source, "--data", numbered, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stampray score: error: ")
    assert "names its classes 0, 1; the model predicts noise, source" in err and "--rename-classes" in err
    assert not os.path.exists(out / "_manifest.json") and not os.path.exists(out / "part-00000.parquet")


@pytest.mark.slow
def test_score_renames_classes_by_position_when_asked(always_source, numbered, tmp_path, capsys, ray_shared):
    out = str(tmp_path / "scores")
    assert main(["score", "--model", always_source, "--data", numbered, "--out", out, "--compile", "off",
                 "--rename-classes"]) == 0
    err = capsys.readouterr().err
    assert "--rename-classes: " in err and "0 -> noise, 1 -> source" in err
    t = read_scores(out)
    assert t.num_rows == 40 and score_manifest(out)["class_names"] == ["noise", "source"]
    assert set(t.column("pred").to_pylist()) == {1} and set(t.column("pred_name").to_pylist()) == {"source"}
    assert (t.column("label").to_numpy() == 1).sum() == 30


def test_score_refuses_a_checkpoint_whose_class_names_collide(source_first, tmp_path, capsys):
    path = str(tmp_path / "dup.pt")
    ck.save(ck.make_bundle(create_model("cnn", 1, 21, 2), class_names=("noise", "noise"), preprocess="course"),
            path)
    assert main(["score", "--model", path, "--data", source_first, "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "the checkpoint's classes: class 'noise' is named twice" in err and "re-ingest" in err


def test_occlude_follows_the_table_order_and_renames_when_asked(always_source, source_first, numbered, tmp_path,
                                                                capsys):
    """In this process (--in-process on: the replica class a pool runs, without its start-up)."""
    base = ["occlude", "--model", always_source, "--kernel", "7", "--stride", "7", "--limit", "3", "--in-process",
            "on"]
    out = tmp_path / "maps"
    assert main([*base, "--data", source_first, "--out", str(out)]) == 0
    assert "another order" in capsys.readouterr().err
    t = pq.read_table(out / "part-00000.parquet")
    assert t.num_rows == 3 and set(t.column("pred").to_pylist()) == {0}  # source, in the table's order
    true_source = [lab == 0 for lab in t.column("label").to_pylist()]
    np.testing.assert_allclose(t.column("base_prob").to_numpy(),
                               [P_HIGH if s else 1 - P_HIGH for s in true_source], rtol=1e-3)
    assert main([*base, "--data", numbered, "--out", str(tmp_path / "m2")]) == 2
    assert "--rename-classes" in capsys.readouterr().err
    assert main([*base, "--data", numbered, "--out", str(tmp_path / "m3"), "--rename-classes"]) == 0
    assert "--rename-classes: " in capsys.readouterr().err


def test_evaluate_refuses_a_table_without_a_column_per_class(tmp_path, capsys):
    """A score table written before class names were checked: 'e+' and 'e-' both went to 'p_e_'."""
    import pyarrow as pa

    path = tmp_path / "old"
    os.makedirs(path)
    pq.write_table(pa.table({"stamp_id": ["a", "b"], "label": pa.array([0, 1], pa.int64()), "split": ["test"] * 2,
                             "pred": [0, 1], "pred_name": ["e+", "e-"], "p_e_": [0.9, 0.1]}),
                   path / "part-00000.parquet")
    (path / "_manifest.json").write_text(json.dumps({
        "model": "m.pt", "model_tag": "cnn@000000000000", "data": "d", "keep": [], "preprocess": "course",
        "class_names": ["e+", "e-"], "num_rows": 2, "set_aside": 0, "errors": {},
        "shards": [{"path": "part-00000.parquet", "rows": 2, "errors": 0}]}))
    assert main(["evaluate", "--scores", str(path), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert "no probability column for p_e_plus (e+), p_e_minus (e-)" in err and "score the table again" in err
