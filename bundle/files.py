"""Writing files so that nobody ever sees half of one: write beside the target, then rename."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

__all__ = ["atomic_path", "write_atomic"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path to write ``path`` through; it replaces ``path`` only if the block completes.

    The temporary file is hidden (so no folder scan picks it up), sits in the target's folder (so the final
    ``os.replace`` is atomic) and ends with ``suffix`` (so writers that choose a format from the extension,
    e.g. ``.nii.gz``, still do). An error in the block, or an interruption, leaves the target as it was and
    removes the temporary file.
    """
    target = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(target)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_path`, flushed to disk, so ``path`` is never partial."""
    with atomic_path(path) as tmp, open(tmp, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
