"""Files below a storage directory, reached without ever following a symlink.

Anything inside a storage may have been put there by someone else: a guest folder that is a
symlink to /etc, a FIFO named like a volume, a symlink at a temp name. So every entry is
opened relative to the storage root with openat(2) and O_NOFOLLOW, only regular files are
used as files (O_NONBLOCK, so a FIFO cannot block the open), and the checks and the work act
on the same opened descriptor: fstat, fchmod, the immutable flag, fsync, and qemu-img through
/proc/self/fd/N. Temp files get random names and are created exclusively. Names are created
with link(2) (fails if anything holds the name) and replaced with rename(2), and the
directory is fsync'd after each, so a name is durable before anything points at it.

The storage root itself is followed: it is the administrator's configured path.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import os
import re
import secrets
import stat
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from drivers.errors import AlreadyExists, NotFound, Refused

_FILE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# temp_file's names, `.<name>.<token>.tmp`, and an older stork's of a volume, without the token
_TEMP = re.compile(r"\..+\.[0-9a-f]{16}\.tmp|\..+\.(?:raw|qcow2)\.tmp")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NOT_FOLLOWED = (errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.ENXIO)

FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_IOC_GETVERSION = 0x80086601, 0x40086602, 0x80087601
FS_IMMUTABLE_FL = 0x10


_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFLNK: "a symlink", stat.S_IFIFO: "a FIFO",
          stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


def kind_of(mode: int) -> str:
    """What a file that is not a regular one is, for messages: "a directory", "a FIFO", ..."""
    return _KINDS.get(stat.S_IFMT(mode), "a special file")


def refused(what: Path | str, why: str) -> Refused:
    return Refused(f"{what}: {why} (stork never follows a symlink or uses a special file in a storage)")


class SafeDir:
    """A storage directory; `folder()` and `open()` hand out descriptors of its entries."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @contextlib.contextmanager
    def folder(self, name: str, create: bool = False) -> Iterator[int]:
        """A descriptor of the directory `name` directly below the root (created if asked,
        the root too); NotFound if absent, Refused if it is a symlink or not a directory."""
        try:
            root = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            if not create:
                raise NotFound(f"{self.root / name}: no such directory") from None
            self.root.mkdir(parents=True, exist_ok=True)
            root = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fd = self._subdir(root, name, create)
        finally:
            os.close(root)
        try:
            yield fd
        finally:
            os.close(fd)

    def _subdir(self, root: int, name: str, create: bool) -> int:
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=root)
        except FileNotFoundError:
            if not create:
                raise NotFound(f"{self.root / name}: no such directory") from None
        except OSError as e:
            if e.errno in _NOT_FOLLOWED:
                raise refused(self.root / name, "not a directory") from None
            raise
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o755, dir_fd=root)
            os.fsync(root)
        return self._subdir(root, name, create=False)

    def remove_folder_if_empty(self, name: str) -> None:
        """rmdir a folder that holds nothing (a guest's, after its last volume went)."""
        with contextlib.suppress(OSError):
            root = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.rmdir(name, dir_fd=root)
                os.fsync(root)
            finally:
                os.close(root)

    def open(self, folder: int, name: str, write: bool = False, label: str = "") -> int:
        """Open the regular file `name` in `folder`; NotFound if absent, Refused otherwise.
        `label` names it in messages (e.g. its volume id)."""
        label = label or name
        try:
            fd = os.open(name, (os.O_RDWR if write else os.O_RDONLY) | _FILE_FLAGS, dir_fd=folder)
        except FileNotFoundError:
            raise NotFound(f"{label}: no such file") from None
        except OSError as e:
            if e.errno in _NOT_FOLLOWED:
                raise refused(label, self.problem(folder, name) or "not a regular file") from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise refused(label, self.problem(folder, name) or "not a regular file")
        return fd

    def open_dir(self, folder: int, name: str, label: str = "") -> int:
        """Open the directory `name` in `folder` without following a link; NotFound if
        absent, Refused for anything else at the name."""
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=folder)
        except FileNotFoundError:
            raise NotFound(f"{label or name}: no such directory") from None
        except OSError as e:
            if e.errno in _NOT_FOLLOWED:
                raise refused(label or name, self.problem(folder, name) or "not a directory") from None
            raise

    @staticmethod
    def problem(folder: int, name: str) -> str:
        """Why the entry `name` in `folder` is not a file stork uses, naming its path; "" for a
        regular file or no entry."""
        try:
            mode = os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode
        except FileNotFoundError:
            return ""
        if stat.S_ISREG(mode):
            return ""
        return f"not a regular file: {os.readlink(f'/proc/self/fd/{folder}')}/{name} is {kind_of(mode)}"

    @contextlib.contextmanager
    def opened(self, folder: int, name: str, write: bool = False, label: str = "") -> Iterator[int]:
        fd = self.open(folder, name, write, label)
        try:
            yield fd
        finally:
            os.close(fd)

    @staticmethod
    def entry_exists(folder: int, name: str) -> bool:
        """Is anything at `name` (a symlink or FIFO counts: the name is taken)?"""
        try:
            os.stat(name, dir_fd=folder, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False

    @staticmethod
    def spelled_so(folder: int, name: str) -> bool:
        """Is the entry `name` finds in `folder` spelled `name`? A file system that folds case
        (CIFS, ZFS with casesensitivity=insensitive, an ext4 folder with casefold) finds
        `Vm-100-disk-0.raw` for `vm-100-disk-0.raw`: a volume id typed in another case would then
        free or rename a volume that guest configs, job records and clones name in its own case,
        each checked as spelled. Only where the name's other case finds the same file is the
        folder listed; an absent name is spelled so (the caller finds it absent)."""
        other = name.swapcase()
        if other == name:
            return True
        try:
            mine = os.stat(name, dir_fd=folder, follow_symlinks=False)
            theirs = os.stat(other, dir_fd=folder, follow_symlinks=False)
        except FileNotFoundError:
            return True  # no entry, or a file system that tells the two cases apart
        return (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino) or name in os.listdir(folder)

    @staticmethod
    def regular_files(folder: int) -> list[str]:
        """Names of the regular files in `folder` (symlinks and special files are not listed)."""
        with os.scandir(folder) as entries:
            return [e.name for e in entries if e.is_file(follow_symlinks=False)]

    @staticmethod
    def other_entries(folder: int) -> list[str]:
        """Names of the entries in `folder` that are not regular files (hidden ones left out)."""
        with os.scandir(folder) as entries:
            return [e.name for e in entries if not e.name.startswith(".") and not e.is_file(follow_symlinks=False)]

    # ---- making names ---------------------------------------------------------------
    @staticmethod
    def is_temp(name: str) -> bool:
        """Is `name` a temp file's, as temp_file makes them (gone or linked by the time the lock ends)?"""
        return _TEMP.fullmatch(name) is not None

    @staticmethod
    def sweep_temps(folder: int) -> None:
        """Remove temp files left in `folder` by a writer that died. Call it under the storage
        lock, which every writer of temp files holds: any temp file there then is stale."""
        with os.scandir(folder) as entries:  # stork's own names only: a folder may be Proxmox VE's too
            stale = [e.name for e in entries if SafeDir.is_temp(e.name)]
        for name in stale:
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                os.unlink(name, dir_fd=folder)

    @contextlib.contextmanager
    def temp_file(self, folder: int, name: str) -> Iterator[tuple[int, str]]:
        """A new empty file with a random hidden name next to `name`, removed on the way out
        unless it was linked or renamed into place (then the unlink finds nothing to do).
        Stale temp files of crashed writers in the folder go first (callers hold the lock)."""
        self.sweep_temps(folder)
        temp = f".{name}.{secrets.token_hex(8)}.tmp"
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | _FILE_FLAGS, 0o644, dir_fd=folder)
        try:
            yield fd, temp
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp, dir_fd=folder)

    @staticmethod
    def drop_temp_links(folder: int, name: str, fd: int) -> None:
        """Unlink the temp names of `name` (temp_file's) that are the very file `fd` is: a writer
        that died between link_new's link(2) and its unlink of the temp name left a second
        name on a file of its own making."""
        opened = os.fstat(fd)
        for entry in os.listdir(folder):
            if entry.startswith(f".{name}.") and entry.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    found = os.stat(entry, dir_fd=folder, follow_symlinks=False)
                    if (found.st_dev, found.st_ino) == (opened.st_dev, opened.st_ino):
                        os.unlink(entry, dir_fd=folder)

    @staticmethod
    def link_new(folder: int, temp: str, name: str, what: str) -> None:
        """Give the flushed temp file its final name, failing if anything holds that name."""
        try:
            os.link(temp, name, src_dir_fd=folder, dst_dir_fd=folder, follow_symlinks=False)
        except FileExistsError:
            raise AlreadyExists(f"{what} already exists") from None
        os.unlink(temp, dir_fd=folder)
        os.fsync(folder)

    def replace(self, folder: int, temp: str, name: str) -> None:
        """Put the flushed temp file in place of the regular file `name` (never free)."""
        if self.entry_exists(folder, name):
            os.close(self.open(folder, name))  # refuses a symlink or special file
        os.rename(temp, name, src_dir_fd=folder, dst_dir_fd=folder)
        os.fsync(folder)

    @staticmethod
    def rename(src_folder: int, src: str, dst_folder: int, dst: str, what: str) -> None:
        """Rename to a free name (callers hold the storage lock), flushing both folders."""
        if SafeDir.entry_exists(dst_folder, dst):
            raise AlreadyExists(f"{what} already exists")
        os.rename(src, dst, src_dir_fd=src_folder, dst_dir_fd=dst_folder)
        os.fsync(dst_folder)
        os.fsync(src_folder)

    @staticmethod
    def unlink(folder: int, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=folder)
        os.fsync(folder)


# ---- what an opened file can tell and be made --------------------------------------------


def set_immutable(fd: int, on: bool) -> bool:
    """chattr +i/-i through the descriptor; False where the file system has no such flag."""
    try:
        flags = struct.unpack("i", fcntl.ioctl(fd, FS_IOC_GETFLAGS, b"\0" * 4))[0]
        wanted = flags | FS_IMMUTABLE_FL if on else flags & ~FS_IMMUTABLE_FL
        if wanted != flags:
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", wanted))
        return True
    except OSError as e:
        if e.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM, errno.EACCES, errno.ENOSYS):
            return False  # no such flag here, or no CAP_LINUX_IMMUTABLE: the base is still 0444
        raise


def identity(fd: int) -> str:
    """Who this file is, unlike any file made after it was deleted: device, inode and the
    inode's generation (ext4 and xfs reuse an inode number at once, with a new generation).
    Where the file system gives no generation (NFS, CIFS, tmpfs), its own file handle stands
    in for it: an NFS client's is the server's, which holds the server's generation, so a name
    freed and made again on the server's reused inode is another file here too."""
    st = os.fstat(fd)
    try:
        generation = str(struct.unpack("i", fcntl.ioctl(fd, FS_IOC_GETVERSION, b"\0" * 4))[0] & 0xFFFFFFFF)
    except OSError:
        generation = _handle_digest(fd)
    return f"{st.st_dev}:{st.st_ino}:{generation}"


AT_EMPTY_PATH = 0x1000
MAX_HANDLE = 128  # MAX_HANDLE_SZ


def _handle_digest(fd: int) -> str:
    """A digest of the file handle of `fd` (name_to_handle_at(2)), "h" first; "0" where the
    file system has none (as before handles stood in: a file told by device and inode alone)."""
    import ctypes  # here: only a file system without a generation asks

    buf = ctypes.create_string_buffer(8 + MAX_HANDLE)
    struct.pack_into("I", buf, 0, MAX_HANDLE)
    mount_id = ctypes.c_int()
    if _libc().name_to_handle_at(fd, b"", buf, ctypes.byref(mount_id), AT_EMPTY_PATH):
        return "0"
    size, kind = struct.unpack_from("Ii", buf.raw)
    return "h" + hashlib.sha256(struct.pack("i", kind) + buf.raw[8:8 + min(size, MAX_HANDLE)]).hexdigest()[:24]


FICLONE = 0x40049409
_NO_REFLINK = (errno.EXDEV, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTTY, errno.ENOSYS)


def reflink(src: int, dst: int) -> bool:
    """Make dst a copy of src that shares its extents (FICLONE: no data is copied); False
    where the two files cannot share (another filesystem, or one without reflinks)."""
    try:
        fcntl.ioctl(dst, FICLONE, src)
    except OSError as e:
        if e.errno in _NO_REFLINK:
            return False
        raise
    return True


def copy_contents(src: int, dst: int) -> None:
    """Copy a whole (small) file between descriptors, in the kernel where it can."""
    size = os.fstat(src).st_size
    offset = 0
    while offset < size:
        sent = os.copy_file_range(src, dst, size - offset, offset, offset)
        if sent == 0:
            break
        offset += sent
    if offset < size:
        raise OSError(errno.EIO, f"short copy ({offset} of {size} bytes)")


def fs_magic(fd: int) -> int:
    """fstatfs(2)'s f_type of the file system holding `fd` (OSError if it cannot be had)."""
    import ctypes

    buf = ctypes.create_string_buffer(256)  # a struct statfs, f_type (a long) first
    if _libc().fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(struct.unpack_from("l", buf.raw)[0]) & 0xFFFFFFFF


@functools.cache
def _libc() -> Any:
    """The C library, for the calls Python's os module lacks (errno kept for ctypes.get_errno)."""
    import ctypes  # here: imported by the few calls that need it, not by every command

    return ctypes.CDLL(None, use_errno=True)


def is_mount_point(path: Path) -> bool:
    """Whether `path` is where a file system is mounted, as the mount table says (a bind mount
    of a directory of the same file system included, which os.path.ismount misses)."""
    target = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as table:
            points = [line.split()[4] for line in table if len(line.split()) > 4]
    except OSError:
        return os.path.ismount(target)
    # the table escapes space, tab, newline and backslash as octal (\040, ...)
    return any(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), p) == target for p in points)
