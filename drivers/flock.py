"""flock(2) with a timeout. The lock belongs to the open file description, so it is taken
in the process that does the work and released by the kernel if that process dies."""

from __future__ import annotations

import contextlib
import fcntl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from drivers.errors import LockTimeout

POLL = 0.005


def open_making_dirs(path: Path, mode: str) -> IO[str]:
    """open(), creating the parent directories on first use only (not a stat per call)."""
    try:
        return open(path, mode)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, mode)


@contextlib.contextmanager
def file_lock(path: Path, timeout: float, what: str) -> Iterator[None]:
    with open_making_dirs(path, "a") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LockTimeout(f"{what}: lock not free after {timeout:g}s") from None
                time.sleep(POLL)
        yield
