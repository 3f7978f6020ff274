"""LVM (thick) storage: each volume a logical volume of one volume group.

    <vg>/<vmid>.vm-<vmid>-disk-<n>.raw   a guest's disk
    <vg>/base.<name>.raw                 a base: read-only (lvchange -pr), tagged stork-base

LV names are flat, so a volume's LV is its flat name (names.flat_name); raw only.

No linked clones. The seed suggests an LV snapshot, but a thick snapshot is a copy-on-write
area of fixed size in front of its origin: it becomes invalid when that area fills up, and
every write to the origin is slowed by a copy into each snapshot. That is a short-lived
backup aid, not a lasting clone, and Proxmox refuses it for the same reason. A template on
thick LVM gets full clones (the feature table says so, and the job refuses a linked one).

A new LV holds whatever its extents held before, another guest's data perhaps. So a new
volume does not read as zeros (`new_volumes_read_zero`: a copy writes the zeros too), and
`allocate` zeroes the whole new LV (blkdiscard --zeroout) before it counts as made; if that
fails, the LV is removed again. Data I/O needs the LV active (device-mapper): `image()`
activates it and opens the block device it resolves to, checking it is the LV's own device
(major:minor from LVM) on the opened descriptor.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
from collections.abc import Iterator

from drivers import faults, names, qemu
from drivers.backends.base import RAW, Driver
from drivers.errors import InvalidName, NotFound, Refused, StorkError
from drivers.names import VolName
from drivers.storage import Option, StorageConfig
from drivers.tools import ToolError, run

BASE_TAG = "stork-base"
TIMEOUT = 300.0
# LVM reserves these in LV names (its own hidden sub-volumes): a volume named so is refused
RESERVED = ("_cdata", "_cmeta", "_corig", "_cpool", "_cvol", "_mimage", "_mlog", "_pmspare", "_rimage", "_rmeta",
            "_tdata", "_tmeta", "_vdata", "_vorigin", "_wcorig", "snapshot", "pvmove")
_LVM_NAME = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}")


def lvm_name(v: object) -> bool:
    """A volume group or LV name LVM takes (and no option: it cannot start with a dash)."""
    return isinstance(v, str) and bool(_LVM_NAME.fullmatch(v)) and v not in (".", "..")


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
        self.vg: str = config.options["vgname"]

    @classmethod
    def place(cls, config: StorageConfig) -> str | None:
        return f"lvm:{config.options['vgname']}"

    def parse_volname(self, text: str) -> VolName:
        vol = super().parse_volname(text)
        if any(word in vol.name for word in RESERVED):
            raise InvalidName(f"invalid volume name {text!r} for storage {self.storage.id!r}: LVM reserves "
                              f"names holding {', '.join(w for w in RESERVED if w in vol.name)}")
        return vol

    # ---- the tool ------------------------------------------------------------------------
    def _lvm(self, *args: str, what: str) -> str:
        """Run an `lvm` command; LVM's "not found" is NotFound."""
        try:
            return run(["lvm", *args], what, timeout=TIMEOUT, env={**os.environ, "LC_ALL": "C"})
        except ToolError as e:
            if "not found" in e.stderr or "Failed to find logical volume" in e.stderr:
                raise NotFound(f"{what} failed: {e.stderr.strip().splitlines()[-1].strip()}") from None
            raise

    # What `_lvs` reads of each LV; a subclass adds its own fields.
    LV_FIELDS = "lv_name,lv_size,lv_attr,lv_tags,lv_uuid,lv_kernel_major,lv_kernel_minor,pool_lv"

    UNBASE_ARGS: tuple[str, ...] = ("-prw",)  # lvchange arguments undoing what protect_base set

    def _ours(self, row: dict[str, str]) -> bool:
        """Whether an LV of the group belongs to this storage: a thick one, not a thin volume."""
        return not row.get("pool_lv")

    def _lv(self, vol: VolName) -> str:
        return f"{self.vg}/{names.flat_name(vol)}"

    def _report(self, command: str, fields: str, *target: str, what: str) -> list[dict[str, str]]:
        out = self._lvm(command, "--reportformat", "json", "--units", "b", "--nosuffix", "-o", fields, *target,
                        what=what)
        try:
            report = json.loads(out)["report"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ToolError(what, ["lvm", command], 0, "lvm answered something that is not its JSON report") from None
        return report.get("lv" if command == "lvs" else "vg", [])

    def _lvs(self) -> dict[VolName, dict[str, str]]:
        """Every volume of the group with its size, attributes, tags and uuid: one `lvs`."""
        rows = self._report("lvs", self.LV_FIELDS, self.vg, what=f"listing volume group {self.vg}")
        return {v: row for row in rows
                if (v := names.from_flat_name(row.get("lv_name", ""))) is not None and v.fmt in self.formats
                and self._ours(row)}

    def _row(self, vol: VolName) -> dict[str, str]:
        row = self._lvs().get(vol)
        if row is None:
            raise NotFound(f"unknown volume {self.volid(vol)}")
        return row

    # ---- reading -------------------------------------------------------------------------
    def list_volumes(self, owner: int | None = None) -> list[VolName]:
        return sorted((v for v in self._lvs() if owner is None or v.owner == owner), key=str)

    def exists(self, vol: VolName) -> bool:
        return vol in self._lvs()

    def identity(self, vol: VolName) -> str:
        return self._row(vol)["lv_uuid"]  # never reused

    def virtual_size(self, vol: VolName) -> int:
        return int(self._row(vol)["lv_size"])

    def allocated_size(self, vol: VolName) -> int:
        return self.virtual_size(vol)  # thick: every extent is allocated

    def parent_of(self, vol: VolName) -> VolName | None:
        self._row(vol)
        return None  # no linked clones on thick LVM

    def status(self) -> tuple[int, int, int]:
        rows = self._report("vgs", "vg_size,vg_free", self.vg, what=f"reading volume group {self.vg}")
        if not rows:
            raise NotFound(f"storage {self.storage.id!r}: no volume group {self.vg}")
        total, free = int(rows[0]["vg_size"]), int(rows[0]["vg_free"])
        return total, total - free, free

    # ---- opening -------------------------------------------------------------------------
    @contextlib.contextmanager
    def image(self, vol: VolName, write: bool = False) -> Iterator[qemu.Image]:
        """The LV's block device, activated, opened and checked to be that LV's device."""
        with self._device(vol, write) as fd:
            yield qemu.Image("raw", {"driver": "host_device", "filename": f"/proc/self/fd/{fd}"}, self.volid(vol),
                             (fd,))
            if write:
                os.fsync(fd)

    @contextlib.contextmanager
    def _device(self, vol: VolName, write: bool) -> Iterator[int]:
        # -K: a base may carry LVM's activation skip flag (lvmthin sets it, as Proxmox does)
        self._lvm("lvchange", "-ay", "-K", self._lv(vol), what=f"activating {self.volid(vol)}")
        row = self._row(vol)
        wanted = (int(row.get("lv_kernel_major") or -1), int(row.get("lv_kernel_minor") or -1))
        link = f"/dev/{self.vg}/{names.flat_name(vol)}"
        path = os.path.realpath(link)  # a udev link to /dev/dm-N
        try:
            fd = os.open(path, (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise Refused(f"activating {self.volid(vol)} failed: no device {link} "
                          "(is device-mapper available, and activation allowed?)") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISBLK(st.st_mode) or (os.major(st.st_rdev), os.minor(st.st_rdev)) != wanted:
                raise Refused(f"{self.volid(vol)}: {path} is not the device of LV {self._lv(vol)}")
            yield fd
        finally:
            os.close(fd)

    # ---- making and freeing ----------------------------------------------------------------
    def allocate(self, vol: VolName, size: int) -> None:
        """A new LV, zeroed whole before it counts as made; removed again if that fails."""
        what = f"creating {self.volid(vol)}"
        self._lvm("lvcreate", "--yes", "-an", "-Zn", "-L", f"{size}b", "-n", names.flat_name(vol), self.vg, what=what)
        try:
            self._zero(vol)
        except BaseException:
            with contextlib.suppress(StorkError):
                self._lvm("lvremove", "--yes", self._lv(vol), what=what)
            raise
        faults.point("created")

    def _zero(self, vol: VolName) -> None:
        """Zero the whole LV (another guest's old data must never show through)."""
        with self._device(vol, write=True) as fd:
            run(["blkdiscard", "--zeroout", f"/proc/self/fd/{fd}"], f"zeroing {self.volid(vol)}", (fd,),
                timeout=TIMEOUT)
            os.fsync(fd)

    def recreate(self, vol: VolName, size: int) -> None:
        self._zero(vol)

    def link_clone(self, base: VolName, vol: VolName) -> None:
        raise Refused(f"{self.volid(base)}: thick LVM makes no linked clones (use a full clone)")

    def free(self, vol: VolName) -> None:
        if not self.exists(vol):
            return
        self._lvm("lvremove", "--yes", self._lv(vol), what=f"freeing {self.volid(vol)}")
        faults.point("freed")

    def free_partial(self, vol: VolName) -> None:
        """Nothing: `allocate` removes an LV it could not zero."""

    def make_base(self, vol: VolName, base: VolName) -> None:
        if self.exists(base):
            raise Refused(f"base image {self.volid(base)} already exists")
        self._lvm("lvrename", self.vg, names.flat_name(vol), names.flat_name(base),
                  what=f"making base {self.volid(base)}")
        faults.point("based")
        self.protect_base(base)

    def protect_base(self, base: VolName) -> None:
        """Read-only and tagged; idempotent (lvchange refuses to set what is set already)."""
        row = self._row(base)
        if row["lv_attr"][1:2] != "r":
            self._lvm("lvchange", "-pr", self._lv(base), what=f"protecting {self.volid(base)}")
        if BASE_TAG not in row.get("lv_tags", "").split(","):
            self._lvm("lvchange", "--addtag", BASE_TAG, self._lv(base), what=f"tagging {self.volid(base)}")

    def unmake_base(self, base: VolName, vol: VolName) -> None:
        what = f"turning {self.volid(base)} back into {self.volid(vol)}"
        if self.exists(vol):
            raise Refused(f"volume {self.volid(vol)} already exists")
        self._lvm("lvchange", *self.UNBASE_ARGS, "--deltag", BASE_TAG, self._lv(base), what=what)
        try:
            self._lvm("lvrename", self.vg, names.flat_name(base), names.flat_name(vol), what=what)
        except BaseException:
            self.protect_base(base)
            raise
        faults.point("unbased")

    def resize(self, vol: VolName, size: int) -> None:
        self._lvm("lvextend", "-L", f"{size}b", self._lv(vol), what=f"resizing {self.volid(vol)}")

