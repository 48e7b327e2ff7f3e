"""``stampray export --model CKPT --onnx FILE``: the model outside PyTorch.

The ONNX graph takes preprocessed stamps ``input`` (N, C, H, W) float32 — N is a dynamic axis — and gives
the class probabilities ``probabilities`` (N, K) (softmax of the logits). The preprocessing is not in the
graph: its name (``stampray.preprocess``; :mod:`stampray.preprocess` documents each step), the class names
(``stampray.class_names``, JSON), the input shape and the model name are in the model's metadata. After
writing, the export runs a test batch through onnxruntime (when installed) and refuses a graph whose
probabilities differ from PyTorch's by more than ``TOLERANCE``.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import tempfile
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from . import checkpoint as ck
from . import outfiles
from . import preprocess as pp
from . import table as st

TOLERANCE = 1e-5
OPSET = 18
WRITTEN_BY = ("stampray.written_by", "stampray export")  # metadata entry that marks an ONNX file as export's own
# what an export of an earlier stampray (before WRITTEN_BY) recorded: such a file is export's own too
LEGACY_KEYS = {"stampray.model", "stampray.preprocess", "stampray.class_names", "stampray.input_shape",
               "stampray.checkpoint"}


@dataclass(frozen=True)
class ExportSettings:
    """Settings of ``stampray export``.

    Args:
        model: checkpoint: model.pt, a checkpoint directory, or a run directory (its best.pt).
        onnx: the ONNX file to write (local path or URI); an existing file is replaced only when an earlier
            export wrote it (its metadata says so), and only once the new one is complete and checked.
    """

    model: str = field(metadata={"path": True})
    onnx: str = field(metadata={"path": True})


class _WithSoftmax(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return torch.softmax(self.net(x), dim=1)


@dataclass
class ExportResult:
    path: str
    max_abs_diff: float | None  # onnxruntime against PyTorch on the test batch; None without onnxruntime
    metadata: dict


def export(settings: ExportSettings) -> ExportResult:
    try:
        import onnx
        import onnxscript  # noqa: F401 - torch's exporter needs it
    except ImportError as e:
        msg = f"export needs the onnx extras ({e.name} is missing): pip install 'stampray[onnx]'"
        raise ValueError(msg) from None

    check_out(settings.onnx)
    st.check_apart_from_model(settings.onnx, settings.model, flag="--onnx")  # not inside a run's directory
    bundle = ck.load_bundle(ck.resolve_path(settings.model))
    net = _WithSoftmax(ck.build_model(bundle)).eval()
    shape = (int(bundle["in_channels"]), *(int(s) for s in bundle["image_size"]))
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(8, *shape)).astype(np.float32)
    raw[:, :, shape[1] // 2, shape[2] // 2] += 20.0  # a bright centre, as a source
    x = pp.get(bundle["preprocess"])(raw)
    with torch.inference_mode():
        want = net(torch.from_numpy(x)).numpy()
    with tempfile.TemporaryDirectory(prefix="stampray-export-") as tmp:
        local = os.path.join(tmp, "model.onnx")
        batch = torch.export.Dim("batch", min=1)
        # The exporter logs a line per torchvision op it cannot register and warns about its own internals:
        # nothing a user can act on.
        quiet = logging.getLogger("torch.onnx")
        level, quiet.level = quiet.level, logging.ERROR
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                program = torch.onnx.export(net, (torch.from_numpy(x),), dynamo=True, input_names=["input"],
                                            output_names=["probabilities"], dynamic_shapes=({0: batch},),
                                            opset_version=OPSET, verbose=False)
        finally:
            quiet.setLevel(level)
        program.save(local)
        model = onnx.load(local)
        meta = {"stampray.model": str(bundle["model"]), "stampray.preprocess": str(bundle["preprocess"]),
                "stampray.class_names": json.dumps(list(bundle["class_names"])),
                "stampray.input_shape": json.dumps(list(shape)), "stampray.checkpoint": str(settings.model),
                WRITTEN_BY[0]: WRITTEN_BY[1]}
        del model.metadata_props[:]
        for k, v in meta.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = k, v
        onnx.checker.check_model(model)
        onnx.save(model, local)
        diff = _check(local, x, want)
        with open(local, "rb") as f:
            data = f.read()
    check_out(settings.onnx)  # again, just before replacing: the file may have appeared since
    st.write_bytes(settings.onnx, data)  # whole or not at all
    return ExportResult(settings.onnx, diff, meta)


def written_by_export(path: str) -> bool:
    """Whether the existing file ``path`` is an ONNX model that ``stampray export`` wrote (its metadata)."""
    import onnx

    fs, p = st.resolve(path)
    try:
        with fs.open_input_stream(p) as f:
            model = onnx.load_model_from_string(f.read())
    except Exception:  # noqa: BLE001 - any file that does not parse as ONNX is not export's
        return False
    keys = {e.key: e.value for e in model.metadata_props}
    return keys.get(WRITTEN_BY[0]) == WRITTEN_BY[1] or LEGACY_KEYS <= set(keys)


def check_out(path: str) -> None:
    """Refuse an ``--onnx`` that is a directory, or an existing file that 'stampray export' did not write."""
    outfiles.check_file(path, "--onnx", "export", written_by_export,
                        f"no {WRITTEN_BY[0]} in an ONNX model's metadata", posixpath.join(path, "model.onnx"))


def _check(path: str, x: np.ndarray, want: np.ndarray) -> float | None:
    """Largest |onnxruntime - PyTorch| on the test batch, at two batch sizes (the batch axis is dynamic);
    refused beyond TOLERANCE. None when onnxruntime is not installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    diffs = []
    for n in (len(x), 3):
        got = sess.run(["probabilities"], {"input": x[:n]})[0]
        diffs.append(float(np.abs(got - want[:n]).max()))
    diff = max(diffs)
    if not diff <= TOLERANCE:
        msg = f"the ONNX graph's probabilities differ from PyTorch's by {diff:.2e} (> {TOLERANCE:g}); not written"
        raise RuntimeError(msg)
    return diff

