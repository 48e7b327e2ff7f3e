"""Nothing a user made is overwritten, nothing outside --out is written, nothing listed is skipped silently."""

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from stampray import checkpoint as ck
from stampray import table as st
from stampray.cli import main
from stampray.models import create_model
from stampray.synth import SynthSettings, synth


def tree_digest(root) -> dict:
    """Every file under ``root`` with its bytes' hash."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    data = str(root / "t4")
    synth(SynthSettings(out=data, n=400, seed=4, shard_rows=100))
    torch.manual_seed(0)
    model = str(root / "m.pt")
    ck.save(ck.make_bundle(create_model("cnn", 1, 21, 2), class_names=("noise", "source"), preprocess="course"),
            model)
    return data, model


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_score_refuses_an_out_that_is_inside_or_around_the_data_and_leaves_it_untouched(survey, tmp_path,
                                                                                       capsys, where):
    data, model = survey
    copy = str(tmp_path / "d9")
    os.system(f"cp -r {data} {copy}")
    before = tree_digest(copy)
    out = {"same": copy, "inside": os.path.join(copy, "scores"), "around": str(tmp_path)}[where]
    assert main(["score", "--model", model, "--data", copy, "--out", out]) == 2
    err = capsys.readouterr().err
    word = {"same": "is", "inside": "lies inside", "around": "contains"}[where]
    assert f"--out {out} {word} --data {copy}; write the output to a directory of its own" in err
    assert tree_digest(copy) == before


def test_every_verb_refuses_an_output_inside_its_input(survey, tmp_path, capsys):
    data, model = survey
    cases = [
        ["occlude", "--model", model, "--data", data, "--out", os.path.join(data, "maps")],
        ["occlude", "--model", model, "--data", data, "--out", str(tmp_path / "maps"), "--png", data],
        ["train", "--model", "cnn", "--data", data, "--out", data],
        ["evaluate", "--scores", data, "--out", os.path.join(data, "report")],
        ["ingest", "--fits", str(tmp_path), "--catalog", str(tmp_path / "c.csv"), "--out", str(tmp_path / "t")],
    ]
    before = tree_digest(data)
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "write the output to a directory of its own, outside every input" in err, (argv, err)
    assert tree_digest(data) == before
    assert not os.path.exists(tmp_path / "t") and not os.path.exists(tmp_path / "maps")


def test_an_output_beside_input_files_is_fine(tmp_path):
    st.check_separate(str(tmp_path / "stamps"), {"--class a": str(tmp_path / "a.npy")}, files=True)
    with pytest.raises(ValueError, match="is --class a"):
        st.check_separate(str(tmp_path / "a.npy"), {"--class a": str(tmp_path / "a.npy")}, files=True)
    st.check_separate("s3://b/scores", {"--data": "s3://b/stamps"})
    with pytest.raises(ValueError, match="lies inside --data s3://b/stamps"):
        st.check_separate("s3://b/stamps/scores/", {"--data": "s3://b/stamps"})


def test_shard_names_that_escape_the_table_are_refused(survey, tmp_path, capsys):
    data, model = survey
    copy = str(tmp_path / "t")
    os.system(f"cp -r {data} {copy}")
    doc = json.loads(open(os.path.join(copy, st.MANIFEST_NAME)).read())
    doc["shards"][0]["path"] = "../../x/part.parquet"
    open(os.path.join(copy, st.MANIFEST_NAME), "w").write(json.dumps(doc))
    assert main(["score", "--model", model, "--data", copy, "--out", str(tmp_path / "s")]) == 2
    assert "lists shard '../../x/part.parquet', which is not a plain file name inside the table" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "s" / "part-00000.parquet") and not os.path.exists(tmp_path.parent / "x")


def test_a_shard_the_manifest_does_not_list_is_named_in_a_warning(survey, tmp_path, ray_shared, capsys):
    data, model = survey
    copy = str(tmp_path / "t")
    os.system(f"cp -r {data} {copy} && cp {copy}/part-00000.parquet {copy}/part-00004.parquet")
    assert main(["score", "--model", model, "--data", copy, "--out", str(tmp_path / "s"), "--compile", "off",
                 "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert ("holds Parquet files its manifest does not list, which are not scored: part-00004.parquet (1 files)"
            in captured.err)
    assert "score: 400 stamps scored" in captured.out
    assert np.sum([json.load(open(tmp_path / "s" / "_manifest.json"))["num_rows"]]) == 400
