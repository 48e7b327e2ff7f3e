import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stampray import table as st
from stampray.vet import VetSettings, fetch_stamps, vet

# p(source) of stamps s00..s49, literal. Top 5: s09 0.99, then s04 and s16 tie at 0.97 (ties go by id),
# s36 0.95, s29 0.93. Nearest 0.5: s25 (0.01 away), s11 (0.015), s05 (0.02), s45 (0.025), s31 (0.03).
P = [0.91, 0.12, 0.55, 0.03, 0.97, 0.48, 0.22, 0.60, 0.05, 0.99,
     0.33, 0.515, 0.07, 0.88, 0.41, 0.15, 0.97, 0.02, 0.70, 0.46,
     0.09, 0.30, 0.58, 0.81, 0.11, 0.49, 0.04, 0.65, 0.26, 0.93,
     0.18, 0.53, 0.06, 0.77, 0.38, 0.14, 0.95, 0.08, 0.44, 0.21,
     0.62, 0.01, 0.35, 0.85, 0.17, 0.525, 0.27, 0.72, 0.10, 0.40]
IDS = [f"s{i:02d}" for i in range(50)]
CLASSES = ["noise", "source"]


def write_stamps(path, channels, ids=IDS, rows_per_shard=20):
    """50 stamps in shards of 20, 20 and 10 rows, with ra, dec, snr and mjd."""
    spec = st.StampSpec((channels, 9, 9), tuple(CLASSES), "test")
    rng = np.random.default_rng(0)
    n = len(ids)
    images = rng.normal(0, 1, (n, channels, 9, 9)).astype(np.float32)
    meta = {"ra": [150.0 + i / 100 for i in range(n)], "dec": [2.0 - i / 100 for i in range(n)],
            "snr": [float(3 + i) for i in range(n)], "mjd": [60000.5 + i for i in range(n)]}
    w = st.StampWriter(str(path), spec, rows_per_shard=rows_per_shard)
    w.write(st.make_table(spec, list(ids), images, labels=[int(p > 0.5) for p in P[:n]], metadata=meta))
    return w.close(), images


def write_scores(path, data_manifest=None, rows=range(50), labelled=False, data_shards=None):
    """A score directory as 'stampray score' writes it, from the literal P; keeps ra, dec and snr."""
    os.makedirs(path, exist_ok=True)
    rows = list(rows)[::-1]  # last id first: ranks must not follow the row order
    p = np.array([P[i] for i in rows], np.float32)
    n = len(rows)
    cols = {"stamp_id": [IDS[i] for i in rows],
            "label": pa.array([int(P[i] > 0.5) for i in rows] if labelled else [None] * n, pa.int64()),
            "split": ["test"] * n, "pred": (p > 0.5).astype(np.int64),
            "pred_name": [CLASSES[int(x > 0.5)] for x in p], "p_noise": 1 - p, "p_source": p,
            "model": ["m@000000000000"] * n, "ra": [150.0 + i / 100 for i in rows],
            "dec": [2.0 - i / 100 for i in rows], "snr": [float(3 + i) for i in rows]}
    pq.write_table(pa.table(cols), os.path.join(path, "part-00000.parquet"))
    if data_shards is None and data_manifest is not None:
        data_shards = {s["path"]: s["footer"] for s in data_manifest.shards}
    doc = {"model": "m.pt", "model_tag": "m@000000000000", "data": "d", "keep": ["ra", "dec", "snr"],
           "preprocess": "course", "class_names": CLASSES, "num_rows": n, "set_aside": 0, "errors": {},
           "shards": [{"path": "part-00000.parquet", "rows": n, "errors": 0}], "data_shards": data_shards or {}}
    with open(os.path.join(path, "_manifest.json"), "w") as f:
        json.dump(doc, f)
    return str(path)


def write_maps(path, ids, kernel=3, base=0.9):
    """An occlude output holding maps of ``ids``: p(source) 0.2 where the centre is hidden, 0.9 elsewhere."""
    os.makedirs(path, exist_ok=True)
    n = len(ids)
    heat = np.full((n, 9, 9), 0.85, np.float32)
    heat[:, 3:6, 3:6] = 0.2

    def tensor(arr):
        typ = pa.fixed_shape_tensor(pa.float32(), [9, 9])
        return pa.ExtensionArray.from_storage(typ, pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), 81))

    pq.write_table(pa.table({"stamp_id": ids, "label": pa.nulls(n, pa.int64()), "pred": [1] * n, "target": [1] * n,
                             "base_prob": pa.array([base] * n, pa.float32()), "heatmap": tensor(heat),
                             "stamp": tensor(np.zeros((n, 9, 9), np.float32))}),
                   os.path.join(path, "part-00000.parquet"))
    with open(os.path.join(path, "_maps.json"), "w") as f:
        json.dump({"verb": "occlude", "kernel": kernel, "stride": 1, "files": ["part-00000.parquet"]}, f)
    return str(path)


def gallery(out, name):
    t = pq.read_table(os.path.join(out, "candidates.parquet"))
    rows = [r for r in t.to_pylist() if r["gallery"] == name]
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    return rows


@pytest.mark.parametrize("channels", [1, 3])
def test_top_and_borderline_galleries(tmp_path, channels):
    m, _ = write_stamps(tmp_path / "stamps", channels)
    s = write_scores(tmp_path / "scores", m)
    out = str(tmp_path / "vet")
    r = vet(VetSettings(scores=s, data=str(tmp_path / "stamps"), out=out, top=5, borderline=4, progress=False))
    assert (r.rows, r.top, r.borderline, r.maps, r.class_name) == (50, 5, 4, 0, "source")
    top = gallery(out, "top")
    assert [x["stamp_id"] for x in top] == ["s09", "s04", "s16", "s36", "s29"]
    assert [x["p_source"] for x in top] == pytest.approx([0.99, 0.97, 0.97, 0.95, 0.93])
    first = top[0]  # scores' metadata, the stamp table's own (mjd), the shard it lives in
    assert (first["ra"], first["dec"], first["snr"], first["mjd"]) == pytest.approx((150.09, 1.91, 12.0, 60009.5))
    assert first["shard"] == "part-00000.parquet" and top[3]["shard"] == "part-00001.parquet"
    assert first["has_map"] is False and first["p_noise"] == pytest.approx(0.01)
    assert [x["stamp_id"] for x in gallery(out, "borderline")] == ["s25", "s11", "s05", "s45"]
    page = open(r.html).read()
    assert page.count("<img") == 1 + 9 * channels  # the histogram, then one panel per channel per card
    assert page.count("<img class=\"panel\"") == 9 * channels
    assert page.count("src=\"data:image/png;base64,") == page.count("<img")
    for sid in ["s09", "s04", "s16", "s36", "s29", "s25", "s11", "s05", "s45"]:
        assert f"{sid}</h3>" in page
    assert "60009.5" in page and "150.09" in page and "12" in page  # s09's mjd, ra and snr
    assert json.loads(open(os.path.join(out, "vet.json")).read())["settings"]["top"] == 5


def test_class_and_threshold(tmp_path):
    m, _ = write_stamps(tmp_path / "stamps", 1)
    s = write_scores(tmp_path / "scores", m, labelled=True)
    out = str(tmp_path / "vet")
    vet(VetSettings(scores=s, data=str(tmp_path / "stamps"), out=out, class_name="noise", top=3, borderline=2,
                    threshold=0.2, progress=False))
    assert [x["stamp_id"] for x in gallery(out, "top")] == ["s41", "s17", "s03"]  # p(source) 0.01, 0.02, 0.03
    # p(noise) nearest 0.2 is p(source) nearest 0.8: s23 (0.81), s33 (0.77)
    assert [x["stamp_id"] for x in gallery(out, "borderline")] == ["s23", "s33"]
    assert [x["label"] for x in gallery(out, "top")] == [0, 0, 0]


def test_since_restricts_to_the_latest_shards(tmp_path):
    m, _ = write_stamps(tmp_path / "stamps", 1)
    assert [s["path"] for s in m.shards] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    s = write_scores(tmp_path / "scores", m)
    data = str(tmp_path / "stamps")
    r = vet(VetSettings(scores=s, data=data, out=str(tmp_path / "a"), since="part-00001", top=5, borderline=2,
                        progress=False))
    assert r.rows == 30 and r.shards == ["part-00001.parquet", "part-00002.parquet"]
    assert [x["stamp_id"] for x in gallery(r.out, "top")] == ["s36", "s29", "s43", "s23", "s33"]
    assert [x["stamp_id"] for x in gallery(r.out, "borderline")] == ["s25", "s45"]
    r = vet(VetSettings(scores=s, data=data, out=str(tmp_path / "b"), since="1", top=3, borderline=1, progress=False))
    assert r.rows == 10 and [x["stamp_id"] for x in gallery(r.out, "top")] == ["s43", "s47", "s40"]
    assert {x["shard"] for x in gallery(r.out, "top")} == {"part-00002.parquet"}
    with pytest.raises(ValueError, match=r"--since part-00009: .* has no shard of that name .*part-00000.parquet"):
        vet(VetSettings(scores=s, data=data, out=str(tmp_path / "c"), since="part-00009", progress=False))


def test_shards_added_since_the_scoring_are_named_and_left_out(tmp_path, caplog):
    """A table that grew (an append) since it was scored: vet shows the scored stamps and says which are not."""
    import logging

    m, _ = write_stamps(tmp_path / "stamps", 1)
    first_two = {s["path"]: s["footer"] for s in m.shards[:2]}
    s = write_scores(tmp_path / "scores", m, rows=range(40), data_shards=first_two)
    data = str(tmp_path / "stamps")
    caplog.set_level(logging.WARNING, logger="stampray.vet")
    r = vet(VetSettings(scores=s, data=data, out=str(tmp_path / "a"), top=3, borderline=1, progress=False))
    assert r.rows == 40 and r.shards == ["part-00000.parquet", "part-00001.parquet"]
    assert caplog.messages == [f"vet: warning: 1 of the 3 shards of {data} (10 stamps: part-00002.parquet) have no "
                               f"scores in {s} yet, and are left out; rerun the same 'stampray score' to score them "
                               f"(it scores only the new shards)"]
    with pytest.raises(ValueError, match=r"^--since -1: give a shard name or a positive number of shards$"):
        vet(VetSettings(scores=s, data=data, out=str(tmp_path / "b"), since="-1", progress=False))


def test_occlusion_maps_are_joined(tmp_path):
    m, _ = write_stamps(tmp_path / "stamps", 3)
    s = write_scores(tmp_path / "scores", m)
    maps = write_maps(tmp_path / "maps", ["s00", "s09", "s36"])  # s00 is not shown
    r = vet(VetSettings(scores=s, data=str(tmp_path / "stamps"), out=str(tmp_path / "vet"), top=5, borderline=4,
                        maps=maps, progress=False))
    assert r.maps == 2
    top = gallery(r.out, "top")
    assert [x["has_map"] for x in top] == [True, False, False, True, False]
    page = open(r.html).read()
    assert page.count("<img class=\"panel map\"") == 2
    assert page.count("<img") == 1 + 9 * 3 + 2
    assert "s09 occlusion map" in page and "s36 occlusion map" in page and "s00" not in page


def test_stamps_are_read_by_id_from_the_shards_that_hold_them(tmp_path):
    _, images = write_stamps(tmp_path / "stamps", 2, rows_per_shard=20)
    t = fetch_stamps(str(tmp_path / "stamps"), ["s45", "s03", "nope"], ["part-00000.parquet", "part-00002.parquet"],
                     [st.IMAGE, "mjd"])
    assert t.column_names == ["stamp_id", "image", "mjd", "shard"]
    got = dict(zip(t.column("stamp_id").to_pylist(), t.column("shard").to_pylist()))
    assert got == {"s03": "part-00000.parquet", "s45": "part-00002.parquet"}
    decoded = st.decode_images(t.column(st.IMAGE), (2, 9, 9))
    assert np.array_equal(decoded[t.column("stamp_id").to_pylist().index("s45")], images[45])


def test_errors_name_the_problem(tmp_path, capsys):
    from stampray.cli import _report

    m, _ = write_stamps(tmp_path / "stamps", 1)
    data = str(tmp_path / "stamps")
    s = write_scores(tmp_path / "scores", m)

    def fails(match, **kw):
        with pytest.raises(ValueError, match=match) as e:
            vet(VetSettings(**{"scores": s, "data": data, "out": str(tmp_path / "o"), "progress": False, **kw}))
        assert _report("vet", e.value) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("stampray vet: error: ")

    fails(r"--class 'star' is not a class of --scores .*; its classes are noise, source", class_name="star")
    empty = write_scores(tmp_path / "empty", m, rows=[])
    fails(r"holds no scored rows", scores=empty)
    early = write_scores(tmp_path / "early", m, rows=range(40))  # the last shard was never scored
    fails(r"holds no rows of the shards --since part-00002 selects \(part-00002.parquet\); score them first",
          scores=early, since="part-00002")
    stale = write_scores(tmp_path / "stale", m, data_shards={"part-00001.parquet": "0" * 32})
    fails(r"is not the table --scores .* scored: shard part-00001.parquet has changed", scores=stale)
    other = write_scores(tmp_path / "other", m, data_shards={"part-00077.parquet": "0" * 32})
    fails(r"holds none of the shards --scores .* scored \(part-00077.parquet\)", scores=other)
    write_stamps(tmp_path / "renamed", 1, ids=[f"x{i:02d}" for i in range(50)])
    fails(r"lacks 9 of the stamps to show \(s04, s05, s09 ...\); the scores were made from another table",
          data=str(tmp_path / "renamed"), scores=write_scores(tmp_path / "nosh", None), top=5, borderline=4)
    with pytest.raises(ValueError, match="--threshold must lie strictly between 0 and 1"):
        VetSettings(scores=s, data=data, out="o", threshold=1.0)


def test_command_line(tmp_path, capsys):
    from stampray import cli

    m, _ = write_stamps(tmp_path / "stamps", 1)
    s = write_scores(tmp_path / "scores", m)
    out = str(tmp_path / "vet")
    assert cli.main(["vet", "--scores", s, "--data", str(tmp_path / "stamps"), "--out", out, "--class",
                     "source", "--top", "2", "--borderline", "1", "--since", "part-00001.parquet",
                     "--stretch", "asinh", "--no-progress"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("vet: 30 scored stamps from 2 shard(s); class source: 2 top and 1 borderline")
    assert [x["stamp_id"] for x in gallery(out, "top")] == ["s36", "s29"]
    parser = cli.build_parser("vet")
    help_text = parser._subparsers._group_actions[0].choices["vet"].format_help()
    assert "--since SHARD|N" in help_text and "(default 25)" in help_text and "--stretch {zscale,asinh}" in help_text


def test_page_renders_with_every_image(tmp_path, images_in_chromium):
    """The page opens in headless Chromium and every <img> decodes (as evaluate's report test does)."""
    m, _ = write_stamps(tmp_path / "stamps", 3)
    s = write_scores(tmp_path / "scores", m, labelled=True)
    r = vet(VetSettings(scores=s, data=str(tmp_path / "stamps"), out=str(tmp_path / "vet"), top=4, borderline=2,
                        maps=write_maps(tmp_path / "maps", ["s09"]), progress=False))
    page = open(r.html).read()
    images, broken = images_in_chromium(page)
    assert (images, broken) == (1 + 6 * 3 + 1, 0)


def test_a_users_files_are_never_replaced_and_a_second_vet_replaces_its_own(tmp_path, capsys,
                                                                            refused_beside_a_users_file):
    from stampray.cli import main

    m, _ = write_stamps(tmp_path / "stamps", 1)
    data = str(tmp_path / "stamps")
    s = write_scores(tmp_path / "scores", m)
    args = ["vet", "--scores", s, "--data", data, "--top", "2", "--borderline", "1", "--no-progress"]
    refused_beside_a_users_file(args, "vet", "vet.html")

    out = tmp_path / "vet"
    assert main(args + ["--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["_stampray.json", "candidates.parquet", "vet.html", "vet.json"]
    (out / "notes.txt").write_text("the user's, beside the page")
    first = (out / "vet.html").read_text()
    assert main(args[:-5] + ["--top", "3", "--borderline", "1", "--no-progress", "--out", str(out)]) == 0
    assert (out / "vet.html").read_text() != first and len(gallery(str(out), "top")) == 3
    assert (out / "notes.txt").read_text() == "the user's, beside the page"

    afile = tmp_path / "afile"
    afile.write_text("x")
    capsys.readouterr()
    assert main(args + ["--out", str(afile)]) == 2
    assert f"--out {afile} is a file; give a directory" in capsys.readouterr().err
    none = str(tmp_path / "none")
    for maps, why in ((s, f"holds no occlusion maps ({s}/part-00000.parquet has no heatmap, base_prob, target "
                          f"column)"), (none, "does not exist")):
        assert main(args + ["--out", str(tmp_path / "v2"), "--maps", maps]) == 2
        assert capsys.readouterr().err == (f"stampray vet: error: --maps {maps} {why}; give the --out directory of "
                                           f"'stampray occlude'\n")
    assert not (tmp_path / "v2").exists()
