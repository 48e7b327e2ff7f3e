"""stampray cutout: stamps cut from synthetic mosaics with known sources at known positions."""

import csv
import gzip
import os

import numpy as np
import pytest

from stampray import table as st
from stampray.cutout import (NONFINITE, CutoutError, CutoutSettings, cut_piece, cutout, list_mosaics,
                             read_header, read_headers)

SIZE = 21
C = SIZE // 2  # the centre pixel of a stamp
NX, NY = 400, 300  # mosaic a.fits
NB = 200  # mosaic deep/b.FITS.gz, centred on a.fits pixel (400, 150): it holds a's columns 300..399 and more

# id -> (x, y) in a.fits (zero-based), label, snr, whether a source is drawn there
ROWS = {
    "s1": ((100.3, 80.6), "source", 12.0, True),  # in a only
    "s2": ((330.2, 150.7), "source", 8.0, True),  # whole in a and in b: a comes first
    "s3": ((395.4, 120.2), "source", 9.5, True),  # runs off a's right edge, whole in b: cut from b
    "s4": ((2.0, 200.0), "source", 7.0, True),  # runs 8 columns off a's left edge, in no other mosaic
    "s5": (None, "noise", 0.0, False),  # in no mosaic
    "s1-again": ((50.0, 50.0), "noise", 0.0, False),  # id s1 again (written as s1 below)
    "s7": ((200.0, 250.0), "source", 6.0, True),  # a NaN pixel of a.fits lies in its cutout
    "s8": ((250.5, 60.5), "noise", 0.0, False),  # plain sky
    "s9": ((150.0, 150.0), "star", 5.0, False),  # a label outside --classes
}


def _wcs(crval, crpix):
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = list(crval)
    w.wcs.crpix = list(crpix)  # one-based
    w.wcs.cdelt = [-1.0 / 3600, 1.0 / 3600]
    return w


def _draw(img, x, y, amp=60.0, sigma=1.5):
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    img += amp * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    """Two overlapping mosaics (a.fits and deep/b.FITS.gz), a text file to ignore, and the catalogue."""
    from astropy.io import fits

    root = tmp_path_factory.mktemp("survey")
    mosaics = root / "mosaics"
    (mosaics / "deep").mkdir(parents=True)
    wa = _wcs((150.0, 2.0), (NX / 2 + 0.5, NY / 2 + 0.5))
    centre_b = wa.pixel_to_world(400.0, 150.0)
    wb = _wcs((centre_b.ra.deg, centre_b.dec.deg), (NB / 2 + 0.5, NB / 2 + 0.5))
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, (NY, NX))
    b = rng.normal(0.0, 1.0, (NB, NB))
    sky = {}
    for sid, (pos, _, _, source) in ROWS.items():
        if pos is None:
            sky[sid] = (150.5, 2.5)  # half a degree from both mosaics
            continue
        c = wa.pixel_to_world(*pos)
        sky[sid] = (float(c.ra.deg), float(c.dec.deg))
        if source:
            _draw(a, *pos)
            _draw(b, *(float(v) for v in wb.world_to_pixel(c)))
    a[252, 203] = np.nan  # inside s7's cutout (rows 240..260, columns 190..210)
    fits.PrimaryHDU(a.astype(np.float32), header=wa.to_header()).writeto(mosaics / "a.fits")
    fits.PrimaryHDU(b.astype(np.float32), header=wb.to_header()).writeto(root / "b.fits")
    with open(root / "b.fits", "rb") as f, gzip.open(mosaics / "deep" / "b.FITS.gz", "wb") as g:
        g.write(f.read())
    (mosaics / "README.txt").write_text("not a mosaic")
    catalog = root / "catalog.csv"
    with open(catalog, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "ra", "dec", "label", "split", "snr", "note"])
        for k, (sid, (_, label, snr, _)) in enumerate(ROWS.items()):
            w.writerow(["s1" if sid == "s1-again" else sid, repr(sky[sid][0]), repr(sky[sid][1]), label,
                        "train" if sid == "s1" else "", snr, f"note{k}"])
    return {"root": root, "mosaics": str(mosaics), "catalog": str(catalog), "sky": sky, "wa": wa, "wb": wb}


def _run(survey, out, **kw):
    kw.setdefault("classes", ("noise", "source"))
    s = CutoutSettings(images=survey["mosaics"], catalog=survey["catalog"], out=str(out), size=SIZE, **kw)
    return cutout(s)


def _by_id(out):
    t = st.read_table(str(out))
    images = st.decode_images(t.column(st.IMAGE), st.read_manifest(str(out)).spec.shape)
    rows = t.drop_columns([st.IMAGE]).to_pylist()
    return {r["stamp_id"]: (r, images[i, 0]) for i, r in enumerate(rows)}


def _reasons(out):
    return {(e["stamp_id"], e["row"]): e["reason"] for e in st.read_errors(str(out)).to_pylist()}


def _expected_xy(survey, sid, mosaic):
    from astropy.coordinates import SkyCoord

    c = SkyCoord(*survey["sky"][sid], unit="deg", frame="icrs")
    return tuple(float(v) for v in survey["wa" if mosaic == "a.fits" else "wb"].world_to_pixel(c))


def test_cutout_stamps_columns_and_reasons(survey, tmp_path, ray_shared):
    out = tmp_path / "stamps"
    r = _run(survey, out)

    stamps = _by_id(out)
    assert list(stamps) == ["s1", "s2", "s8", "s3"]  # mosaic order, then catalogue order
    assert {k: v[0]["mosaic"] for k, v in stamps.items()} == {"s1": "a.fits", "s2": "a.fits", "s8": "a.fits",
                                                              "s3": "deep/b.FITS.gz"}
    for sid, (row, img) in stamps.items():
        assert img.shape == (SIZE, SIZE) and np.isfinite(img).all()
        assert (row["ra"], row["dec"]) == survey["sky"][sid]  # the catalogue's values, unchanged
        assert (row["x"], row["y"]) == pytest.approx(_expected_xy(survey, sid, row["mosaic"]), abs=1e-6)
        assert row["snr"] == ROWS[sid][2] and row["note"] == f"note{list(ROWS).index(sid)}"
        assert row["label"] == ("noise", "source").index(ROWS[sid][1])
        if ROWS[sid][3]:
            peak = np.unravel_index(np.argmax(img), img.shape)
            assert abs(peak[0] - C) <= 1 and abs(peak[1] - C) <= 1, (sid, peak)
    assert (stamps["s1"][0]["x"], stamps["s1"][0]["y"]) == pytest.approx(ROWS["s1"][0], abs=1e-6)
    assert stamps["s1"][0]["split"] == "train" and stamps["s2"][0]["split"] is None

    reasons = _reasons(out)
    assert sorted(reasons) == [("s1", 5), ("s4", 3), ("s5", 4), ("s7", 6), ("s9", 8)]  # catalogue rows
    assert reasons[("s4", 3)].startswith("partial: the 21x21 cutout at x=2.00,y=200.00 runs off a.fits")
    assert "--partial pad" in reasons[("s4", 3)]
    ra, dec = survey["sky"]["s5"]
    assert reasons[("s5", 4)] == f"outside: no mosaic contains ra={ra:.6f},dec={dec:.6f}"
    assert reasons[("s1", 5)] == f"duplicate_id: 's1' already used by {survey['catalog']} row 0"
    assert reasons[("s7", 6)] == "nonfinite: 1 non-finite pixels (NaN or inf) of a.fits"
    assert reasons[("s9", 8)].startswith("label: 'star' is not one of the classes")

    manifest = st.read_manifest(str(out))
    assert manifest.num_rows == r.stamps == 4 and r.rows_in == len(ROWS) == r.stamps + sum(r.set_aside.values())
    assert r.set_aside == {"partial": 1, "outside": 1, "duplicate_id": 1, "nonfinite": 1, "label": 1}
    assert (r.mosaics, r.mosaics_used, r.tasks) == (2, 2, 2)
    assert manifest.spec.shape == (1, SIZE, SIZE) and manifest.spec.class_names == ("noise", "source")
    assert manifest.label_counts == {"0": 1, "1": 3}
    assert {"ra", "dec", "mosaic", "x", "y", "snr", "note", "split"} <= set(manifest.columns)
    assert sum(v["rows"] for v in st.inspect_shards(str(out), manifest).values()) == 4  # footers as recorded


def test_partial_pad_keeps_padded_stamps(survey, tmp_path, ray_shared):
    r = _run(survey, tmp_path / "nan", partial="pad")
    stamps = _by_id(tmp_path / "nan")
    assert r.stamps == 5 and "partial" not in r.set_aside
    assert stamps["s3"][0]["mosaic"] == "deep/b.FITS.gz"  # a whole cutout still wins over a padded one
    row, img = stamps["s4"]
    assert row["mosaic"] == "a.fits" and (row["x"], row["y"]) == pytest.approx((2.0, 200.0), abs=1e-6)
    assert np.isnan(img).sum() == 8 * SIZE  # columns -8..-1 of a.fits
    assert np.isnan(img[:, :8]).all() and np.isfinite(img[:, 8:]).all()
    assert np.unravel_index(np.nanargmax(img), img.shape) == (C, C)
    for sid in ("s1", "s2", "s3", "s8"):
        assert np.isfinite(stamps[sid][1]).all()

    _run(survey, tmp_path / "zero", partial="pad", pad_value=0.0)
    img = _by_id(tmp_path / "zero")["s4"][1]
    assert np.isfinite(img).all() and (img[:, :8] == 0).all() and (img == 0).sum() == 8 * SIZE


def test_nonfinite_fail_names_the_mosaic(survey, tmp_path, ray_shared):
    with pytest.raises(CutoutError, match=r"a\.fits: the cutout of 's7' .* holds 1 non-finite pixels"):
        _run(survey, tmp_path / "out", nonfinite="fail")


def test_uris_and_overwrite(survey, tmp_path, ray_shared):
    out = tmp_path / "stamps"
    r = _run({**survey, "mosaics": "file://" + survey["mosaics"], "catalog": "file://" + survey["catalog"]}, out)
    assert r.stamps == 4 and st.read_table(str(out)).column("mosaic").to_pylist()[-1] == "deep/b.FITS.gz"
    with pytest.raises(CutoutError, match="already holds a stamp table; pass --overwrite"):
        _run(survey, out)
    assert _run(survey, out, overwrite=True, shard_rows=3).stamps == 4
    assert [s["rows"] for s in st.read_manifest(str(out)).shards] == [3, 1]


def test_cli(survey, tmp_path, ray_shared, capsys):
    from stampray import cli

    out = tmp_path / "stamps"
    assert cli.main(["cutout", "--images", survey["mosaics"], "--catalog", survey["catalog"], "--out",
                     str(out), "--size", str(SIZE), "--classes", "noise,source", "--partial", "pad",
                     "--pad-value", "0", "--no-progress"]) == 0
    line = capsys.readouterr().out
    assert "wrote 5 stamps (1, 21, 21)" in line and "set aside 4 (duplicate_id 1, label 1, nonfinite 1, " \
                                                      "outside 1)" in line
    s = st.read_manifest(str(out)).settings["cutout"]
    assert (s["partial"], s["pad_value"], s["classes"], s["progress"], s["shard_rows"]) == \
        ("pad", 0.0, ["noise", "source"], False, 50_000)
    with pytest.raises(SystemExit):
        cli.build_parser("cutout").parse_args(["cutout", "--images", "m", "--catalog", "c", "--out", "o",
                                               "--size", "5", "--partial", "skip"])
    assert "set-aside" in capsys.readouterr().err


@pytest.mark.parametrize("kw, match", [
    ({"size": 0}, "--size must be a positive integer"),
    ({"size": True}, "--size must be a positive integer"),
    ({"shard_rows": -1}, "--shard-rows must be a positive integer"),
    ({"partial": "skip"}, "--partial must be one of set-aside, pad"),
    ({"pad_value": 0.0}, "--pad-value 0.0 applies to padded cutouts only"),
    ({"nonfinite": "keep"}, "--nonfinite must be one of set-aside, fail"),
    ({"hdu": " "}, "--hdu must be an HDU index"),
    ({"classes": ("a", "a")}, "--classes"),
])
def test_settings_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        CutoutSettings(**{"images": "m", "catalog": "c.csv", "out": "o", "size": 5, **kw})


def test_nonfinite_choices_are_ingests():
    from stampray.ingest import NONFINITE as INGEST_NONFINITE

    assert NONFINITE == INGEST_NONFINITE


def test_mosaic_listing_and_hdus(survey, tmp_path):
    from astropy.io import fits

    assert list_mosaics(survey["mosaics"]) == [
        (os.path.join(survey["mosaics"], "a.fits"), "a.fits"),
        (os.path.join(survey["mosaics"], "deep", "b.FITS.gz"), "deep/b.FITS.gz")]
    one = os.path.join(survey["mosaics"], "a.fits")
    assert list_mosaics(one) == [(one, "a.fits")]
    with pytest.raises(CutoutError, match="holds no FITS mosaic"):
        list_mosaics(str(tmp_path))
    with pytest.raises(CutoutError, match="does not exist"):
        list_mosaics(str(tmp_path / "nowhere"))

    data = np.zeros((30, 40), np.float32)
    path = str(tmp_path / "c.fits.fz")
    hdr = _wcs((10.0, -5.0), (20.5, 15.5)).to_header()
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, header=hdr, name="SCI")]).writeto(path)
    for hdu in (None, "SCI", "1", 1):
        m = read_header(path, "c.fits.fz", hdu)
        assert (m.hdu, m.shape, m.naxis) == (1, (30, 40), 2)
    with pytest.raises(CutoutError, match="HDU 0 holds no 2-D image"):
        read_header(path, "c.fits.fz", "0")
    with pytest.raises(CutoutError, match="has no HDU named 'WHT'"):
        read_header(path, "c.fits.fz", "WHT")

    cube = str(tmp_path / "radio.fits")  # a radio image: RA, Dec, one frequency, one Stokes
    from astropy.wcs import WCS

    w = WCS(naxis=4)
    w.wcs.ctype = ["RA---SIN", "DEC--SIN", "FREQ", "STOKES"]
    w.wcs.crval, w.wcs.crpix, w.wcs.cdelt = [10.0, -5.0, 3e9, 1.0], [20.5, 15.5, 1, 1], [-1e-3, 1e-3, 1e6, 1]
    plane = np.zeros((1, 1, 30, 40), np.float32)
    plane[0, 0, 15, 20] = 1.0
    fits.PrimaryHDU(plane, header=w.to_header()).writeto(cube)
    m = read_header(cube, "radio.fits")
    assert (m.hdu, m.shape, m.naxis, m.wcs.naxis) == (0, (30, 40), 4, 2)
    got = cut_piece(cube, m.hdu, m.naxis, 5, False, np.nan, np.array([20.0]), np.array([15.0]))
    assert got["images"].shape == (1, 1, 5, 5) and got["images"][0, 0, 2, 2] == 1.0 and got["images"].sum() == 1.0


def test_refused_outputs(survey, tmp_path):
    with pytest.raises(ValueError, match="lies inside --images"):
        _run(survey, os.path.join(survey["mosaics"], "stamps"))
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "part-00000.parquet").write_bytes(b"not ours")
    with pytest.raises(ValueError, match="which stampray did not write there"):
        _run(survey, foreign)
    assert (foreign / "part-00000.parquet").read_bytes() == b"not ours"
    bad = tmp_path / "bad.csv"
    bad.write_text("name,ra,dec\nx,1,2\n")
    with pytest.raises(CutoutError, match="needs columns id,ra,dec.*lacks id"):
        cutout(CutoutSettings(images=survey["mosaics"], catalog=str(bad), out=str(tmp_path / "o"), size=SIZE))


@pytest.mark.parametrize("size", [4, 5, 21])
def test_whole_cutout_decision_matches_astropy(size, tmp_path):
    """The driver decides which cutouts fit wholly, the tasks cut them in astropy's strict mode: the two agree
    (and a task refuses, rather than sets aside, a cutout that does not fit)."""
    from astropy.nddata.utils import PartialOverlapError, overlap_slices

    from stampray.cutout import whole_cutout

    rng = np.random.default_rng(1)
    x, y = rng.uniform(-0.5, 39.5, 400), rng.uniform(-0.5, 29.5, 400)
    x[:40], y[:40] = np.round(x[:40]) + 0.5, np.round(y[:40])  # half-pixel ties
    want = []
    for xi, yi in zip(x, y):
        try:
            overlap_slices((30, 40), (size, size), (yi, xi), mode="strict")
            want.append(True)
        except PartialOverlapError:
            want.append(False)
    got = whole_cutout(x, y, size, (30, 40))
    assert got.tolist() == want and 0 < sum(want) < len(want)
    from astropy.io import fits

    path = str(tmp_path / "m.fits")
    fits.PrimaryHDU(np.zeros((30, 40), np.float32)).writeto(path)
    assert cut_piece(path, 0, 2, size, False, np.nan, x[got][:3], y[got][:3])["images"].shape == (3, 1, size, size)
    with pytest.raises(PartialOverlapError):
        cut_piece(path, 0, 2, size, False, np.nan, x[~got][:1], y[~got][:1])


def test_truncated_mosaic_sets_aside_what_it_cannot_read(survey, tmp_path, ray_shared, caplog):
    """The stamps past its end are set aside as unreadable, and one warning names the short file (astropy's
    own names none, and is not shown)."""
    import warnings

    from astropy.io import fits
    from astropy.utils.exceptions import AstropyUserWarning

    a = os.path.join(survey["mosaics"], "a.fits")
    header = len(fits.getheader(a).tostring())  # whole 2880-byte blocks
    cut = tmp_path / "cut.fits"
    with open(a, "rb") as f:
        cut.write_bytes(f.read(header + 100 * NX * 4))  # the first 100 rows of pixels, of 300
    with warnings.catch_warnings():
        warnings.simplefilter("error", AstropyUserWarning)
        r = cutout(CutoutSettings(images=str(cut), catalog=survey["catalog"], out=str(tmp_path / "out"),
                                  size=SIZE, classes=("noise", "source")))
    need = header + 300 * NX * 4  # the pixels the header promises (not the padding after them)
    assert [m for m in caplog.messages if "shorter" in m] == [
        f"cutout: warning: cut.fits is shorter than its header says ({header + 100 * NX * 4:,} of {need:,} bytes): "
        f"the stamps past its end are set aside as unreadable"]
    assert list(_by_id(tmp_path / "out")) == ["s1", "s8"]  # cutouts within rows 0..99
    unreadable = {k[0]: v for k, v in _reasons(tmp_path / "out").items() if v.startswith("unreadable")}
    assert sorted(unreadable) == ["s2", "s7"]
    assert unreadable["s2"].startswith("unreadable: cut.fits: its pixels cannot be read (")
    # The cutout tasks (run here, where a warning is an error) say nothing of their own about it either.
    m = read_headers([(str(cut), "cut.fits")], None)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", AstropyUserWarning)
        piece = cut_piece(str(cut), m.hdu, m.naxis, SIZE, False, np.nan, np.array([20.0, 20.0]),
                          np.array([20.0, 250.0]))
    assert list(piece["errors"]) == [1]
    assert r.set_aside == {"unreadable": 2, "partial": 2, "outside": 1, "duplicate_id": 1, "label": 1}
