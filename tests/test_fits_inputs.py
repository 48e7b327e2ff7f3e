"""Real survey inputs (issue #12): FITS names, compression, HDUs, headers and WCS; arrays whose shape misleads.

FITS fixtures are written with astropy in each test's tmp_path. No test here starts Ray: the distributed
path's units run in-process (``_dispatch`` and ``ray_session`` replaced), which is what a unit's Ray task runs.
"""

import contextlib
import gzip

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import astropy.units as u
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.wcs import WCS

from stampray import ingest as ingest_module
from stampray import table as st
from stampray.ingest import IngestError, IngestSettings, ingest


def stamp(h=21, w=21, seed=None):
    return np.random.default_rng(seed).normal(size=(h, w)).astype(np.float32)


def catalogue(path, names):
    """A catalogue ``file,label`` of ``names``, every label 0; returns its path."""
    path.write_text("file,label\n" + "".join(f"{n},0\n" for n in names))
    return str(path)


def read_back(out):
    m = st.read_manifest(out)
    tbl = st.read_table(out)
    return m, tbl, st.decode_images(tbl.column("image"), m.spec.shape)


def reasons(out):
    return {e["stamp_id"]: e["reason"] for e in st.read_errors(out).to_pylist()}


def tan_header(ra, dec, h=21, w=21):
    """A TAN WCS whose reference pixel is the cutout's centre: zero-based ((w-1)/2, (h-1)/2)."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ra, dec]
    wcs.wcs.crpix = [(w - 1) / 2 + 1, (h - 1) / 2 + 1]  # FITS pixels are one-based
    wcs.wcs.cdelt = [-0.25 / 3600, 0.25 / 3600]
    return wcs.to_header()


# --------------------------------------------------------------------------------------------------
# 1. Ids from real file names
# --------------------------------------------------------------------------------------------------
NAMES = {
    "J123456.78+012345.6_r.fits": "J123456.78+012345.6_r",
    "J123456.78+012345.6_g.fits": "J123456.78+012345.6_g",
    "J123456.78-012345.6_r.fits": "J123456.78-012345.6_r",
    "100_010.451-009.284_0.0529_0080.60.fits": "100_010.451-009.284_0.0529_0080.60",
    "100_010.451-009.284_0.0529_0080.61.fits": "100_010.451-009.284_0.0529_0080.61",
    "cutout.0042.fits.gz": "cutout.0042",
    "cutout.0043.FITS.GZ": "cutout.0043",
    "cutout.0044.fit": "cutout.0044",
    "cutout.0045.fts.bz2": "cutout.0045",
    "cutout.0046.fits.fz": "cutout.0046",
    "cutout.0047.fz": "cutout.0047",
}


def write_named(d, name, data):
    if name.lower().endswith("fz"):
        fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data.astype(np.int32))]).writeto(d / name)
    else:
        fits.PrimaryHDU(data).writeto(d / name)  # astropy compresses .gz and .bz2 names itself


def test_fits_ids_are_whole_names_less_the_fits_extension(tmp_path):
    d = tmp_path / "cut"
    d.mkdir()
    data = {}
    for i, name in enumerate(NAMES):
        data[name] = np.arange(21 * 21, dtype=np.int32).reshape(21, 21) + 1000 * i
        write_named(d, name, data[name])
    cat = catalogue(tmp_path / "cat.csv", list(NAMES))
    out = str(tmp_path / "o")
    r = ingest(IngestSettings(out=out, fits=str(d), catalog=cat, parallel="off"))
    assert r.set_aside == {} and r.ingested == len(NAMES)
    _, tbl, images = read_back(out)
    assert tbl.column("stamp_id").to_pylist() == list(NAMES.values())
    np.testing.assert_array_equal(images[:, 0], np.stack([data[n] for n in NAMES]).astype(np.float32))

    out = str(tmp_path / "p")
    ingest(IngestSettings(out=out, fits=str(d), catalog=cat, id_prefix="hsc", parallel="off"))
    assert st.read_table(out).column("stamp_id").to_pylist() == [f"hsc-{v}" for v in NAMES.values()]


def test_fits_ids_collide_only_when_names_do(tmp_path):
    d = tmp_path / "cut"
    (d / "a").mkdir(parents=True)
    (d / "b").mkdir()
    for name in ("a/J1.5+2.fits", "b/J1.5+2.fits", "a/J1.5-2.fits"):
        fits.PrimaryHDU(stamp()).writeto(d / name)
    out = str(tmp_path / "o")
    names = ["a/J1.5+2.fits", "b/J1.5+2.fits", "a/J1.5-2.fits"]
    r = ingest(IngestSettings(out=out, fits=str(d), catalog=catalogue(tmp_path / "cat.csv", names), parallel="off"))
    assert r.ingested == 2 and r.set_aside == {"duplicate_id": 1}
    assert st.read_table(out).column("stamp_id").to_pylist() == ["J1.5+2", "J1.5-2"]
    assert reasons(out) == {"J1.5+2": f"duplicate_id: 'J1.5+2' already used by {tmp_path}/cat.csv row 0"}


def test_array_file_prefixes_keep_dots_before_the_extension(tmp_path):
    np.save(tmp_path / "run.1.npy", np.zeros((2, 5, 5), np.float32))
    np.save(tmp_path / "run.2.npy", np.ones((2, 5, 5), np.float32))
    out = str(tmp_path / "o")
    r = ingest(IngestSettings(out=out, parallel="off", classes=("a",),
                              class_files=(("a", str(tmp_path / "run.1.npy")), ("a", str(tmp_path / "run.2.npy")))))
    assert r.ingested == 4 and r.set_aside == {}
    assert st.read_table(out).column("stamp_id").to_pylist() == [
        "run.1-000000000", "run.1-000000001", "run.2-000000000", "run.2-000000001"]


# --------------------------------------------------------------------------------------------------
# 2. FITS as it is stored
# --------------------------------------------------------------------------------------------------
def test_gzip_and_tile_compressed_fits_locally_and_by_uri(tmp_path):
    d = tmp_path / "cut"
    d.mkdir()
    a, b = stamp(seed=1), np.arange(441, dtype=np.int16).reshape(21, 21)
    fits.PrimaryHDU(a.astype(">f4")).writeto(d / "a.fits.gz")
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(b, compression_type="RICE_1")]).writeto(d / "b.fits.fz")
    c = stamp(seed=2)
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(c, compression_type="GZIP_2", quantize_level=0.0)]
                 ).writeto(d / "c.fits.fz")
    assert (d / "a.fits.gz").read_bytes()[:2] == b"\x1f\x8b"
    cat = catalogue(tmp_path / "cat.csv", ["a.fits.gz", "b.fits.fz", "c.fits.fz"])
    for k, (fits_dir, cat_path) in enumerate([(str(d), cat), (f"file://{d}", f"file://{cat}")]):
        out = str(tmp_path / f"o{k}")
        r = ingest(IngestSettings(out=out, fits=fits_dir, catalog=cat_path, parallel="off"))
        assert r.set_aside == {} and r.ingested == 3
        _, tbl, images = read_back(out)
        assert tbl.column("stamp_id").to_pylist() == ["a", "b", "c"]
        np.testing.assert_array_equal(images[:, 0], np.stack([a, b.astype(np.float32), c]))


def three_extensions(path, sci, tmpl, diff, compress=False):
    """An empty primary HDU and the extensions SCI, TEMPLATE, DIFF (one left out when its array is None)."""
    hdus = [fits.PrimaryHDU()]
    hdus += [fits.ImageHDU(x.astype(">f4"), name=n) for x, n in zip((sci, tmpl, diff), ("SCI", "TEMPLATE", "DIFF"))
             if x is not None]
    fits.HDUList(hdus).writeto(path)
    if compress:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()


def test_hdus_stack_as_channels_with_exact_pixels(tmp_path):
    d = tmp_path / "cut"
    d.mkdir()
    planes = [[np.full((21, 21), 100 * i + k, np.float32) + np.arange(21, dtype=np.float32) for k in range(3)]
              for i in range(3)]
    three_extensions(d / "t0.fits", *planes[0])
    three_extensions(d / "t1.fits", *planes[1], compress=True)  # t1.fits.gz
    three_extensions(d / "t2.fits", *planes[2])
    three_extensions(d / "short.fits", planes[0][0], None, planes[0][2])
    three_extensions(d / "odd.fits", planes[0][0], planes[0][1], np.zeros((20, 20)))
    names = ["t0.fits", "t1.fits.gz", "t2.fits", "short.fits", "odd.fits"]
    cat = catalogue(tmp_path / "cat.csv", names)
    for k, (fits_dir, cat_path) in enumerate([(str(d), cat), (f"file://{d}", f"file://{cat}")]):
        out = str(tmp_path / f"o{k}")
        r = ingest(IngestSettings(out=out, fits=fits_dir, catalog=cat_path, hdu="SCI,TEMPLATE,DIFF", parallel="off"))
        assert r.ingested == 3 and r.set_aside == {"hdu": 1, "shape": 1}
        m, tbl, images = read_back(out)
        assert m.spec.shape == (3, 21, 21)
        assert tbl.column("stamp_id").to_pylist() == ["t0", "t1", "t2"]
        np.testing.assert_array_equal(images, np.array(planes, np.float32))
        assert reasons(out) == {
            "short": f"hdu: {fits_dir}/short.fits has no HDU 'TEMPLATE' (--hdu SCI,TEMPLATE,DIFF); "
                     f"its HDUs: 0 PRIMARY, 1 SCI, 2 DIFF",
            "odd": f"shape: {fits_dir}/odd.fits has HDUs SCI 21x21, TEMPLATE 21x21, DIFF 20x20 of different "
                   f"shapes; stacked HDUs (--hdu SCI,TEMPLATE,DIFF) must be 2-D images of one shape",
        }

    # Channel order follows --hdu; names are matched as FITS matches EXTNAME (any case).
    out = str(tmp_path / "order")
    r = ingest(IngestSettings(out=out, fits=str(d), catalog=cat, hdu="diff,sci", parallel="off"))
    assert r.ingested == 4 and r.set_aside == {"shape": 1}  # short.fits has both; odd.fits's DIFF is 20x20
    images = read_back(out)[2]
    np.testing.assert_array_equal(images, np.array(planes + planes[:1], np.float32)[:, [2, 0]])
    # One HDU by index or by name; by default the first HDU holding an image (the empty primary skipped).
    for hdu, plane in (("2", 1), ("TEMPLATE", 1), (None, 0)):
        out = str(tmp_path / f"one-{hdu}")
        r = ingest(IngestSettings(out=out, fits=str(d), catalog=cat, hdu=hdu, parallel="off"))
        images = read_back(out)[2]
        assert images.shape[1] == 1
        np.testing.assert_array_equal(images[:3, 0], np.array(planes, np.float32)[:, plane])
    assert r.set_aside == {} and r.ingested == 5  # default: every file has an image in HDU 1


def test_first_readable_cutout_message_names_the_hdus(tmp_path):
    d = tmp_path / "cut"
    d.mkdir()
    fits.PrimaryHDU(stamp()).writeto(d / "x.fits")
    with pytest.raises(IngestError, match=r"no readable FITS cutout among the 1 files of .*cat.csv \(the first, "
                                          r"x.fits: has no HDU 'SCI' \(--hdu SCI\); its HDUs: 0 PRIMARY\)"):
        ingest(IngestSettings(out=str(tmp_path / "o"), fits=str(d), catalog=catalogue(tmp_path / "cat.csv", ["x.fits"]),
                              hdu="SCI", parallel="off"))


def test_big_endian_scaled_and_nan_pixels(tmp_path):
    d = tmp_path / "cut"
    d.mkdir()
    f4 = stamp(seed=3).astype(">f4")
    fits.PrimaryHDU(f4).writeto(d / "f4.fits")
    nan = f4.copy()
    nan[4, 5] = np.nan
    nan[6, 7] = np.nan
    fits.PrimaryHDU(nan).writeto(d / "nan.fits")
    raw = np.arange(441, dtype=">i2").reshape(21, 21) - 200
    scaled = fits.PrimaryHDU(raw)
    scaled.header["BSCALE"], scaled.header["BZERO"] = 0.5, 100.0
    scaled.writeto(d / "i2.fits")
    blank = raw.copy()
    blank[0, 0] = -32768
    hdu = fits.PrimaryHDU(blank)
    hdu.header["BSCALE"], hdu.header["BZERO"], hdu.header["BLANK"] = 0.5, 100.0, -32768
    hdu.writeto(d / "blank.fits")
    assert fits.getdata(d / "f4.fits").dtype.byteorder == ">"  # as stored
    cat = catalogue(tmp_path / "cat.csv", ["f4.fits", "nan.fits", "i2.fits", "blank.fits"])
    out = str(tmp_path / "o")
    r = ingest(IngestSettings(out=out, fits=str(d), catalog=cat, parallel="off"))
    assert r.ingested == 2 and r.set_aside == {"nonfinite": 2}
    _, tbl, images = read_back(out)
    assert images.dtype == np.float32 and images.dtype.byteorder in "=<|"
    np.testing.assert_array_equal(images[0, 0], f4.astype(np.float32))
    np.testing.assert_array_equal(images[1, 0], raw.astype(np.float32) * 0.5 + 100.0)
    assert reasons(out) == {"nan": "nonfinite: 2 non-finite pixels (NaN or inf)",
                            "blank": "nonfinite: 1 non-finite pixels (NaN or inf)"}
    with pytest.raises(IngestError, match=r"cat.csv row 1 has 2 non-finite pixels .* --nonfinite set-aside"):
        ingest(IngestSettings(out=str(tmp_path / "f"), fits=str(d), catalog=cat, nonfinite="fail", parallel="off"))


def wcs_survey(tmp_path):
    """Four cutouts: WCS and header keys in the SCI extension, AIRMASS only in the primary header."""
    d = tmp_path / "cut"
    d.mkdir()
    specs = [("w0.fits", 150.1, 2.2, 30.0, "r", 1.2), ("w1.fits", 210.987654321, -45.5, 60, "g", None),
             ("nowcs.fits", None, None, 90.5, "i", 1.4), ("big.fits", 12.345, 67.89, None, "z", 1.1)]
    for name, ra, dec, exptime, band, airmass in specs:
        h, w = (25, 25) if name == "big.fits" else (21, 21)
        sci = fits.ImageHDU(stamp(h, w), name="SCI", header=tan_header(ra, dec, h, w) if ra is not None else None)
        if exptime is not None:
            sci.header["EXPTIME"] = exptime
        sci.header["FILTER"] = band
        primary = fits.PrimaryHDU()
        if airmass is not None:
            primary.header["AIRMASS"] = airmass
        primary.header["FILTER"] = "primary-not-read"
        fits.HDUList([primary, sci]).writeto(d / name)
    return d, specs


def test_header_keys_and_wcs_centre_become_columns(tmp_path):
    d, specs = wcs_survey(tmp_path)
    cat = tmp_path / "cat.csv"
    cat.write_text("file,label,snr\n" + "".join(f"{s[0]},0,{i}.5\n" for i, s in enumerate(specs)))
    out = str(tmp_path / "o")
    r = ingest(IngestSettings(out=out, fits=str(d), catalog=str(cat), size=21, hdu="SCI",
                              header_keys=("EXPTIME", "filter", "AIRMASS", "GAIN"), parallel="off"))
    assert r.ingested == 4 and r.set_aside == {}
    tbl = st.read_table(out)
    assert tbl.schema.names[3:] == ["snr", "exptime", "filter", "airmass", "gain", "ra", "dec"]
    assert [str(tbl.schema.field(c).type) for c in tbl.schema.names[3:]] == [
        "double", "double", "string", "double", "string", "double", "double"]
    assert tbl.column("exptime").to_pylist() == [30.0, 60.0, 90.5, None]
    assert tbl.column("filter").to_pylist() == ["r", "g", "i", "z"]  # the SCI header's, not the primary's
    assert tbl.column("airmass").to_pylist() == [1.2, None, 1.4, 1.1]  # from the primary header
    assert tbl.column("gain").to_pylist() == [None] * 4  # in no header
    ra, dec = tbl.column("ra").to_pylist(), tbl.column("dec").to_pylist()
    assert ra[2] is None and dec[2] is None  # no celestial WCS
    for i in (0, 1, 3):  # the stamp centre is CRVAL (for big.fits, after the centre crop from 25x25)
        assert ra[i] == pytest.approx(specs[i][1], abs=1e-9) and dec[i] == pytest.approx(specs[i][2], abs=1e-9)


def test_catalogue_ra_dec_win_over_the_wcs(tmp_path):
    d, specs = wcs_survey(tmp_path)
    cat = tmp_path / "cat.csv"
    cat.write_text("file,label,ra,dec\n" + "".join(f"{s[0]},0,{i},{-i}\n" for i, s in enumerate(specs[:3])))
    out = str(tmp_path / "o")
    ingest(IngestSettings(out=out, fits=str(d), catalog=str(cat), parallel="off"))
    tbl = st.read_table(out)
    assert tbl.schema.names[3:] == ["ra", "dec"]
    assert tbl.column("ra").to_pylist() == [0.0, 1.0, 2.0] and tbl.column("dec").to_pylist() == [0.0, -1.0, -2.0]


def test_galactic_wcs_gives_icrs_ra_dec(tmp_path):
    d = tmp_path / "cut"
    d.mkdir()
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["GLON-TAN", "GLAT-TAN"]
    wcs.wcs.crval = [0.0, 0.0]
    wcs.wcs.crpix = [11, 11]
    wcs.wcs.cdelt = [-1e-4, 1e-4]
    fits.PrimaryHDU(stamp(), header=wcs.to_header()).writeto(d / "gc.fits")
    out = str(tmp_path / "o")
    ingest(IngestSettings(out=out, fits=str(d), catalog=catalogue(tmp_path / "cat.csv", ["gc.fits"]), parallel="off"))
    tbl = st.read_table(out)
    # The Galactic centre (l = b = 0) in ICRS: 17h45m37.2s -28d56m10s, and exactly astropy's transformation.
    ra, dec = tbl.column("ra").to_pylist()[0], tbl.column("dec").to_pylist()[0]
    assert ra == pytest.approx(266.40499, abs=1e-4) and dec == pytest.approx(-28.93617, abs=1e-4)
    gc = SkyCoord(l=0 * u.deg, b=0 * u.deg, frame="galactic").icrs
    assert ra == pytest.approx(gc.ra.deg, abs=1e-9) and dec == pytest.approx(gc.dec.deg, abs=1e-9)


def test_header_key_that_is_not_a_number_where_the_column_is_set_aside(tmp_path):
    d = tmp_path / "cut"
    d.mkdir()
    for name, exptime in (("a.fits", 30.0), ("b.fits", "unknown")):
        hdu = fits.PrimaryHDU(stamp())
        hdu.header["EXPTIME"] = exptime
        hdu.writeto(d / name)
    out = str(tmp_path / "o")
    r = ingest(IngestSettings(out=out, fits=str(d), catalog=catalogue(tmp_path / "cat.csv", ["a.fits", "b.fits"]),
                              header_keys=("EXPTIME",), parallel="off"))
    assert r.ingested == 1 and r.set_aside == {"header": 1}
    assert reasons(out) == {"b": f"header: {d}/b.fits: EXPTIME = 'unknown' is not a number, but the column "
                                 f"'exptime' is numeric (from the first cutouts that have EXPTIME); fix the header "
                                 f"or leave EXPTIME out of --header-keys"}


def test_a_truncated_cutout_is_set_aside_naming_it_and_astropy_prints_nothing(tmp_path, capsys):
    d = tmp_path / "cut"
    d.mkdir()
    for name in ("a.fits", "b.fits", "c.fits"):
        fits.PrimaryHDU(stamp(seed=1)).writeto(d / name)
    whole = (d / "b.fits").read_bytes()
    (d / "b.fits").write_bytes(whole[:2880 + 500])  # the header and 125 of the 441 pixels
    out = str(tmp_path / "o")
    r = ingest(IngestSettings(out=out, fits=str(d), catalog=catalogue(tmp_path / "cat.csv", ["a.fits", "b.fits",
                                                                                            "c.fits"]),
                              parallel="off"))
    assert r.ingested == 2 and r.set_aside == {"unreadable": 1}
    assert reasons(out) == {"b": f"unreadable: {d}/b.fits: File may have been truncated: actual file length "
                                 f"(3380) is smaller than the expected size ({len(whole)})"}
    captured = capsys.readouterr()
    assert "truncated" not in captured.out + captured.err  # astropy's own line names no file


def test_header_key_columns_are_refused_when_they_collide(tmp_path):
    for key in ("LABEL", "stamp_id", "Split", "IMAGE"):
        with pytest.raises(ValueError, match=f"--header-keys {key}: its column '{key.lower()}' is one stampray "
                                             f"writes itself"):
            IngestSettings(out="o", fits="d", catalog="c.csv", header_keys=(key,))
    with pytest.raises(ValueError, match="--header-keys names exptime and EXPTIME, which both make the column"):
        IngestSettings(out="o", fits="d", catalog="c.csv", header_keys=("exptime", "EXPTIME"))
    with pytest.raises(ValueError, match="--hdu and --header-keys choose what is read from FITS cutouts"):
        IngestSettings(out="o", images="a.npy", hdu="1")
    assert IngestSettings(out="o", fits="d", catalog="c.csv", hdu=1, header_keys="A, B").header_keys == ("A", "B")
    d = tmp_path / "cut"
    d.mkdir()
    fits.PrimaryHDU(stamp()).writeto(d / "a.fits")
    cat = tmp_path / "cat.csv"
    cat.write_text("file,label,snr\na.fits,0,1\n")
    with pytest.raises(IngestError, match=f"--header-keys SNR: its column 'snr' is already a column of {cat}; "
                                          f"leave SNR out of --header-keys or rename the catalogue column"):
        ingest(IngestSettings(out=str(tmp_path / "o"), fits=str(d), catalog=str(cat), header_keys=("SNR",)))


def test_units_write_one_schema_whatever_files_they_hold(tmp_path, monkeypatch):
    """Two units: the first's files lack EXPTIME and a WCS, the second's have them. The distributed path's
    units (run in-process here, as their Ray tasks would) write shards of one schema, equal to in-process."""
    d = tmp_path / "cut"
    d.mkdir()
    names = []
    for i in range(4):
        hdu = fits.PrimaryHDU(stamp(seed=i), header=tan_header(10.0 + i, -5.0) if i >= 2 else None)
        if i >= 2:
            hdu.header["EXPTIME"] = 10.0 * i
        hdu.header["BAND"] = "gr"[i % 2]
        hdu.writeto(d / f"s.{i}.fits")
        names.append(f"s.{i}.fits")
    cat = catalogue(tmp_path / "cat.csv", names)
    settings = dict(fits=str(d), catalog=cat, header_keys=("EXPTIME", "BAND"), unit_files=2, progress=False)

    def run_units_here(s, plan, todo, progress):
        return {u: ingest_module._run_unit(s, plan.spec, plan.names, plan.units[u]) for u in todo}

    ref = str(tmp_path / "ref")
    ingest(IngestSettings(out=ref, parallel="off", **settings))
    monkeypatch.setattr(ingest_module, "_dispatch", run_units_here)
    monkeypatch.setattr("stampray.runtime.ray_session", lambda address: contextlib.nullcontext())
    out = tmp_path / "units"
    r = ingest(IngestSettings(out=str(out), parallel="on", **settings))
    assert r.units == 2 and r.ingested == 4
    schemas = [pq.read_schema(p) for p in sorted(out.glob("part-*.parquet"))]
    assert len(schemas) == 2 and schemas[0].equals(schemas[1])
    assert schemas[0].names == ["stamp_id", "image", "label", "exptime", "band", "ra", "dec"]
    tbl = st.read_table(str(out))
    assert tbl.equals(st.read_table(ref))
    assert tbl.column("exptime").to_pylist() == [None, None, 20.0, 30.0]
    assert tbl.column("band").to_pylist() == ["g", "r", "g", "r"]
    assert tbl.column("ra").to_pylist()[:2] == [None, None]
    assert tbl.column("ra").to_pylist()[2:] == pytest.approx([12.0, 13.0], abs=1e-9)
    assert tbl.column("stamp_id").to_pylist() == ["s.0", "s.1", "s.2", "s.3"]


# --------------------------------------------------------------------------------------------------
# 5. Arrays whose shape misleads
# --------------------------------------------------------------------------------------------------
def test_one_image_without_an_n_axis_is_refused(tmp_path):
    np.save(tmp_path / "one.npy", np.zeros((21, 21), np.float32))
    with pytest.raises(IngestError, match=r"one.npy holds one 21x21 image \(shape \(21, 21\)\), not a batch; "
                                          r"save images with a leading N axis \(np.save\(f, img\[None\]\)\)$"):
        ingest(IngestSettings(out=str(tmp_path / "o"), images=str(tmp_path / "one.npy")))
    np.save(tmp_path / "sq.npy", np.zeros((16, 16), np.float32))  # one image, or 16 flat 4x4 images
    with pytest.raises(IngestError, match=r"sq.npy holds one 16x16 image .* or pass --layout flat if it holds "
                                          r"16 flat images of 4x4 pixels"):
        ingest(IngestSettings(out=str(tmp_path / "o"), class_files=(("a", str(tmp_path / "sq.npy")),)))
    r = ingest(IngestSettings(out=str(tmp_path / "flat"), images=str(tmp_path / "sq.npy"), layout="flat"))
    assert r.ingested == 16 and r.manifest.spec.shape == (1, 4, 4)
    np.save(tmp_path / "flat.npy", np.zeros((3, 441), np.float32))  # a batch of flat 21x21 images: fine
    assert ingest(IngestSettings(out=str(tmp_path / "f2"), images=str(tmp_path / "flat.npy"))).ingested == 3

    np.save(tmp_path / "rgb.npy", np.zeros((21, 21, 3), np.float32))
    with pytest.raises(IngestError, match=r"rgb.npy: shape \(21, 21, 3\) would be read as 21 images of 21x3 pixels; "
                                          r"it looks like one 21x21 image with 3 channels \(channels-last\), not a "
                                          r"batch; save images with a leading N axis .*, or pass --layout nhw if it "
                                          r"holds 21 images of 21x3 pixels"):
        ingest(IngestSettings(out=str(tmp_path / "o"), images=str(tmp_path / "rgb.npy")))
    r = ingest(IngestSettings(out=str(tmp_path / "nhw"), images=str(tmp_path / "rgb.npy"), layout="nhw"))
    assert r.ingested == 21 and r.manifest.spec.shape == (1, 21, 3)
    np.save(tmp_path / "rgb1.npy", np.zeros((1, 21, 21, 3), np.float32))  # with its N axis: one 3-channel stamp
    r = ingest(IngestSettings(out=str(tmp_path / "rgb1"), images=str(tmp_path / "rgb1.npy")))
    assert r.ingested == 1 and r.manifest.spec.shape == (3, 21, 21)


def test_missing_array_keys_are_refused(tmp_path):
    npz = tmp_path / "t.npz"
    np.savez(npz, images=np.zeros((3, 21, 21), np.float32), labels=np.array([0, 1, 0]))
    with pytest.raises(IngestError, match=r"t.npz has no array 'label'; it holds: images, labels; "
                                          r"name the array with --labels-key$"):
        ingest(IngestSettings(out=str(tmp_path / "o"), images=str(npz), labels_key="label"))
    with pytest.raises(IngestError, match=r"t.npz has no array 'stamps'; it holds: images, labels; "
                                          r"name the array with --images-key$"):
        ingest(IngestSettings(out=str(tmp_path / "o"), images=str(npz), images_key="stamps"))
    out = str(tmp_path / "ok")
    ingest(IngestSettings(out=out, images=str(npz)))  # the default: 'labels' when the archive has it
    tbl = st.read_table(out)
    assert tbl.column("label").to_pylist() == [0, 1, 0] and tbl.schema.names == ["stamp_id", "image", "label"]
    np.savez(tmp_path / "u.npz", images=np.zeros((2, 21, 21), np.float32))
    out = str(tmp_path / "unlabelled")
    ingest(IngestSettings(out=out, images=str(tmp_path / "u.npz")))
    assert st.read_table(out).column("label").to_pylist() == [None, None]

    with h5py.File(tmp_path / "j.h5", "w") as f:
        f["images"] = np.zeros((2, 20, 20), np.float32)
        f["y"] = np.array([0, 1])
    with pytest.raises(IngestError, match=r"j.h5 has no dataset 'labels'; it holds: images, y; name the labels "
                                          r"with --labels-key"):
        ingest(IngestSettings(out=str(tmp_path / "o"), hdf5=str(tmp_path / "j.h5"), labels_key="labels"))


def test_cli_flags_hdu_and_header_keys(tmp_path, capsys):
    from stampray.cli import main

    d = tmp_path / "cut"
    d.mkdir()
    sci, diff = stamp(seed=5), stamp(seed=6)
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(sci, name="SCI", header=tan_header(1.5, 2.5)),
                  fits.ImageHDU(diff, name="DIFF")]).writeto(d / "J0.1+2.3.fits")
    with fits.open(d / "J0.1+2.3.fits", mode="update") as hdul:
        hdul[1].header["MJD-OBS"] = 60000.25
    out = tmp_path / "o"
    cat = catalogue(tmp_path / "c.csv", ["J0.1+2.3.fits"])
    assert main(["ingest", "--out", str(out), "--fits", str(d), "--catalog", cat,
                 "--hdu", "SCI,DIFF", "--header-keys", "MJD-OBS", "--parallel", "off", "--no-progress"]) == 0
    assert "ingested 1 stamps (2, 21, 21)" in capsys.readouterr().out
    m, tbl, images = read_back(str(out))
    assert tbl.to_pydict()["stamp_id"] == ["J0.1+2.3"] and tbl.column("mjd-obs").to_pylist() == [60000.25]
    assert tbl.column("ra").to_pylist()[0] == pytest.approx(1.5, abs=1e-9)
    np.testing.assert_array_equal(images[0], np.stack([sci, diff]))
    assert m.settings["ingest"]["hdu"] == "SCI,DIFF" and m.settings["ingest"]["header_keys"] == ["MJD-OBS"]
