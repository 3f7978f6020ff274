"""flock(2) with a timeout. The lock belongs to the open file description, so it is taken
in the process that does the work and released by the kernel if that process dies."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from drivers.errors import LockTimeout, Refused

DIR_LOCK_POLL = 1.0  # each mkdir of a cluster file system lock is a message to every node
POLL = 0.005


_MODES = {"a": os.O_WRONLY | os.O_CREAT | os.O_APPEND, "x": os.O_WRONLY | os.O_CREAT | os.O_EXCL}


def open_making_dirs(path: Path, mode: str) -> IO[str]:
    """open() for appending ("a") or exclusive creation ("x"), never through a symlink (one
    planted at a lock file's name would make us create its target), creating the parent
    directories on first use only (not a stat per call)."""
    flags = _MODES[mode] | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # a FIFO there cannot block us
    try:
        fd = os.open(path, flags, 0o644)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, flags, 0o644)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return os.fdopen(fd, mode)


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (a name just created, renamed or removed) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_held: set[int] = set()  # the descriptors of the file locks this process holds now


def _let_go_of_held() -> None:
    """In a forked child: a flock belongs to the open file description, which the child's
    copies of its parent's descriptors keep, so a lock another thread held at the fork (the
    worker's sweep, as Celery's pool forks a process) would outlive its `with` for as long as
    the child lives. The copies are pointed at /dev/null instead (not closed: the parent's
    file objects, copied too, close their numbers when collected)."""
    if not _held:
        return
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    for fd in _held:
        with contextlib.suppress(OSError):
            os.dup2(null, fd, inheritable=False)
    os.close(null)
    _held.clear()


os.register_at_fork(after_in_child=_let_go_of_held)


@contextlib.contextmanager
def file_lock(path: Path, timeout: float, what: str) -> Iterator[None]:
    try:
        f = open_making_dirs(path, "a")
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.EINVAL):
            raise
        raise Refused(f"{what}: lock file {path} is a symlink or not a regular file (never used)") from None
    with f:
        fd = f.fileno()
        _held.add(fd)  # from before the lock is ours to after it is let go: a fork between leaves none behind
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise LockTimeout(f"{what}: lock not free after {timeout:g}s") from None
                    time.sleep(POLL)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)  # for every copy of the descriptor
        finally:
            _held.discard(fd)


@contextlib.contextmanager
def dir_lock(path: Path, timeout: float, what: str) -> Iterator[None]:
    """A lock held by having made the directory `path`, removed again on the way out: Proxmox
    VE's cluster file system lock (its cfs_lock), taken as it takes it: the lock folder made
    first (else the cluster file system is not online), then each second a mkdir, and after a
    failed one an unlock request (utime 0), which expires a lock older than 120 s."""
    deadline = time.monotonic() + timeout
    with contextlib.suppress(OSError):
        os.mkdir(path.parent)
    if not path.parent.is_dir():
        raise Refused(f"{what}: cannot take lock {path}: {path.parent} is not there (is the cluster file system "
                      "online?)")
    while True:
        try:
            os.mkdir(path)
            break
        except FileExistsError:
            if time.monotonic() > deadline:
                raise LockTimeout(f"{what}: lock not free after {timeout:g}s") from None
            with contextlib.suppress(OSError):
                os.utime(path, (0, 0))  # the unlock request
            time.sleep(DIR_LOCK_POLL)
        except OSError as e:
            raise Refused(f"{what}: cannot take lock {path}: {e.strerror or e}") from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(path)
