"""Self-describing model checkpoints.

A checkpoint is one ``model.pt`` file holding only tensors and plain containers, so it loads with
``torch.load(..., weights_only=True)`` (no unpickling of arbitrary objects). Beside the weights it stores
everything needed to rebuild and use the model: architecture name and keyword arguments, input channels
and size, preprocessing name, class names, the training settings and metrics.
"""

from __future__ import annotations

import hashlib
import io
from typing import TYPE_CHECKING

from . import table as st

if TYPE_CHECKING:  # torch is imported where a checkpoint is read, written or built, not with this module:
    import torch  # score's coordinator and commit tasks import stampray.score and never need torch

    from .models import StampModel

FORMAT = "stampray-checkpoint"
VERSION = 1
FILE_NAME = "model.pt"


def make_bundle(model: StampModel, *, class_names, preprocess: str, config: dict | None = None,
                metrics: dict | None = None, epoch: int = 0, extra: dict | None = None) -> dict:
    """The checkpoint dictionary for ``model`` (unwrap DDP before calling)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": model.model_name,
        "model_kwargs": dict(getattr(model, "model_kwargs", {})),
        "in_channels": int(model.in_channels),
        "image_size": [int(s) for s in model.image_size],
        "num_classes": int(model.num_classes),
        "class_names": [str(c) for c in class_names],
        "preprocess": str(preprocess),
        "config": dict(config or {}),
        "metrics": dict(metrics or {}),
        "epoch": int(epoch),
        "state_dict": state,
        **(extra or {}),
    }


def split_of(bundle: dict) -> dict | None:
    """The split definition the model was trained with: ``{"fractions": (train, val, test), "column": bool}``
    (``column``: the training table shipped a fixed ``split`` column, which wins over the id hash; None when
    unknown). Checkpoints written before it was recorded give the fractions of their training settings;
    None when the checkpoint says nothing (not written by ``stampray train``)."""
    rec = bundle.get("split")
    if isinstance(rec, dict) and rec.get("fractions") is not None:
        return {"fractions": tuple(float(f) for f in rec["fractions"]), "column": rec.get("column")}
    fractions = (bundle.get("config") or {}).get("fractions")
    if fractions is not None:
        return {"fractions": tuple(float(f) for f in fractions), "column": None}
    return None


def bundle_bytes(bundle: dict) -> bytes:
    """A bundle as the bytes of a ``model.pt`` file (what :func:`bundle_from_bytes` reads back)."""
    import torch

    buf = io.BytesIO()
    torch.save(bundle, buf)
    return buf.getvalue()


def save(bundle: dict, path: str) -> None:
    """Write a bundle to a local path or URI."""
    fs, p = st.resolve(path)
    with fs.open_output_stream(p) as f:
        f.write(bundle_bytes(bundle))


def resolve_path(path: str) -> str:
    """Accept a ``model.pt`` file, a checkpoint directory holding one, or a run directory (its ``best.pt``)."""
    path = str(path)
    fs, p = st.resolve(path)
    info = fs.get_file_info(p)
    if info.type == st.pafs.FileType.File:
        return path
    if info.type == st.pafs.FileType.Directory:
        for name in (FILE_NAME, "best.pt", "last.pt"):
            candidate = st.join(path, name)
            if st.exists(candidate):
                return candidate
        msg = f"{path} holds no {FILE_NAME} or best.pt; pass a checkpoint written by 'stampray train'"
        raise FileNotFoundError(msg)
    msg = f"checkpoint {path} does not exist"
    raise FileNotFoundError(msg)


def load_bundle(path: str, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint with ``weights_only=True``; refuse files that are not stampray checkpoints."""
    path = resolve_path(path)
    fs, p = st.resolve(path)
    with fs.open_input_stream(p) as f:
        data = f.read()
    return bundle_from_bytes(data, path, map_location)


def bundle_from_bytes(data: bytes, path: str, map_location: str | torch.device = "cpu") -> dict:
    """:func:`load_bundle` on a checkpoint's bytes already read (``path`` names it in messages). The one
    place stampray calls ``torch.load``, always with ``weights_only=True``."""
    import torch

    import pickle
    import zipfile

    written_by = ("Checkpoints are written by 'stampray train' (best.pt, last.pt, epoch-NNNN/model.pt) or "
                  "stampray.checkpoint.save")
    if not zipfile.is_zipfile(io.BytesIO(data)):
        msg = (f"{path} is not a stampray checkpoint: it is not the zip archive that torch.save writes "
               f"({len(data):,} bytes: empty, cut short in a copy, or another format such as ONNX). {written_by}")
        raise ValueError(msg)
    try:
        bundle = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # PyTorch's own message suggests loading with weights_only=False, which would run code stored in
        # the file: stampray does not repeat that advice.
        msg = (f"{path} is not a stampray checkpoint: it holds objects other than tensors and plain values, "
               f"which stampray never loads. {written_by}")
        raise ValueError(msg) from None
    except Exception as e:  # noqa: BLE001 - a damaged archive: torch's reader raises RuntimeError and others
        detail = " ".join(str(e).split())[:200]
        msg = f"{path} is damaged and cannot be read as a checkpoint ({type(e).__name__}: {detail}). {written_by}"
        raise ValueError(msg) from None
    if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
        msg = f"{path} is not a stampray checkpoint (no '{FORMAT}' marker)"
        raise ValueError(msg)
    if int(bundle.get("version", -1)) > VERSION:
        msg = f"{path} was written by a newer stampray (checkpoint version {bundle['version']}); upgrade stampray"
        raise ValueError(msg)
    return bundle


def build_model(bundle: dict) -> StampModel:
    """Rebuild the model described by a bundle and load its weights (eval mode)."""
    from .models import create_model

    model = create_model(bundle["model"], bundle["in_channels"], tuple(bundle["image_size"]),
                         bundle["num_classes"], **bundle.get("model_kwargs", {}))
    model.load_state_dict(bundle["state_dict"])
    return model.eval()


def weights_hash(bundle: dict) -> str:
    """A short, stable hash of the weights (names, shapes and bytes), for the ``model`` column of scores."""
    import torch

    h = hashlib.sha256()
    for name in sorted(bundle["state_dict"]):
        t = bundle["state_dict"][name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()[:12]


def load_model(path: str, map_location: str | torch.device = "cpu") -> StampModel:
    """A ready model from a checkpoint: rebuilt by name, weights loaded, in eval mode.

    The bundle's metadata is attached as ``model.stampray`` (class names, preprocessing, metrics).
    """
    bundle = load_bundle(path, map_location)
    model = build_model(bundle)
    model.stampray = {k: v for k, v in bundle.items() if k not in ("state_dict", "optimizer")}
    return model
