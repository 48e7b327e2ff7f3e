"""stampray: train CNNs on image stamps and score millions of them with Ray.

Every command-line verb is also a Python function taking the same settings:
:func:`stampray.synth.synth`, :func:`stampray.ingest.ingest`, :func:`stampray.models.create_model`.
"""

__version__ = "0.1.0"
