import os
import pickle

import h5py
import numpy as np
import pytest
from astropy.io import fits

from stampray import table as st
from stampray.ingest import IngestError, IngestSettings, _open_npy, _StreamedNpy, ingest


def read_back(path):
    m = st.read_manifest(path)
    tbl = st.read_table(path)
    return m, tbl, st.decode_images(tbl.column("image"), m.spec.shape)


def test_class_files_npy_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(12, 21, 21)).astype(np.float32)
    sources = rng.normal(size=(8, 21, 21)).astype(np.float32)
    np.save(tmp_path / "stamps_noise.npy", noise)
    np.save(tmp_path / "stamps_sources.npy", sources)
    out = str(tmp_path / "out")
    r = ingest(IngestSettings(out=out, chunk_rows=5, shard_rows=7, class_files=(
        ("noise", str(tmp_path / "stamps_noise.npy")), ("source", str(tmp_path / "stamps_sources.npy")))))
    assert r.ingested == 20 and r.rows_in == 20 and r.set_aside == {}
    m, tbl, images = read_back(out)
    assert m.spec.class_names == ("noise", "source") and m.spec.shape == (1, 21, 21)
    assert [s["rows"] for s in m.shards] == [7, 7, 6]
    assert tbl.column("label").to_pylist() == [0] * 12 + [1] * 8
    assert tbl.column("stamp_id").to_pylist()[:2] == ["stamps_noise-000000000", "stamps_noise-000000001"]
    np.testing.assert_array_equal(images[:, 0], np.concatenate([noise, sources]))


def test_ids_are_stable_across_reruns(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 5, 5), np.float32))
    ids = []
    for k in range(2):
        out = str(tmp_path / f"o{k}")
        ingest(IngestSettings(out=out, class_files=(("a", str(tmp_path / "x.npy")),), chunk_rows=3 - k))
        ids.append(st.read_table(out).column("stamp_id").to_pylist())
    assert ids[0] == ids[1] == [f"x-{i:09d}" for i in range(4)]


def test_npz_channels_last_multichannel_with_metadata(tmp_path):
    rng = np.random.default_rng(1)
    nhwc = rng.normal(size=(6, 21, 21, 3)).astype(np.float32)  # science/template/difference
    np.savez(tmp_path / "triplets.npz", images=nhwc, labels=np.array([0, 1, 1, 0, 1, 0]), snr=np.arange(6.0))
    out = str(tmp_path / "out")
    ingest(IngestSettings(out=out, images=str(tmp_path / "triplets.npz"), classes=("bogus", "real"), chunk_rows=4))
    m, tbl, images = read_back(out)
    assert m.spec.shape == (3, 21, 21)
    np.testing.assert_array_equal(images, np.moveaxis(nhwc, -1, 1))
    assert tbl.column("snr").to_pylist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert tbl.column("label").to_pylist() == [0, 1, 1, 0, 1, 0]


def test_npy_pair_channels_first_and_one_hot_labels(tmp_path):
    nchw = np.arange(4 * 2 * 20 * 20, dtype=np.float32).reshape(4, 2, 20, 20)
    np.save(tmp_path / "img.npy", nchw)
    np.save(tmp_path / "lab.npy", np.eye(3)[[2, 0, 1, 2]])  # Keras-style one-hot
    out = str(tmp_path / "out")
    ingest(IngestSettings(out=out, images=str(tmp_path / "img.npy"), labels=str(tmp_path / "lab.npy")))
    m, tbl, images = read_back(out)
    assert m.spec.shape == (2, 20, 20) and m.spec.class_names == ("0", "1", "2")
    np.testing.assert_array_equal(images, nchw)
    assert tbl.column("label").to_pylist() == [2, 0, 1, 2]


def test_unlabelled_images_get_null_labels(tmp_path):
    np.save(tmp_path / "img.npy", np.ones((3, 21, 21), np.float32))
    out = str(tmp_path / "out")
    ingest(IngestSettings(out=out, images=str(tmp_path / "img.npy")))
    assert st.read_table(out).column("label").to_pylist() == [None, None, None]


def test_hdf5_big_endian_jets(tmp_path):
    rng = np.random.default_rng(2)
    imgs = rng.random((9, 20, 20)).astype(">f4")
    labels = np.array([0, 1, 2, 3, 4, 0, 1, 2, 3])
    with h5py.File(tmp_path / "jets.h5", "w") as f:
        f["images"] = imgs
        f["labels"] = labels
        f["pt"] = np.linspace(100, 900, 9)
    out = str(tmp_path / "out")
    ingest(IngestSettings(out=out, hdf5=str(tmp_path / "jets.h5"), classes=("g", "q", "t", "w", "z"), chunk_rows=4))
    m, tbl, images = read_back(out)
    assert m.spec.class_names == ("g", "q", "t", "w", "z")
    np.testing.assert_array_equal(images[:, 0], imgs.astype(np.float32))
    assert tbl.column("label").to_pylist() == labels.tolist()
    np.testing.assert_allclose(tbl.column("pt").to_numpy(), np.linspace(100, 900, 9))


def test_hdf5_missing_key_is_named(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["stamps"] = np.zeros((2, 5, 5))
    with pytest.raises(IngestError, match="has no dataset 'images'; it holds: stamps; name the images with --images-key"):
        ingest(IngestSettings(out=str(tmp_path / "o"), hdf5=str(tmp_path / "x.h5")))


def test_files_that_are_not_what_their_flag_says_or_were_cut_short_are_named(tmp_path, capsys):
    from stampray.cli import main

    np.save(tmp_path / "lab.npy", np.zeros(4, np.int64))
    with h5py.File(tmp_path / "good.h5", "w") as f:
        f["images"] = np.zeros((4, 5, 5), np.float32)
    (tmp_path / "cut.h5").write_bytes((tmp_path / "good.h5").read_bytes()[:1000])
    np.savez(tmp_path / "good.npz", images=np.ones((400, 5, 5), np.float32))
    whole = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(whole[:len(whole) // 2])
    for source, words in (
            (["--hdf5", str(tmp_path / "lab.npy"), "--images-key", "images"],
             f"{tmp_path / 'lab.npy'} is not a readable HDF5 file ("),
            (["--hdf5", str(tmp_path / "cut.h5"), "--images-key", "images"],
             f"{tmp_path / 'cut.h5'} is not a readable HDF5 file ("),
            (["--images", str(tmp_path / "cut.npz"), "--images-key", "images"],
             f"{tmp_path / 'cut.npz'} is not a readable .npz archive (")):
        assert main(["ingest", "--out", str(tmp_path / "o")] + source) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"stampray ingest: error: {words}") and err.count("\n") == 1, err
        assert not (tmp_path / "o").exists()
    # a member whose data stops early (the central directory intact): the rows where it ends are named
    import zipfile

    with zipfile.ZipFile(tmp_path / "good.npz") as z:
        member = z.read("images.npy")
    with zipfile.ZipFile(tmp_path / "short.npz", "w") as z:
        z.writestr("images.npy", member[:len(member) - 25 * 4 * 10])  # the last 10 of 400 rows are missing
    assert main(["ingest", "--out", str(tmp_path / "o"), "--images", str(tmp_path / "short.npz"),
                 "--images-key", "images"]) == 2
    assert capsys.readouterr().err == (f"stampray ingest: error: {tmp_path / 'short.npz'}[images] ends at row 390 of "
                                       f"400: the archive is cut short; save it again with numpy.savez\n")
    assert not (tmp_path / "o").exists()  # the run made it, and leaves nothing behind


def test_an_input_of_which_nothing_can_be_used_ends_non_zero_saying_why(tmp_path, capsys):
    from stampray.cli import main

    np.save(tmp_path / "im.npy", np.zeros((3, 5, 5), np.float32))
    np.save(tmp_path / "neg.npy", np.full(3, -1, np.int64))  # every label out of range
    out = tmp_path / "o"
    assert main(["ingest", "--out", str(out), "--images", str(tmp_path / "im.npy"), "--labels",
                 str(tmp_path / "neg.npy"), "--classes", "a,b"]) == 2
    err = capsys.readouterr().err
    assert err == (f"stampray ingest: error: none of the 3 input rows could be used (label 3); they are listed with "
                   f"their reasons in {out}/_errors, and no table was written (a rerun at {out} needs no "
                   f"--overwrite): fix the input, or the flags that select from it\n")
    assert not (out / "_manifest.json").exists() and st.read_errors(str(out)).num_rows == 3  # kept, to read
    with pytest.raises(FileNotFoundError):
        st.read_manifest(str(out))  # no table: score, train and the rest refuse it
    np.save(tmp_path / "ok.npy", np.zeros(3, np.int64))
    assert main(["ingest", "--out", str(out), "--images", str(tmp_path / "im.npy"), "--labels",
                 str(tmp_path / "ok.npy"), "--classes", "a,b"]) == 0  # the corrected rerun, no --overwrite
    assert st.read_manifest(str(out)).num_rows == 3 and not (out / "_errors").exists()
    (tmp_path / "cat.csv").write_text("file,label\n")
    (tmp_path / "cutouts").mkdir()
    assert main(["ingest", "--out", str(tmp_path / "o2"), "--fits", str(tmp_path / "cutouts"), "--catalog",
                 str(tmp_path / "cat.csv"), "--size", "5", "--classes", "a,b"]) == 2
    assert capsys.readouterr().err == (f"stampray ingest: error: the input holds no rows, so no stamp could be "
                                       f"written at {tmp_path / 'o2'}; check that it is the input you meant\n")
    assert not (tmp_path / "o2").exists()  # made by the run, left with nothing


def test_a_fits_header_astropy_cannot_parse_sets_the_file_aside_without_astropys_notes(tmp_path, capfd, recwarn):
    from astropy.io.fits.verify import VerifyWarning

    from stampray.cli import main

    d = tmp_path / "cutouts"
    d.mkdir()
    for i in range(2):
        fits.PrimaryHDU(np.full((5, 5), i, np.float32)).writeto(d / f"c{i}.fits")
    b = bytearray((d / "c1.fits").read_bytes())
    at = b.find(b"NAXIS1")
    b[at + 10:at + 30] = b"  garbage!!         "  # an unparsable card
    (d / "c1.fits").write_bytes(bytes(b))
    (tmp_path / "cat.csv").write_text("file,label\nc0.fits,0\nc1.fits,1\n")
    assert main(["ingest", "--out", str(tmp_path / "o"), "--fits", str(d), "--catalog", str(tmp_path / "cat.csv"),
                 "--size", "5", "--classes", "a,b"]) == 0
    out, err = capfd.readouterr()
    assert "ingested 1 stamps" in out and "set aside 1 (unreadable 1)" in out
    # no VerifyWarning, which names no file: the set-aside list names it, with the reason
    assert err == "" and not [w for w in recwarn if issubclass(w.category, VerifyWarning)], err
    assert st.read_errors(str(tmp_path / "o")).to_pylist() == [
        {"stamp_id": "c1", "source": str(tmp_path / "cat.csv"), "row": 1,
         "reason": f"unreadable: {d / 'c1.fits'}: Empty or corrupt FITS file"}]


def write_fits(path, data):
    fits.PrimaryHDU(np.asarray(data).astype(">f4")).writeto(path)


def test_fits_directory_with_catalogue(tmp_path):
    rng = np.random.default_rng(4)
    d = tmp_path / "cutouts"
    d.mkdir()
    arrays = [rng.normal(size=(21, 21)) for _ in range(3)] + [rng.normal(size=(25, 25)), rng.normal(size=(19, 19))]
    for i, a in enumerate(arrays):
        write_fits(d / f"c{i}.fits", a)
    nan = rng.normal(size=(21, 21))
    nan[3, 4] = np.nan
    write_fits(d / "nan.fits", nan)
    lines = ["file,label,id,snr"] + [f"c{i}.fits,{['star', 'galaxy'][i % 2]},obj{i},{i}.5" for i in range(5)]
    lines += ["nan.fits,star,objnan,1", "gone.fits,star,objgone,2", "c0.fits,comet,objbad,3"]
    (tmp_path / "cat.csv").write_text("\n".join(lines) + "\n")

    out = str(tmp_path / "refuse")
    r = ingest(IngestSettings(out=out, fits=str(d), catalog=str(tmp_path / "cat.csv"), classes=("star", "galaxy")))
    assert r.ingested == 3 and r.set_aside == {"shape": 2, "nonfinite": 1, "unreadable": 1, "label": 1}
    errors = {e["stamp_id"]: e["reason"] for e in st.read_errors(out).to_pylist()}
    assert errors["obj3"] == f"shape: {d}/c3.fits is 25x25, the dataset 21x21; pass --size N to centre-crop or pad every cutout"
    assert errors["objgone"] == f"unreadable: {d}/gone.fits does not exist"
    assert errors["objbad"] == "label: 'comet' is not one of the classes (star, galaxy)"

    out = str(tmp_path / "fit")
    r = ingest(IngestSettings(out=out, fits=str(d), catalog=str(tmp_path / "cat.csv"), classes=("star", "galaxy"),
                              size=21))
    assert r.ingested == 5
    m, tbl, images = read_back(out)
    assert tbl.column("stamp_id").to_pylist() == ["obj0", "obj1", "obj2", "obj3", "obj4"]
    assert tbl.column("label").to_pylist() == [0, 1, 0, 1, 0]
    assert tbl.column("snr").to_pylist() == [0.5, 1.5, 2.5, 3.5, 4.5]
    np.testing.assert_allclose(images[0, 0], arrays[0].astype(np.float32))
    np.testing.assert_allclose(images[3, 0], arrays[3][2:23, 2:23].astype(np.float32))  # centre crop
    padded = images[4, 0]
    np.testing.assert_allclose(padded[1:20, 1:20], arrays[4].astype(np.float32))  # centre pad
    assert padded[0, 0] == pytest.approx(np.median(arrays[4].astype(np.float32)))


def test_pickle_refused_then_allowed(tmp_path):
    rng = np.random.default_rng(5)
    imgs = rng.normal(size=(4, 64, 64))
    with open(tmp_path / "radio.pkl", "wb") as f:
        pickle.dump(imgs, f)
    with open(tmp_path / "labels.pkl", "wb") as f:
        pickle.dump([0, 3, 1, 2], f)
    settings = dict(out=str(tmp_path / "o"), pickle=str(tmp_path / "radio.pkl"), labels=str(tmp_path / "labels.pkl"))
    with pytest.raises(IngestError, match="refusing to unpickle .*radio.pkl: loading a pickle runs arbitrary code"
                                          ".* pass --allow-pickle"):
        ingest(IngestSettings(**settings))
    assert not os.path.exists(tmp_path / "o" / "_manifest.json")
    ingest(IngestSettings(**settings, allow_pickle=True, classes=("extended", "point", "double", "triple")))
    m, tbl, images = read_back(str(tmp_path / "o"))
    assert m.spec.shape == (1, 64, 64) and tbl.column("label").to_pylist() == [0, 3, 1, 2]
    np.testing.assert_allclose(images[:, 0], imgs.astype(np.float32))


def test_object_npy_is_refused_without_opt_in(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([np.zeros(3), "x"], dtype=object), allow_pickle=True)
    with pytest.raises(IngestError, match="refusing to unpickle"):
        ingest(IngestSettings(out=str(tmp_path / "o"), images=str(tmp_path / "obj.npy")))


def test_nonfinite_policy(tmp_path):
    x = np.zeros((5, 21, 21), np.float32)
    x[1, 0, 0] = np.nan
    x[3, 2, 2] = np.inf
    x[3, 2, 3] = -np.inf
    np.save(tmp_path / "x.npy", x)
    out = str(tmp_path / "o")
    r = ingest(IngestSettings(out=out, class_files=(("a", str(tmp_path / "x.npy")),)))
    assert r.ingested == 3 and r.set_aside == {"nonfinite": 2}
    assert st.read_errors(out).to_pylist() == [
        {"stamp_id": "x-000000001", "source": str(tmp_path / "x.npy"), "row": 1,
         "reason": "nonfinite: 1 non-finite pixels (NaN or inf)"},
        {"stamp_id": "x-000000003", "source": str(tmp_path / "x.npy"), "row": 3,
         "reason": "nonfinite: 2 non-finite pixels (NaN or inf)"},
    ]
    with pytest.raises(IngestError, match=r"x.npy row 1 has 1 non-finite pixels .* --nonfinite set-aside"):
        ingest(IngestSettings(out=str(tmp_path / "f"), class_files=(("a", str(tmp_path / "x.npy")),),
                              nonfinite="fail"))


def test_labels_outside_the_class_list_are_set_aside(tmp_path):
    np.save(tmp_path / "img.npy", np.zeros((4, 21, 21), np.float32))
    np.save(tmp_path / "lab.npy", np.array([0, 1, 2, -1]))
    out = str(tmp_path / "o")
    r = ingest(IngestSettings(out=out, images=str(tmp_path / "img.npy"), labels=str(tmp_path / "lab.npy"),
                              classes=("noise", "source")))
    assert r.ingested == 2 and r.set_aside == {"label": 2}
    reasons = [e["reason"] for e in st.read_errors(out).to_pylist()]
    assert reasons == ["label: 2 is outside the class list 0..1 (noise, source)",
                       "label: -1 is outside the class list 0..1 (noise, source)"]


def test_an_empty_class_name_is_an_unlabelled_stamp_as_an_empty_number_is(tmp_path):
    from stampray.ingest import map_labels

    names, labels, bad = map_labels(np.array(["star", "", "galaxy", "  ", "star"]), (), "cat.csv")
    assert names == ("galaxy", "star") and labels.tolist() == [1, -1, 0, -1, 1] and bad == {}
    names, labels, bad = map_labels(np.array(["star", "", "qso"]), ("galaxy", "star"), "cat.csv")
    assert labels.tolist() == [1, -1, -2] and bad == {2: "label: 'qso' is not one of the classes (galaxy, star)"}
    names, labels, _ = map_labels(np.array([1.0, np.nan, 0.0]), (), "cat.csv")
    assert names == ("0", "1") and labels.tolist() == [1, -1, 0]


def test_duplicate_ids_are_set_aside(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.zeros((4, 21, 21), np.float32), labels=np.array([0, 1, 0, 1]),
             ids=np.array(["a", "b", "a", "c"]))
    out = str(tmp_path / "o")
    r = ingest(IngestSettings(out=out, images=str(tmp_path / "d.npz"), ids_key="ids"))
    assert r.ingested == 3 and r.set_aside == {"duplicate_id": 1}
    err = st.read_errors(out).to_pylist()[0]
    assert err["row"] == 2 and err["reason"] == f"duplicate_id: 'a' already used by {tmp_path}/d.npz row 0"


def test_inconsistent_shapes_between_files_are_refused(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((2, 21, 21), np.float32))
    np.save(tmp_path / "b.npy", np.zeros((2, 20, 20), np.float32))
    with pytest.raises(IngestError, match=r"must share one shape, but the --class files differ .*a.npy: \(1, 21, 21\)"):
        ingest(IngestSettings(out=str(tmp_path / "o"), class_files=(("a", str(tmp_path / "a.npy")),
                                                                    ("b", str(tmp_path / "b.npy")))))


def test_ambiguous_layout_asks_for_layout(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((2, 3, 3, 3), np.float32))
    with pytest.raises(IngestError, match="pass --layout nchw or --layout nhwc"):
        ingest(IngestSettings(out=str(tmp_path / "o"), images=str(tmp_path / "a.npy")))
    ingest(IngestSettings(out=str(tmp_path / "o"), images=str(tmp_path / "a.npy"), layout="nchw"))


def test_fixed_split_is_recorded(tmp_path):
    np.save(tmp_path / "test.npy", np.zeros((3, 21, 21), np.float32))
    out = str(tmp_path / "o")
    ingest(IngestSettings(out=out, class_files=(("a", str(tmp_path / "test.npy")),), split="test"))
    assert st.read_table(out).column("split").to_pylist() == ["test"] * 3


def test_arrays_are_read_in_bounded_chunks(tmp_path):
    big = np.arange(50 * 4 * 4, dtype=np.float32).reshape(50, 4, 4)
    np.save(tmp_path / "big.npy", big)
    arr = _open_npy(str(tmp_path / "big.npy"))
    assert isinstance(arr.arr, np.memmap)  # memory-mapped, never loaded whole
    np.savez_compressed(tmp_path / "big.npz", images=big)
    streamed = _StreamedNpy(str(tmp_path / "big.npz"), "images")
    chunks = list(streamed.chunks(16))
    assert [len(c) for _, c in chunks] == [16, 16, 16, 2]
    np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), big)


def test_one_source_form_only(tmp_path):
    with pytest.raises(ValueError, match="give exactly one source form"):
        IngestSettings(out="o", images="a.npy", hdf5="b.h5")
    with pytest.raises(ValueError, match="--fits DIR needs --catalog CSV"):
        IngestSettings(out="o", fits="d")


def test_first_row_owns_its_id_even_when_set_aside(tmp_path):
    # The owner of an id follows from the ids alone (as the distributed ingest decides it before reading):
    # a later row with the id of an unusable row is a duplicate, not its replacement.
    x = np.zeros((3, 5, 5), np.float32)
    x[0, 0, 0] = np.nan
    np.savez(tmp_path / "d.npz", images=x, ids=np.array(["a", "a", "b"]))
    out = str(tmp_path / "o")
    r = ingest(IngestSettings(out=out, images=str(tmp_path / "d.npz"), ids_key="ids"))
    assert r.ingested == 1 and r.set_aside == {"nonfinite": 1, "duplicate_id": 1}
    assert [e["reason"] for e in st.read_errors(out).to_pylist()] == [
        "nonfinite: 1 non-finite pixels (NaN or inf)", f"duplicate_id: 'a' already used by {tmp_path}/d.npz row 0"]
