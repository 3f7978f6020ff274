"""Validation of every user-supplied name before it reaches a path or a command line.

Volume ids are `<storage>:<volname>`; a dir-style volname is `<vmid>/<name>.<fmt>` for a
guest's disk or `base/<name>.<fmt>` for a base image (the seed's naming).
"""

from __future__ import annotations

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
        image_name(self.name, "volume name")
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
