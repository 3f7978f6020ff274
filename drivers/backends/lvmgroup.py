"""What the two LVM backends share: one volume group and the `lvm` tool run on it. Thick LVM
(lvm.py) and LVM-thin (lvmthin.py) each hold a VolumeGroup and call it; neither driver
inherits from the other.

LV names are flat, so a volume's LV is its flat name (names.flat_name); raw only. A base is
renamed into the base namespace, made read-only (lvchange -pr) and tagged stork-base.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
from collections.abc import Callable, Iterator

from drivers import faults, names, qemu
from drivers.errors import InvalidName, NotFound, Refused
from drivers.names import VolName
from drivers.storage import StorageConfig
from drivers.tools import ToolError, run

BASE_TAG = "stork-base"
TIMEOUT = 300.0
# LVM reserves these in LV names (its own hidden sub-volumes): a volume named so is refused
RESERVED = ("_cdata", "_cmeta", "_corig", "_cpool", "_cvol", "_mimage", "_mlog", "_pmspare", "_rimage", "_rmeta",
            "_tdata", "_tmeta", "_vdata", "_vorigin", "_wcorig", "snapshot", "pvmove")
_LVM_NAME = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}")
# What `VolumeGroup.lvs` reads of each LV; a driver adds its own fields.
LV_FIELDS = "lv_name,lv_size,lv_attr,lv_tags,lv_uuid,lv_kernel_major,lv_kernel_minor,pool_lv"

Row = dict[str, str]


def lvm_name(v: object) -> bool:
    """A volume group or LV name LVM takes (and no option: it cannot start with a dash)."""
    return isinstance(v, str) and bool(_LVM_NAME.fullmatch(v)) and v not in (".", "..")


def check_reserved(vol: VolName, text: str, storage_id: str) -> VolName:
    """`vol` (parsed from `text`), unless its name holds a word LVM reserves."""
    if any(word in vol.name for word in RESERVED):
        raise InvalidName(f"invalid volume name {text!r} for storage {storage_id!r}: LVM reserves "
                          f"names holding {', '.join(w for w in RESERVED if w in vol.name)}")
    return vol


class VolumeGroup:
    """The LVs of the storage's volume group (`vgname`) that belong to the storage (`ours`
    picks them from the group's `lvs` rows), with `fields` read of each."""

    def __init__(self, storage: StorageConfig, fields: str, ours: Callable[[Row], bool]) -> None:
        self.storage_id, self.vg = storage.id, storage.options["vgname"]
        self.fields, self.ours = fields, ours

    def volid(self, vol: VolName) -> str:
        return f"{self.storage_id}:{vol}"

    # ---- the tool ------------------------------------------------------------------------
    def run(self, *args: str, what: str) -> str:
        """Run an `lvm` command; LVM's "not found" is NotFound."""
        try:
            return run(["lvm", *args], what, timeout=TIMEOUT, env={**os.environ, "LC_ALL": "C"})
        except ToolError as e:
            if "not found" in e.stderr or "Failed to find logical volume" in e.stderr:
                raise NotFound(f"{what} failed: {e.stderr.strip().splitlines()[-1].strip()}") from None
            raise

    def report(self, command: str, fields: str, *target: str, what: str) -> list[Row]:
        out = self.run(command, "--reportformat", "json", "--units", "b", "--nosuffix", "-o", fields, *target,
                       what=what)
        try:
            report = json.loads(out)["report"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ToolError(what, ["lvm", command], 0, "lvm answered something that is not its JSON report") from None
        return report.get("lv" if command == "lvs" else "vg", [])

    def lv(self, vol: VolName) -> str:
        return f"{self.vg}/{names.flat_name(vol)}"

    # ---- reading -------------------------------------------------------------------------
    def lvs(self) -> dict[VolName, Row]:
        """Every volume of the storage with its fields: one `lvs` of the group."""
        rows = self.report("lvs", self.fields, self.vg, what=f"listing volume group {self.vg}")
        return {v: row for row in rows
                if (v := names.from_flat_name(row.get("lv_name", ""))) is not None and v.fmt == "raw"
                and self.ours(row)}

    def row(self, vol: VolName) -> Row:
        row = self.lvs().get(vol)
        if row is None:
            raise NotFound(f"unknown volume {self.volid(vol)}")
        return row

    def list_volumes(self, owner: int | None) -> list[VolName]:
        return sorted((v for v in self.lvs() if owner is None or v.owner == owner), key=str)

    def vg_status(self) -> tuple[int, int, int]:
        """(total, used, free) bytes of the whole group."""
        rows = self.report("vgs", "vg_size,vg_free", self.vg, what=f"reading volume group {self.vg}")
        if not rows:
            raise NotFound(f"storage {self.storage_id!r}: no volume group {self.vg}")
        total, free = int(rows[0]["vg_size"]), int(rows[0]["vg_free"])
        return total, total - free, free

    # ---- opening -------------------------------------------------------------------------
    @contextlib.contextmanager
    def image(self, vol: VolName, write: bool) -> Iterator[qemu.Image]:
        """The LV's block device, activated, opened and checked to be that LV's device."""
        with self.device(vol, write) as fd:
            yield qemu.Image("raw", {"driver": "host_device", "filename": f"/proc/self/fd/{fd}"}, self.volid(vol),
                             (fd,))
            if write:
                os.fsync(fd)

    @contextlib.contextmanager
    def device(self, vol: VolName, write: bool, find: Callable[[VolName], Row] | None = None) -> Iterator[int]:
        """The LV's block device, activated, opened and checked to be its device (major:minor
        from `find`, the storage's volume rows by default, read once it is active)."""
        # -K: a base may carry LVM's activation skip flag (lvmthin sets it, as Proxmox does)
        self.run("lvchange", "-ay", "-K", self.lv(vol), what=f"activating {self.volid(vol)}")
        row = (find or self.row)(vol)
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
                raise Refused(f"{self.volid(vol)}: {path} is not the device of LV {self.lv(vol)}")
            yield fd
        finally:
            os.close(fd)

    # ---- changing ------------------------------------------------------------------------
    def free(self, vol: VolName) -> None:
        if vol not in self.lvs():
            return
        self.run("lvremove", "--yes", self.lv(vol), what=f"freeing {self.volid(vol)}")
        faults.point("freed")

    def rename_to_base(self, vol: VolName, base: VolName) -> None:
        if base in self.lvs():
            raise Refused(f"base image {self.volid(base)} already exists")
        self.run("lvrename", self.vg, names.flat_name(vol), names.flat_name(base),
                 what=f"making base {self.volid(base)}")
        faults.point("based")

    def protect(self, base: VolName, row: Row) -> None:
        """Read-only and tagged; idempotent (lvchange refuses to set what is set already)."""
        if row["lv_attr"][1:2] != "r":
            self.run("lvchange", "-pr", self.lv(base), what=f"protecting {self.volid(base)}")
        if BASE_TAG not in row.get("lv_tags", "").split(","):
            self.run("lvchange", "--addtag", BASE_TAG, self.lv(base), what=f"tagging {self.volid(base)}")

    def unmake_base(self, base: VolName, vol: VolName, unbase_args: tuple[str, ...],
                    protect_again: Callable[[VolName], None]) -> None:
        """`base` writable (lvchange `unbase_args`), untagged and renamed back to `vol`; protected
        again if the rename fails."""
        what = f"turning {self.volid(base)} back into {self.volid(vol)}"
        if vol in self.lvs():
            raise Refused(f"volume {self.volid(vol)} already exists")
        self.run("lvchange", *unbase_args, "--deltag", BASE_TAG, self.lv(base), what=what)
        try:
            self.run("lvrename", self.vg, names.flat_name(base), names.flat_name(vol), what=what)
        except BaseException:
            protect_again(base)
            raise
        faults.point("unbased")

    def resize(self, vol: VolName, size: int) -> None:
        self.run("lvextend", "-L", f"{size}b", self.lv(vol), what=f"resizing {self.volid(vol)}")
