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
model without dropout. ``stampray score --tta/--mc-dropout/--features`` scores through the same function
(:func:`forward_passes`), so its columns equal this table's.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from . import checkpoint as ck
from . import preprocess as pp
from . import table as st
from .classes import prob_column, std_column

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


def check_passes(net: nn.Module, tta: int, mc_dropout: int, *, prefix: str = "", tta_flag: str = "--tta",
                 mc_flag: str = "--mc-dropout") -> None:
    """Refuse passes the model cannot take: MC dropout without dropout layers, TTA on stamps that are not
    square (a quarter turn of an H x W stamp is W x H)."""
    if mc_dropout and not has_dropout(net):
        msg = f"{prefix}{mc_flag} needs dropout layers, and {type(net).__name__} has none; use {tta_flag} instead"
        raise ValueError(msg)
    h, w = (int(s) for s in net.image_size)
    if int(tta) > 1 and h != w:
        msg = (f"{prefix}--tta needs square stamps (a quarter turn makes an HxW stamp WxH), and the model takes "
               f"{h}x{w} stamps; leave TTA off")
        raise ValueError(msg)
    top = tta_max(h, w)
    if int(tta) > top:
        msg = (f"{prefix}{tta_flag} {int(tta)}: at most {top} for {h}x{w} stamps (the 8 flips and quarter turns, "
               f"then one-pixel steps of shift up to half the stamp, {(min(h, w) - 1) // 2} pixels, in 8 "
               f"directions); 8 is the usual choice")
        raise ValueError(msg)


def tta_max(h: int, w: int) -> int:
    """The most TTA transforms an ``h`` x ``w`` stamp has: the 8 symmetries, then shifts in 8 directions of up
    to half the stamp (a longer shift leaves mostly repeated edge pixels)."""
    return 8 + len(_SHIFTS) * max(0, (min(int(h), int(w)) - 1) // 2)


def feature_width(net: nn.Module) -> int:
    """Length of the model's ``forward_features`` vector (one dry run on a zero stamp, in eval mode)."""
    device = next(net.parameters()).device
    was = net.training
    net.eval()
    try:
        with torch.inference_mode():
            x = torch.zeros(1, int(net.in_channels), *(int(s) for s in net.image_size), device=device)
            return int(net.forward_features(x).flatten(1).shape[1])
    finally:
        net.train(was)


class Outputs(nn.Module):
    """A model's logits, and its ``forward_features`` vector when asked: ``(logits,)`` or ``(logits,
    features)``. What every pass calls; a replica compiles it as one graph."""

    def __init__(self, net: nn.Module, features: bool = False):
        super().__init__()
        self.net, self.features = net, bool(features)

    def forward(self, x: torch.Tensor):
        f = self.net.forward_features(x)
        logits = self.net.forward_head(f)
        return (logits, f.flatten(1)) if self.features else (logits,)


class Passes(NamedTuple):
    """What :func:`forward_passes` returns for N stamps of k classes (tensors or, from a replica, arrays)."""

    probs: Any  # (N, k): the mean of the passes' softmax probabilities
    std: Any  # (N, k): their population standard deviation; None for one pass
    features: Any  # (N, F): forward_features of the first pass (the stamp itself); None unless asked


def forward_passes(net: nn.Module, x: torch.Tensor, *, tta: int = 0, mc_dropout: int = 0, features: bool = False,
                   forward=None) -> Passes:
    """Probabilities of a preprocessed batch ``x`` (N, C, H, W): one plain pass, the mean of ``tta`` symmetry
    transforms, or the mean of ``mc_dropout`` passes with the dropout layers active; ``std`` with K >= 2
    passes, ``features`` when asked. All K x N variants go through the model as one batch (pass-major).

    ``forward``: what to call on that batch instead of ``Outputs(net, features)`` (a replica's compiled copy
    of it, with its memory layout and autocast); it must return what :class:`Outputs` returns. The dropout
    layers of ``net`` are active only during the call. :func:`predict` and ``stampray score``'s replicas
    (:class:`stampray.inference.ModelActor`) both score through here.
    """
    tta, mc_dropout = int(tta), int(mc_dropout)
    passes, n = max(tta, mc_dropout, 1), len(x)
    if tta > 1:
        x = torch.cat([symmetry(x, k) for k in range(tta)])
    elif mc_dropout > 1:
        x = x.repeat(mc_dropout, 1, 1, 1)
    forward = Outputs(net, features) if forward is None else forward
    dropout = [m for m in net.modules() if isinstance(m, nn.modules.dropout._DropoutNd)] if mc_dropout else []
    was = [m.training for m in dropout]
    for m in dropout:
        m.train()
    try:
        out = forward(x)
    finally:
        for m, w in zip(dropout, was):
            m.train(w)
    p = torch.softmax(out[0].float(), 1).reshape(passes, n, -1)
    feats = None
    if features:  # the first pass's (pass-major), copied: a view would keep all K passes' features alive
        feats = out[1].float()[:n].clone() if passes > 1 else out[1].float()
    return Passes(p.mean(0), p.std(0, unbiased=False) if passes > 1 else None, feats)


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """torch's generators (the CPU's, and ``device``'s if a GPU) seeded with ``seed`` inside the block and
    restored after it; a no-op for None."""
    if seed is None:
        yield
        return
    cuda = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(int(seed))
        yield


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


def predict(model, images, *, tta: int = 0, mc_dropout: int = 0, features: bool = False,
            seed: int | None = 0) -> pa.Table:
    """Probabilities (and their spread, and features) for ``images``; see the module docstring. ``seed``:
    the MC-dropout masks' (batch ``i`` draws from a generator seeded with ``seed + i``, torch's own left as
    it was), so the same call gives the same numbers; None draws from torch's global generator."""
    for name, value in (("tta", tta), ("mc_dropout", mc_dropout)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            msg = f"predict: {name} counts passes: an integer >= 0 (0: one plain pass), got {value!r}"
            raise ValueError(msg)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise ValueError(f"predict: seed is an integer, or None for torch's own generator; got {seed!r}")
    tta, mc_dropout = int(tta), int(mc_dropout)
    if tta and mc_dropout:
        raise ValueError("predict: choose tta or mc_dropout, not both")
    net, info = _as_model(model)
    check_passes(net, tta, mc_dropout, prefix="predict: ", tta_flag="tta", mc_flag="mc_dropout")
    prep = pp.get(info["preprocess"])
    names = info["class_names"]
    probs, stds, feats, ids = [], [], [], []
    passes = max(tta, mc_dropout, 1)
    with torch.inference_mode():
        for i, (raw, batch_ids) in enumerate(_batches(images, info["shape"])):
            with seeded(seed + i if mc_dropout and seed is not None else None, next(net.parameters()).device):
                out = forward_passes(net, torch.from_numpy(prep(raw)), tta=tta, mc_dropout=mc_dropout,
                                     features=features)
            probs.append(out.probs.numpy())
            if out.std is not None:
                stds.append(out.std.numpy())
            if features:
                feats.append(out.features.numpy())
            if batch_ids is not None:
                ids += batch_ids
    k = len(names)
    p = np.concatenate(probs) if probs else np.zeros((0, k), np.float32)
    lost = int((~np.isfinite(p).all(1)).sum())
    if lost:
        import warnings

        warnings.warn(f"predict: {lost} of {len(p)} stamps have no finite probabilities (non-finite pixels, or "
                      f"values too large for the preprocessing in float32): their p_ columns are NaN ('stampray "
                      f"score' and 'train' set such stamps aside)", RuntimeWarning, stacklevel=2)
    cols = {st.ID: pa.array(ids, pa.string())} if ids else {}
    for j, c in enumerate(names):
        cols[prob_column(c)] = pa.array(p[:, j], pa.float32())
    if passes > 1:
        s = np.concatenate(stds) if stds else np.zeros((0, k), np.float32)
        for j, c in enumerate(names):
            cols[std_column(c)] = pa.array(s[:, j], pa.float32())
    if features:
        width = feature_width(net)
        fx = np.concatenate(feats).astype(np.float32) if feats else np.zeros((0, width), np.float32)
        cols["features"] = pa.FixedSizeListArray.from_arrays(pa.array(fx.reshape(-1), pa.float32()), width)
    return pa.table(cols)
