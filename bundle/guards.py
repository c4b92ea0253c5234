"""Guards that stop a run at once, with a message saying what to do, instead of letting it go wrong slowly.

- :func:`writable_folder`: an output folder is checked when the run starts, not after hours of work.
- :func:`lock_folder`: one training at a time per state folder; a second one names the first one's PID.
- :func:`remove_stale_temporaries`: hidden ``.<name>.tmp-<pid>-*`` files that a killed run left behind
  (:func:`bundle.files.atomic_path`) are removed on the next run.
- :class:`StopOnNonFiniteLoss`: training stops with an error at the first NaN or infinite loss, naming the
  iteration (ignite's ``TerminateOnNan`` only ends the run, which then exits as if it had succeeded).
- :class:`ValidateAtEnd`: the last epoch is always validated, so no training ends without a ``model.pt``.
- :func:`require_foreground`: a training set whose labels hold no foreground at all stops before training.

The configs call them from ``initialize`` and ``train#handlers``.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import tempfile
from collections.abc import Callable

import torch
from monai.handlers import ValidationHandler
from monai.utils import IgniteInfo, min_version, optional_import

TerminateOnNan, _ = optional_import("ignite.handlers", IgniteInfo.OPT_IMPORT_VERSION, min_version, "TerminateOnNan")
Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
fcntl, has_fcntl = optional_import("fcntl")

__all__ = [
    "writable_folder",
    "lock_folder",
    "remove_stale_temporaries",
    "StopOnNonFiniteLoss",
    "ValidateAtEnd",
    "LOCK_NAME",
    "require_foreground",
]

#: Name of the lock file a training keeps in its state folder.
LOCK_NAME = ".lock"

logger = logging.getLogger(__name__)

_held_locks: dict[str, int] = {}  # folder -> open file descriptor holding its lock, for this process's lifetime
_TEMPORARY = re.compile(r"\..+\.tmp-(?P<pid>\d+)-[0-9a-f]{8}.*")


def writable_folder(path: str | os.PathLike, key: str = "output_dir") -> str:
    """``path`` once it is known to be a folder this process can write into, or can create.

    Called at start-up for every folder a run writes, so a wrong ``--output_dir`` fails before the first
    case is segmented or the first epoch trained, with the config key to change. A missing folder is not
    created here (a run that fails later leaves nothing behind); its nearest existing parent is checked.
    """
    path = os.fspath(path)
    existing = os.path.abspath(path)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = "is a file" if existing == os.path.abspath(path) else f"is inside '{existing}', which is a file"
        raise NotADirectoryError(
            f"`{key}` '{path}' {what}, not a folder: point --{key} at a folder (it is created if missing)."
        )
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise PermissionError(
            f"`{key}` '{path}' cannot be written ('{existing}': {error.strerror or error}): point --{key} at a "
            "folder you can write to."
        ) from error
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as error:
        return error.errno == errno.EPERM  # it exists, it is just not ours
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Remove the hidden temporary files in ``folder`` whose writing process is gone; return their paths.

    :func:`bundle.files.atomic_path` names its temporary files ``.<name>.tmp-<pid>-<8 hex>``; a process killed
    mid-write (``kill -9``, a lost node) leaves one behind. Files of a process that is still running are kept.
    """
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in os.listdir(folder):
        match = _TEMPORARY.fullmatch(name)
        if match and int(match["pid"]) != os.getpid() and not _alive(int(match["pid"])):
            path = os.path.join(folder, name)
            try:
                os.remove(path)
            except FileNotFoundError:
                continue
            removed.append(path)
            logger.warning(f"removed '{path}', left half-written by a run that was killed")
    return removed


def lock_folder(folder: str | os.PathLike, key: str = "state_dir") -> str:
    """Take an exclusive lock on ``folder`` for the rest of this process; return the folder.

    Two trainings writing one state folder delete and overwrite each other's checkpoints. The lock is an
    ``flock`` on ``<folder>/.lock``, which records the holder's PID; the operating system releases it when the
    process ends, however it ends, so a killed run never leaves a stale lock. A second process fails at
    start-up naming the first one's PID; the same process may lock the same folder again (e.g. a resumed run
    in one Python session). Stale temporary files in the folder are removed once the lock is held.
    """
    folder = os.path.abspath(os.fspath(folder))
    if folder in _held_locks:
        return folder
    writable_folder(folder, key)
    os.makedirs(folder, exist_ok=True)
    if not has_fcntl:  # not a POSIX system: no flock, run unguarded
        logger.warning(f"cannot lock '{folder}' on this system; make sure no other training writes into it.")
        return folder
    fd = os.open(os.path.join(folder, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RuntimeError(
            f"'{folder}' is in use by another training (PID {holder}): two runs in one `{key}` would overwrite "
            f"each other's checkpoints. Wait for it to end (or stop it), or give this run another --bundle_root or "
            f"--{key}."
        ) from error
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held_locks[folder] = fd
    remove_stale_temporaries(folder)
    return folder


def _losses(output):
    if isinstance(output, dict):
        return {k: v for k, v in output.items() if str(k).endswith("loss")}
    return output


class StopOnNonFiniteLoss(TerminateOnNan):
    """Stop training with an error at the first iteration whose loss is NaN or infinite.

    ignite's ``TerminateOnNan`` ends the run quietly, which then saves its final state and exits with
    status 0; this handler raises instead, naming the epoch and iteration, so a script or scheduler sees the
    failure. Non-finite weights are never saved (:class:`bundle.checkpoints.SafeCheckpointSaver`), so the
    last good state stays on disk to resume from.

    Args:
        output_transform: picks the values to check from ``engine.state.output``; by default every entry whose
            key ends with ``loss`` (``loss``, ``critic_loss``, ``discriminator_loss``, ...), so one handler fits
            every trainer of the bundle.
    """

    def __init__(self, output_transform: Callable | None = None) -> None:
        super().__init__(output_transform=output_transform or _losses)

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine) -> None:
        was_terminating = engine.should_terminate
        super().__call__(engine)
        if engine.should_terminate and not was_terminating:
            values = self._output_transform(engine.state.output)
            if isinstance(values, dict):
                values = ", ".join(f"{k} {float(torch.as_tensor(v).detach()):g}" for k, v in values.items())
            raise FloatingPointError(
                f"non-finite loss at epoch {engine.state.epoch}, iteration {engine.state.iteration} ({values}): "
                "training stopped, and the weights it had just updated were not saved. Check the inputs, lower "
                "`learning_rate`, or add the Dice term (--dice_weight 1.0), then continue from the last saved "
                "state with --resume true."
            )


class ValidateAtEnd(ValidationHandler):
    """MONAI's ``ValidationHandler`` that also validates after the last epoch, whatever ``interval`` is.

    With ``max_epochs`` not a multiple of ``val_interval`` (e.g. ``--max_epochs 2`` with the default interval
    5) the last epochs would never be validated, and a run shorter than one interval would end with no
    ``model.pt`` at all.
    """

    def attach(self, engine) -> None:
        if not self.epoch_level:
            super().attach(engine)
            return
        interval = self.interval

        def every_interval_or_last(engine, epoch: int) -> bool:
            return epoch % interval == 0 or epoch == engine.state.max_epochs

        engine.add_event_handler(Events.EPOCH_COMPLETED(event_filter=every_interval_or_last), self)
        if self.exec_at_start:
            engine.add_event_handler(Events.STARTED, self)


def require_foreground(dataset, regions, key: str = "label") -> bool:
    """Stop before training when no training label holds any foreground (``True`` once one does).

    Labels that match no region (another convention's values, or labels of the wrong data) would train a
    segmentor that paints nothing, validate at Dice 0 every epoch and still save a ``model.pt``. Foreground is
    a voxel in a region whose label values exclude 0 (a multiclass ``background: [0]`` class is not
    foreground). The labels are read from ``dataset``'s cache (a MONAI ``CacheDataset``, filled once here for
    the training that follows) or, for items not cached, from their files.
    """
    from monai.transforms import LoadImage

    from .cases import case_id

    values = {name: [int(v) for v in vals] for name, vals in dict(regions).items()}
    channels = [i for i, vals in enumerate(values.values()) if 0 not in vals]
    wanted = sorted({v for vals in values.values() if 0 not in vals for v in vals})
    cache = list(getattr(dataset, "_cache", None) or [])
    data = list(getattr(dataset, "data", []))
    found = False
    for index, item in enumerate(data):
        cached = cache[index] if index < len(cache) else None
        if isinstance(cached, dict) and key in cached:
            label = torch.as_tensor(cached[key])
            found = bool(label[channels].any()) if channels else False
        elif isinstance(item, dict) and item.get(key):
            label = torch.as_tensor(LoadImage(image_only=True)(item[key]))
            found = bool(torch.isin(torch.round(label), torch.tensor(wanted, dtype=label.dtype)).any())
        if found:
            return True
    if data:
        shown = ", ".join(str(case_id(item) if isinstance(item, dict) else item) for item in data[:5])
        raise ValueError(
            f"none of the {len(data)} training label map(s) ({shown}{' ...' if len(data) > 5 else ''}) holds a voxel "
            f"of any region {values}: the segmentor would learn to paint nothing. Check that the labels are the ground "
            "truth and that `label_convention` (brats, brats2023, brats2024, msd) or `regions` match their values."
        )
    return found
