"""LVM-thin storage: each volume a thin LV in one thin pool of a volume group.

    <vg>/<vmid>.vm-<vmid>-disk-<n>.raw   a guest's disk, a thin volume of <thinpool>
    <vg>/base.<name>.raw                 a base: read-only (lvchange -pr), activation skipped
                                         (-ky, as Proxmox does), tagged stork-base
    a linked clone                       a thin snapshot of a base (lvcreate -s), writable and
                                         activated normally (-kn)

The group and the `lvm` tool on it are lvmgroup.py's, shared with thick LVM (lvm.py), and
what is said there of names, bases and devices holds here, except where thin volumes differ:
- a linked clone's base is its LV's `origin`, which LVM itself keeps in the VG metadata, so
  parents and children come from one `lvs` (no tag of stork's own could disagree with it);
  freeing a base with clones is refused by `Driver.free_volume` (LVM would allow it: its
  thin snapshots outlive their origin, but the clones would lose their base in stork's view);
- a new thin volume reads as zeros where nothing was written; a chunk the pool provisions for
  a partial write is zeroed only if the pool zeroes new blocks (`lvcreate -Zy`, LVM's default
  for thin pools). So a copy skips zero areas only on a zeroing pool;
- allocation needs no zeroing pass: unprovisioned blocks read as zeros.

LV names are one namespace per volume group, so one stork storage per volume group (thick or
thin): the config refuses a second (`place`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from functools import cached_property

from drivers import faults, names, qemu
from drivers.backends.base import RAW_WITH_CLONES, Driver
from drivers.backends.lvm import OPTIONS as LVM_OPTIONS
from drivers.backends.lvmgroup import LV_FIELDS, Row, VolumeGroup, check_reserved, lvm_name
from drivers.errors import NotFound
from drivers.names import VolName
from drivers.storage import Option, StorageConfig

OPTIONS = {
    **LVM_OPTIONS,
    "thinpool": Option(lvm_name, "the name of a thin pool LV in the volume group (letters, digits, + _ . -)",
                       required=True),
}


class LvmThinDriver(Driver):
    type_name = "lvmthin"
    formats = ("raw",)
    default_format = "raw"
    linked_clone_format = "raw"
    FEATURES = RAW_WITH_CLONES
    OPTIONS = OPTIONS

    def __init__(self, config: StorageConfig) -> None:
        super().__init__(config)
        self.pool: str = config.options["thinpool"]
        # the thin volumes of our pool, not thick LVs (those are an lvm storage's)
        self.group = VolumeGroup(config, LV_FIELDS + ",origin,data_percent",
                                 ours=lambda row: row.get("pool_lv") == self.pool)
        self.vg = self.group.vg

    @classmethod
    def place(cls, config: StorageConfig) -> str | None:
        return f"lvm:{config.options['vgname']}"  # the group's, as thick LVM: one storage per group

    def parse_volname(self, text: str) -> VolName:
        return check_reserved(super().parse_volname(text), text, self.storage.id)

    def _pool_row(self) -> Row:
        rows = self.group.report("lvs", "lv_name,lv_size,lv_attr,data_percent,zero", f"{self.vg}/{self.pool}",
                                 what=f"reading thin pool {self.vg}/{self.pool}")
        if not rows or rows[0].get("lv_attr", "")[:1] != "t":
            raise NotFound(f"storage {self.storage.id!r}: {self.vg}/{self.pool} is not a thin pool")
        return rows[0]

    @cached_property
    def new_volumes_read_zero(self) -> bool:  # type: ignore[override]
        """Only a pool that zeroes the blocks it provisions never shows old data in a new volume."""
        return self._pool_row().get("zero") == "zero"

    # ---- reading -------------------------------------------------------------------------
    def list_volumes(self, owner: int | None = None) -> list[VolName]:
        return self.group.list_volumes(owner)

    def exists(self, vol: VolName) -> bool:
        return vol in self.group.lvs()

    def identity(self, vol: VolName) -> str:
        return self.group.row(vol)["lv_uuid"]  # never reused

    def virtual_size(self, vol: VolName) -> int:
        return int(self.group.row(vol)["lv_size"])

    def allocated_size(self, vol: VolName) -> int:
        """What the pool has provisioned for it; LVM knows that only of an active volume, and
        an inactive one is counted whole (an upper bound, never an understatement)."""
        row = self.group.row(vol)
        size = int(row["lv_size"])
        percent = row.get("data_percent") or ""
        return int(size * float(percent) / 100) if percent else size

    def parent_of(self, vol: VolName) -> VolName | None:
        return self._parent(self.group.row(vol))

    @staticmethod
    def _parent(row: Row) -> VolName | None:
        origin = names.from_flat_name(row.get("origin") or "")
        return origin if origin is not None and origin.is_base else None

    def clones_of(self, base: VolName) -> list[VolName]:
        """One `lvs` for the whole pool, not one per volume."""
        return sorted((v for v, row in self.group.lvs().items() if self._parent(row) == base), key=str)

    def status(self) -> tuple[int, int, int]:
        """The thin pool's data space: what guests can still write, not the group's free extents."""
        row = self._pool_row()
        total, percent = int(row["lv_size"]), row.get("data_percent") or ""
        if not percent:
            raise NotFound(f"storage {self.storage.id!r}: thin pool {self.vg}/{self.pool} is not active, "
                           "LVM does not know its usage")
        used = int(total * float(percent) / 100)
        return total, used, total - used

    def image(self, vol: VolName, write: bool = False) -> AbstractContextManager[qemu.Image]:
        return self.group.image(vol, write)

    # ---- making and freeing ----------------------------------------------------------------
    def allocate(self, vol: VolName, size: int) -> None:
        """A thin volume: nothing provisioned, so it reads as zeros without a zeroing pass."""
        self.group.run("lvcreate", "--yes", "-V", f"{size}b", "--thinpool", f"{self.vg}/{self.pool}",
                       "-n", names.flat_name(vol), what=f"creating {self.volid(vol)}")
        faults.point("created")

    def link_clone(self, base: VolName, vol: VolName) -> None:
        """A thin snapshot of the base, writable and activated normally (the base skips activation)."""
        self.group.run("lvcreate", "--yes", "-s", "-kn", "-prw", "-n", names.flat_name(vol), self.group.lv(base),
                       what=f"cloning {self.volid(base)} to {self.volid(vol)}")
        faults.point("created")

    def free(self, vol: VolName) -> None:
        self.group.free(vol)

    def free_partial(self, vol: VolName) -> None:
        """Nothing: a thin volume is made by one `lvcreate`, whole or not at all."""

    def make_base(self, vol: VolName, base: VolName) -> None:
        self.group.rename_to_base(vol, base)
        self.protect_base(base)

    def protect_base(self, base: VolName) -> None:
        """Read-only, tagged and skipped by activation; idempotent."""
        row = self.group.row(base)
        self.group.protect(base, row)
        if row["lv_attr"][9:10] != "k":
            self.group.run("lvchange", "-ky", self.group.lv(base), what=f"protecting {self.volid(base)}")

    def unmake_base(self, base: VolName, vol: VolName) -> None:
        self.group.unmake_base(base, vol, ("-prw", "-kn"), self.protect_base)

    def resize(self, vol: VolName, size: int) -> None:
        self.group.resize(vol, size)
