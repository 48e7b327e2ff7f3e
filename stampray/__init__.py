"""stampray: train CNNs on image stamps and score millions of them with Ray.

Every command-line verb is also a Python function taking the same settings:
:func:`stampray.synth.synth`, :func:`stampray.ingest.ingest`, :func:`stampray.models.create_model`.
"""

__version__ = "0.1.0"


def load_model(path, map_location="cpu"):
    """A ready model (eval mode) from a stampray checkpoint: ``model.pt``, a checkpoint directory or a run
    directory (its ``best.pt``). Loads with ``torch.load(..., weights_only=True)``."""
    from .checkpoint import load_model as _load
    from .checkpoint import resolve_path as _resolve

    return _load(_resolve(path), map_location)


def predict(model, images, *, tta: int = 0, mc_dropout: int = 0, features: bool = False, seed: int | None = 0):
    """Probabilities for a NumPy array of stamps (N,H,W or N,C,H,W) or a stamp table path, with the
    checkpoint's preprocessing; an Arrow table (see :mod:`stampray.notebook`). No Ray needed. ``seed``: the
    MC-dropout masks' (the same call, the same numbers; None: torch's global generator)."""
    from .notebook import predict as _predict

    return _predict(model, images, tta=tta, mc_dropout=mc_dropout, features=features, seed=seed)
