"""flawscope: unsupervised visual anomaly detection for manufacturing.

Learn what good parts look like from good images only, then score new images and
localize defects with a per-pixel anomaly map.
"""

__version__ = "0.1.0"
