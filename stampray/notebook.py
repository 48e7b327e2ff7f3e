"""Probabilities for stamps in a notebook: ``stampray.predict(model, images)``, no Ray needed.

``model`` is a loaded model (:func:`stampray.load_model`) or a checkpoint path; ``images`` a NumPy array
(N, H, W) or (N, C, H, W) of raw pixels, or a stamp table's path (read shard by shard). The checkpoint's
preprocessing is applied (a model loaded with :func:`stampray.load_model` keeps its checkpoint's step and
class names), and the result is an Arrow table: ``p_<class>`` per class, with ``tta=K`` or
``mc_dropout=K`` the mean over K passes and ``p_<class>_std`` their standard deviation, and with
``features=True`` a fixed-size list column ``features`` (the ``forward_features`` vector, float32).

Test-time augmentation (``tta=K``): the first K of a fixed sequence of symmetry transforms of each stamp —
the eight flips and quarter turns (identity first), then integer shifts of one pixel (right, down, left,
up, then the diagonals) of the identity, then of two pixels, ...; shifted-in pixels repeat the edge. All
variants of a batch go through the model as one batch, so the cost is K times one pass. MC dropout
(``mc_dropout=K``): K passes with the dropout layers active (everything else in eval mode); refused for a
model without dropout.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from . import checkpoint as ck
from . import preprocess as pp
from . import table as st
from .classes import prob_column

BATCH = 1024  # stamps per forward (times K with tta or mc_dropout)
_SHIFTS = [(0, 1), (1, 0), (0, -1), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1)]


def symmetry(x: torch.Tensor, k: int) -> torch.Tensor:
    """Transform ``k`` of the fixed TTA sequence applied to a batch (N, C, H, W) (see the module docstring)."""
    if k < 8:
        y = torch.rot90(x, k % 4, dims=(2, 3))
        return torch.flip(y, dims=(3,)) if k >= 4 else y
    step, which = divmod(k - 8, len(_SHIFTS))
    dy, dx = (d * (step + 1) for d in _SHIFTS[which])
    h, w = x.shape[2], x.shape[3]
    rows = torch.clamp(torch.arange(h, device=x.device) - dy, 0, h - 1)
    cols = torch.clamp(torch.arange(w, device=x.device) - dx, 0, w - 1)
    return x[:, :, rows][:, :, :, cols]


def has_dropout(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules())


def _as_model(model) -> tuple[nn.Module, dict]:
    """(model in eval mode, its checkpoint facts: class names, preprocessing, input shape)."""
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        model = ck.load_model(ck.resolve_path(str(model)))
    net, meta = model, getattr(model, "stampray", None)
    if meta is None:
        msg = ("predict: give a checkpoint path or a model from stampray.load_model (it carries the "
               "checkpoint's preprocessing and class names)")
        raise ValueError(msg)
    info = {"class_names": list(meta["class_names"]), "preprocess": meta["preprocess"]}
    info["shape"] = (int(net.in_channels), *(int(s) for s in net.image_size))
    return net.eval(), info


def _batches(images, shape) -> Iterator[tuple[np.ndarray, list[str] | None]]:
    """Raw (N, C, H, W) float32 batches, with ids when read from a stamp table."""
    if isinstance(images, (str, bytes)) or hasattr(images, "__fspath__"):
        m = st.read_manifest(str(images))
        if tuple(m.spec.shape) != tuple(shape):
            msg = f"predict: {images} holds {m.spec.shape} stamps, the model takes {tuple(shape)}"
            raise ValueError(msg)
        for b in st.iter_batches(str(images), BATCH, [st.ID, st.IMAGE]):
            yield st.decode_images(b.column(st.IMAGE), shape), b.column(st.ID).to_pylist()
        return
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(shape):
        msg = (f"predict: images of shape {np.shape(images)} do not fit the model's input {tuple(shape)}; give "
               f"(N, H, W) or (N, C, H, W)")
        raise ValueError(msg)
    for i in range(0, len(x), BATCH):
        yield x[i:i + BATCH], None


def predict(model, images, *, tta: int = 0, mc_dropout: int = 0, features: bool = False) -> pa.Table:
    """Probabilities (and their spread, and features) for ``images``; see the module docstring."""
    if tta and mc_dropout:
        raise ValueError("predict: choose tta or mc_dropout, not both")
    if int(tta) < 0 or int(mc_dropout) < 0:
        raise ValueError("predict: tta and mc_dropout count passes (0 for one plain pass)")
    net, info = _as_model(model)
    if mc_dropout and not has_dropout(net):
        msg = f"predict: --mc-dropout needs dropout layers, and {type(net).__name__} has none; use tta instead"
        raise ValueError(msg)
    prep = pp.get(info["preprocess"])
    names = info["class_names"]
    probs, stds, feats, ids = [], [], [], []
    passes = int(tta or mc_dropout or 1)
    with torch.inference_mode():
        for raw, batch_ids in _batches(images, info["shape"]):
            x = torch.from_numpy(prep(raw))
            if tta:
                x = torch.cat([symmetry(x, k) for k in range(passes)])
            elif mc_dropout:
                x = x.repeat(passes, 1, 1, 1)
                for m in net.modules():
                    if isinstance(m, nn.modules.dropout._DropoutNd):
                        m.train()
            try:
                f = net.forward_features(x)
                p = torch.softmax(net.forward_head(f).float(), 1).reshape(passes, len(raw), -1)
            finally:
                net.eval()
            probs.append(p.mean(0).numpy())
            if passes > 1:
                stds.append(p.std(0, unbiased=False).numpy())
            if features:
                feats.append(f.reshape(passes, len(raw), -1)[0].float().numpy())
            if batch_ids is not None:
                ids += batch_ids
    k = len(names)
    p = np.concatenate(probs) if probs else np.zeros((0, k), np.float32)
    cols = {st.ID: pa.array(ids, pa.string())} if ids else {}
    for j, c in enumerate(names):
        cols[prob_column(c)] = pa.array(p[:, j], pa.float32())
    if passes > 1:
        s = np.concatenate(stds) if stds else np.zeros((0, k), np.float32)
        for j, c in enumerate(names):
            cols[prob_column(c) + "_std"] = pa.array(s[:, j], pa.float32())
    if features:
        fx = np.concatenate(feats).astype(np.float32) if feats else np.zeros((0, 0), np.float32)
        cols["features"] = pa.FixedSizeListArray.from_arrays(pa.array(fx.reshape(-1)), fx.shape[1] or 1)
    return pa.table(cols)
