"""flawscope: unsupervised visual anomaly detection for manufacturing.

Learn what good parts look like from good images only, then score new images and
localize defects with a per-pixel anomaly map::

    from flawscope import Detector

    det = Detector.fit("data/synthetic_object", model="patchcore")
    prediction = det.predict("part.png")

See :mod:`flawscope.detector` for the whole API.
"""

__version__ = "0.1.0"
__all__ = ["Detector", "Prediction", "FlawscopeError", "available_models", "__version__"]


def __getattr__(name: str):
    # Imported on first use, so `import flawscope` (and the CLI's start-up) stays light.
    if name in ("Detector", "Prediction"):
        from . import detector

        return getattr(detector, name)
    if name == "FlawscopeError":
        from .errors import FlawscopeError

        return FlawscopeError
    if name == "available_models":
        from .models import available_models

        return available_models
    raise AttributeError(f"module 'flawscope' has no attribute {name!r}")
