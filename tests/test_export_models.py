"""#16.5: every registered model exports to ONNX, and onnxruntime gives PyTorch's probabilities.

Export times measured on the shared 2-core test machine (torch 2.13, the dynamo exporter with its own
onnxruntime check, plus this test's): cnn 7.4 s (the first export in a process pays the exporter's start-up),
vgg6 2.9 s, jet_cnn 2.5 s, dense 2.4 s, radio_cnn 2.3 s, dense_bn 1.4 s: about 20 s in all.
resnet50 (23.5 M parameters) takes 30-37 s; the whole file (about 20 s without it) runs with the slow tests,
and the fast subset keeps the demo model's export (tests/test_notebook.py).
"""

import json
import os

import numpy as np
import pytest
import torch

from stampray import checkpoint as ck
from stampray import preprocess as pp
from stampray.export import ExportSettings, export
from stampray.models import _REGISTRY, list_models

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.slow

# Each model at its natural input (the course notebook's stamps): (channels, height, width), classes.
NATURAL = {"jet_cnn": ((1, 20, 20), 5), "radio_cnn": ((1, 64, 64), 4)}
DEFAULT = ((1, 21, 21), 2)
SLOW = {"resnet50"}  # 30-37 s to export (23.5 M parameters): with the slow tests


def natural(name):
    return NATURAL.get(name, DEFAULT)


def params():
    out = []
    for name in list_models():
        marks = [pytest.mark.slow] if name in SLOW else []
        out.append(pytest.param(name, marks=marks, id=name))
    return out


def test_every_model_is_exported_here():
    """A new model gets the export test at its natural shape; one too small for the default needs an entry."""
    for name in list_models():
        (_, h, w), _ = natural(name)
        assert min(h, w) >= _REGISTRY[name].min_size, f"add {name}'s natural input shape to NATURAL"


@pytest.mark.parametrize("name", params())
def test_model_exports_and_matches_pytorch(tmp_path, make_checkpoint, name):
    (c, h, w), k = natural(name)
    assert h == w  # make_checkpoint builds square stamps
    classes = tuple(f"{name}-class{i}" for i in range(k))
    preprocess = pp.names()[list_models().index(name) % len(pp.names())]  # every preprocessing gets recorded
    path = make_checkpoint(str(tmp_path / "model.pt"), name=name, channels=c, size=h, classes=classes,
                           preprocess=preprocess)
    onnx_path = str(tmp_path / "model.onnx")
    r = export(ExportSettings(model=path, onnx=onnx_path))
    assert r.max_abs_diff is not None and r.max_abs_diff <= 1e-5

    import onnx

    meta = {p.key: p.value for p in onnx.load(onnx_path).metadata_props}
    assert meta["stampray.model"] == name
    assert meta["stampray.preprocess"] == preprocess
    assert json.loads(meta["stampray.class_names"]) == list(classes)
    assert json.loads(meta["stampray.input_shape"]) == [c, h, w]

    model = ck.load_model(path).eval()
    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for n in (1, 6):  # the batch axis is dynamic; neither is the export's own test batch size
        raw = rng.normal(size=(n, c, h, w)).astype(np.float32)
        raw[:, :, h // 2, w // 2] += 10.0
        x = pp.get(preprocess)(raw)
        got = sess.run(["probabilities"], {"input": x})[0]
        with torch.no_grad():
            want = torch.softmax(model(torch.from_numpy(x)), 1).numpy()
        assert got.shape == (n, k)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_an_export_into_the_run_directory_it_reads_is_refused(tmp_path, make_checkpoint):
    run = tmp_path / "runs" / "cnn"
    run.mkdir(parents=True)
    make_checkpoint(str(run / "best.pt"))
    with pytest.raises(ValueError, match=rf"^--onnx {run}/x.onnx lies inside --model {run}; write the output to a "
                                         r"directory of its own, outside every input$"):
        export(ExportSettings(model=str(run), onnx=str(run / "x.onnx")))
    assert os.listdir(run) == ["best.pt"]


def test_an_export_replaces_only_an_onnx_file_an_export_wrote(tmp_path, make_checkpoint):
    """A second export to the same file replaces the first; a file of the user's at that name stays."""
    path = make_checkpoint(str(tmp_path / "model.pt"))
    onnx_path = tmp_path / "model.onnx"
    export(ExportSettings(model=path, onnx=str(onnx_path)))
    import onnx

    first = onnx_path.read_bytes()
    changed = onnx.load(str(onnx_path))
    changed.doc_string = "edited after the export"  # still export's (its metadata is intact), but changed
    onnx.save(changed, str(onnx_path))
    assert onnx_path.read_bytes() != first
    export(ExportSettings(model=path, onnx=str(onnx_path)))
    assert onnx_path.read_bytes() == first  # replaced by a complete new export
    older = onnx.load(str(onnx_path))  # as an earlier stampray exported it, without stampray.written_by
    kept = [(e.key, e.value) for e in older.metadata_props if e.key != "stampray.written_by"]
    del older.metadata_props[:]
    for k, v in kept:
        entry = older.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(older, str(onnx_path))
    export(ExportSettings(model=path, onnx=str(onnx_path)))
    assert onnx_path.read_bytes() == first
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.pt"]  # no temporary file left beside it
