"""Directory storage: raw and qcow2 files, the seed's reference case.

    <path>/<vmid>/vm-<vmid>-disk-<n>.<fmt>   a guest's disk
    <path>/base/<name>.<fmt>                 a base image: mode 0444 and, where the file
                                             system allows, immutable (chattr +i)

A linked clone is a qcow2 overlay whose backing file is the base, stored as a path
relative to the overlay (`../base/<name>.<fmt>`), so the storage can be moved or mounted
elsewhere. A clone's base is read back from the qcow2 header. `.overlays/` keeps one blank
overlay per base, copied for each new clone.

With `layout = "pve"` the storage is a Proxmox VE directory storage, read and written in
place with Proxmox VE's names (drivers/names.py, `pve_volname`):

    <path>/images/<vmid>/vm-<vmid>-disk-<n>.<fmt>     a guest's disk
    <path>/images/<vmid>/base-<vmid>-disk-<n>.<fmt>   a base of template <vmid>: mode 0444
                                                      (never immutable: Proxmox VE could not
                                                      delete its own template's disk)

and a linked clone's backing file is `../<vmid>/base-...`, as Proxmox VE writes it
(`images/.overlays/` is not a guest's folder: Proxmox VE passes over it).

Every entry is reached through `SafeDir` (drivers/safedir.py): relative to the storage root,
never through a symlink, regular files only, each new name flushed with its directory.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from drivers import faults, names, pve, qemu
from drivers.backends.base import Driver, ForeignLock
from drivers.errors import FeatureUnsupported, NotFound, Refused, StorageUnavailable
from drivers.names import FORMATS, VolName
from drivers.safedir import SafeDir, copy_contents, identity, is_mount_point, kind_of, set_immutable
from drivers.storage import IS_MOUNTPOINT, MKDIR, PATH, Option, StorageConfig

ALL = frozenset(FORMATS)
OVERLAYS = ".overlays"  # blank overlays of bases, copied to make linked clones
MAX_CHAIN = 16  # bases made from linked clones read through bases: how deep one may go


_NUMBERED = re.compile(r"(?:vm|base)-([0-9]+)-disk-([0-9]+)\..*")  # a disk's entry: its owner and number


@dataclass(frozen=True)
class Layout:
    """Where a volume's file is and how its volname is spelt: stork's or Proxmox VE's."""

    subdir: str  # the folder under `path` that holds the volume folders
    folder: Callable[[VolName], str]  # the volume folder a volume is in
    is_folder: Callable[[str], bool]  # a directory name that may be a volume folder
    parse: Callable[[str], VolName]  # a volname as a user writes it
    text: Callable[[VolName], str]  # the one spelling of a volname kept in configs and records
    immutable_bases: bool  # chattr +i on bases (no other tool needs to delete them)
    bases_beside_disks: bool  # a base stays in its guest's folder (named for that guest)

    def at(self, path: str) -> VolName:
        """The volume at `<folder>/<file>` (a path, not a volname: exactly one '/')."""
        if path.count("/") != 1:
            raise names.InvalidName(f"not a volume's path: {path!r}")
        vol = self.parse(path)
        if self.text(vol) != path:
            raise names.InvalidName(f"not a volume's path: {path!r}")
        return vol


LAYOUTS = {
    "stork": Layout("", lambda v: "base" if v.owner is None else str(v.owner),
                    lambda name: name == "base" or name.isdigit(), names.volname, str, True, False),
    "pve": Layout("images", names.pve_folder, str.isdigit, names.pve_volname, names.pve_text, False, True),
}


def _file(vol: VolName) -> str:
    return f"{vol.name}.{vol.fmt}"


def _layout(v: object) -> bool:
    return v in LAYOUTS


def _pve_config(v: object) -> bool:
    return v is False or (isinstance(v, str) and v.startswith("/") and "\0" not in v)




class DirDriver(Driver):
    type_name = "dir"
    formats = FORMATS
    default_format = "raw"
    linked_clone_format = "qcow2"
    FEATURES = {
        "make_base": {"current": ALL},
        "linked_clone": {"base": ALL},
        "copy": {"current": ALL, "base": ALL},
        "resize": {"current": ALL},
        "move": {"current": ALL, "base": ALL},  # a base only while no linked clone reads through it
    }
    OPTIONS = {"path": PATH, "mkdir": MKDIR, "is_mountpoint": IS_MOUNTPOINT,
               "format": Option(lambda v: v in FORMATS, f"the format of new volumes: {' or '.join(FORMATS)}"),
               "layout": Option(_layout, "stork or pve (a Proxmox VE directory storage, used in place)",
                                default="stork"),
               # layout pve: where Proxmox VE's storage.cfg and guest configs are (a volume one names is
               # never changed by stork), or false on a storage no Proxmox VE uses any more
               "pve_config": Option(_pve_config, "an absolute path (Proxmox VE's /etc/pve) or false",
                                    default="/etc/pve"),
               # layout pve, a storage of one node: Proxmox VE's lock of it is taken with stork's
               "pve_locks": Option(_pve_config, "an absolute path (Proxmox VE's /var/lock/pve-manager) or false",
                                   default="/var/lock/pve-manager")}

    def __init__(self, config: StorageConfig) -> None:
        super().__init__(config)
        assert config.path is not None  # a required option: the config checked it
        self.path: Path = config.path
        self.layout = LAYOUTS[str(config.options.get("layout") or "stork")]
        self.root: Path = config.path / self.layout.subdir if self.layout.subdir else config.path

    def _folder(self, vol: VolName) -> str:
        return self.layout.folder(vol)

    def _guest_folder(self, vol: VolName) -> str | None:
        """The volume's folder, if it is one to remove once empty (a guest's, not `base`)."""
        folder = self._folder(vol)
        return None if folder == "base" else folder

    def parse_volname(self, text: str) -> VolName:
        vol = self.layout.parse(text)
        if vol.fmt not in self.formats:
            raise FeatureUnsupported(f"storage {self.storage.id!r} cannot hold {vol.fmt} volumes")
        self.layout.text(vol)  # a base name the layout cannot place is refused here, not at its first use
        return vol

    def volid(self, vol: VolName) -> str:
        return f"{self.storage.id}:{self.layout.text(vol)}"

    def named_base(self, vol: VolName, name: str) -> VolName:
        """In Proxmox VE's layout a base stays in its guest's folder, named for that guest
        (`base-<vmid>-<name>`): Proxmox VE counts what is in a folder as that guest's."""
        base = super().named_base(vol, name)
        self.layout.text(base)  # InvalidName for a name it cannot place
        if self.layout.bases_beside_disks and self.layout.folder(base) != self.layout.folder(vol):
            raise names.InvalidName(f"invalid base name {name!r} for {self.volid(vol)}: on a storage of Proxmox VE's "
                                    f"layout its base is named base-{self.layout.folder(vol)}-<name>")
        return base

    def _pve_config(self) -> Path | None:
        """Where Proxmox VE's configs are, on a storage of its layout that Proxmox VE uses."""
        where = self.storage.options.get("pve_config")
        return Path(where) if self.layout is LAYOUTS["pve"] and where else None

    def _pve_storages(self) -> list[pve.PveStorage]:
        """Proxmox VE's storages at this path (its storage.cfg)."""
        config = self._pve_config()
        return pve.storages_at(config, self.path) if config else []

    def foreign_ids(self) -> tuple[str, ...]:
        return tuple(s.id for s in self._pve_storages())

    def foreign_locks(self) -> list[ForeignLock]:
        """Proxmox VE's lock of each of its storages here, as pve-storage's cluster_lock_storage
        takes it while it names, allocates, clones or frees a volume: a shared one's in its
        cluster file system (`priv/lock/storage-<id>`, made as a directory), another's a flock
        on `<pve_locks>/pve-storage-<id>`. Which, Proxmox VE's own shared flag says."""
        config, flocks = self._pve_config(), self.storage.options.get("pve_locks")
        if config is None:
            return []
        return [ForeignLock(config / "priv" / "lock" / f"storage-{s.id}", "mkdir") if s.shared
                else ForeignLock(Path(flocks) / f"pve-storage-{s.id}", "flock")
                for s in self._pve_storages() if s.shared or flocks]

    def foreign_users(self, vol: VolName) -> list[str]:
        """Proxmox VE guests whose configs name the volume (by any of the storage's ids, or by path)."""
        return self.foreign_users_by_volume().get(self.layout.text(vol), [])

    def foreign_users_by_volume(self) -> dict[str, list[str]]:
        config = self._pve_config()
        return pve.users_by_volume(config, self.foreign_ids(), self.root) if config else {}

    def foreign_guest(self, vmid: int) -> str | None:
        config = self._pve_config()
        found = pve.guest_config(config, vmid) if config else None
        return f"Proxmox VE's (its config {found})" if found else None

    @property
    def _dir(self) -> SafeDir:
        self.activate()
        return SafeDir(self.root)

    def activate(self) -> None:
        """Ready the directory for use, as Proxmox VE activates a dir storage, the same for a
        status and a job: refused when `is_mountpoint` and nothing is mounted there (what would
        be written goes onto the disk under the mount), made when missing and `mkdir` (the
        default), else refused."""
        if self.storage.options.get("is_mountpoint") and not is_mount_point(self.path):
            raise StorageUnavailable(f"storage {self.storage.id!r}: {self.path} is not a mounted file system "
                                     "(is_mountpoint)")
        if not self.path.is_dir() and not self.storage.options.get("mkdir", True):
            raise StorageUnavailable(f"storage {self.storage.id!r}: {self.path} does not exist (and mkdir = false)")
        if not self.root.is_dir():
            self.root.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _opened(self, vol: VolName, write: bool = False) -> Iterator[int]:
        """The volume's regular file, opened without following links; NotFound if absent. One
        with a second name is not opened to be written: a hard link, which O_NOFOLLOW does not
        see, may be a file outside the storage (stork makes each volume with one name)."""
        try:
            with self._dir.folder(self._folder(vol)) as folder:
                fd = self._dir.open(folder, _file(vol), write, label=self.volid(vol))
                if not self._dir.spelled_so(folder, _file(vol)):  # another case's file, on a file system that folds it
                    os.close(fd)
                    raise NotFound(self.volid(vol))
                if write and os.fstat(fd).st_nlink > 1:
                    self._dir.drop_temp_links(folder, _file(vol), fd)  # a crashed maker's temp name: not a link out
                    if os.fstat(fd).st_nlink > 1:
                        os.close(fd)
                        raise Refused(f"{self.volid(vol)} has another name (a hard link): not written, it may be "
                                      "a file outside the storage")
        except NotFound:
            raise NotFound(f"unknown volume {self.volid(vol)}") from None
        try:
            yield fd
        finally:
            os.close(fd)

    # ---- reading ------------------------------------------------------------------------
    def list_volumes(self, owner: int | None = None) -> list[VolName]:
        found = []
        for name, folder in self._folders(owner):
            for file in self._dir.regular_files(folder):
                with contextlib.suppress(names.InvalidName):  # stray files are not volumes
                    found.append(self.layout.at(f"{name}/{file}"))
        # a folder of Proxmox VE's layout holds its template's bases too: not the guest's volumes
        return sorted((v for v in found if owner is None or v.owner == owner), key=str)

    def next_disk_name(self, owner: int, fmt: str, taken: frozenset[str] = frozenset()) -> VolName:
        """As Proxmox VE numbers them: any entry `vm-<owner>-disk-N.*` or `base-<owner>-disk-N.*`
        in the guest's folder takes N (a template's base was that guest's disk N; a vmdk is a disk
        stork does not read, but a disk)."""
        found = {f"vm-{owner}-disk-{int(m.group(2))}" for _, folder in self._folders(owner)
                 for entry in os.listdir(folder) if (m := _NUMBERED.fullmatch(entry)) and m.group(1) == str(owner)}
        return super().next_disk_name(owner, fmt, taken | found)

    def strays(self, owner: int | None = None) -> list[tuple[VolName, str]]:
        found = []
        for name, folder in self._folders(owner):
            for entry in self._dir.other_entries(folder):
                with contextlib.suppress(names.InvalidName):
                    found.append((self.layout.at(f"{name}/{entry}"), self._dir.problem(folder, entry)))
        return sorted(((v, p) for v, p in found if owner is None or v.owner == owner), key=lambda s: str(s[0]))

    def stray_folders(self) -> list[tuple[str, str]]:
        if not self.root.is_dir():
            return []
        kinds = {}
        with os.scandir(self.root) as entries:
            for e in entries:
                if self.layout.is_folder(e.name) and not e.is_dir(follow_symlinks=False):
                    with contextlib.suppress(FileNotFoundError):  # gone meanwhile: nothing to say
                        kinds[e.name] = kind_of(e.stat(follow_symlinks=False).st_mode)
        return sorted((name, f"not a directory: {self.root / name} is {kind}") for name, kind in kinds.items())

    def _folders(self, owner: int | None) -> Iterator[tuple[str, int]]:
        """The volume folders (`base`, and one per guest id), opened; an absent one, or one
        that is not a directory, is skipped."""
        self.activate()  # an unmounted mount point lists nothing: refused, not empty
        if owner is not None:
            wanted = [str(owner)]
        elif self.root.is_dir():
            with os.scandir(self.root) as entries:
                wanted = [e.name for e in entries
                          if e.is_dir(follow_symlinks=False) and self.layout.is_folder(e.name)]
        else:
            wanted = []
        for name in wanted:
            with contextlib.suppress(NotFound, Refused), self._dir.folder(name) as folder:
                yield name, folder

    def exists(self, vol: VolName) -> bool:
        """Is anything at the volume's name? (A symlink counts: the name is taken, and every
        use of it is refused.)"""
        try:
            with self._dir.folder(self._folder(vol)) as folder:
                return self._dir.entry_exists(folder, _file(vol)) and self._dir.spelled_so(folder, _file(vol))
        except NotFound:
            return False

    def identity(self, vol: VolName) -> str:
        with self._opened(vol) as fd:
            return identity(fd)

    def virtual_size(self, vol: VolName) -> int:
        with self._opened(vol) as fd:
            if vol.fmt == "qcow2" and (header := qemu.read_qcow2_header(fd)):
                return header.virtual_size
            return os.fstat(fd).st_size

    def allocated_size(self, vol: VolName) -> int:
        with self._opened(vol) as fd:
            return os.fstat(fd).st_blocks * 512

    def internal_snapshots(self, vol: VolName) -> int:
        if vol.fmt != "qcow2":
            return 0
        with self._opened(vol) as fd:
            header = qemu.read_qcow2_header(fd)
        return header.snapshots if header else 0

    def parent_of(self, vol: VolName) -> VolName | None:
        if vol.fmt != "qcow2":
            return None
        with self._opened(vol) as fd:
            header = qemu.read_qcow2_header(fd)
        if header is None or not header.backing_file:
            return None
        return self._volume_at(self._folder(vol), header.backing_file)

    def unlisted_readers(self, base: VolName) -> list[str]:
        """The guest and base folders' files that are no volume by name (a clone copied to
        `vm-101-disk-0.qcow2.bak`, a disk put there by hand) whose qcow2 header reads through
        `base`, each named by its path. Read only where a base is to be freed or moved, a header
        each; a folder stork does not use is not looked in."""
        found, safe = [], self._dir  # (each look at _dir checks the storage is there)
        for name, folder in self._folders(None):
            for file in safe.regular_files(folder):
                if SafeDir.is_temp(file) or self._is_volume(f"{name}/{file}"):
                    continue
                try:
                    with safe.opened(folder, file) as fd:
                        header = qemu.read_qcow2_header(fd)
                except NotFound:
                    continue  # gone since the listing
                if header and header.backing_file and self._volume_at(name, header.backing_file) == base:
                    found.append(f"file {self.root / name / file}")
        return sorted(found)

    def _is_volume(self, path: str) -> bool:
        try:
            self.layout.at(path)
        except names.InvalidName:
            return False
        return True

    def _volume_at(self, folder: str, backing: str) -> VolName | None:
        """The base a backing path names, worked out as text (no link is resolved): a relative
        path is relative to the overlay's folder. A path outside the storage, or to a volume
        that is not a base (another guest's disk, which nothing keeps from being written,
        freed or renamed under the overlay), is no stork base: None."""
        root = str(self.root)
        path = posixpath.normpath(backing if backing.startswith("/") else posixpath.join(root, folder, backing))
        if not path.startswith(root + "/"):
            return None
        try:
            vol = self.layout.at(path[len(root) + 1:])
        except names.InvalidName:
            return None
        return vol if vol.is_base else None

    @contextlib.contextmanager
    def image(self, vol: VolName, write: bool = False) -> Iterator[qemu.Image]:
        """The volume opened for qemu-img; a linked clone with its base (and the base's own
        base, ...) opened the same way as its backing. A backing file outside the storage is
        refused rather than followed."""
        with contextlib.ExitStack() as stack:
            top = fd = stack.enter_context(self._opened(vol, write))
            chain, at = [(vol, fd)], vol
            while (header := self._header(at, fd)) and header.backing_file:
                base = self._volume_at(self._folder(at), header.backing_file)
                if base is None or len(chain) > MAX_CHAIN:
                    raise Refused(f"{self.volid(vol)} reads {header.backing_file!r}, which is not a base on "
                                  f"storage {self.storage.id!r}")
                fd = stack.enter_context(self._opened(base))
                chain.append((base, fd))
                at = base
            image = None
            for v, f in reversed(chain):
                image = qemu.Image.of_fd(v.fmt, f, self.volid(v), backing=image)
            assert image is not None
            yield image
            if write:
                os.fsync(top)  # qemu-img's writes (cache none or unsafe) are surely on disk only now

    # ---- making and freeing ---------------------------------------------------------------
    def allocate(self, vol: VolName, size: int) -> None:
        """Create the volume empty (sparse); a failure leaves no file and no empty folder."""
        try:
            with self._dir.folder(self._folder(vol), create=True) as folder, \
                    self._dir.temp_file(folder, _file(vol)) as (fd, temp):
                qemu.create(fd, vol.fmt, size, self.volid(vol))
                os.fsync(fd)
                self._dir.link_new(folder, temp, _file(vol), f"volume {self.volid(vol)}")
                faults.point("created")
        except BaseException:
            if guest_folder := self._guest_folder(vol):
                self._dir.remove_folder_if_empty(guest_folder)
            raise

    def recreate(self, vol: VolName, size: int) -> None:
        """Replace the volume by an empty one of `size` in one rename: the name is never free."""
        with self._dir.folder(self._folder(vol)) as folder, self._dir.temp_file(folder, _file(vol)) as (fd, temp):
            qemu.create(fd, vol.fmt, size, self.volid(vol))
            os.fsync(fd)
            self._dir.replace(folder, temp, _file(vol))
            faults.point("recreated")

    def free(self, vol: VolName) -> None:
        """Delete the volume (absent already: nothing to do); a symlink or special file at
        its name is refused, never deleted through."""
        try:
            with self._dir.folder(self._folder(vol)) as folder:
                if not self._dir.entry_exists(folder, _file(vol)):
                    return
                with self._opened(vol) as fd:
                    if vol.is_base:
                        set_immutable(fd, False)
                        self._free_overlay(vol)
                self._dir.unlink(folder, _file(vol))
                faults.point("freed")
                self._dir.sweep_temps(folder)  # what a crashed writer left would keep the folder
        except NotFound:
            return
        if guest_folder := self._guest_folder(vol):
            self._dir.remove_folder_if_empty(guest_folder)  # the guest's folder, once it holds nothing

    def status(self) -> tuple[int, int, int]:
        self.activate()
        st = os.statvfs(self.root)
        total, avail = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        return total, total - st.f_bfree * st.f_frsize, avail

    def free_partial(self, vol: VolName) -> None:
        with contextlib.suppress(NotFound), self._dir.folder(self._folder(vol)) as folder:
            self._dir.sweep_temps(folder)  # under the storage lock: every temp file there is stale
        if guest_folder := self._guest_folder(vol):
            self._dir.remove_folder_if_empty(guest_folder)

    def make_base(self, vol: VolName, base: VolName) -> None:
        with self._opened(vol) as fd, self._dir.folder(self._folder(vol)) as src, \
                self._dir.folder(self._folder(base), create=True) as dst:
            self._dir.rename(src, _file(vol), dst, _file(base), f"base image {self.volid(base)}")
            faults.point("based")
            self._protect(fd)
        self._dir.remove_folder_if_empty(self._folder(vol))  # the guest's, if that was its last volume

    def protect_base(self, base: VolName) -> None:
        with self._opened(base) as fd:
            self._protect(fd)

    def _protect(self, fd: int) -> None:
        if stat.S_IMODE(os.fstat(fd).st_mode) != 0o444:  # an immutable base refuses even a chmod to its mode
            os.fchmod(fd, 0o444)
        if self.layout.immutable_bases and not set_immutable(fd, True):
            _warn("immutable_unsupported", storage=self.storage.id)

    def unmake_base(self, base: VolName, vol: VolName) -> None:
        with self._opened(base) as fd, self._dir.folder(self._folder(base)) as src, \
                self._dir.folder(self._folder(vol), create=True) as dst:
            set_immutable(fd, False)
            self._free_overlay(base)
            self._dir.rename(src, _file(base), dst, _file(vol), f"volume {self.volid(vol)}")
            faults.point("unbased")
            os.fchmod(fd, 0o644)

    def link_clone(self, base: VolName, vol: VolName) -> None:
        """Copy the base's blank overlay: every clone's header is the same, since the
        backing path `../base/<name>` is relative and every guest folder is one level deep,
        and copying 200 KiB is much cheaper than starting qemu-img for each clone."""
        with contextlib.ExitStack() as stack:
            overlay = stack.enter_context(self._blank_overlay(base))
            folder = stack.enter_context(self._dir.folder(self._folder(vol), create=True))
            fd, temp = stack.enter_context(self._dir.temp_file(folder, _file(vol)))
            copy_contents(overlay, fd)
            os.fsync(fd)
            self._dir.link_new(folder, temp, _file(vol), f"volume {self.volid(vol)}")
            faults.point("created")

    @contextlib.contextmanager
    def _blank_overlay(self, base: VolName) -> Iterator[int]:
        """An empty qcow2 overlay of `base`, made once (under the storage lock), opened; made
        again where the one there is not of this base's size (a base of that name freed and made
        anew outside stork, by Proxmox VE on a storage of its layout, say)."""
        name, size = f"{_file(base)}.qcow2", self.virtual_size(base)
        backing = f"../{self._folder(base)}/{_file(base)}"
        with self._dir.folder(OVERLAYS, create=True) as folder:
            if self._dir.entry_exists(folder, name):
                with self._dir.opened(folder, name) as fd:
                    if _overlay_fits(fd, size, backing):  # checked on the very file that is copied
                        yield fd
                        return
            with self._dir.temp_file(folder, name) as (fd, temp):
                qemu.create(fd, "qcow2", size, self.volid(base), backing=backing, backing_fmt=base.fmt)
                os.fsync(fd)
                self._dir.replace(folder, temp, name)
                yield fd  # the new overlay, flushed and in place

    def _free_overlay(self, base: VolName) -> None:
        with contextlib.suppress(NotFound), self._dir.folder(OVERLAYS) as folder:
            self._dir.unlink(folder, f"{_file(base)}.qcow2")

    def _header(self, vol: VolName, fd: int) -> qemu.Qcow2Header | None:
        """The qcow2 header, read from the descriptor qemu-img will get; an image whose data
        lives in an external file (a path of the header's choosing) is refused: qemu would
        open that file whatever the json: spec says."""
        header = qemu.read_qcow2_header(fd)
        if header and header.external_data_file:
            raise Refused(f"{self.volid(vol)} keeps its data in an external file: refused (never followed)")
        return header

    def resize(self, vol: VolName, size: int) -> None:
        with self._opened(vol, write=True) as fd:
            self._header(vol, fd)
            # a linked clone's base is not needed to grow it, and is read-only: open none
            qemu.resize(qemu.Image.of_fd(vol.fmt, fd, self.volid(vol)), size)
            os.fsync(fd)


def _overlay_fits(fd: int, size: int, backing: str) -> bool:
    """Whether a blank overlay is one of this base (its backing path) at its size now."""
    header = qemu.read_qcow2_header(fd)
    rounded = -(-size // 512) * 512  # qcow2 holds whole sectors: a raw base of 1000 bytes is 1024 there
    return header is not None and header.virtual_size in (size, rounded) and header.backing_file == backing


def _warn(event: str, **fields: object) -> None:
    import structlog  # here, not at the top: tens of ms for every process importing drivers (the CLI)

    structlog.get_logger(__name__).warning(event, **fields)
