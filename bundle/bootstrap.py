"""How the configs find this bundle's folder and its code, wherever the bundle is unpacked.

MONAI 1.6 gives a config no way to learn where its own file is. ``ConfigWorkflow`` keeps the folder as
``config_root_path`` on itself, and puts the bundle root on ``sys.path`` only in ``run()``
(``monai/bundle/workflows.py``), after ``initialize()`` has already parsed the config. ``monai.bundle.load`` and
MONAI Label build their own workflows. Model-zoo bundles therefore hard-code ``"bundle_root": "."`` and must be
run from their own folder. This bundle instead finds the folder itself, with two config items that every
stand-alone config (``train.json``, ``inference.json``; the overlays compose on them) spells exactly as
:data:`BUNDLE_ROOT` and :data:`SEGAN` below (``tests/test_bootstrap.py`` holds them to it):

* ``bundle_root``: the folder above ``configs/`` of the ``ConfigWorkflow`` whose frame is on the call stack
  (``monai.bundle run``, ``ConfigWorkflow``, ``monai.bundle.load``), else ``.``. An override wins: MONAI Label
  passes the served bundle's folder, and ``--bundle_root`` works as in any bundle. This expression cannot
  call into this module, since it is what finds the module.
* ``segan``: puts ``bundle_root`` on ``sys.path`` (as ``ConfigWorkflow.run`` would, but also when nothing
  calls ``run``) and returns the package, lazily imported, through :func:`package`. That function warns when
  the process already holds another copy of the ``bundle`` package whose code differs: Python imports a
  package once per process, so two different bundles cannot be served side by side in one process.

Where a helper needs the ``ConfigParser`` that is evaluating it (to read raw, unevaluated items),
:func:`running_parser` finds it the same way. Each entry point is tested end to end: ``monai.bundle run`` from
another folder (``test_portable.py``), ``ConfigWorkflow`` on a copied bundle (``test_zoo_workflow.py``),
``monai.bundle.load`` and a downloaded zip (``test_package.py``), MONAI Label (``test_monailabel_contract.py``).
"""

from __future__ import annotations

import hashlib
import inspect
import os
import sys
import warnings
from pathlib import Path
from typing import Any

__all__ = ["BUNDLE_ROOT", "SEGAN", "package", "running", "running_parser"]

#: The ``bundle_root`` item of every stand-alone config.
BUNDLE_ROOT = (
    "$next((str(w.config_root_path.parent if w.config_root_path.name == 'configs' else w.config_root_path) "
    "for w in (f.frame.f_locals.get('self') for f in inspect.stack(0)) if isinstance(w, monai.bundle.ConfigWorkflow)), "
    "'.')"
)
#: The ``segan`` item of every stand-alone config: the package, found under ``bundle_root``.
SEGAN = "$sys.path.insert(1, os.path.abspath(@bundle_root)) or pkgutil.resolve_name('bundle.bootstrap').package(@bundle_root)"


def _code_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def package(bundle_root: str | os.PathLike) -> Any:
    """The ``bundle`` package, checked to hold the code under ``bundle_root``.

    Warns (``RuntimeWarning``) when the process imported another copy of the package earlier and its modules
    differ from ``<bundle_root>/bundle``: the earlier copy is what runs, so its behaviour, not this bundle's,
    is what the user gets. An identical copy (a bundle copied or unpacked from this one) is silent.
    """
    loaded = sys.modules[__name__.rpartition(".")[0]]
    here = Path(loaded.__file__).resolve().parent
    wanted = (Path(bundle_root) / "bundle").resolve()
    if wanted != here and wanted.is_dir() and _code_digest(wanted) != _code_digest(here):
        warnings.warn(
            f"this process already runs the bundle code in {here}, which differs from {wanted} under bundle_root "
            f"'{bundle_root}': Python imports a package once per process, so {here} is what runs. Run each bundle "
            "in its own process (a separate `python -m monai.bundle run`, or its own MONAI Label app).",
            RuntimeWarning,
            stacklevel=2,
        )
    return loaded


def running(kind: type) -> Any:
    """The innermost object of type ``kind`` that is ``self`` in a frame on the call stack, or ``None``."""
    frame = inspect.currentframe()
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, kind):
            return owner
        frame = frame.f_back
    return None


def running_parser() -> Any:
    """The ``monai.bundle.ConfigParser`` evaluating the config expression that called us, or ``None``."""
    from monai.bundle import ConfigParser

    return running(ConfigParser)
