"""stampray: train CNNs on image stamps and score millions of them with Ray.

Every command-line verb is also a Python function taking the same settings:
:func:`stampray.synth.synth`, :func:`stampray.ingest.ingest`, :func:`stampray.models.create_model`.
"""

__version__ = "0.1.0"


def load_model(path, map_location="cpu"):
    """A ready model (eval mode) from a stampray checkpoint: ``model.pt``, a checkpoint directory or a run
    directory (its ``best.pt``). Loads with ``torch.load(..., weights_only=True)``."""
    from .checkpoint import load_model as _load

    return _load(path, map_location)
