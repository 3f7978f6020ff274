"""Proxmox VE's guest configs, as stork reads them: to adopt a guest whose disks are on a
storage of Proxmox VE's layout (`stork guest import-pve`), and to leave alone every volume a
Proxmox VE guest names (the in-use checks of such a storage). Its volume names are in
drivers/names.py (`pve_volname`).

A config (`/etc/pve/nodes/<node>/qemu-server/<vmid>.conf`, `.../lxc/<vmid>.conf`) is lines of
`key: value`, a description as `#` lines, and after them sections (`[snapshot]`, `[PENDING]`,
`[special:cloudinit]`) of more such lines. A disk's value is its volume id (or `file=` it),
then `key=value` options: `local:100/vm-100-disk-0.qcow2,size=32G`. stork reads only that; a
line it does not know is kept as it is, as a note.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from drivers import names
from drivers.errors import InvalidName, NotFound, Refused

MAX_CONFIG = 1 << 20  # Proxmox VE's own limit on a config file is 512 KiB
# every key whose value may name a volume: a qemu guest's disks, an LXC's root and mount
# points, unused volumes, a snapshot's saved RAM
_VOLUME_KEY = re.compile(r"(?:ide|sata|scsi|virtio|efidisk|tpmstate|unused|mp)[0-9]+|rootfs|vmstate")
_LINE = re.compile(r"(?P<key>[a-z][a-z0-9_-]*):\s*(?P<value>.*)")
_SECTION = re.compile(r"\[(?P<name>[^\]]+)\]")
_PVE_STORAGE = re.compile(r"[a-z][a-z0-9._-]*[a-z0-9]")


@dataclass(frozen=True)
class PveGuest:
    """What stork reads of a Proxmox VE guest config."""

    vmid: int
    name: str = ""
    template: bool = False
    disks: dict[str, str] = field(default_factory=dict)  # slot -> volume id (short form), disks only
    unused: tuple[str, ...] = ()
    notes: dict[str, str] = field(default_factory=dict)  # every other key of the current config, as written
    volumes: tuple[tuple[str, str], ...] = ()  # (where, volume id) of every section: what it keeps in use
    devices: dict[str, str] = field(default_factory=dict)  # disk slots of no volume: a host device or path


def volume_of(value: str) -> str | None:
    """The volume id a disk's value names, in its short form; None for none (`none`, a CD-ROM
    drive without a medium, a host device `/dev/...`)."""
    first = value.split(",", 1)[0].strip()
    first = first.removeprefix("file=")
    storage, colon, volname = first.partition(":")
    if not colon or not _PVE_STORAGE.fullmatch(storage) or not volname:
        return None
    try:
        return names.short_volid(first)
    except InvalidName:
        return None


def parse(vmid: int, text: str, where: str) -> PveGuest:
    """A config's text; InvalidName naming `where` and the line for one that does not parse."""
    current: dict[str, str] = {}
    volumes: list[tuple[str, str]] = []
    section = ""
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if (head := _SECTION.fullmatch(line)) is not None:
            section = head["name"]
            continue
        match = _LINE.fullmatch(line)
        if match is None:
            raise InvalidName(f"{where}:{n}: not a Proxmox VE guest config line: {raw[:80]!r}")
        key, value = match["key"], match["value"]
        if _VOLUME_KEY.fullmatch(key) and (volid := volume_of(value)) is not None:
            volumes.append((f"{section} {key}" if section else key, volid))
        if not section:
            current[key] = value
    slots = {key: value for key, value in current.items()
             if _VOLUME_KEY.fullmatch(key) and not key.startswith("unused") and key != "vmstate"
             and "media=cdrom" not in value}
    disks = {key: volid for key, value in slots.items() if (volid := volume_of(value)) is not None}
    devices = {key: value for key, value in slots.items()
               if key not in disks and value.split(",", 1)[0].removeprefix("file=") != "none"}
    unused = tuple(volid for key, value in sorted(current.items())
                   if key.startswith("unused") and (volid := volume_of(value)) is not None)
    kept = {"name", "template"} | set(disks) | set(devices) | {k for k in current if k.startswith("unused")}
    return PveGuest(vmid=vmid, name=current.get("name", ""), template=current.get("template", "0").strip() == "1",
                    disks=disks, unused=unused, notes={k: v for k, v in current.items() if k not in kept},
                    volumes=tuple(volumes), devices=devices)


def notes_text(notes: dict[str, str]) -> str:
    """A guest's other keys as one line of notes (what a job result keeps)."""
    text = "Proxmox VE: " + "; ".join(f"{k}: {v}" for k, v in notes.items()) if notes else ""
    return "".join(c for c in text if c.isprintable())[:1000]


def read(path: Path, vmid: int | None = None) -> PveGuest:
    """A config file; its guest id from its name (`<vmid>.conf`) unless given."""
    if vmid is None:
        stem = path.name.removesuffix(".conf")
        if not path.name.endswith(".conf") or not stem.isdigit():
            raise InvalidName(f"{path}: not named <vmid>.conf: give the guest id (--vmid)")
        vmid = names.vmid(stem)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG + 1)
    except FileNotFoundError:
        raise NotFound(f"{path}: no such file") from None
    except OSError as e:
        raise Refused(f"{path}: cannot read it: {e.strerror or e}") from None
    if len(data) > MAX_CONFIG:
        raise InvalidName(f"{path}: larger than any Proxmox VE guest config")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidName(f"{path}: not UTF-8 text: not a Proxmox VE guest config") from None
    return parse(vmid, text, str(path))


def users(config_dir: Path, storage: str, volname: str) -> list[str]:
    """The Proxmox VE guests (of every node) whose configs name `storage:volname` (short form),
    each as `Proxmox VE guest <vmid> (<where>)`. Fails closed: Refused naming what could not be
    read (a config that cannot be read might name the volume)."""
    wanted = f"{storage}:{volname}"
    nodes = config_dir / "nodes"
    found = []
    try:
        node_names = sorted(os.listdir(nodes))
    except OSError as e:
        raise Refused(f"cannot read Proxmox VE's guest configs in {nodes}: {e.strerror or e} (set pve_config = \"\" "
                      "on a storage no Proxmox VE uses any more)") from None
    for node in node_names:
        for kind in ("qemu-server", "lxc"):
            folder = nodes / node / kind
            try:
                files = sorted(os.listdir(folder))
            except FileNotFoundError:
                continue
            except OSError as e:
                raise Refused(f"cannot read Proxmox VE's guest configs in {folder}: {e.strerror or e}") from None
            for file in files:
                if not file.endswith(".conf"):
                    continue
                vmid = file.removesuffix(".conf")
                with contextlib.suppress(NotFound):  # removed since the listing
                    guest = read(folder / file, int(vmid) if vmid.isdigit() else 0)
                    found += [f"Proxmox VE guest {vmid} ({where})" for where, volid in guest.volumes if volid == wanted]
    return found
