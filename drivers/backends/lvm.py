"""LVM (thick) storage: each volume a logical volume of one volume group.

    <vg>/<vmid>.vm-<vmid>-disk-<n>.raw   a guest's disk
    <vg>/base.<name>.raw                 a base: read-only (lvchange -pr), tagged stork-base

LV names are flat, so a volume's LV is its flat name (names.flat_name); raw only. The group
and the `lvm` tool on it are lvmgroup.py's, shared with LVM-thin.

No linked clones. The seed suggests an LV snapshot, but a thick snapshot is a copy-on-write
area of fixed size in front of its origin: it becomes invalid when that area fills up, and
every write to the origin is slowed by a copy into each snapshot. That is a short-lived
backup aid, not a lasting clone, and Proxmox refuses it for the same reason. A template on
thick LVM gets full clones (the feature table says so, and the job refuses a linked one).

A new LV holds whatever its extents held before, another guest's data perhaps. So a new
volume does not read as zeros (`new_volumes_read_zero`: a copy writes the zeros too), and
`allocate` zeroes the whole new LV (blkdiscard --zeroout) before it counts as made; if that
fails, the LV is removed again. Until it is zeroed it carries the tag stork-zeroing and is no
volume (not found, listed as a stray): one left so by a process killed mid-zeroing is never
taken for made by the step tried again; its name is not given again, and the operator removes
it (free_partial and an allocate of that name do too). A resize zeroes what lvextend added
(`zero_grown`, again by a resize tried after a crash), else shrinks the LV back. Data I/O
needs the LV active (device-mapper): `image()` activates it and opens the block device it
resolves to, checking it is the LV's own device (major:minor from LVM) on the opened
descriptor.
"""

from __future__ import annotations

import contextlib
import os
from contextlib import AbstractContextManager

from drivers import faults, names, qemu
from drivers.backends.base import RAW, Driver
from drivers.backends.lvmgroup import LV_FIELDS, TIMEOUT, Row, VolumeGroup, check_reserved, lvm_name
from drivers.errors import NotFound, Refused, StorkError
from drivers.names import VolName
from drivers.storage import Option, StorageConfig
from drivers.tools import run

ZEROING_TAG = "stork-zeroing"  # on a new LV until it is zeroed whole


def _zeroing(row: Row) -> bool:
    return ZEROING_TAG in row.get("lv_tags", "").split(",")


OPTIONS = {
    "vgname": Option(lvm_name, "an LVM volume group name (letters, digits, + _ . -)", required=True),
}


class LvmDriver(Driver):
    type_name = "lvm"
    formats = ("raw",)
    default_format = "raw"
    linked_clone_format = "raw"
    FEATURES = {
        "make_base": {"current": RAW},
        "copy": {"current": RAW, "base": RAW},
        "resize": {"current": RAW},
        "move": {"current": RAW, "base": RAW},
    }  # no "linked_clone": see the module docstring
    OPTIONS = OPTIONS
    new_volumes_read_zero = False  # an LV holds its extents' old data

    def __init__(self, config: StorageConfig) -> None:
        super().__init__(config)
        # a thick LV of the group, not a thin volume (those are an lvmthin storage's)
        self.group = VolumeGroup(config, LV_FIELDS, ours=lambda row: not row.get("pool_lv") and not _zeroing(row))
        self.vg = self.group.vg

    @classmethod
    def place(cls, config: StorageConfig) -> str | None:
        return f"lvm:{config.options['vgname']}"

    def parse_volname(self, text: str) -> VolName:
        return check_reserved(super().parse_volname(text), text, self.storage.id)

    # ---- reading -------------------------------------------------------------------------
    def list_volumes(self, owner: int | None = None) -> list[VolName]:
        return self.group.list_volumes(owner)

    def strays(self, owner: int | None = None) -> list[tuple[VolName, str]]:
        """LVs a worker killed while making them left before they were zeroed whole: no volumes,
        listed as such (and their names not given again) for the operator to remove."""
        rows = self.group.report("lvs", LV_FIELDS, self.vg, what=f"listing volume group {self.vg}")
        return [(vol, f"LV {self.vg}/{row['lv_name']} was never zeroed whole (its maker was killed): "
                      "remove it with lvremove")
                for row in rows if _zeroing(row) and not row.get("pool_lv")
                and (vol := names.from_flat_name(row.get("lv_name", ""))) is not None
                and (owner is None or vol.owner == owner)]

    def exists(self, vol: VolName) -> bool:
        return vol in self.group.lvs()

    def identity(self, vol: VolName) -> str:
        return self.group.row(vol)["lv_uuid"]  # never reused

    def virtual_size(self, vol: VolName) -> int:
        return int(self.group.row(vol)["lv_size"])

    def allocated_size(self, vol: VolName) -> int:
        return self.virtual_size(vol)  # thick: every extent is allocated

    def parent_of(self, vol: VolName) -> VolName | None:
        self.group.row(vol)
        return None  # no linked clones on thick LVM

    def status(self) -> tuple[int, int, int]:
        return self.group.vg_status()

    def image(self, vol: VolName, write: bool = False) -> AbstractContextManager[qemu.Image]:
        return self.group.image(vol, write)

    # ---- making and freeing ----------------------------------------------------------------
    def allocate(self, vol: VolName, size: int) -> None:
        """A new LV, zeroed whole before it counts as made (tagged until then); removed again
        if that fails. One of that name left unzeroed by a process killed meanwhile goes first."""
        what = f"creating {self.volid(vol)}"
        self.free_partial(vol)
        self.group.run("lvcreate", "--yes", "-an", "-Zn", "--addtag", ZEROING_TAG, "-L", f"{size}b", "-n",
                       names.flat_name(vol), self.vg, what=what)
        try:
            self._zero(vol, made=False)
            self.group.run("lvchange", "--deltag", ZEROING_TAG, self.group.lv(vol), what=what)
        except BaseException:
            with contextlib.suppress(StorkError):
                self.group.run("lvremove", "--yes", self.group.lv(vol), what=what)
            raise
        faults.point("created")

    def resize(self, vol: VolName, size: int) -> None:
        old = self.virtual_size(vol)
        self.group.resize(vol, size)
        self.zero_grown(vol, old)

    def zero_grown(self, vol: VolName, old_size: int) -> None:
        """Zero the LV past `old_size`: the extents lvextend added hold another guest's old
        data. Where that fails, the LV is shrunk back to `old_size` (that tail was never shown
        to anyone), so no later resize takes the grown LV for done."""
        try:
            with self.group.device(vol, write=True) as fd:
                end = os.lseek(fd, 0, os.SEEK_END)
                if end > old_size:
                    run(["blkdiscard", "--zeroout", "-o", str(old_size), "-l", str(end - old_size),
                         f"/proc/self/fd/{fd}"], f"zeroing what {self.volid(vol)} grew by", (fd,), timeout=TIMEOUT)
                    os.fsync(fd)
        except BaseException:
            with contextlib.suppress(StorkError):
                self.group.run("lvreduce", "--yes", "-L", f"{old_size}b", self.group.lv(vol),
                               what=f"shrinking {self.volid(vol)} back to {old_size} bytes")
            raise

    def _zero(self, vol: VolName, made: bool = True) -> None:
        """Zero the whole LV (another guest's old data must never show through): a volume, or
        (not `made`) the LV allocate made, tagged and no volume yet."""
        with self.group.device(vol, write=True, find=None if made else self._unzeroed) as fd:
            run(["blkdiscard", "--zeroout", f"/proc/self/fd/{fd}"], f"zeroing {self.volid(vol)}", (fd,),
                timeout=TIMEOUT)
            os.fsync(fd)

    def recreate(self, vol: VolName, size: int) -> None:
        self._zero(vol)

    def link_clone(self, base: VolName, vol: VolName) -> None:
        raise Refused(f"{self.volid(base)}: thick LVM makes no linked clones (use a full clone)")

    def free(self, vol: VolName) -> None:
        self.group.free(vol)

    def free_partial(self, vol: VolName) -> None:
        """Remove the LV of that name if it was never zeroed whole (its process killed while
        zeroing): no volume, whatever it holds."""
        try:
            self._unzeroed(vol)
        except NotFound:
            return
        self.group.run("lvremove", "--yes", self.group.lv(vol), what=f"removing {self.volid(vol)}, never zeroed whole")

    def _unzeroed(self, vol: VolName) -> Row:
        """The row of the thick LV of that name that allocate has not zeroed whole yet."""
        rows = self.group.report("lvs", LV_FIELDS, self.group.lv(vol), what=f"reading {self.volid(vol)}")
        if not (found := [row for row in rows if _zeroing(row) and not row.get("pool_lv")]):
            raise NotFound(f"{self.volid(vol)}: no LV being made")
        return found[0]

    def make_base(self, vol: VolName, base: VolName) -> None:
        self.group.rename_to_base(vol, base)
        self.protect_base(base)

    def protect_base(self, base: VolName) -> None:
        """Read-only and tagged; idempotent."""
        self.group.protect(base, self.group.row(base))

    def unmake_base(self, base: VolName, vol: VolName) -> None:
        self.group.unmake_base(base, vol, ("-prw",), self.protect_base)

