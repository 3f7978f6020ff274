"""Fault points: places where a crash test can have the process killed, right after an effect
(a volume created, renamed, freed) and before the step records it.

A test arms points by writing their names, one per line, into the file named by
STORK_FAULTS in the worker's environment; the first process to reach an armed point takes it
out of the file (so the redelivered step runs on) and kills itself with SIGKILL. Without
STORK_FAULTS a point costs one dictionary lookup.
"""

from __future__ import annotations

import fcntl
import os
import signal

ENV = "STORK_FAULTS"


def point(name: str) -> None:
    file = os.environ.get(ENV)
    if not file:
        return
    try:
        with open(file, "r+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # one process fires a point, once
            armed = f.read().split()
            if name not in armed:
                return
            armed.remove(name)
            f.seek(0)
            f.truncate()
            f.write("\n".join(armed))
            f.flush()
            os.fsync(f.fileno())
    except FileNotFoundError:
        return
    os.kill(os.getpid(), signal.SIGKILL)
