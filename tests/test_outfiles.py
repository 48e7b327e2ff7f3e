"""stampray.outfiles: a verb's named files in a directory that may hold the user's own."""

import hashlib
import json

import pytest

from stampray import outfiles
from stampray.occlusion import PNG_FILES

REPORT = outfiles.Files("evaluate", "--out", ("page.html",), ".png")


def stage(tmp_path, tag: str, names) -> str:
    d = tmp_path / f"staged-{tag}"
    d.mkdir()
    for n in names:
        (d / n).write_text(f"{n} of run {tag}")
    return str(d)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_a_run_killed_while_putting_its_files_leaves_them_all_its_own(tmp_path, monkeypatch):
    out = tmp_path / "out"
    outfiles.publish(stage(tmp_path, "1", ["a.png", "page.html"]), ["a.png", "page.html"], str(out), REPORT)
    assert json.loads((out / "_stampray.json").read_text()) == {
        "verb": "evaluate", "files": {"a.png": [digest("a.png of run 1")], "page.html": [digest("page.html of run 1")]}}

    real, calls = outfiles._put_bytes, []

    def dies_on_the_second_file(dest, data):
        calls.append(dest)
        if len(calls) == 3:  # the interim marker, b.png, then page.html: killed there
            raise KeyboardInterrupt
        real(dest, data)

    monkeypatch.setattr(outfiles, "_put_bytes", dies_on_the_second_file)
    with pytest.raises(KeyboardInterrupt):
        outfiles.publish(stage(tmp_path, "2", ["b.png", "page.html"]), ["b.png", "page.html"], str(out), REPORT)
    monkeypatch.setattr(outfiles, "_put_bytes", real)
    assert (out / "page.html").read_text() == "page.html of run 1"  # the old page, complete
    assert (out / "b.png").read_text() == "b.png of run 2"
    (out / ".page.html.0123456789ab.tmp").write_text("half a page")  # as a kill inside a write leaves it

    # The next run owns both the old and the half-put files: it replaces them and removes what it no longer draws
    outfiles.publish(stage(tmp_path, "3", ["c.png", "page.html"]), ["c.png", "page.html"], str(out), REPORT)
    assert sorted(p.name for p in out.iterdir()) == ["_stampray.json", "c.png", "page.html"]
    assert (out / "page.html").read_text() == "page.html of run 3"


def test_names_that_are_not_plain_files_of_the_verbs_kind_are_never_taken_from_a_list(tmp_path):
    victim, out = tmp_path / "victim.txt", tmp_path / "out"
    victim.write_text("the user's")
    out.mkdir()
    (out / "notes.txt").write_text("the user's too")
    (out / "_stampray.json").write_text(json.dumps({"verb": "evaluate", "files": {
        "../victim.txt": [], str(victim): [], "notes.txt": [], ".hidden.png": [], "old.png": []}}))
    (out / "old.png").write_text("an earlier run's")
    assert outfiles.owned(str(out), REPORT) == {"old.png": []}
    outfiles.publish(stage(tmp_path, "1", ["page.html"]), ["page.html"], str(out), REPORT)
    assert victim.read_text() == "the user's" and (out / "notes.txt").read_text() == "the user's too"
    assert (out / "old.png").read_text() == "an earlier run's"  # listed without a digest: replaced, never removed


def test_an_index_of_the_users_own_is_not_taken_for_an_earlier_occludes(tmp_path):
    """An ``index.csv`` with occlude's header, written by the user, names other files than occlude would
    (occlude names each picture png_name(stamp_id)): nothing it lists is taken, and it is not replaced."""
    fits, png = tmp_path / "s1.fits", tmp_path / "png"
    fits.write_text("a survey file")
    png.mkdir()
    (png / "s3.png").write_text("a picture of the user's")
    (png / "index.csv").write_text(f"stamp_id,file\ns1,{fits}\ns3,s3.png\n")
    assert outfiles.owned(str(png), PNG_FILES) == {}
    with pytest.raises(ValueError, match=f"^--png {png} holds s3.png, index.csv, which 'stampray occlude' did not write"):
        outfiles.publish(stage(tmp_path, "1", ["s3.png", "index.csv"]), ["s3.png", "index.csv"], str(png), PNG_FILES)
    assert fits.read_text() == "a survey file" and (png / "s3.png").read_text() == "a picture of the user's"
    assert sorted(p.name for p in png.iterdir()) == ["index.csv", "s3.png"]
    # occlude's own index of an earlier stampray (no _stampray.json): its files are replaced, never removed
    (png / "index.csv").write_text("stamp_id,file\ns3,s3.png\na/b,a_b-3ec69c85.png\n")
    (png / "a_b-3ec69c85.png").write_text("an earlier occlude's")
    assert outfiles.owned(str(png), PNG_FILES) == {"index.csv": [], "occlusion_grid.png": [], "s3.png": [],
                                                   "a_b-3ec69c85.png": []}
    outfiles.publish(stage(tmp_path, "2", ["s3.png", "index.csv"]), ["s3.png", "index.csv"], str(png), PNG_FILES)
    assert (png / "s3.png").read_text() == "s3.png of run 2" and (png / "a_b-3ec69c85.png").exists()


def test_a_directory_of_another_verb_or_with_a_foreign_marker_is_refused(tmp_path):
    out = tmp_path / "out"
    vet = outfiles.Files("vet", "--out", ("vet.html",), ".html")
    outfiles.publish(stage(tmp_path, "1", ["vet.html"]), ["vet.html"], str(out), vet)
    with pytest.raises(ValueError, match=rf"^--out {out} holds the output of 'stampray vet' \(its _stampray.json\); "
                                         r"give 'stampray evaluate' a directory of its own$"):
        outfiles.check(str(out), REPORT)
    (out / "_stampray.json").write_text('{"files": ["x"]}')
    with pytest.raises(ValueError, match=rf"^{out}/_stampray.json exists but is not one stampray wrote"):
        outfiles.check(str(out), vet)
    assert (out / "vet.html").read_text() == "vet.html of run 1"
