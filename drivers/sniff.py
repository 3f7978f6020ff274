"""Which format an image file to import is, read from its bytes by stork, before qemu opens it.

qemu-img's own probe is not safe on a file someone else made: to probe a VMDK descriptor it
opens the extent files the descriptor names, any path on the host (a FIFO there hangs it, a
device is opened), and a qcow or vmdk names a backing file it would read. So the format is
told here from the same magic numbers qemu's probes look for, every image qemu could take for
something else is named (and refused where stork does not import it), and qemu is then told
the format outright: it never guesses, and never follows a name in a header.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass

# formats stork imports (qemu's names); "raw" is what has none of the magics below
IMPORTABLE = ("raw", "qcow2", "qcow", "vmdk", "vhdx", "vpc", "vdi")
HEAD = 65536  # bytes read from the start: every probe's magic, a VMDK's embedded descriptor
VMDK_DESCRIPTOR = "vmdk descriptor"  # text naming extent files: drivers/vmdk.py reads it, never qemu's probe
_VDI_SIGNATURE = 0xBEDA107F
_CLOOP = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
# magic at offset 0 -> qemu's format name, for the formats stork does not import
_OTHERS = ((b"QED\x00", "qed"), (b"LUKS\xba\xbe", "luks"), (b"WithoutFreeSpace", "parallels"),
           (b"WithouFreSpacExt", "parallels"), (b"Bochs Virtual HD Image", "bochs"), (_CLOOP, "cloop"),
           (b"COWD", "vmdk (VMware 3)"))


@dataclass(frozen=True)
class Sniffed:
    fmt: str  # qemu's format name; "vmdk descriptor" for a text descriptor
    refusal: str = ""  # why it cannot be imported, "" when it can


def sniff(head: bytes, tail: bytes) -> Sniffed:
    """The format of an image whose first bytes are `head` (up to HEAD) and last 512 `tail`."""
    if head[:4] == b"QFI\xfb" and len(head) >= 8:  # a backing file it names: qemu.refuse_external
        return Sniffed("qcow" if struct.unpack(">I", head[4:8])[0] == 1 else "qcow2")
    if head[:4] == b"KDMV":
        return Sniffed("vmdk", _vmdk_sparse_refusal(head))
    if head[:8] == b"vhdxfile":
        return Sniffed("vhdx")
    if head[:8] == b"conectix":
        return _vpc(head[:512])
    if len(head) >= 0x44 and struct.unpack("<I", head[0x40:0x44])[0] == _VDI_SIGNATURE:
        return Sniffed("vdi")
    for magic, name in _OTHERS:
        if head.startswith(magic):
            return Sniffed(name, f"{name} images are not imported (import raw, qcow2, qcow, vmdk, vhdx, vpc or vdi)")
    if _vmdk_text(head):  # read as a file of its own, its extents beside it: qemu.open_import
        return Sniffed(VMDK_DESCRIPTOR, "a VMDK descriptor is read from a file of its own, its extents beside it")
    if len(tail) == 512 and tail[:8] == b"conectix" and _vhd_footer_valid(tail):
        return _vpc(tail)  # a fixed VHD: the data, then its footer
    return Sniffed("raw")


def sniff_file(fd: int, window: tuple[int, int] | None = None) -> Sniffed:
    """sniff() of the opened file `fd`, or of the (offset, size) window of it an archive's member is."""
    offset, size = window or (0, os.fstat(fd).st_size)
    return sniff(os.pread(fd, min(HEAD, size), offset), os.pread(fd, 512, offset + size - 512) if size >= 1024 else b"")


def _vpc(footer: bytes) -> Sniffed:
    disk_type = struct.unpack(">I", footer[60:64])[0] if len(footer) >= 64 else 0
    if disk_type == 4:
        return Sniffed("vpc", "a differencing VHD reads its parent disk: import the merged disk")
    return Sniffed("vpc")


def _vhd_footer_valid(footer: bytes) -> bool:
    """A VHD footer's checksum: the ones' complement of the sum of its bytes but the checksum's."""
    stored = struct.unpack(">I", footer[64:68])[0]
    return stored == (~(sum(footer[:64]) + sum(footer[68:])) & 0xFFFFFFFF)


def _vmdk_sparse_refusal(head: bytes) -> str:
    """A sparse VMDK carries a descriptor in itself; one that names a parent is a delta disk.
    One of capacity 0 is worse: qemu then reads its embedded descriptor as a descriptor file,
    and opens the extents it names, any path on the host."""
    if len(head) < 44:
        return "a VMDK header cut short"
    capacity, desc_offset, desc_size = struct.unpack("<Q", head[12:20])[0], *struct.unpack("<QQ", head[28:44])
    if capacity == 0:
        return "a sparse VMDK of capacity 0 is read by its embedded descriptor, whose extents are other files"
    text = head[desc_offset * 512:(desc_offset + desc_size) * 512].split(b"\x00", 1)[0] if desc_offset else b""
    match = re.search(rb'^\s*parentFileNameHint\s*=\s*"([^"]*)"', text, re.MULTILINE)
    if match and match[1].strip():
        return "a delta VMDK reads its parent disk (parentFileNameHint): import the merged disk"
    return ""


def _vmdk_text(head: bytes) -> bool:
    """qemu's probe of a VMDK text descriptor: past comment and blank lines, a `version=N` line."""
    for line in head.split(b"\n"):
        stripped = line.rstrip(b"\r")
        if stripped.startswith(b"#") or not stripped.strip(b" "):
            continue
        return stripped in (b"version=1", b"version=2", b"version=3")
    return False
