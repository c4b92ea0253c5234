"""Custom code of the SegAN MONAI bundle.

Everything MONAI and ignite already provide is wired in ``configs/``; this package holds only what the
method needs on top, one module per concept: ``networks`` (segmentor, critics), ``losses`` (multi-scale L1),
``engines`` (the adversarial trainers), ``transforms``, ``saving`` (one file per case), ``cases`` (finding
cases on disk, naming them), ``datalist`` (split and load), ``phantom`` and ``demo`` (synthetic cases, the
demo dataset on disk), ``lesion_demo`` (synthetic dermoscopy), ``inferers`` (slice inference over foreground
crops), ``metrics``, ``reports`` and ``figures`` (evaluation outputs), ``checkpoints`` (finding weights and
training states), ``speed`` (speed options), ``constants`` and ``files``; ``moeskops`` holds the networks of Moeskops
et al. 2017, the
other adversarial system of the source papers.

The configs reach it through one lazily resolved item, ``segan``, rather than ``"$import bundle"``, and find
the bundle's folder through ``bundle_root``: ``bootstrap`` says how and why (MONAI 1.6 tells a config nothing
about where its file is, and puts the bundle on ``sys.path`` only in ``run``), so a bundle unpacked anywhere
finds its code and ``models/`` with nothing installed.
Submodules are imported on first use (``segan.demo.ensure_demo_data`` imports ``bundle.demo``), so a config
pays only for the modules it touches.
"""

import importlib
import pkgutil

__version__ = "0.3.1"

#: Every module of the package, found on disk rather than kept by hand (a new module is reachable from the
#: configs as ``@segan.<module>`` without an edit here).
__all__ = sorted(module.name for module in pkgutil.iter_modules(__path__) if not module.name.startswith("_"))


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
