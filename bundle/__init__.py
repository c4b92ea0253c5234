"""Custom code of the SegAN MONAI bundle.

Everything MONAI and ignite already provide is wired in ``configs/``; this package holds only what the
method needs on top: the segmentor and critic networks, the multi-scale L1 loss, the adversarial trainer,
BraTS-aware transforms and datalists, the synthetic demo data and the evaluation report.
"""

__version__ = "0.1.0"
