"""ZFS storage: each volume a dataset holding its raw image.

    <pool>/<vmid>/vm-<vmid>-disk-<n>.raw    a guest's disk: a dataset with disk.raw in it
    <pool>/base/<name>.raw                   a base: read-only, with the snapshot @__base__

`pool` is a pool or a dataset of one, mounted; each volume's image is reached below its
mountpoint. A linked clone is `zfs clone <base>@__base__`, and ZFS itself records the link
(the clone's `origin`): a base whose snapshot has clones is not freed, and ZFS refuses too
("snapshot has dependent clones"). A volume's dataset name is its volume name under the pool,
one to one, so names from `base/` and from a guest's folder cannot collide.

Debian's zfs-fuse (what runs on these machines) has datasets, snapshots, clones and send/recv
but no zvols, hence a dataset holding a file; a zvol backend would hand qemu-img the block
device /dev/zvol/<pool>/... instead, and needs the kernel module. zfs-fuse renames a dataset
only unmounted: a rename is umount, rename, mount.

A new volume is made under a temp name (`<name>.raw:tmp<hex>`, which parses as no volume),
filled and renamed into place, so its name never shows a half-made dataset. Every zfs call is
an argv list through drivers/tools.py; each listing is one `zfs list`.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from drivers import faults, names, qemu
from drivers.backends.base import RAW_WITH_CLONES, Driver
from drivers.errors import InvalidName, NotFound, Refused, StorkError
from drivers.names import VolName
from drivers.safedir import SafeDir
from drivers.storage import POOL, StorageConfig
from drivers.tools import ToolError, run

ZFS = "zfs"
IMAGE = "disk.raw"
SNAPSHOT = "__base__"
BUSY_WAIT = 10.0  # seconds a dataset may stay busy after its last file was closed
TEMP = ":tmp"  # a temp dataset's name ends <entry>:tmp<hex>; no volume name holds a colon
_TEMP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*:tmp[0-9a-f]{8}")


def _folder(vol: VolName) -> str:
    return "base" if vol.owner is None else str(vol.owner)


def _entry(vol: VolName) -> str:
    return f"{vol.name}.{vol.fmt}"


@dataclass(frozen=True)
class Dataset:
    name: str
    origin: str | None  # the snapshot it is a clone of


class ZfsDriver(Driver):
    type_name = "zfs"
    formats = ("raw",)
    default_format = "raw"
    linked_clone_format = "raw"
    FEATURES = RAW_WITH_CLONES
    OPTIONS = {"pool": POOL}

    @classmethod
    def place(cls, config: StorageConfig) -> str | None:
        return f"zfs:{config.options['pool']}"  # a dataset inside another's is inside it

    def __init__(self, config: StorageConfig) -> None:
        super().__init__(config)
        self.pool: str = config.options["pool"]

    # ---- names ---------------------------------------------------------------------------
    def parse_volname(self, text: str) -> VolName:
        vol = super().parse_volname(text)
        if "+" in vol.name:
            raise InvalidName(f"invalid volume name {text!r} for storage {self.storage.id!r}: "
                              "ZFS names cannot hold '+'")
        return vol

    def dataset(self, vol: VolName) -> str:
        return f"{self.pool}/{_folder(vol)}/{_entry(vol)}"

    def _zfs(self, *args: str, what: str) -> str:
        try:
            return self._run_while_busy([ZFS, *args], what)
        except ToolError as e:
            if "dataset does not exist" in e.stderr:
                raise NotFound(f"{what} failed: no such dataset") from None
            if "dependent clones" in e.stderr:
                said = e.stderr.strip().splitlines()[0]
                raise Refused(f"{what} failed: it has linked clones (ZFS: {said})") from None
            raise

    @staticmethod
    def _run_while_busy(argv: list[str], what: str) -> str:
        """Run a zfs command, again while it answers "busy": zfs-fuse hears of a closed file
        a moment after close(2) returns (FUSE releases files asynchronously)."""
        deadline = time.monotonic() + BUSY_WAIT
        while True:
            try:
                return run(argv, what, timeout=120, env={**os.environ, "LC_ALL": "C"})  # messages as matched
            except ToolError as e:
                if "busy" not in e.stderr or time.monotonic() > deadline:
                    raise
            time.sleep(0.1)

    def _mountpoint(self) -> Path:
        where = self._zfs("get", "-H", "-o", "value", "mountpoint", self.pool, what=f"reading pool {self.pool}").strip()
        if not where.startswith("/"):
            raise Refused(f"storage {self.storage.id!r}: pool {self.pool} is not mounted (mountpoint {where})")
        return Path(where)

    def _datasets(self) -> dict[str, Dataset]:
        """Every dataset below the pool, in one `zfs list`."""
        out = self._zfs("list", "-H", "-t", "filesystem", "-o", "name,origin", "-r", self.pool,
                        what=f"listing pool {self.pool}")
        found = {}
        for line in out.splitlines():
            name, _, origin = line.partition("\t")
            found[name] = Dataset(name, None if origin in ("-", "") else origin)
        return found

    def _volume_of(self, dataset: str) -> VolName | None:
        prefix = f"{self.pool}/"
        if not dataset.startswith(prefix):
            return None
        try:
            return names.volname(dataset[len(prefix):])
        except names.InvalidName:
            return None  # the pool itself, a folder dataset, a temp name, someone else's

    # ---- opening -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _opened(self, vol: VolName, write: bool = False) -> Iterator[int]:
        """The image file in the volume's mounted dataset (mounted again if a crash or a
        daemon restart left it unmounted), opened without following links."""
        if not self.exists(vol):
            raise NotFound(f"unknown volume {self.volid(vol)}")
        self._ensure_mounted(self.dataset(vol))
        files = SafeDir(self._mountpoint())
        with files.folder(_folder(vol)) as folder:
            sub = files.open_dir(folder, _entry(vol), self.volid(vol))
            if os.fstat(sub).st_dev == os.fstat(folder).st_dev:  # the mountpoint's directory, not the dataset
                os.close(sub)
                raise Refused(f"{self.volid(vol)}: dataset {self.dataset(vol)} is not mounted at its mountpoint")
        try:
            fd = files.open(sub, IMAGE, write, label=self.volid(vol))
        finally:
            os.close(sub)
        try:
            yield fd
        finally:
            os.close(fd)

    def _mounted(self, dataset: str) -> bool:
        return self._zfs("get", "-H", "-o", "value", "mounted", dataset, what=f"reading {dataset}").strip() == "yes"

    def _ensure_mounted(self, dataset: str) -> None:
        if not self._mounted(dataset):
            self._zfs("mount", dataset, what=f"mounting {dataset}")

    @contextlib.contextmanager
    def image(self, vol: VolName, write: bool = False) -> Iterator[qemu.Image]:
        with self._opened(vol, write) as fd:
            yield qemu.Image.of_fd("raw", fd, self.volid(vol))
            if write:
                os.fsync(fd)

    # ---- reading -------------------------------------------------------------------------
    def list_volumes(self, owner: int | None = None) -> list[VolName]:
        found = [v for name in self._datasets() if (v := self._volume_of(name)) is not None and v.fmt in self.formats]
        return sorted((v for v in found if owner is None or v.owner == owner), key=str)

    def exists(self, vol: VolName) -> bool:
        return self.dataset(vol) in self._datasets()

    def identity(self, vol: VolName) -> str:
        return self._zfs("get", "-H", "-o", "value", "guid", self.dataset(vol),
                         what=f"reading {self.volid(vol)}").strip()  # never reused

    def virtual_size(self, vol: VolName) -> int:
        with self._opened(vol) as fd:
            return os.fstat(fd).st_size

    def allocated_size(self, vol: VolName) -> int:
        with self._opened(vol) as fd:
            return os.fstat(fd).st_blocks * 512

    def parent_of(self, vol: VolName) -> VolName | None:
        dataset = self._datasets().get(self.dataset(vol))
        if dataset is None:
            raise NotFound(f"unknown volume {self.volid(vol)}")
        return self._base_of(dataset)

    def _base_of(self, dataset: Dataset) -> VolName | None:
        if dataset.origin is None or not dataset.origin.endswith(f"@{SNAPSHOT}"):
            return None
        base = self._volume_of(dataset.origin.removesuffix(f"@{SNAPSHOT}"))
        return base if base is not None and base.is_base else None

    def clones_of(self, base: VolName) -> list[VolName]:
        """From one `zfs list`: the datasets whose origin is the base's snapshot."""
        return sorted((v for d in self._datasets().values()
                       if self._base_of(d) == base and (v := self._volume_of(d.name)) is not None), key=str)

    def status(self) -> tuple[int, int, int]:
        st = os.statvfs(self._mountpoint())
        total, avail = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        return total, total - st.f_bfree * st.f_frsize, avail

    # ---- making and freeing ----------------------------------------------------------------
    def _ensure_folder(self, vol: VolName) -> None:
        name = f"{self.pool}/{_folder(vol)}"
        if name not in self._datasets():
            self._zfs("create", name, what=f"creating dataset {name}")

    def _rename(self, old: str, new: str, what: str) -> None:
        """zfs-fuse renames only an unmounted dataset: umount, rename, mount, each step skipped
        where a crash left it done already."""
        datasets = self._datasets()
        if old not in datasets and new in datasets:  # renamed before a crash: mount it
            self._ensure_mounted(new)
            return
        if self._mounted(old):
            self._zfs("umount", old, what=what)
        try:
            self._zfs("rename", old, new, what=what)
        except StorkError:
            self._ensure_mounted(old)
            raise
        self._ensure_mounted(new)

    def _drop_folder_if_empty(self, vol: VolName) -> None:
        """Destroy a guest's folder dataset once it holds no volume (as dir storage removes
        an emptied guest folder)."""
        if vol.owner is None:
            return
        folder = f"{self.pool}/{_folder(vol)}"
        datasets = self._datasets()
        if folder in datasets and not any(name.startswith(folder + "/") for name in datasets):
            with contextlib.suppress(StorkError):  # taken by a new volume meanwhile: it stays
                self._destroy(folder, f"removing the empty dataset {folder}")

    def allocate(self, vol: VolName, size: int) -> None:
        """A new dataset holding a sparse raw image, made under a temp name and renamed."""
        self._sweep_temps(vol)
        temp = f"{self.dataset(vol)}{TEMP}{secrets.token_hex(4)}"
        what = f"creating {self.volid(vol)}"
        self._zfs("create", "-p", temp, what=what)  # -p: with the guest's folder dataset, if need be
        try:
            files = SafeDir(self._mountpoint())
            with files.folder(_folder(vol)) as folder:
                sub = files.open_dir(folder, temp.rpartition("/")[2])
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
            if self.exists(vol):
                raise Refused(f"volume {self.volid(vol)} already exists")
            self._rename(temp, self.dataset(vol), what)
        except BaseException:
            with contextlib.suppress(StorkError):
                self._destroy(temp, what)
                self._drop_folder_if_empty(vol)
            raise
        faults.point("created")

    def recreate(self, vol: VolName, size: int) -> None:
        with self._opened(vol, write=True) as fd:
            os.ftruncate(fd, 0)
            os.ftruncate(fd, size)
            os.fsync(fd)

    def link_clone(self, base: VolName, vol: VolName) -> None:
        """`zfs clone` of the base's snapshot: made whole in one transaction, at its name."""
        # -p: the guest's folder dataset is made with it, where it is not there yet
        self._zfs("clone", "-p", f"{self.dataset(base)}@{SNAPSHOT}", self.dataset(vol),
                  what=f"cloning {self.volid(base)}")
        faults.point("created")

    def free(self, vol: VolName) -> None:
        """Destroy the volume's dataset (a base's with its snapshot; ZFS refuses while clones
        depend on it); absent already: nothing to do."""
        if not self.exists(vol):
            return
        what = f"freeing {self.volid(vol)}"
        if vol.is_base:
            self._drop_base_snapshot(vol, what)  # refused while clones depend
        try:
            self._destroy(self.dataset(vol), what)
        except BaseException:
            if vol.is_base:
                self.protect_base(vol)  # still a base: clonable again
            raise
        faults.point("freed")
        self._drop_folder_if_empty(vol)

    def _destroy(self, dataset: str, what: str) -> None:
        """zfs-fuse destroys a dataset only unmounted."""
        with contextlib.suppress(StorkError):
            self._zfs("umount", dataset, what=what)
        self._zfs("destroy", dataset, what=what)

    def free_partial(self, vol: VolName) -> None:
        self._sweep_temps(vol)

    def _sweep_temps(self, vol: VolName) -> None:
        """Destroy temp datasets a creation that died left in the volume's folder (callers
        hold the storage lock: any temp there is stale)."""
        folder = f"{self.pool}/{_folder(vol)}/"
        for name in self._datasets():
            if name.startswith(folder) and _TEMP_NAME.fullmatch(name.removeprefix(folder)):
                self._destroy(name, f"removing the temp dataset {name}")

    def make_base(self, vol: VolName, base: VolName) -> None:
        self._ensure_folder(base)
        if self.exists(base):
            raise Refused(f"base image {self.volid(base)} already exists")
        self._rename(self.dataset(vol), self.dataset(base), f"making base {self.volid(base)}")
        faults.point("based")
        self.protect_base(base)
        self._drop_folder_if_empty(vol)

    def protect_base(self, base: VolName) -> None:
        """The snapshot clones are made of, and the dataset read-only; idempotent."""
        what = f"protecting {self.volid(base)}"
        if not self._has_base_snapshot(base, what):
            self._zfs("snapshot", f"{self.dataset(base)}@{SNAPSHOT}", what=what)
        self._zfs("set", "readonly=on", self.dataset(base), what=what)

    def _has_base_snapshot(self, base: VolName, what: str) -> bool:
        snapshots = self._zfs("list", "-H", "-t", "snapshot", "-o", "name", "-r", self.dataset(base), what=what)
        return f"{self.dataset(base)}@{SNAPSHOT}" in snapshots.split()

    def _drop_base_snapshot(self, base: VolName, what: str) -> None:
        """Destroy the base's snapshot, where it has one: a make_base cut off before its
        protect_base left none, and `zfs destroy` of a missing snapshot fails with a message
        of its own on OpenZFS ("could not find any snapshots to destroy"), not zfs-fuse's."""
        if self._has_base_snapshot(base, what):
            self._zfs("destroy", f"{self.dataset(base)}@{SNAPSHOT}", what=what)

    def unmake_base(self, base: VolName, vol: VolName) -> None:
        """Drop the snapshot (ZFS refuses while clones depend on it), make the dataset writable
        and rename it back; a failure on the way makes it a protected base again."""
        what = f"turning {self.volid(base)} back into {self.volid(vol)}"
        if self.exists(vol):
            raise Refused(f"volume {self.volid(vol)} already exists")
        with contextlib.suppress(NotFound):
            self._drop_base_snapshot(base, what)
        try:
            self._zfs("set", "readonly=off", self.dataset(base), what=what)
            self._ensure_folder(vol)
            self._rename(self.dataset(base), self.dataset(vol), what)
        except BaseException:
            if self.exists(base):
                self.protect_base(base)
            raise
        faults.point("unbased")

    def resize(self, vol: VolName, size: int) -> None:
        with self._opened(vol, write=True) as fd:
            os.ftruncate(fd, size)
            os.fsync(fd)
