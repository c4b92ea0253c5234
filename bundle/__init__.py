"""Custom code of the SegAN MONAI bundle.

Everything MONAI and ignite already provide is wired in ``configs/``; this package holds only what the
method needs on top: the segmentor and critic networks, the multi-scale L1 loss, the adversarial trainers,
BraTS-aware transforms and datalists, the synthetic demo data and the evaluation report; ``moeskops`` holds
the networks of Moeskops et al. 2017, the other adversarial system of the source papers.

The configs reach it through one lazily resolved item, ``"segan": "$importlib.import_module('bundle')"``,
rather than ``"$import bundle"``: MONAI evaluates import statements before ``run`` puts the bundle root on
``sys.path``, so an eager import fails for a bundle that is run from elsewhere without being installed.
Importing the package therefore imports all of its modules.
"""

from . import constants, datalist, demo, engines, files, handlers, losses, metrics, moeskops, networks, transforms

__version__ = "0.1.0"

__all__ = ["constants", "datalist", "demo", "engines", "files", "handlers", "losses", "metrics", "moeskops", "networks", "transforms"]
