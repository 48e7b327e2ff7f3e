"""#15.1: a stamp table grows by a night (``ingest --append``)."""

import json
import os

import numpy as np
import pytest

from stampray import table as st
from stampray.append import APPEND_DIR, AppendError, existing_table
from stampray.ingest import IngestSettings, ingest


def _npy(path, n, shape=(21, 21), value=0.0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(int(value * 10) + n)
    np.save(path, (rng.normal(size=(n, *shape)) + value).astype(np.float32))
    return str(path)


@pytest.fixture
def table(tmp_path):
    out = str(tmp_path / "stamps")
    ingest(IngestSettings(out=out, shard_rows=10, class_files=(
        ("noise", _npy(tmp_path / "night1" / "noise.npy", 12)),
        ("source", _npy(tmp_path / "night1" / "source.npy", 8, value=3.0)))))
    return out


def test_append_adds_shards_after_the_old_ones_and_sets_repeated_ids_aside(tmp_path, table):
    before = st.read_manifest(table)
    old_files = {s["path"]: open(os.path.join(table, s["path"]), "rb").read() for s in before.shards}
    # night 2: "noise.npy" again (ids noise-000000000.. repeat night 1's) and a new file of sources
    r = ingest(IngestSettings(out=table, append=True, shard_rows=10, class_files=(
        ("noise", _npy(tmp_path / "night2" / "noise.npy", 15)),
        ("source", _npy(tmp_path / "night2" / "late.npy", 6, value=3.0)))))
    m = st.read_manifest(table)
    assert r.appended == 3 + 6 and r.appended_aside == {"duplicate_id": 12}
    assert m.num_rows == 20 + 9 and r.manifest.to_json() == m.to_json()
    paths = [s["path"] for s in m.shards]
    assert paths[:len(before.shards)] == [s["path"] for s in before.shards]
    assert all(p.startswith("part-a0001-") for p in paths[len(before.shards):])
    assert {p: open(os.path.join(table, p), "rb").read() for p in old_files} == old_files  # untouched
    ids = st.read_table(table, [st.ID]).column(st.ID).to_pylist()
    assert len(ids) == len(set(ids)) == 29
    assert {"noise-000000012", "noise-000000014", "late-000000005"} <= set(ids)
    assert m.label_counts == {"0": 12 + 3, "1": 8 + 6}
    errors = st.read_errors(table).to_pylist()
    dup = sorted(e["stamp_id"] for e in errors if e["reason"].startswith("duplicate_id"))
    assert dup == [f"noise-{i:09d}" for i in range(12)]
    assert all("is already in the table" in e["reason"] for e in errors)
    assert m.errors == {"duplicate_id": 12}
    rec = m.settings["appends"][0]
    assert rec["stamps"] == 9 and rec["shards"] == paths[len(before.shards):] and "provenance" in rec
    assert not os.path.exists(os.path.join(table, APPEND_DIR))
    st.inspect_shards(table, m)  # every shard's footer matches the manifest
    # a second night gets the next append number
    ingest(IngestSettings(out=table, append=True, class_files=(("source", _npy(tmp_path / "n3" / "n3.npy", 4)),)))
    assert [s["path"] for s in st.read_manifest(table).shards][-1].startswith("part-a0002-")


def test_append_refuses_what_does_not_fit(tmp_path, table):
    with pytest.raises(AppendError, match=r"the new stamps are 1x20x20, the table .* holds 1x21x21 stamps; ingest "
                                          r"them into a table of their own$"):  # --size is for FITS cutouts only
        ingest(IngestSettings(out=table, append=True, class_files=(
            ("noise", _npy(tmp_path / "x" / "small.npy", 3, shape=(20, 20))),)))
    with pytest.raises(AppendError, match=r"classes \['bogus', 'real'\] differ from the table's \['noise', "
                                          r"'source'\]; pass --classes noise,source"):
        ingest(IngestSettings(out=table, append=True, classes=("bogus", "real"), class_files=(
            ("bogus", _npy(tmp_path / "y" / "b.npy", 3)), ("real", _npy(tmp_path / "y" / "r.npy", 3)))))
    with pytest.raises(AppendError, match="holds no stamp table .* drop --append to create one"):
        ingest(IngestSettings(out=str(tmp_path / "none"), append=True, class_files=(
            ("noise", _npy(tmp_path / "z" / "n.npy", 3)),)))
    assert st.read_manifest(table).num_rows == 20  # nothing changed
    assert not os.path.exists(os.path.join(table, APPEND_DIR))  # and no staging area left behind


def test_a_merge_killed_after_its_plan_is_rolled_forward(tmp_path, table, monkeypatch):
    import stampray.append as ap

    def killed(out):
        raise RuntimeError("killed right after writing the plan")

    monkeypatch.setattr(ap, "_roll_forward", killed)
    with pytest.raises(RuntimeError, match="killed"):
        ingest(IngestSettings(out=table, append=True, class_files=(("noise", _npy(tmp_path / "k" / "k.npy", 5)),)))
    monkeypatch.undo()
    assert st.read_manifest(table).num_rows == 20  # readers still see the table before the append
    plan = json.loads(open(os.path.join(table, APPEND_DIR, "plan.json")).read())
    assert len(plan["moves"]) == 1
    m = existing_table(table)  # the next --append (or this call) finishes it
    assert m.num_rows == 25 and [s["path"] for s in m.shards][-1] == "part-a0001-00000.parquet"
    assert not os.path.exists(os.path.join(table, APPEND_DIR))
    st.inspect_shards(table, m)


def test_synth_appends_a_night_with_another_seed(tmp_path, capsys):
    from stampray.cli import main

    out = str(tmp_path / "s")
    assert main(["synth", "--out", out, "-n", "50", "--seed", "1", "--no-progress"]) == 0
    assert main(["synth", "--out", out, "-n", "30", "--seed", "2", "--append", "--no-progress"]) == 0
    m = st.read_manifest(out)
    added = st.read_table(out, [st.LABEL]).column(st.LABEL).to_pylist()[50:]
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"synth: wrote 30 tno stamps (1, 21, 21) in 1 new shards appended to {out} (now 80 stamps "
                           f"in 2 shards); classes {{'noise': {added.count(0)}, 'source': {added.count(1)}}}; ")
    assert m.settings["appends"][-1]["label_counts"] == {k: v for k, v in (("0", added.count(0)),
                                                                            ("1", added.count(1))) if v}
    assert m.num_rows == 80 and [s["path"] for s in m.shards] == ["part-00000.parquet", "part-a0001-00000.parquet"]
    ids = st.read_table(out, [st.ID]).column(st.ID).to_pylist()
    assert ids[:50] == [f"tno-s1-{i:09d}" for i in range(50)] and ids[50:] == [f"tno-s2-{i:09d}" for i in range(30)]


def test_after_an_append_score_scores_only_the_new_shards(tmp_path, make_checkpoint, stampray_log):
    """Scored in this process (--in-process on): which shards are new is the driver's to tell, either way."""
    from stampray.score import ScoreSettings, read_scores, score
    from stampray.synth import SynthSettings, synth

    data, out = str(tmp_path / "s"), str(tmp_path / "scores")
    synth(SynthSettings(out=data, n=300, seed=1, shard_rows=150, progress=False))
    ckpt = make_checkpoint(tmp_path / "m.pt")
    first = score(ScoreSettings(model=ckpt, data=data, out=out, in_process="on"))
    assert first.scored_now == 300
    synth(SynthSettings(out=data, n=120, seed=2, shard_rows=100, progress=False, append=True))
    stampray_log.clear()
    again = score(ScoreSettings(model=ckpt, data=data, out=out, in_process="on"))
    assert "score: 2 new shards (120 stamps), 2 already scored" in stampray_log.text
    assert again.scored_now == 120 and again.skipped_shards == 2 and again.scored == 420
    ids = read_scores(out, columns=["stamp_id"]).column("stamp_id").to_pylist()
    assert len(ids) == len(set(ids)) == 420
    assert set(ids) == set(st.read_table(data, [st.ID]).column(st.ID).to_pylist())


def test_an_append_of_repeated_ids_only_keeps_its_ledger_and_the_next_one_its_own(tmp_path, table, capsys):
    """Every row of a rerun night is a repeated id: nothing is appended (a warning, exit 0), the rows are listed,
    and the next append's set-aside file does not overwrite that list."""
    from stampray.cli import main

    night1 = ["--class", f"noise={tmp_path / 'night1' / 'noise.npy'}", "--class",
              f"source={tmp_path / 'night1' / 'source.npy'}"]
    assert main(["ingest", "--out", table, "--append", "--shard-rows", "10", *night1]) == 0
    assert f"ingest: warning: no stamp was appended to {table}; the 20 rows set aside" in capsys.readouterr().err
    assert main(["ingest", "--out", table, "--append", "--shard-rows", "10", *night1[:2]]) == 0  # 12 again
    m = st.read_manifest(table)
    assert m.num_rows == 20 and m.errors == {"duplicate_id": 32}
    assert st.read_errors(table).num_rows == 32  # every row the manifest counts is listed
    assert sorted(os.listdir(os.path.join(table, "_errors"))) == ["part-a0001-00000.parquet",
                                                                   "part-a0002-00000.parquet"]
