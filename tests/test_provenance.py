"""#13.6-8: --version, provenance in every output, one progress line, synth's manifest as written."""

import json
from importlib import metadata

import pytest

from stampray import table as st


def test_version_names_stampray_ray_torch_and_python(capsys):
    from stampray import __version__
    from stampray.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith(f"stampray {__version__} (ray {metadata.version('ray')}, "
                          f"torch {metadata.version('torch')}, python ")


def test_synth_returns_the_manifest_it_wrote_with_its_provenance(tmp_path):
    from stampray.provenance import provenance
    from stampray.synth import SynthSettings, synth

    m = synth(SynthSettings(out=str(tmp_path / "s"), n=300, shard_rows=100, progress=False))
    on_disk = st.read_manifest(str(tmp_path / "s"))
    assert m.to_json() == on_disk.to_json()
    assert on_disk.settings["provenance"] == provenance()
    assert provenance()["ray"] == metadata.version("ray") and provenance()["torch"] == metadata.version("torch")


def test_evaluate_has_no_address_flag_as_it_never_starts_ray(capsys):
    from stampray.cli import main

    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--scores", "s", "--out", "r", "--address", "auto"])
    assert e.value.code == 2 and "unrecognized arguments: --address auto" in capsys.readouterr().err


def test_the_progress_line_counts_and_rates_and_can_be_silenced(capsys, monkeypatch):
    from stampray.progress import Progress

    monkeypatch.setenv("STAMPRAY_PROGRESS", "1")
    p = Progress("ingest", 10, True, unit="files", rate_unit="stamps")
    p.update(4, 400)  # the first update shows (nothing shown yet)
    p.update(3, 300)  # within 10 s of the last line: not shown
    p.close()  # the final count
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(", ")[0] for line in lines] == ["ingest: 4/10 files (40.0%)", "ingest: 7/10 files (70.0%)"]
    assert all(line.endswith(" stamps/s") for line in lines)
    r = Progress("synth", 5)
    r.update(5)  # the first line is already the final count
    r.close()  # so the close adds none
    assert [line.split(", ")[0] for line in capsys.readouterr().err.splitlines()] == ["synth: 5/5 stamps (100.0%)"]
    monkeypatch.setenv("STAMPRAY_PROGRESS", "0")
    q = Progress("synth", 10)
    q.update(10)
    q.say("hello")
    q.close()
    assert capsys.readouterr().err == ""


def test_evaluate_records_provenance(tmp_path):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stampray.evaluate import EvaluateSettings, evaluate
    from stampray.provenance import provenance

    s = tmp_path / "s"
    s.mkdir()
    pq.write_table(pa.table({"stamp_id": ["a", "b"], "label": pa.array([0, 1], pa.int64()), "split": ["test"] * 2,
                             "pred": [0, 1], "pred_name": ["x", "y"], "p_x": np.float32([0.9, 0.2]),
                             "p_y": np.float32([0.1, 0.8]), "model": ["m@0"] * 2}), str(s / "part-00000.parquet"))
    (s / "_manifest.json").write_text(json.dumps({
        "model": "m.pt", "model_tag": "m@0", "data": "d", "keep": [], "preprocess": "course", "class_names": ["x", "y"],
        "num_rows": 2, "set_aside": 0, "errors": {}, "shards": [{"path": "part-00000.parquet", "rows": 2, "errors": 0}],
        "split": {"fractions": [0.7, 0.1, 0.2], "source": "checkpoint", "column": False}}))
    r = evaluate(EvaluateSettings(scores=(str(s),), out=str(tmp_path / "r"), progress=False))
    assert r.report["provenance"] == provenance()
    assert json.loads((tmp_path / "r" / "report.json").read_text())["provenance"] == provenance()
