"""VMDK descriptors (monolithicFlat, twoGbMaxExtentFlat, twoGbMaxExtentSparse) read as input.

A text descriptor names its extents as files, and qemu opens whatever path it names. So stork
parses it here, strictly: every extent a plain file name beside the descriptor, of a kind qemu
reads (RW FLAT or SPARSE), and no parent (a delta disk). Each extent is then opened by stork,
without following a link, and qemu is given a descriptor stork writes into a private folder,
whose extents are links to those opened descriptors (`/proc/self/fd/N`): qemu reads exactly
the files that were checked, and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from drivers.errors import InvalidName

CREATE_TYPES = ("monolithicFlat", "twoGbMaxExtentFlat", "twoGbMaxExtentSparse", "vmfs")
MAX_DESCRIPTOR = 65536
_EXTENT = re.compile(r'(RW|RDONLY|NOACCESS)\s+(\d{1,18})\s+(FLAT|SPARSE|ZERO|VMFS)'
                     r'(?:\s+"([^"]*)"(?:\s+(\d{1,18}))?)?\s*')
_KEY = re.compile(r'\s*([A-Za-z.]+)\s*=\s*"?([^"]*)"?\s*')


@dataclass(frozen=True)
class Extent:
    access: str
    sectors: int
    kind: str  # FLAT or SPARSE (VMFS is FLAT)
    name: str
    offset: int  # sectors into a FLAT file


@dataclass(frozen=True)
class Descriptor:
    create_type: str
    extents: tuple[Extent, ...]

    @property
    def size(self) -> int:
        return sum(extent.sectors for extent in self.extents) * 512


def parse(text: bytes, label: str) -> Descriptor:
    """The descriptor's extents, or InvalidName naming what stork does not read in it. It ends
    at its first NUL, as qemu reads it (qemu-img pads the file it writes with them)."""
    text = text.split(b"\0", 1)[0]
    if len(text) > MAX_DESCRIPTOR:
        raise InvalidName(f"{label}: a VMDK descriptor of {len(text)} bytes is not read")
    try:
        lines = text.decode("ascii").splitlines()
    except UnicodeDecodeError:
        raise InvalidName(f"{label}: a VMDK descriptor is ASCII text") from None
    keys: dict[str, str] = {}
    extents: list[Extent] = []
    for line in (raw.strip() for raw in lines):
        if not line or line.startswith("#"):
            continue
        if match := _EXTENT.fullmatch(line):
            extents.append(_extent(match, label))
        elif match := _KEY.fullmatch(line):
            keys[match[1]] = match[2]
        else:
            raise InvalidName(f"{label}: VMDK descriptor line not read: {line[:60]!r}")
    if keys.get("parentFileNameHint", "").strip() or keys.get("parentCID", "ffffffff").lower() != "ffffffff":
        raise InvalidName(f"{label}: a delta VMDK reads its parent disk (parentFileNameHint): import the merged disk")
    create_type = keys.get("createType", "")
    if create_type not in CREATE_TYPES:
        raise InvalidName(f"{label}: VMDK createType {create_type!r} is not imported "
                          f"(imported: {', '.join(CREATE_TYPES)}, monolithicSparse, streamOptimized)")
    if not extents:
        raise InvalidName(f"{label}: the VMDK descriptor names no extent")
    return Descriptor(create_type, tuple(extents))


def _extent(match: re.Match[str], label: str) -> Extent:
    access, sectors, kind, name, offset = match[1], int(match[2]), match[3], match[4] or "", int(match[5] or 0)
    kind = "FLAT" if kind == "VMFS" else kind
    if access != "RW" or kind == "ZERO":  # qemu reads only RW extents of a file, and skips the rest
        raise InvalidName(f"{label}: VMDK extent {access} {kind} is not read by qemu: only RW FLAT and SPARSE ones")
    if "/" in name or name in ("", ".", "..") or not name.isprintable():
        raise InvalidName(f"{label}: VMDK extent {name!r} is not a file beside the descriptor")
    if sectors <= 0:
        raise InvalidName(f"{label}: VMDK extent {name!r} of {sectors} sectors")
    return Extent(access, sectors, kind, name, offset)


def text(descriptor: Descriptor, names: list[str]) -> str:
    """The descriptor as stork gives it to qemu: its extents renamed `names`, no parent."""
    # no blank line before an extent: qemu 7.2's parser reads the extent after a blank line twice
    lines = ["# Disk DescriptorFile", "version=1", "CID=fffffffe", "parentCID=ffffffff",
             f'createType="{descriptor.create_type}"', "# Extent description"]
    for extent, name in zip(descriptor.extents, names, strict=True):
        offset = f" {extent.offset}" if extent.kind == "FLAT" else ""
        lines.append(f'{extent.access} {extent.sectors} {extent.kind} "{name}"{offset}')
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def private_descriptor(descriptor: Descriptor, fds: list[int]) -> Iterator[Path]:
    """A folder only this user can change, holding the descriptor qemu is to open, each extent
    a link to the descriptor stork opened it as (`/proc/self/fd/N`, resolved in qemu's own
    process, which inherits it). Others may enter it and read the descriptor (it names no
    more than that), so a qemu run as the image's owner can. Removed when done."""
    folder = Path(tempfile.mkdtemp(prefix="stork-vmdk-"))
    try:
        names = [f"extent{i}" for i in range(len(fds))]
        for name, fd in zip(names, fds, strict=True):
            os.symlink(f"/proc/self/fd/{fd}", folder / name)
        (folder / "disk.vmdk").write_text(text(descriptor, names))
        (folder / "disk.vmdk").chmod(0o644)
        folder.chmod(0o711)  # entered, not listed
        yield folder / "disk.vmdk"
    finally:
        shutil.rmtree(folder, ignore_errors=True)
