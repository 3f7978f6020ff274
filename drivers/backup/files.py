"""The file-system plumbing under the chunk store (drivers.backup.store) and its snapshot writer
(drivers.backup.writer): the names in the store's layout (described in drivers.backup.store), whole
reads and writes of a descriptor, lock files, and removing a folder out of sight.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from datetime import UTC, datetime

from drivers.backup.records import format_time
from drivers.errors import Corrupt
from drivers.safedir import refused

CHUNKS, VM, LOCK = ".chunks", "vm", ".lock"
KEY_FINGERPRINT = ".key-fingerprint"  # in .chunks: the fingerprint of an encrypted store's key
CHUNK_SIZE = ".chunk-size"  # in .chunks: the chunk size the store was made with
MANIFEST_MAC = "manifest.mac"  # beside an encrypted store's manifest: its HMAC
PARTIAL, TRASH = ".partial-", ".trash-"


def now_text() -> str:
    """The current time as a manifest or state file records it."""
    return format_time(datetime.now(UTC))


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd`, however many writes it takes."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def read_all(fd: int, limit: int, what: str) -> bytes:
    """Read `fd` to its end; Corrupt, naming `what`, if it holds more than `limit` bytes."""
    parts, total = [], 0
    while part := os.read(fd, min(limit + 1 - total, 8 << 20)):
        total += len(part)
        if total > limit:
            raise Corrupt(f"{what}: larger than the {limit} bytes it can be")
        parts.append(part)
    return b"".join(parts)


def open_lock(folder: int, name: str) -> int:
    """Open (or make) a lock file; a symlink or special file at its name is refused."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, 0o644, dir_fd=folder)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise refused(_path_of(folder, name), "a symlink or special file as lock file") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise refused(_path_of(folder, name), "a special file as lock file")
    return fd


def _path_of(folder: int, name: str) -> str:
    """The path of `name` in the open `folder`, for messages."""
    return f"{os.readlink(f'/proc/self/fd/{folder}')}/{name}"


@contextlib.contextmanager
def flocked(folder: int, name: str, exclusive: bool) -> Iterator[int]:
    """Hold flock on a lock file for the block. Holders keep it briefly (a chunk write, one
    folder's sweep, a state update), so waiting without a timeout is fine."""
    fd = open_lock(folder, name)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield fd
    finally:
        os.close(fd)


def still_named(folder: int, name: str, fd: int) -> bool:
    """Does `name` in `folder` still hold the directory open as `fd`?"""
    try:
        st = os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def discard(folder: int, name: str, label: str) -> None:
    """Remove a folder's subfolder: first renamed out of sight (so a crash never leaves half of
    it under its name), then deleted; whatever a failure leaves stays in trash for gc."""
    trash = f"{TRASH}{label}-{secrets.token_hex(4)}"
    os.rename(name, trash, src_dir_fd=folder, dst_dir_fd=folder)
    os.fsync(folder)
    shutil.rmtree(trash, ignore_errors=True, dir_fd=folder)  # never follows a symlink
    os.fsync(folder)
