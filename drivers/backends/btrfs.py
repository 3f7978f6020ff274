"""btrfs storage: each volume a subvolume holding its raw image.

    <path>/<vmid>/vm-<vmid>-disk-<n>.raw/disk.raw   a guest's disk: a subvolume and its image
    <path>/base/<name>.raw/disk.raw                 a base: the subvolume made read-only

A linked clone is a writable snapshot of its base's subvolume: it shares the base's extents.
A btrfs snapshot does not depend on its source, so freeing a base would lose no clone's data;
stork keeps the link all the same (a template's clones are listed, and its base is not freed
under them), and reads it from btrfs itself: a clone's subvolume has its base's UUID as parent
UUID. Proxmox's btrfs plugin does not keep this link. A full copy within the filesystem
shares extents (FICLONE, Driver.copy_from) instead of copying data.

Everything is done by ioctls on opened descriptors — subvolume create, snapshot, delete by id,
the read-only flag, subvolume info — which is what the `btrfs` tool does, so no path is
resolved twice and no symlink is followed: the subvolume checked is the one acted on. A new
subvolume is made under a hidden temp name, renamed into place and the filesystem synced
(syncfs), so a name is never visible before its subvolume is durable.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import secrets
import struct
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from drivers import faults, names, qemu
from drivers.backends.base import RAW_WITH_CLONES, Driver
from drivers.errors import NotFound, Refused, StorageUnavailable
from drivers.names import VolName
from drivers.safedir import SafeDir, is_mount_point
from drivers.storage import IS_MOUNTPOINT, PATH, StorageConfig

IMAGE = "disk.raw"  # the image file in each volume's subvolume
SUBVOLUME_ROOT_INODE = 256  # every subvolume's top directory has this inode number


# ---- btrfs ioctls (linux/btrfs.h) ---------------------------------------------------------
def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (0x94 << 8) | nr


ARGS_SIZE = 4096  # struct btrfs_ioctl_vol_args and _v2 are both 4 KiB
INFO_SIZE = 504  # struct btrfs_ioctl_get_subvol_info_args
SUBVOL_CREATE_V2 = _ioc(1, 24, ARGS_SIZE)
SNAP_CREATE_V2 = _ioc(1, 23, ARGS_SIZE)
SUBVOL_GETFLAGS = _ioc(2, 25, 8)
SUBVOL_SETFLAGS = _ioc(1, 26, 8)
GET_SUBVOL_INFO = _ioc(2, 60, INFO_SIZE)
SNAP_DESTROY_V2 = _ioc(1, 63, ARGS_SIZE)
SUBVOL_RDONLY = 1 << 1
SUBVOL_SPEC_BY_ID = 1 << 4


def _name_args(name: str, fd: int = 0) -> bytearray:
    """btrfs_ioctl_vol_args_v2 naming an entry (and a source subvolume, for a snapshot).
    A bytearray: Python passes at most 1 KiB of immutable bytes to an ioctl."""
    encoded = name.encode()
    return bytearray(struct.pack("qQQ32x", fd, 0, 0) + encoded + b"\0" * (ARGS_SIZE - 56 - len(encoded)))


def _id_args(subvolume_id: int) -> bytearray:
    return bytearray(struct.pack("qQQ32xQ", 0, 0, SUBVOL_SPEC_BY_ID, subvolume_id) + b"\0" * (ARGS_SIZE - 64))


@dataclass(frozen=True)
class Subvolume:
    id: int
    uuid: str
    parent_uuid: str | None  # the subvolume it is a snapshot of
    name: str = ""  # its entry's name in the directory that holds it
    in_subvolume: int = 0  # the id of the subvolume holding that directory
    in_directory: int = 0  # that directory's inode


def subvolume_info(fd: int) -> Subvolume:
    """What btrfs says of the subvolume `fd` is in (struct btrfs_ioctl_get_subvol_info_args)."""
    buf = bytearray(INFO_SIZE)
    fcntl.ioctl(fd, GET_SUBVOL_INFO, buf)
    parent = bytes(buf[312:328])
    tree, parent_id, dirid = (struct.unpack_from("Q", buf, at)[0] for at in (0, 264, 272))
    return Subvolume(tree, str(uuid.UUID(bytes=bytes(buf[296:312]))),
                     str(uuid.UUID(bytes=parent)) if any(parent) else None,
                     bytes(buf[8:264]).split(b"\0")[0].decode(errors="replace"), parent_id, dirid)


def set_readonly(fd: int, on: bool) -> None:
    flags = struct.unpack("Q", fcntl.ioctl(fd, SUBVOL_GETFLAGS, b"\0" * 8))[0]
    wanted = flags | SUBVOL_RDONLY if on else flags & ~SUBVOL_RDONLY
    if wanted != flags:
        fcntl.ioctl(fd, SUBVOL_SETFLAGS, struct.pack("Q", wanted))


def is_readonly(fd: int) -> bool:
    return bool(struct.unpack("Q", fcntl.ioctl(fd, SUBVOL_GETFLAGS, b"\0" * 8))[0] & SUBVOL_RDONLY)


_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(fd: int) -> None:
    """Commit the filesystem's transaction: new and renamed subvolumes are durable then."""
    if _libc.syncfs(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _folder(vol: VolName) -> str:
    return "base" if vol.owner is None else str(vol.owner)


def _entry(vol: VolName) -> str:
    return f"{vol.name}.{vol.fmt}"


def _is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


class BtrfsDriver(Driver):
    type_name = "btrfs"
    formats = ("raw",)
    default_format = "raw"
    linked_clone_format = "raw"
    FEATURES = RAW_WITH_CLONES
    # is_mountpoint: the path is where the btrfs is mounted; where the host's own root is a btrfs,
    # a plain directory left by an unmount is on a btrfs too, and only the mount table tells
    OPTIONS = {"path": PATH, "is_mountpoint": IS_MOUNTPOINT}

    def __init__(self, config: StorageConfig) -> None:
        super().__init__(config)
        assert config.path is not None  # a required option: the config checked it
        self.root: Path = config.path
        self._safedir = SafeDir(self.root)
        self._on_btrfs = False
        self._bases_seen: tuple[tuple[int, int, int], list[tuple[VolName, str]]] | None = None

    # ---- opening -------------------------------------------------------------------------
    @property
    def _dir(self) -> SafeDir:
        """The storage's directory, on a btrfs: every use checks, so an unmounted storage is
        never read as empty (a volume not there, nothing to free, a base never renamed)."""
        self._require_btrfs()
        return self._safedir

    def _require_btrfs(self) -> None:
        """Refuse a storage whose directory is not on a btrfs (an unmounted filesystem leaves
        a plain directory of the root filesystem there), as unavailable: an undo meeting it is
        tried again, once it is mounted. Checked once per driver."""
        if self._on_btrfs:
            return
        if self.storage.options.get("is_mountpoint") and not is_mount_point(self.root):
            raise StorageUnavailable(f"storage {self.storage.id!r}: {self.root} is not a mounted file system "
                                     "(is_mountpoint)")
        try:
            root = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise StorageUnavailable(f"storage {self.storage.id!r}: {self.root}: no such directory") from None
        try:
            subvolume_info(root)
        except OSError as e:
            if e.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
                raise StorageUnavailable(f"storage {self.storage.id!r}: {self.root} is not on a btrfs filesystem") \
                    from None
            raise
        finally:
            os.close(root)
        self._on_btrfs = True

    def _open_subvolume(self, folder: int, name: str, label: str) -> int:
        """The subvolume `name` in `folder`, opened without following a link; NotFound if
        absent, Refused for anything else at the name (a file, a plain directory, a link)."""
        try:
            fd = self._dir.open_dir(folder, name, label)
        except NotFound:
            raise NotFound(f"unknown volume {label}") from None
        if os.fstat(fd).st_ino != SUBVOLUME_ROOT_INODE:
            os.close(fd)
            raise Refused(f"{label}: not a volume: {self._path(folder, name)} is a directory, not a btrfs subvolume")
        return fd

    @staticmethod
    def _path(folder: int, name: str) -> str:
        return f"{os.readlink(f'/proc/self/fd/{folder}')}/{name}"

    @contextlib.contextmanager
    def _subvolume(self, vol: VolName) -> Iterator[int]:
        self._require_btrfs()
        try:
            with self._dir.folder(_folder(vol)) as folder:
                fd = self._open_subvolume(folder, _entry(vol), self.volid(vol))
        except NotFound:
            raise NotFound(f"unknown volume {self.volid(vol)}") from None
        try:
            yield fd
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _opened(self, vol: VolName, write: bool = False) -> Iterator[int]:
        """The volume's image file, opened inside its subvolume."""
        with self._subvolume(vol) as sub, self._dir.opened(sub, IMAGE, write, label=self.volid(vol)) as fd:
            yield fd

    @contextlib.contextmanager
    def image(self, vol: VolName, write: bool = False) -> Iterator[qemu.Image]:
        """The raw image, opened for qemu-img; a linked clone needs no backing (a snapshot
        holds its data itself)."""
        with self._opened(vol, write) as fd:
            yield qemu.Image.of_fd("raw", fd, self.volid(vol))
            if write:
                os.fsync(fd)

    # ---- reading -------------------------------------------------------------------------
    def _folders(self, owner: int | None, folder: str | None = None) -> Iterator[tuple[str, int]]:
        """The folders to list: `owner`'s, or the one named, or every guest's and base/."""
        if not self.root.is_dir():
            return
        self._require_btrfs()
        if folder is not None:
            wanted = [folder]
        elif owner is not None:
            wanted = [str(owner)]
        else:
            with os.scandir(self.root) as entries:
                wanted = [e.name for e in entries
                          if e.is_dir(follow_symlinks=False) and (e.name == "base" or e.name.isdigit())]
        for name in wanted:
            with contextlib.suppress(NotFound, Refused), self._dir.folder(name) as folder:
                yield name, folder

    def _entries(self, owner: int | None, only: str | None = None) -> Iterator[tuple[VolName, bool, int, str]]:
        """Every entry named like a volume: (volume, is a subvolume, folder, entry name)."""
        for name, folder in self._folders(owner, only):
            with os.scandir(folder) as entries:
                # a subvolume's entry is a directory whose own inode (lstat) is the subvolume root's
                found = [(e.name, e.is_dir(follow_symlinks=False)
                          and e.stat(follow_symlinks=False).st_ino == SUBVOLUME_ROOT_INODE)
                         for e in entries if not e.name.startswith(".")]
            for entry, subvolume in found:
                with contextlib.suppress(names.InvalidName):
                    yield names.volname(f"{name}/{entry}"), subvolume, folder, entry

    def list_volumes(self, owner: int | None = None) -> list[VolName]:
        return sorted((v for v, subvolume, _, _ in self._entries(owner) if subvolume and v.fmt == "raw"), key=str)

    def strays(self, owner: int | None = None) -> list[tuple[VolName, str]]:
        found = []
        for vol, subvolume, folder, entry in self._entries(owner):
            if not subvolume:
                why = self._dir.problem(folder, entry) or f"{self._path(folder, entry)} is not a btrfs subvolume"
                found.append((vol, why.replace("not a regular file: ", "not a subvolume: ")))
        return sorted(found, key=lambda s: str(s[0]))

    def exists(self, vol: VolName) -> bool:
        try:
            with self._dir.folder(_folder(vol)) as folder:
                return self._dir.entry_exists(folder, _entry(vol))
        except NotFound:
            return False

    def identity(self, vol: VolName) -> str:
        with self._subvolume(vol) as fd:
            return subvolume_info(fd).uuid  # never reused, unlike inode numbers

    def virtual_size(self, vol: VolName) -> int:
        with self._opened(vol) as fd:
            return os.fstat(fd).st_size

    def allocated_size(self, vol: VolName) -> int:
        with self._opened(vol) as fd:
            return os.fstat(fd).st_blocks * 512

    def parent_of(self, vol: VolName) -> VolName | None:
        with self._subvolume(vol) as fd:
            parent = subvolume_info(fd).parent_uuid
        if parent is None:
            return None
        return next((base for base, uid in self._base_uuids() if uid == parent), None)

    def clones_of(self, base: VolName) -> list[VolName]:
        """Volumes made as snapshots of the base, by their parent UUID (one ioctl each)."""
        with self._subvolume(base) as fd:
            uid = subvolume_info(fd).uuid
        return [v for v in self.list_volumes() if self._parent_uuid(v) == uid]

    def _parent_uuid(self, vol: VolName) -> str | None:
        try:
            with self._subvolume(vol) as fd:
                return subvolume_info(fd).parent_uuid
        except (NotFound, Refused):
            return None  # freed or replaced meanwhile: no clone of anything

    def _base_uuids(self) -> list[tuple[VolName, str]]:
        """The bases and their UUIDs, read once per change of base/ (its directory's times
        change with every entry made, renamed or removed there): `volume list` asks for
        every volume's parent, and must not read every base again each time."""
        try:
            st = os.stat(self.root / "base", follow_symlinks=False)
            key = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
        except FileNotFoundError:
            return []
        if self._bases_seen is not None and self._bases_seen[0] == key:
            return self._bases_seen[1]
        found = []
        for base, subvolume, _, _ in self._entries(None, only="base"):
            if subvolume and base.fmt == "raw":
                with contextlib.suppress(NotFound, Refused), self._subvolume(base) as fd:
                    found.append((base, subvolume_info(fd).uuid))
        self._bases_seen = (key, found)
        return found

    def status(self) -> tuple[int, int, int]:
        self._require_btrfs()
        st = os.statvfs(self.root)
        total, avail = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        return total, total - st.f_bfree * st.f_frsize, avail

    # ---- making and freeing ----------------------------------------------------------------
    def _new_subvolume(self, folder: int, vol: VolName, make: Callable[[int, str], object]) -> None:
        """Make a subvolume by `make(folder, temp)` under a hidden temp name, then give it the
        volume's name and commit; a failure leaves no subvolume behind."""
        self._sweep_temps(folder)
        temp = f".{_entry(vol)}.{secrets.token_hex(8)}.tmp"
        make(folder, temp)
        try:
            self._dir.rename(folder, temp, folder, _entry(vol), f"volume {self.volid(vol)}")
        except BaseException:
            self._destroy(folder, temp)
            raise
        syncfs(folder)
        faults.point("created")

    def allocate(self, vol: VolName, size: int) -> None:
        """A new subvolume holding a sparse raw image of `size` bytes."""
        def make(folder: int, temp: str) -> None:
            fcntl.ioctl(folder, SUBVOL_CREATE_V2, _name_args(temp))
            try:
                sub = self._dir.open_dir(folder, temp)
                try:
                    fd = os.open(IMAGE, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                                 dir_fd=sub)
                    try:
                        os.ftruncate(fd, size)
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                finally:
                    os.close(sub)
            except BaseException:
                self._destroy(folder, temp)
                raise

        self._require_btrfs()
        try:
            with self._dir.folder(_folder(vol), create=True) as folder:
                self._new_subvolume(folder, vol, make)
        except BaseException:
            if vol.owner is not None:
                self._dir.remove_folder_if_empty(_folder(vol))
            raise

    def recreate(self, vol: VolName, size: int) -> None:
        """Empty the image in place: the name is never free."""
        with self._opened(vol, write=True) as fd:
            os.ftruncate(fd, 0)
            os.ftruncate(fd, size)
            os.fsync(fd)

    def link_clone(self, base: VolName, vol: VolName) -> None:
        """A writable snapshot of the base's subvolume: it shares every extent."""
        with contextlib.ExitStack() as stack:
            source = stack.enter_context(self._subvolume(base))
            try:
                folder = stack.enter_context(self._dir.folder(_folder(vol), create=True))
                self._new_subvolume(folder, vol, lambda f, temp: fcntl.ioctl(f, SNAP_CREATE_V2,
                                                                              _name_args(temp, source)))
            except BaseException:
                self._dir.remove_folder_if_empty(_folder(vol))
                raise

    def free(self, vol: VolName) -> None:
        """Delete the volume's subvolume (absent already: nothing to do); anything else at
        its name is refused, never deleted."""
        try:
            with self._dir.folder(_folder(vol)) as folder:
                if not self._dir.entry_exists(folder, _entry(vol)):
                    return
                sub = self._open_subvolume(folder, _entry(vol), self.volid(vol))
                try:
                    subvolume_id = self._held_here(folder, _entry(vol), sub, self.volid(vol))
                finally:
                    os.close(sub)
                fcntl.ioctl(folder, SNAP_DESTROY_V2, _id_args(subvolume_id))  # the very subvolume opened
                syncfs(folder)
                faults.point("freed")
                self._sweep_temps(folder)
        except NotFound:
            return
        if not vol.is_base:
            self._dir.remove_folder_if_empty(_folder(vol))

    @staticmethod
    def _held_here(folder: int, name: str, sub: int, label: str) -> int:
        """The id of the opened subvolume `sub` if btrfs says it is the entry `name` of
        `folder` (a subvolume mounted over the name would be another one, deleted elsewhere)."""
        info, where = subvolume_info(sub), subvolume_info(folder)
        if (info.name, info.in_subvolume, info.in_directory) != (name, where.id, os.fstat(folder).st_ino):
            raise Refused(f"{label}: the subvolume at this name is not held by its folder (a mount?): not deleted")
        return info.id

    def free_partial(self, vol: VolName) -> None:
        with contextlib.suppress(NotFound), self._dir.folder(_folder(vol)) as folder:
            self._sweep_temps(folder)  # under the storage lock: every temp subvolume there is stale
        if vol.owner is not None:
            self._dir.remove_folder_if_empty(_folder(vol))

    def _sweep_temps(self, folder: int) -> None:
        """Remove the temp subvolumes (and temp files) a creation that died left in `folder`."""
        with os.scandir(folder) as entries:
            stale = [e.name for e in entries if _is_temp(e.name)]
        for name in stale:
            self._destroy(folder, name)

    def _destroy(self, folder: int, name: str) -> None:
        try:
            sub = self._dir.open_dir(folder, name)
        except NotFound:
            return
        except Refused:
            os.unlink(name, dir_fd=folder)  # a temp file, or a link someone put there
            return
        try:
            if os.fstat(sub).st_ino != SUBVOLUME_ROOT_INODE:
                return  # a plain directory at a temp name: not ours
            subvolume_id = self._held_here(folder, name, sub, name)
        finally:
            os.close(sub)
        fcntl.ioctl(folder, SNAP_DESTROY_V2, _id_args(subvolume_id))

    def make_base(self, vol: VolName, base: VolName) -> None:
        """Rename the subvolume into base/, then make it read-only."""
        with self._subvolume(vol) as sub, self._dir.folder(_folder(vol)) as src, \
                self._dir.folder("base", create=True) as dst:
            self._rename(sub, src, _entry(vol), dst, _entry(base), f"base image {self.volid(base)}")
            faults.point("based")
            set_readonly(sub, True)
            syncfs(sub)
        self._dir.remove_folder_if_empty(_folder(vol))  # the guest's, if that was its last volume

    def protect_base(self, base: VolName) -> None:
        with self._subvolume(base) as sub:
            set_readonly(sub, True)
            syncfs(sub)

    def unmake_base(self, base: VolName, vol: VolName) -> None:
        """Make the base writable and rename it back to the guest's folder (a read-only
        subvolume cannot move to another directory: its `..` changes). A failed rename makes
        it read-only again; a crash in between is finished by the redelivered undo."""
        with self._subvolume(base) as sub, self._dir.folder("base") as src, \
                self._dir.folder(_folder(vol), create=True) as dst:
            set_readonly(sub, False)
            try:
                self._rename(sub, src, _entry(base), dst, _entry(vol), f"volume {self.volid(vol)}")
            except BaseException:
                set_readonly(sub, True)
                raise
            faults.point("unbased")
            syncfs(sub)

    def _rename(self, sub: int, src: int, name: str, dst: int, new: str, what: str) -> None:
        """Rename the opened subvolume `sub`, at `name` in `src`, to `new` in `dst`; should the
        name have held another subvolume by then, it is renamed back and refused."""
        self._dir.rename(src, name, dst, new, what)
        moved = self._dir.open_dir(dst, new, what)
        try:
            same = subvolume_info(moved).id == subvolume_info(sub).id
        finally:
            os.close(moved)
        if not same:
            self._dir.rename(dst, new, src, name, what)
            raise Refused(f"{what}: the subvolume at the name changed while it was renamed: left as it was")

    def resize(self, vol: VolName, size: int) -> None:
        with self._opened(vol, write=True) as fd:
            os.ftruncate(fd, size)
            os.fsync(fd)
