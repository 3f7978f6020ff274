"""Validation of every user-supplied name before it reaches a path or a command line.

Volume ids are `<storage>:<volname>`; a dir-style volname is `<vmid>/<name>.<fmt>` for a
guest's disk or `base/<name>.<fmt>` for a base image (the seed's naming). A directory storage
of Proxmox VE's layout names its bases `<vmid>/base-<vmid>-<name>.<fmt>` instead, as Proxmox VE
does (see `pve_volname`).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

from drivers.errors import InvalidName

MAX_NAME = 120
MAX_SIZE = (1 << 63) - (1 << 20)  # what a file offset (and qemu) can address
VMID_MIN, VMID_MAX = 100, 999_999_999
FORMATS = ("raw", "qcow2")

_STORAGE_ID = re.compile(r"[a-z][a-z0-9_-]{0,39}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
_DISK_KEY = re.compile(r"(scsi|virtio|sata|ide|efidisk|tpmstate)(0|[1-9][0-9]?)")
DISK_BUSES = {"ide": 4, "sata": 6, "scsi": 31, "virtio": 16, "efidisk": 1, "tpmstate": 1}  # as Proxmox VE
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B?|B)?", re.IGNORECASE)
_UNITS = {"": 1 << 30, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}  # a bare number: GiB
MIN_SIZE = 1 << 20  # the smallest disk: anything less is a typo (8 for 8 GiB written as bytes, say)


def storage_id(text: str) -> str:
    """Return `text` if it is a valid storage id (lower-case, starts with a letter)."""
    if not isinstance(text, str) or not _STORAGE_ID.fullmatch(text):
        raise InvalidName(
            f"invalid storage id {text!r}: expected a lower-case letter, then up to 39 of "
            "a-z 0-9 _ -"
        )
    return text


def node(text: str) -> str:
    """Return `text` if it is a valid node name (same alphabet as storage ids)."""
    if not isinstance(text, str) or not _STORAGE_ID.fullmatch(text):
        raise InvalidName(f"invalid node name {text!r}: expected a lower-case letter, then up to 39 of a-z 0-9 _ -")
    return text


def vmid(value: str | int) -> int:
    """Return a guest id as int; ids run from 100 to 999999999 as in Proxmox VE."""
    text = str(value)
    if not text.isascii() or not text.isdigit() or not VMID_MIN <= int(text) <= VMID_MAX:
        raise InvalidName(f"invalid guest id {value!r}: expected a number from {VMID_MIN} to {VMID_MAX}")
    return int(text)


def image_name(text: str, what: str = "name") -> str:
    """Return `text` if it is a safe file-name stem: ASCII, no '/', no '..', no leading '-'."""
    if (
        not isinstance(text, str)
        or not text.isascii()
        or len(text) > MAX_NAME
        or ".." in text
        or not _NAME.fullmatch(text)
    ):
        raise InvalidName(
            f"invalid {what} {text!r}: expected 1-{MAX_NAME} ASCII letters, digits or _.+- "
            "starting with a letter or digit, without '..'"
        )
    return text


def volume_stem(text: str, what: str = "volume name") -> str:
    """An image_name that a volume can have: none ending in '.', as `<stem>.<fmt>` would then
    hold '..', a volume no volume id names (a base made so could not be turned back)."""
    image_name(text, what)
    if text.endswith("."):
        raise InvalidName(f"invalid {what} {text!r}: a volume's name cannot end in '.'")
    return text


def image_format(text: str) -> str:
    if text not in FORMATS:
        raise InvalidName(f"invalid format {text!r}: expected one of {', '.join(FORMATS)}")
    return text


def disk_key(text: str) -> str:
    """A disk slot as Proxmox VE numbers them: ide0-3, sata0-5, scsi0-30, virtio0-15,
    efidisk0, tpmstate0."""
    match = _DISK_KEY.fullmatch(text) if isinstance(text, str) else None
    if not match or int(match.group(2)) >= DISK_BUSES[match.group(1)]:
        raise InvalidName(f"invalid disk {text!r}: expected ide0-3, sata0-5, scsi0-30, virtio0-15, efidisk0 "
                          "or tpmstate0")
    return text


def size(text: str | int) -> int:
    """Parse a size into bytes: '8G', '512M', '1.5GiB', '1048576B', or a bare number of GiB
    ('8', as Proxmox VE reads it); an int is a byte count. K, M, G, T and KiB... are powers of
    1024; KB, MB, GB, TB are refused as ambiguous. At least 1 MiB, whole 512-byte sectors (what
    qemu-img works in)."""
    if isinstance(text, bool) or not isinstance(text, str | int):
        raise InvalidName(f"invalid size {text!r}: expected a number with K, M, G or T")
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE.fullmatch(text.strip())
        if not match:
            raise InvalidName(f"invalid size {text!r}: expected a positive number with K, M, G or T "
                              "(a bare number is GiB)")
        suffix = (match.group(2) or "").upper()
        if len(suffix) == 2:  # KB, MB, GB, TB: decimal to some, binary to others
            raise InvalidName(f"invalid size {text!r}: {match.group(2)} is ambiguous (powers of 1000 or of 1024?): "
                              f"write {match.group(1)}{suffix[0]} or {match.group(1)}{suffix[0]}iB (powers of "
                              "1024, as qemu-img and Proxmox VE read them), or a byte count with B")
        unit = "B" if suffix == "B" else suffix.rstrip("B").rstrip("I")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise InvalidName(f"invalid size {text!r}: must be greater than zero")
    if value > MAX_SIZE:
        raise InvalidName(f"invalid size {text!r}: larger than any image can be (8 EiB)")
    if value < MIN_SIZE:
        raise InvalidName(f"invalid size {text!r}: below 1 MiB, the smallest disk")
    if value % 512:
        raise InvalidName(f"invalid size {text!r}: not a whole number of 512-byte sectors")
    return value


@dataclass(frozen=True)
class VolumeId:
    """`<storage>:<volname>`, split and checked; `volname` is validated by the storage driver."""

    storage: str
    volname: str

    def __str__(self) -> str:
        return f"{self.storage}:{self.volname}"


def volume_id(text: str) -> VolumeId:
    """Split a volume id; the storage part is checked here, the volname by its driver."""
    if not isinstance(text, str) or ":" not in text:
        raise InvalidName(f"invalid volume id {text!r}: expected <storage>:<volname>")
    storage, volname = text.split(":", 1)
    storage_id(storage)
    if not volname:
        raise InvalidName(f"invalid volume id {text!r}: the volume name is empty")
    return VolumeId(storage, volname)


@dataclass(frozen=True)
class VolName:
    """A parsed dir-style volname: owner guest (None for a base), name stem, format."""

    owner: int | None
    name: str
    fmt: str

    def __post_init__(self) -> None:
        # Every VolName is checked where it is made, whatever made it (a parsed volume id, a
        # job record read from Redis, a name chosen by a step): it becomes a path below.
        if self.owner is not None and (isinstance(self.owner, bool) or not isinstance(self.owner, int)):
            raise InvalidName(f"invalid guest id {self.owner!r}: expected a number from {VMID_MIN} to {VMID_MAX}")
        if self.owner is not None:
            vmid(self.owner)
        volume_stem(self.name)
        image_format(self.fmt)

    @property
    def is_base(self) -> bool:
        return self.owner is None

    def __str__(self) -> str:
        folder = "base" if self.owner is None else str(self.owner)
        return f"{folder}/{self.name}.{self.fmt}"


def volname(text: str) -> VolName:
    """Parse `<vmid>/vm-<vmid>-<rest>.<fmt>` or `base/<name>.<fmt>`."""
    bad = InvalidName(
        f"invalid volume name {text!r}: expected <vmid>/vm-<vmid>-<name>.<raw|qcow2> "
        "or base/<name>.<raw|qcow2>"
    )
    if not isinstance(text, str) or text.count("/") != 1 or not text.isascii() or ".." in text:
        raise bad  # '..' anywhere, even 'base/a..raw' (a stem ending in '.'), is refused
    folder, file = text.split("/")
    stem, dot, fmt = file.rpartition(".")
    if not dot or fmt not in FORMATS:
        raise bad
    try:
        image_name(stem)
    except InvalidName:
        raise bad from None
    if folder == "base":
        return VolName(None, stem, fmt)
    owner = vmid(folder) if folder.isdigit() else None
    if owner is None or folder != str(owner) or not stem.startswith(f"vm-{owner}-"):
        raise bad  # one spelling per volume: '0100/...' would dodge the in-use checks
    return VolName(owner, stem, fmt)


def flat_name(vol: VolName) -> str:
    """The volume's name where names are flat (an RBD image, an LV): `<folder>.<name>.<fmt>`.
    The folder (`base` or a guest id) holds no dot, so the first dot splits it off again, and
    a base and a guest's disk never share a flat name."""
    return f"{'base' if vol.owner is None else vol.owner}.{vol.name}.{vol.fmt}"


def from_flat_name(text: str) -> VolName | None:
    """The volume a flat name is of; None for a name that is not one of stork's."""
    folder, dot, rest = text.partition(".")
    if not dot:
        return None
    try:
        return volname(f"{folder}/{rest}")
    except InvalidName:
        return None


# ---- Proxmox VE's names (a directory storage of `layout = "pve"`) ------------------------
# Proxmox VE keeps a guest's disks and its template's bases side by side in `images/<vmid>/`,
# tells a base by its `base-` prefix, and spells a linked clone's volume id with its base in
# front: `100/base-100-disk-0.qcow2/101/vm-101-disk-0.qcow2` (pve-storage's parse_volname).
# stork reads both spellings and stores the short one (`101/vm-101-disk-0.qcow2`: the file's
# own path), so a volume has one spelling in guest configs, job records and in-use checks.

_PVE_FILE = re.compile(r"(?P<folder>[0-9]+)/(?P<stem>(?P<prefix>vm|base)-(?P<vmid>[0-9]+)-[^/]+)\.(?P<fmt>[a-z0-9]+)")
_PVE_LONG = re.compile(r"(?P<base>[0-9]+/[^/]+)/(?P<own>[0-9]+/[^/]+)")


def pve_volname(text: str) -> VolName:
    """Parse a volname of Proxmox VE's layout: `<vmid>/vm-<vmid>-<name>.<fmt>` (a disk),
    `<vmid>/base-<vmid>-<name>.<fmt>` (a base), or a linked clone's long form
    `<vmid>/base-<vmid>-<name>.<fmt>/<vmid>/<vm|base>-<vmid>-<name>.<fmt>` (read as its short
    form, the second half; the base is read from the image). Stricter than Proxmox VE: a disk's and a
    base's name carry the guest id of their folder, and the format is one stork writes."""
    if not isinstance(text, str) or not text.isascii():
        raise _pve_bad(text)
    if (long := _PVE_LONG.fullmatch(text)) is not None:
        if not pve_volname(long["base"]).is_base:
            raise _pve_bad(text)  # a base that is no base (Proxmox VE reads it): the long form names no clone
        return pve_volname(long["own"])  # a disk, or a base made of a linked clone (a template's of a clone)
    match = _PVE_FILE.fullmatch(text)
    if match is None or match["fmt"] not in FORMATS or ".." in text or match["folder"] != match["vmid"]:
        raise _pve_bad(text)
    owner = vmid(match["folder"]) if match["folder"].isdigit() else None
    if str(owner) != match["folder"]:
        raise _pve_bad(text)  # '0100/...': one spelling per volume
    try:
        image_name(match["stem"])
    except InvalidName:
        raise _pve_bad(text) from None
    return VolName(None if match["prefix"] == "base" else owner, match["stem"], match["fmt"])


def _pve_bad(text: object) -> InvalidName:
    return InvalidName(f"invalid volume name {text!r} on a storage of Proxmox VE's layout: expected "
                       "<vmid>/vm-<vmid>-<name>.<raw|qcow2>, <vmid>/base-<vmid>-<name>.<raw|qcow2>, or a "
                       "linked clone's <vmid>/base-<vmid>-<name>.<fmt>/<vmid>/vm-<vmid>-<name>.qcow2")


def pve_folder(vol: VolName) -> str:
    """The folder of `images/` a volume of Proxmox VE's layout is in: its guest's, and for a
    base the guest id its name carries (`base-100-disk-0`: 100). InvalidName for a base named
    otherwise (Proxmox VE would not read it as a base)."""
    if vol.owner is not None:
        return str(vol.owner)
    match = re.fullmatch(r"base-([1-9][0-9]*)-.+", vol.name)
    if match is None or not VMID_MIN <= int(match.group(1)) <= VMID_MAX:
        raise InvalidName(f"invalid base name {vol.name!r} on a storage of Proxmox VE's layout: expected "
                          "base-<vmid>-<name>, the guest id of the template it belongs to first")
    return match.group(1)


def pve_text(vol: VolName, base: VolName | None = None) -> str:
    """A volume's volname in Proxmox VE's layout: its short form, or with `base`, the long form
    Proxmox VE shows for a linked clone of it."""
    own = f"{pve_folder(vol)}/{vol.name}.{vol.fmt}"
    return own if base is None else f"{pve_text(base)}/{own}"


def stored_volid(text: str) -> VolumeId:
    """A volume id as guest configs and job records keep it: one spelling per volume, so a
    linked clone's long form (Proxmox VE's) is refused there, naming the short form."""
    vid = volume_id(text)
    if (long := _PVE_LONG.fullmatch(vid.volname)) is not None:
        raise InvalidName(f"{text!r} is the long form of a linked clone's volume id: write it "
                          f"{vid.storage}:{long['own']}")
    return vid


def short_volid(text: str) -> str:
    """A volume id as the user typed it, with a linked clone's long form (Proxmox VE's) folded
    into the short one that guest configs and job records keep; the rest is checked later."""
    vid = volume_id(text)
    long = _PVE_LONG.fullmatch(vid.volname)
    return f"{vid.storage}:{long['own']}" if long is not None else text


def any_volname(text: str) -> VolName:
    """A volname of either layout (a job record is checked before its storage is known)."""
    try:
        return volname(text)
    except InvalidName:
        if _PVE_LONG.fullmatch(text) is None:
            with contextlib.suppress(InvalidName):
                return pve_volname(text)
        raise
