"""OVA archives and their OVF descriptors, read as input: what a guest imported from VMware,
VirtualBox or a vendor appliance is made of.

An OVA is a tar: an .ovf (XML) naming the disk files beside it in the archive. Its members are
read in place, never extracted: the archive is opened once, its member table read from that
descriptor, and qemu reads each disk at its offset in the same descriptor. Refused, naming the
archive and why: a member that is not a regular file (a link, a device), a name with a folder
or `..`, two members of one name, an OVF with a DTD or entities or bigger than MAX_OVF, a disk
file the archive lacks, a disk on no known controller.
"""

from __future__ import annotations

import os
import re
import tarfile
from dataclasses import dataclass
from xml.etree.ElementTree import Element

from defusedxml import ElementTree
from defusedxml.common import DefusedXmlException

from drivers import names
from drivers.errors import InvalidName

MAX_OVF = 1 << 20  # bytes: an OVF is a page of XML; a bigger one is not read
OVF = "{http://schemas.dmtf.org/ovf/envelope/1}"
RASD = "{http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData}"
# CIM resource types of the controllers a disk may sit on -> stork's disk key prefix
CONTROLLERS = {"5": "ide", "6": "scsi", "20": "sata"}
DISK_DRIVE, CPU, MEMORY, NIC = "17", "3", "4", "10"


@dataclass(frozen=True)
class Member:
    name: str
    offset: int  # of its data in the archive
    size: int


@dataclass(frozen=True)
class OvfDisk:
    key: str  # its slot in the guest: scsi0, ide1, sata0
    href: str  # its file in the archive
    capacity: int  # bytes, as the OVF declares it


@dataclass(frozen=True)
class Ovf:
    name: str
    disks: tuple[OvfDisk, ...]
    notes: str  # what stork does not use (memory, CPUs, networks), kept for the user


def members(fd: int, label: str) -> dict[str, Member]:
    """The archive's members by name, read from the opened file `fd` (left where it was)."""
    found: dict[str, Member] = {}
    try:
        with os.fdopen(os.dup(fd), "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for info in tar:
                _check_member(info, label)
                if info.name in found:
                    raise InvalidName(f"{label}: member {info.name!r} appears twice in the archive")
                found[info.name] = Member(info.name, info.offset_data, info.size)
    except (tarfile.TarError, OSError) as e:
        raise InvalidName(f"{label}: not an OVA (a tar archive): {e}") from None
    return found


def _check_member(info: tarfile.TarInfo, label: str) -> None:
    if not info.isreg() or info.issparse():  # a sparse member's data is not where its window would be
        raise InvalidName(f"{label}: member {info.name!r} is not a regular file (a link, folder or device)")
    plain_name(info.name, label, "member name")


def plain_name(name: str, label: str, what: str = "disk file") -> str:
    """A file name an OVF or OVA may use: no folder, not `.` or `..`, printable."""
    if "/" in name or name in ("", ".", "..") or not name.isprintable():
        raise InvalidName(f"{label}: {what} {name!r} is not a plain file name")
    return name


def read_member(fd: int, member: Member, limit: int, label: str = "") -> bytes:
    if member.size > limit:
        raise InvalidName(f"{label}: member {member.name!r} is {member.size} bytes, more than the {limit} "
                          "an OVF may have")
    return os.pread(fd, member.size, member.offset)


def parse(text: bytes, label: str) -> Ovf:
    """The guest an OVF describes: its name, its disks in their slots, notes on the rest."""
    if len(text) > MAX_OVF:
        raise InvalidName(f"{label}: the OVF is {len(text)} bytes, more than {MAX_OVF}")
    try:
        root = ElementTree.fromstring(text, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as e:
        raise InvalidName(f"{label}: OVF refused: {type(e).__name__} (no DTD or entities are read)") from None
    except ElementTree.ParseError as e:
        raise InvalidName(f"{label}: OVF is not well-formed XML: {e}") from None
    files = {f.get(f"{OVF}id"): f.get(f"{OVF}href") for f in root.iter(f"{OVF}File")}
    disks = {d.get(f"{OVF}diskId"): d for d in root.iter(f"{OVF}Disk")}
    system = next(root.iter(f"{OVF}VirtualSystem"), None)
    if root.tag.startswith("{http://schemas.dmtf.org/ovf/envelope/2}"):
        raise InvalidName(f"{label}: OVF 2.0 is not read (OVF 1.x is: what VMware and VirtualBox export)")
    if system is None:
        raise InvalidName(f"{label}: the OVF describes no virtual system")
    items = [_item(i) for i in system.iter(f"{OVF}Item")]
    controllers = {i["InstanceID"]: i for i in items if i.get("ResourceType") in CONTROLLERS}
    found: list[OvfDisk] = []
    for item in (i for i in items if i.get("ResourceType") == DISK_DRIVE):
        disk_id = (item.get("HostResource") or "").rsplit("/", 1)[-1]
        disk = disks.get(disk_id)
        if disk is None:
            raise InvalidName(f"{label}: disk drive {item.get('ElementName', '?')!r} names no disk of the OVF")
        href = files.get(disk.get(f"{OVF}fileRef"))
        if not href:
            raise InvalidName(f"{label}: disk {disk_id!r} names no file of the OVF")
        controller = controllers.get(item.get("Parent", ""))
        if controller is None:
            raise InvalidName(f"{label}: disk {disk_id!r} is on no IDE, SCSI or SATA controller")
        prefix = CONTROLLERS[controller["ResourceType"]]
        found.append(OvfDisk(_slot(prefix, item.get("AddressOnParent", "0"), found, label), href,
                             _capacity(disk, label)))
    if not found:
        raise InvalidName(f"{label}: the OVF names no disk")
    return Ovf(_name(system), tuple(found), _notes(items))


def _item(element: Element) -> dict[str, str]:
    return {child.tag.removeprefix(RASD): (child.text or "").strip() for child in element if child.tag.startswith(RASD)}


def _slot(prefix: str, address: str, taken: list[OvfDisk], label: str) -> str:
    """The disk's key: its bus and address, or the next free one on its bus when two disks
    of different controllers of one kind share an address."""
    number = int(address) if address.isascii() and address.isdigit() and len(address) < 4 else 0
    used = {d.key for d in taken}
    while f"{prefix}{number}" in used:
        number += 1
    try:
        return names.disk_key(f"{prefix}{number}")
    except InvalidName:
        raise InvalidName(f"{label}: too many disks on the {prefix} bus") from None


_UNITS = re.compile(r"byte(?:\s*\*\s*2\^([1-6]?\d))?")  # at most 2^69: sizes, not numbers to build


def _capacity(disk: Element, label: str) -> int:
    raw, units = disk.get(f"{OVF}capacity", ""), disk.get(f"{OVF}capacityAllocationUnits", "byte")
    match = _UNITS.fullmatch(units.strip())
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 20) or match is None:
        raise InvalidName(f"{label}: disk capacity {raw!r} in {units!r} is not a size stork reads")
    return int(raw) << int(match[1] or 0)


def _name(system: Element) -> str:
    """The guest's name, where the OVF's is one stork takes (else none: the notes keep it)."""
    element = next(system.iter(f"{OVF}Name"), None)
    name = (element.text or "").strip() if element is not None else ""
    try:
        return names.image_name(name, "name") if name else ""
    except InvalidName:
        return ""


def _notes(items: list[dict[str, str]]) -> str:
    said = []
    for item in items:
        kind, quantity = item.get("ResourceType"), item.get("VirtualQuantity", "")
        if kind == CPU:
            said.append(f"{quantity} CPUs")
        elif kind == MEMORY:
            said.append(f"memory {quantity} {item.get('AllocationUnits', 'MB')}")
        elif kind == NIC:
            said.append(f"network {item.get('Connection', '?')} ({item.get('ResourceSubType', '?')})")
    text = "OVF: " + ", ".join(said) if said else ""
    return "".join(c for c in text if c.isprintable())[:200]
