"""The storage driver interface: one method table for every backend, features as data.

A backend subclasses `Driver`, declares `FEATURES` and `formats`, and writes the abstract
methods. Everything a job needs beyond them (feature checks, name choice, copying, info)
is written once here. Drivers know nothing of Celery, Redis or locks: callers hold the
storage lock around naming, allocation, rename and free.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from drivers import names, qemu
from drivers.errors import FeatureUnsupported, NotFound
from drivers.names import VolName
from drivers.safedir import reflink
from drivers.storage import Option, StorageConfig

# What a job may do with a volume: feature -> volume state ("current" | "base") -> formats.
FeatureTable = Mapping[str, Mapping[str, frozenset[str]]]

RAW = frozenset({"raw"})
# The table of a backend of raw volumes with native clones (btrfs, zfs, rbd): bases from
# disks, linked clones of bases, copies and moves of both, resizing disks. A base moves only
# while no linked clone names it (the move job checks).
RAW_WITH_CLONES: FeatureTable = {
    "make_base": {"current": RAW},
    "linked_clone": {"base": RAW},
    "copy": {"current": RAW, "base": RAW},
    "resize": {"current": RAW},
    "move": {"current": RAW, "base": RAW},
}

FEATURE_WORDS = {
    "make_base": "converting to a base image",
    "linked_clone": "a linked clone",
    "copy": "copying",
    "resize": "resizing (writing)",
    "move": "moving",
}


@dataclass(frozen=True)
class ForeignLock:
    """A lock another manager of the same volumes takes (Proxmox VE's), taken with stork's."""

    path: Path
    kind: str  # "flock": a file flock'd (its lock_file); "mkdir": a directory made (its cluster file system's)


@dataclass(frozen=True)
class VolumeInfo:
    volid: str
    fmt: str
    virtual_size: int
    allocated: int
    is_base: bool
    parent: str | None = None  # volume id of the base a linked clone reads through
    clones: tuple[str, ...] = ()  # volume ids of a base's linked clones
    users: tuple[str, ...] = ()  # guests that attach it, as <vmid>:<disk> (filled in by the reader of guest configs)
    orphan: bool = False  # no guest, no unfinished job and no job result names it (a leftover to look at)
    problem: str = ""  # not a volume at all, only named like one (Driver.strays): what it is instead
    replicas: tuple[str, ...] = ()  # a base's replicas on other nodes, as "<volid> (node <node>)" (from templates)

    def as_dict(self) -> dict[str, object]:
        return {
            "volid": self.volid,
            "format": self.fmt,
            "virtual_size": self.virtual_size,
            "allocated": self.allocated,
            "base": self.is_base,
            "parent": self.parent,
            "clones": list(self.clones),
            "users": list(self.users),
            "orphan": self.orphan,
            "problem": self.problem,
            "replicas": list(self.replicas),
        }


class Driver(ABC):
    type_name: ClassVar[str]
    FEATURES: ClassVar[FeatureTable]
    formats: ClassVar[tuple[str, ...]]
    default_format: ClassVar[str]
    linked_clone_format: ClassVar[str]  # the format a linked clone of a base gets
    OPTIONS: ClassVar[Mapping[str, Option]]  # its own keys in [storage.<id>] (drivers/storage.py)
    CONTENT: ClassVar[frozenset[str]] = frozenset({"images"})  # what its storages may hold
    # A newly allocated volume reads as zeros (a new file, a thin volume): a copy into it may
    # skip zero areas. False for a thick LV, which holds whatever blocks it was given.
    new_volumes_read_zero: ClassVar[bool] = True
    # Every node sees the same volumes (a Ceph pool): the storage is shared whatever the config says.
    always_shared: ClassVar[bool] = False

    @classmethod
    def place(cls, config: StorageConfig) -> str | None:
        """Where a storage that is not a directory keeps its volumes (a pool, a namespace), as
        a '/'-separated name: two storages at the same place, or one inside the other, are
        refused by the config (one volume would have two ids and pass the other's in-use
        checks). Storages of files are checked by their paths instead."""
        return None

    def __init__(self, storage: StorageConfig) -> None:
        self.storage = storage

    @property
    def preferred_format(self) -> str:
        """The format of a new volume when none is given: the storage's `format`, else the driver's."""
        return str(self.storage.options.get("format") or self.default_format)

    # ---- the method table a backend writes ------------------------------------------
    @abstractmethod
    def image(self, vol: VolName, write: bool = False) -> AbstractContextManager[qemu.Image]:
        """The volume opened for qemu-img (with its base as backing, for a linked clone). On a
        clean exit from a writable image, what was written is flushed to stable storage."""

    @abstractmethod
    def identity(self, vol: VolName) -> str:
        """A token naming this volume and no volume made after it is freed (to tell, after a
        crash, whether a name still holds the volume a step meant to act on)."""

    @abstractmethod
    def list_volumes(self, owner: int | None = None) -> list[VolName]:
        """Every volume on the storage, bases included; with `owner`, that guest's only."""

    def strays(self, owner: int | None = None) -> list[tuple[VolName, str]]:
        """Entries named like volumes that are not volumes (a directory, a symlink, a FIFO
        someone left in a storage of files), each with what is wrong with it, naming its path.
        A backend whose volumes are not files has none."""
        return []

    def stray_folders(self) -> list[tuple[str, str]]:
        """Entries named like a folder of volumes (a guest's, `base`) that are not directories (a
        symlink to elsewhere, a file), each with what is wrong with it: their volumes are not
        the storage's, and are listed as such. A backend whose volumes are not files has none."""
        return []

    def internal_snapshots(self, vol: VolName) -> int:
        """Snapshots the volume holds inside itself (a qcow2 file's), which a copy of its data
        does not carry: a move's source that has any is not freed. A backend whose snapshots
        are volumes of their own (ZFS, RBD: their destroy refuses while any exist) has none."""
        return 0

    @abstractmethod
    def exists(self, vol: VolName) -> bool: ...

    @abstractmethod
    def allocate(self, vol: VolName, size: int) -> None:
        """Create an empty (zero, sparse where possible) volume of `size` bytes."""

    @abstractmethod
    def free(self, vol: VolName) -> None:
        """Delete a volume; a base may only be freed by `free_volume` (checks clones)."""

    @abstractmethod
    def make_base(self, vol: VolName, base: VolName) -> None:
        """Turn `vol` into the read-only base `base` (rename + protect)."""

    @abstractmethod
    def unmake_base(self, base: VolName, vol: VolName) -> None:
        """Undo `make_base`: `base` becomes the writable `vol` again."""

    @abstractmethod
    def link_clone(self, base: VolName, vol: VolName) -> None:
        """Create `vol` as a linked clone whose data is shared with `base`."""

    @abstractmethod
    def parent_of(self, vol: VolName) -> VolName | None:
        """The base a linked clone reads through, from the storage itself."""

    @abstractmethod
    def virtual_size(self, vol: VolName) -> int: ...

    @abstractmethod
    def allocated_size(self, vol: VolName) -> int: ...

    @abstractmethod
    def resize(self, vol: VolName, size: int) -> None: ...

    def zero_grown(self, vol: VolName, old_size: int) -> None:
        """Make what a resize added past `old_size` read as zeros, where growing does not (a
        thick LV's new extents hold what they held before); idempotent, for a resize tried
        again after a crash. Nothing to do where new space reads as zeros."""
        return None

    def recreate(self, vol: VolName, size: int) -> None:
        """Make `vol` an empty volume of `size` again (to redo an interrupted copy into it).
        Backends that can replace it atomically should, so its name is never free."""
        self.free(vol)
        self.allocate(vol, size)

    @abstractmethod
    def status(self) -> tuple[int, int, int]:
        """(total, used, available) bytes of the storage; NotFound or OSError if it cannot be read."""

    @abstractmethod
    def free_partial(self, vol: VolName) -> None:
        """Remove what an interrupted creation of `vol` may have left (a temp file, an empty
        folder); call it under the storage lock, for a name that was never created."""

    @abstractmethod
    def protect_base(self, base: VolName) -> None:
        """Make sure a base is read-only (again); idempotent."""

    # ---- written once for all backends ------------------------------------------------
    def parse_volname(self, text: str) -> VolName:
        vol = names.volname(text)
        if vol.fmt not in self.formats:
            raise FeatureUnsupported(f"storage {self.storage.id!r} cannot hold {vol.fmt} volumes")
        return vol

    def volid(self, vol: VolName) -> str:
        return f"{self.storage.id}:{vol}"

    # ---- another manager of the same volumes (Proxmox VE, on a directory of its layout) ----
    def foreign_ids(self) -> tuple[str, ...]:
        """The ids the other manager knows this storage by (for guests adopted from it)."""
        return ()

    def foreign_locks(self) -> list[ForeignLock]:
        """The locks it holds while it names, makes or frees a volume: taken with stork's own."""
        return []

    def foreign_users(self, vol: VolName) -> list[str]:
        """Its guests that use the volume, each named; StorkError when they cannot be read."""
        return []

    def foreign_users_by_volume(self) -> dict[str, list[str]]:
        """foreign_users of every volume it names, by volname (one read for a listing)."""
        return {}

    def foreign_guest(self, vmid: int) -> str | None:
        """Whose the guest id is, if the other manager has a guest of that id (its volumes would
        share a folder with stork's guest's)."""
        return None

    def require_existing(self, vol: VolName) -> None:
        if not self.exists(vol):
            raise NotFound(f"unknown volume {self.volid(vol)}")

    def has_feature(self, feature: str, vol: VolName) -> bool:
        state = "base" if vol.is_base else "current"
        return vol.fmt in self.FEATURES.get(feature, {}).get(state, frozenset())

    def require_feature(self, feature: str, vol: VolName) -> None:
        if self.has_feature(feature, vol):
            return
        words = FEATURE_WORDS.get(feature, feature)
        if not any(vol.fmt in formats for formats in self.FEATURES.get(feature, {}).values()):
            reason = f"{self.type_name} storage does not support it for {vol.fmt} volumes"
        elif vol.is_base:
            reason = "it is a read-only base image"
        else:
            reason = "it is not a base image (make one with 'stork base' or 'stork template')"
        raise FeatureUnsupported(f"{self.volid(vol)}: {words} is not allowed: {reason}")

    def clones_of(self, base: VolName) -> list[VolName]:
        return [v for v in self.list_volumes() if self.parent_of(v) == base]

    def readers_of(self, base: VolName) -> list[str]:
        """What reads through `base`, as a refusal to free, move or replace it names it: each
        linked clone's volume id, and each file in the storage that is no volume and reads
        through it (unlisted_readers)."""
        return [self.volid(c) for c in self.clones_of(base)] + self.unlisted_readers(base)

    def unlisted_readers(self, base: VolName) -> list[str]:
        """Files no volume id names whose data reads through `base` (a storage of files: a copy
        of a clone kept as `vm-101-disk-0.qcow2.bak`), each as `file <path>`. None where every
        image the storage holds is a volume."""
        return []

    def next_disk_name(self, owner: int, fmt: str, taken: frozenset[str] = frozenset()) -> VolName:
        """The first free `vm-<owner>-disk-N` (an entry only named like a volume takes its name
        too); call it under the storage lock."""
        used = {v.name for v in self.list_volumes(owner)} | {v.name for v, _ in self.strays(owner)} | taken
        n = 0
        while f"vm-{owner}-disk-{n}" in used:
            n += 1
        return VolName(owner, f"vm-{owner}-disk-{n}", fmt)

    @staticmethod
    def default_base_name(vol: VolName) -> VolName:
        """`100/vm-100-disk-0.raw` becomes `base/base-100-disk-0.raw` (Proxmox-style)."""
        stem = vol.name.removeprefix("vm-") if vol.owner is not None else vol.name
        return VolName(None, f"base-{stem}", vol.fmt)

    def named_base(self, vol: VolName, name: str) -> VolName:
        """The base `vol` becomes under a name the user chose; InvalidName where the storage
        cannot give it that name."""
        return VolName(None, name, vol.fmt)

    def free_base_name(self, vol: VolName) -> VolName:
        """`default_base_name(vol)`, or where a volume holds that name (the base of a template
        that a restore replaces, say), the first free one after it: `base-100-disk-1`, ... (a
        name of another shape gets `-1`, `-2`, ...). Call it under the storage lock."""
        base = self.default_base_name(vol)
        taken = {v.name for v in self.list_volumes() if v.owner is None} | \
                {v.name for v, _ in self.strays() if v.owner is None}
        numbered = re.fullmatch(r"(base-\d+-disk-)(\d+)", base.name)
        stem, n = (numbered.group(1), int(numbered.group(2))) if numbered else (f"{base.name}-", 0)
        name = base.name
        while name in taken:
            n += 1
            name = f"{stem}{n}"
        return VolName(None, name, vol.fmt)

    def info(self, vol: VolName, with_clones: bool = True) -> VolumeInfo:
        self.require_existing(vol)
        parent = self.parent_of(vol)
        clones = self.clones_of(vol) if vol.is_base and with_clones else []
        return VolumeInfo(
            volid=self.volid(vol),
            fmt=vol.fmt,
            virtual_size=self.virtual_size(vol),
            allocated=self.allocated_size(vol),
            is_base=vol.is_base,
            parent=self.volid(parent) if parent else None,
            clones=tuple(self.volid(c) for c in clones),
        )

    def free_volume(self, vol: VolName) -> None:
        """Free a volume, refusing a base that linked clones still read through."""
        self.require_existing(vol)
        if vol.is_base and (readers := self.readers_of(vol)):
            raise FeatureUnsupported(
                f"{self.volid(vol)} is a base image with {len(readers)} linked clone(s): {', '.join(readers)}"
            )
        self.free(vol)

    def copy_in(self, src: qemu.Image, size: int, dst: VolName, progress: qemu.Progress | None = None) -> None:
        """Copy an opened image into the allocated dst (generic path: qemu-img), flushed to
        stable storage before it returns; zero areas are skipped only where a new volume
        reads as zeros."""
        with self.image(dst, write=True) as target:
            qemu.convert(src, target, size, progress, target_is_zero=self.new_volumes_read_zero)

    def copy_from(
        self, source: Driver, src: VolName, dst: VolName, progress: qemu.Progress | None = None
    ) -> None:
        """Copy src (on any storage) into the allocated dst: by sharing extents where both are
        files of one format on one filesystem that can (btrfs, XFS with reflink), else through
        qemu-img. A backend may add its own fast paths."""
        size = source.virtual_size(src)
        with source.image(src) as image:
            if dst.fmt == src.fmt and self._reflink(image, dst):
                if progress:
                    progress(size, size)
                return
            self.copy_in(image, size, dst, progress)

    def _reflink(self, src: qemu.Image, dst: VolName) -> bool:
        """FICLONE the whole of a self-contained file image into dst's file, if they can share."""
        if src.backing is not None or not src.is_file:
            return False  # a linked clone is flattened by qemu-img, never copied as an overlay
        with self.image(dst, write=True) as target:
            return target.is_file and target.backing is None and reflink(src.fds[0], target.fds[0])

    def compare(self, source: Driver, src: VolName, dst: VolName) -> None:
        """Raise ToolFailed unless dst holds the same data as src."""
        with source.image(src) as image:
            self.compare_with(image, dst)

    def compare_with(self, image: qemu.Image, dst: VolName) -> None:
        """Raise ToolFailed unless dst holds the same data as `image` (another node's export)."""
        with self.image(dst) as b:
            qemu.compare(image, b)
