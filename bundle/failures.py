"""Batch inference that survives a bad case: the case is skipped, the others run, and the run still fails.

A folder of hundreds of cases should not stop at the first damaged file, leaving later cases unsegmented;
nor should it end with exit status 0 as if every case had been segmented. With ``continue_on_error``
(``configs/inference.json``, on by default):

- :class:`CaseDataset` turns an error in a case's preprocessing (a file that does not load, NaN voxels,
  modalities on different grids, ...) into a *failed item* instead of an exception in the data loader;
- :class:`CaseFailures` is the evaluator's ``iteration_update``: it skips failed items, runs every other case
  through the usual iteration (network, postprocessing, saving) and records any error it raises; when the
  run completes it logs the failed cases with their reasons and raises an error listing them, so the command
  exits non-zero after every case that could be segmented has been saved.

A failed case leaves no file (outputs are written atomically, :func:`bundle.files.atomic_path`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from monai.data import Dataset
from monai.utils import IgniteInfo, ensure_tuple, min_version, optional_import

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["CaseDataset", "CaseFailures", "FAILURE_KEY", "reason"]

#: Item key of a failed case: the reason it failed.
FAILURE_KEY = "failure"


def reason(error: BaseException) -> str:
    """The informative message of an error: the first in its chain that is not MONAI's "applying transform"."""
    seen = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    for e in seen:
        text = str(e)
        if not (isinstance(e, RuntimeError) and text.startswith("applying transform")):
            return f"{type(e).__name__}: {text}" if not isinstance(e, ValueError) else text
    return f"{type(seen[0]).__name__}: {seen[0]}"


def _case_of(item: Any) -> str:
    if isinstance(item, Mapping):
        case = item.get("case")
        if isinstance(case, (list, tuple)):  # a collated batch of one
            case = case[0] if case else None
        if case:
            return str(case)
        image = item.get("image")
        if image is not None and not hasattr(image, "shape"):
            return str(ensure_tuple(image)[0])
    return "?"


class CaseDataset(Dataset):
    """A MONAI ``Dataset`` whose items that fail their transform become ``{"case": id, "failure": reason}``.

    Args:
        data: datalist items, each with a ``"case"`` id.
        transform: the preprocessing.
        catch_errors: ``False`` lets errors through (the plain ``Dataset``).
    """

    def __init__(self, data, transform=None, catch_errors: bool = True) -> None:
        super().__init__(data=data, transform=transform)
        self.catch_errors = bool(catch_errors)

    def _transform(self, index: int):
        if not self.catch_errors:
            return super()._transform(index)
        try:
            return super()._transform(index)
        except Exception as error:
            return {"case": _case_of(self.data[index]), FAILURE_KEY: reason(error)}


class CaseFailures:
    """Skip and record failed cases in an evaluator's run; fail the run at its end if any case failed.

    Use it as the evaluator's ``iteration_update`` and in its handlers (``attach``). With ``enabled=False``
    it only runs the usual iteration.

    Args:
        enabled: skip and record failures (``True``) or let the first error stop the run (``False``).
        output_dir: named in the final message, where the other cases were saved.
    """

    def __init__(self, enabled: bool = True, output_dir: str = "", name: str = "CaseFailures") -> None:
        self.enabled = bool(enabled)
        self.output_dir = str(output_dir)
        self.failures: list[tuple[str, str]] = []
        self.cases = 0
        self.logger = logging.getLogger(name)

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def _started(self, _engine) -> None:
        self.failures, self.cases = [], 0

    def __call__(self, engine, batch):
        """The evaluator's iteration, for one case (batch size 1), unless the case failed before or fails now."""
        self.cases += 1
        failed = batch.get(FAILURE_KEY) if isinstance(batch, Mapping) else None
        if failed is not None:
            self._record(_case_of(batch), str(ensure_tuple(failed)[0]))
            return {}
        if not self.enabled:
            return engine._iteration(engine, batch)
        try:
            return engine._iteration(engine, batch)
        except Exception as error:
            self._record(_case_of(batch), reason(error))
            return {}

    def _record(self, case: str, why: str) -> None:
        self.failures.append((case, why))
        self.logger.error(f"case '{case}' failed, skipped: {why}")

    def completed(self, _engine) -> None:
        if not self.failures:
            return
        listed = "\n".join(f"  - {case}: {why}" for case, why in self.failures)
        done = self.cases - len(self.failures)
        where = f" in '{self.output_dir}'" if self.output_dir else ""
        raise RuntimeError(
            f"{len(self.failures)} of {self.cases} case(s) failed and have no output; the other {done} were saved"
            f"{where}. Fix or remove the failed cases and run them again:\n{listed}"
        )
