"""Which guest configs changed since this process last stat'd them all: an inotify watch on the
guests directory, so an in-use check stats the configs changed since (a few), not every one.

A check must see every config changed since the volume index's `since` (drivers/guest_index.py).
Without a watch it stats each config for its ctime. With one, the process stats them all once
(`listed`: the names whose ctime is not older than `since`, or that have a second link), and
from then on the kernel names every entry of the directory written, truncated, renamed in or
out, created, removed or given new attributes, as it happens; a check adds those to the names
and stats only them. Names whose ctime has fallen behind `since` (a refresh has indexed them)
are dropped again.

The watch is not trusted, and the next check stats every config anew, when:
- the kernel's event queue overflowed, or the directory was removed, moved or unmounted, or
  another directory stands at its path now (compared on each check: one stat);
- a file that is no config was made or written in the directory and may be a config under
  another name: one with a second link, or one gone by the check (stork's own temp files
  excepted: see `_told_apart`);
- `since` went back (a clock that went back; the index is being rebuilt);
- the process forked (a child gets a new watch: a shared queue would give each only part of it);
- REVALIDATE seconds have passed since the last full stat. That bounds what no event naming a
  config tells: a write through a writable mapping; through a descriptor opened under a name
  in another directory (a hard link there, even one removed since); through a second name in
  this directory that is reused before the check (linked, written, then removed and made
  again, or renamed over); a file mounted over a config.
Only on a local file system (guest_index.WATCHED_FILE_SYSTEMS) on which the kernel's NFS server
exports nothing: other clients of a network or cluster file system, an overlay's layers beneath
it, and an NFS server's writes through file handles, whose files are tied to no directory, reach
no watch. A user-space NFS server (nfs-ganesha) writes through handles too and is not
detected: what it writes to a config whose name is not in the kernel's cache is seen within
REVALIDATE. Where inotify cannot be had (fs.inotify.max_user_instances reached, say), every
check stats every config.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import stat
import struct
import threading
import time
from pathlib import Path

from drivers.guests import TEMP_NAME

REVALIDATE = 30.0  # s between full stats of every config, for what no event tells (see above)
# what the kernel's NFS server exports (its cache, filled as clients come) and is set to export
NFS_EXPORT_TABLES = (Path("/proc/fs/nfsd/exports"), Path("/var/lib/nfs/etab"))

_IN_MODIFY, _IN_ATTRIB, _IN_CLOSE_WRITE = 0x2, 0x4, 0x8
_IN_MOVED_FROM, _IN_MOVED_TO, _IN_CREATE, _IN_DELETE = 0x40, 0x80, 0x100, 0x200
_IN_DELETE_SELF, _IN_MOVE_SELF, _IN_UNMOUNT, _IN_Q_OVERFLOW, _IN_IGNORED = 0x400, 0x800, 0x2000, 0x4000, 0x8000
_IN_ONLYDIR = 0x01000000
_WRITTEN = _IN_MODIFY | _IN_ATTRIB | _IN_CLOSE_WRITE | _IN_MOVED_TO | _IN_CREATE  # made, or its inode changed
_WATCHED = _WRITTEN | _IN_MOVED_FROM | _IN_DELETE | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ONLYDIR
_LOST = _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_UNMOUNT | _IN_Q_OVERFLOW | _IN_IGNORED  # the watch tells no more
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then len bytes of name

_libc = ctypes.CDLL(None, use_errno=True)


class Watch:
    """An inotify watch on one directory's entries, with the config names that may have
    changed since the `since` of its last full stat."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.pid = os.getpid()
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise _os_error(directory)
        try:
            # the watch goes on the directory opened here, whose identity each check compares
            # with what stands at the path then
            dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                opened = os.fstat(dfd)
                if _libc.inotify_add_watch(self.fd, f"/proc/self/fd/{dfd}".encode(), _WATCHED) < 0:
                    raise _os_error(directory)
            finally:
                os.close(dfd)
        except BaseException:
            os.close(self.fd)
            raise
        self.identity = (opened.st_dev, opened.st_ino)
        self.lost = False
        self.since: int | None = None  # the `since` its names are relative to; None: never listed
        self.listed_at = 0.0
        self.names: set[str] = set()

    def changed_since(self, since: int) -> set[str] | None:
        """The config names that may have changed since `since`, None when only a full stat can
        tell (never listed, `since` went back, the watch lost or due for revalidation)."""
        if self.since is None or since < self.since or self.expired():
            return None
        self.names |= self._drain()
        if self.lost or _identity(self.directory) != self.identity:
            self.lost = True
            return None
        return set(self.names)

    def expired(self) -> bool:
        return self.since is not None and time.monotonic() - self.listed_at > REVALIDATE

    def stale(self, directory: Path) -> bool:
        """Not to be used for `directory` any more: a new watch, and a full stat, is due."""
        return self.directory != directory or self.lost or self.pid != os.getpid() or self.expired()

    def listed(self, since: int, names: set[str], started: float) -> None:
        """A full stat, begun (time.monotonic) after the watch was made, found these names changed
        since `since`."""
        self.since, self.names, self.listed_at = since, set(names), started

    def settled(self, since: int, names: set[str]) -> None:
        """These names were stat'd older than `since`: a change after that stat is an event."""
        self.names -= names
        self.since = max(since, self.since or since)

    def _drain(self) -> set[str]:
        names: set[str] = set()
        others: set[str] = set()
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            offset = 0
            while offset < len(data):
                _, mask, _, length = _EVENT.unpack_from(data, offset)
                name = os.fsdecode(data[offset + _EVENT.size:offset + _EVENT.size + length].rstrip(b"\0"))
                offset += _EVENT.size + length
                if mask & _LOST:
                    self.lost = True
                elif name.endswith(".toml") and not name.startswith("."):
                    names.add(name)
                elif mask & _WRITTEN:
                    others.add(name)
        if not all(self._told_apart(name, names) for name in others):
            self.lost = True
        return names

    def _told_apart(self, name: str, names: set[str]) -> bool:
        """Whether a file made or written in the directory under a name that is no config's is
        told apart from the configs: one with a second link may be a config's inode under
        another name, written with no event naming the config, and one gone may have been. Two
        exceptions, stork's own temp files: gone (renamed or linked into place: its config's own
        event tells), and linked to its own config, not yet removed (that config is stat'd)."""
        try:
            st = os.lstat(os.path.join(self.directory, name))
        except FileNotFoundError:
            return TEMP_NAME.fullmatch(name) is not None
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode) or st.st_nlink == 1:
            return True
        if (temp := TEMP_NAME.fullmatch(name)) and st.st_nlink == 2:
            config = f"{temp[1]}.toml"
            with contextlib.suppress(OSError):
                if os.lstat(os.path.join(self.directory, config)).st_ino == st.st_ino:
                    names.add(config)
                    return True
        return False

    def close(self) -> None:
        os.close(self.fd)


def _identity(directory: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(directory)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _os_error(directory: Path) -> OSError:
    number = ctypes.get_errno()
    return OSError(number, os.strerror(number), str(directory))


def exported_paths(table: bytes) -> list[Path]:
    """The paths of an NFS export table (/proc/fs/nfsd/exports, /var/lib/nfs/etab): the first
    field of each line, octal escapes for blanks, # comments."""
    return [Path(os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), line.split()[0])))
            for line in table.splitlines() if line.strip() and not line.startswith(b"#")]


def _nfs_exported(directory: Path) -> bool:
    """Whether the kernel's NFS server exports, or is set to export, any path on the file system
    of `directory` (an export elsewhere on it, or a bind mount of it, takes file handles of its
    files too). A table that cannot be read counts as exporting."""
    device = os.stat(directory).st_dev
    for table in NFS_EXPORT_TABLES:
        try:
            paths = exported_paths(table.read_bytes())
        except FileNotFoundError:
            continue  # no NFS server here
        except OSError:
            return True
        for path in paths:
            with contextlib.suppress(OSError):  # an export not there exports nothing of ours
                if os.stat(path).st_dev == device:
                    return True
    return False


_current: Watch | None = None  # one per process: a worker's processes each check one directory
lock = threading.Lock()  # held around a check's use of the watch


def _after_fork() -> None:
    """A child starts with no watch (and a free lock: a thread of the parent may have held it)."""
    global _current, lock
    lock = threading.Lock()
    if _current is not None:
        _current.close()  # the child's copy of the descriptor: the parent's watch stays
        _current = None


os.register_at_fork(after_in_child=_after_fork)


def watching(directory: Path) -> Watch | None:
    """This process's watch on `directory`, made now if it had none that can still be trusted
    (the caller then stats every config and calls `listed`); None where none can be had. Call
    with `lock` held."""
    global _current
    if _current is not None and _current.stale(directory):
        _current.close()
        _current = None
    if _current is None:
        try:
            if _nfs_exported(directory):
                return None
            _current = Watch(directory)
        except OSError:
            return None
    return _current
