"""stampray.outfiles: a verb's named files in a directory that may hold the user's own."""

import hashlib
import json

import pytest

from stampray import outfiles


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
    outfiles.publish(stage(tmp_path, "1", ["a.png", "page.html"]), ["a.png", "page.html"], str(out), "evaluate", "--out")
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
        outfiles.publish(stage(tmp_path, "2", ["b.png", "page.html"]), ["b.png", "page.html"], str(out), "evaluate",
                         "--out")
    monkeypatch.setattr(outfiles, "_put_bytes", real)
    assert (out / "page.html").read_text() == "page.html of run 1"  # the old page, complete
    assert (out / "b.png").read_text() == "b.png of run 2"

    # The next run owns both the old and the half-put files: it replaces them and removes what it no longer draws
    outfiles.publish(stage(tmp_path, "3", ["c.png", "page.html"]), ["c.png", "page.html"], str(out), "evaluate",
                     "--out")
    assert sorted(p.name for p in out.iterdir()) == ["_stampray.json", "c.png", "page.html"]
    assert (out / "page.html").read_text() == "page.html of run 3"


def test_a_directory_of_another_verb_or_with_a_foreign_marker_is_refused(tmp_path):
    out = tmp_path / "out"
    outfiles.publish(stage(tmp_path, "1", ["vet.html"]), ["vet.html"], str(out), "vet", "--out")
    with pytest.raises(ValueError, match=rf"^--out {out} holds the output of 'stampray vet' \(its _stampray.json\); "
                                         r"give 'stampray evaluate' a directory of its own$"):
        outfiles.check(str(out), "evaluate", "--out", ["report.html"])
    (out / "_stampray.json").write_text('{"files": ["x"]}')
    with pytest.raises(ValueError, match=rf"^{out}/_stampray.json exists but is not one stampray wrote"):
        outfiles.check(str(out), "vet", "--out", ["vet.html"])
    assert (out / "vet.html").read_text() == "vet.html of run 1"
