"""Proxmox VE's storage.cfg and guest configs, as stork reads them: which of its storages a
directory of its layout is (their ids, and whether it locks them cluster-wide), a guest to
adopt whose disks are there (`stork guest import-pve`), and every volume a Proxmox VE guest
names, which stork leaves alone (the in-use checks of such a storage). Its volume names are
in drivers/names.py (`pve_volname`).

A config (`/etc/pve/nodes/<node>/qemu-server/<vmid>.conf`, `.../lxc/<vmid>.conf`) is lines of
`key: value`, a description as `#` lines, and after them sections (`[snapshot]`, `[PENDING]`,
`[special:cloudinit]`) of more such lines. A disk's value is its volume id (or `file=` it),
then `key=value` options: `local:100/vm-100-disk-0.qcow2,size=32G`. stork reads only that; a
line it does not know is kept as it is, as a note.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from drivers import names
from drivers.errors import InvalidName, NotFound, Refused, StorageUnavailable, StorkError

MAX_CONFIG = 1 << 20  # Proxmox VE's own limit on a config file is 512 KiB
# every key whose value may name a volume: a qemu guest's disks, an LXC's root and mount
# points, unused volumes, a snapshot's saved RAM
_VOLUME_KEY = re.compile(r"(?:ide|sata|scsi|virtio|efidisk|tpmstate|unused|mp)[0-9]+|rootfs|vmstate")
_LINE = re.compile(r"(?P<key>[a-z][a-z0-9_.-]*):\s*(?P<value>.*)")  # lxc.cgroup2.devices.allow: ...
_SECTION = re.compile(r"\[(?P<name>[^\]]+)\]")
_PVE_STORAGE = re.compile(r"[a-z][a-z0-9._-]*[a-z0-9]", re.IGNORECASE)  # as pve-storage's parse_volume_id
# storage.cfg as pve-common's SectionConfig reads it: `type: id`, then indented `key value`
# lines up to an empty one; `#` comments
_STORAGE_HEAD = re.compile(r"(?P<type>\S+):\s*(?P<id>\S+)\s*")
_STORAGE_PROPERTY = re.compile(r"\s+(?P<key>\S+)(?:\s+(?P<value>.*\S))?\s*")
_SHARED_TYPES = ("nfs", "cifs", "cephfs", "glusterfs")  # Proxmox VE sets shared on these, whatever the section says
PVE_LOCAL = ("local", "/var/lib/vz")  # Proxmox VE's `local` is always a dir storage there
_NO_VOLUME = ("", "none", "cdrom")


@dataclass(frozen=True)
class PveGuest:
    """What stork reads of a Proxmox VE guest config."""

    vmid: int
    name: str = ""
    template: bool = False
    disks: dict[str, str] = field(default_factory=dict)  # slot -> volume id (short form), disks only
    unused: tuple[str, ...] = ()
    notes: dict[str, str] = field(default_factory=dict)  # every other key of the current config, as written
    references: tuple[tuple[str, str], ...] = ()  # (where, value) of every volume key in every section
    devices: dict[str, str] = field(default_factory=dict)  # disk slots of no volume: a host device or path
    digest: str = ""  # of the config's text as read (config_digest): one read again later is the same config


def target_of(value: str) -> str:
    """What a disk's value (a property string) names, as pve-common's parse_property_string
    reads it: empty items skipped; its `file=` (a qemu disk's) or `volume=` (an LXC mount
    point's, and qemu's alias of `file`), the last one given; else its one item without a key
    (a volume id, a path, or `none`/`cdrom`). `?` when it names none, or a key twice, or a
    keyed and an unkeyed one, or two unkeyed ones (Proxmox VE refuses those, but for qemu's
    `volume` twice: read as a volume stork cannot tell)."""
    items = [item.strip() for item in value.split(",") if item.strip()]
    pairs = [(key, rest) for key, eq, rest in (item.partition("=") for item in items) if eq]
    keyed = [rest for key, rest in pairs if key in ("file", "volume")]
    bare = [item for item in items if "=" not in item]
    twice = any(sum(key == name for key, _ in pairs) > 1 for name in ("file", "volume"))
    if keyed and not bare and not twice:
        return keyed[-1]
    if len(bare) == 1 and not keyed:
        return bare[0]
    return "?" if items else ""


def _short(volname: str) -> str:
    """A volname in its short form: a linked clone's `<base>/<own>` is its own half (as
    Proxmox VE's path of it is), whatever the first half says."""
    parts = volname.split("/")
    return "/".join(parts[2:]) if len(parts) == 4 else volname


def volume_of(value: str) -> str | None:
    """The volume id a disk's value names, in its short form; None for no volume (`none`, an
    empty CD-ROM drive, a host device or path)."""
    storage, colon, volname = target_of(value).partition(":")
    if not colon or not _PVE_STORAGE.fullmatch(storage) or not volname:
        return None
    return f"{storage}:{_short(volname)}"


def parse(vmid: int, text: str, where: str) -> PveGuest:
    """A config's text; InvalidName naming `where` and the line for one that does not parse."""
    current: dict[str, str] = {}
    references: list[tuple[str, str]] = []
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
        key = "ide2" if key == "cdrom" else key  # as Proxmox VE reads it (parse_vm_config): a disk there too
        if _VOLUME_KEY.fullmatch(key):
            references.append((f"{section} {key}" if section else key, value))
        if not section:
            current[key] = value
    slots = {key: value for key, value in current.items()
             if _VOLUME_KEY.fullmatch(key) and not key.startswith("unused") and key != "vmstate"
             and "media=cdrom" not in value}
    disks = {key: volid for key, value in slots.items() if (volid := volume_of(value)) is not None}
    devices = {key: value for key, value in slots.items() if key not in disks and target_of(value) not in _NO_VOLUME}
    unused = tuple(volid for key, value in sorted(current.items())
                   if key.startswith("unused") and (volid := volume_of(value)) is not None)
    kept = {"name", "template"} | set(disks) | set(devices) | {k for k in current if k.startswith("unused")}
    return PveGuest(vmid=vmid, name=current.get("name", ""), template=current.get("template", "0").strip() == "1",
                    disks=disks, unused=unused, notes={k: v for k, v in current.items() if k not in kept},
                    references=tuple(references), devices=devices)


def notes_text(notes: dict[str, str]) -> str:
    """A guest's other keys as one line of notes (what a job result keeps)."""
    text = "Proxmox VE: " + "; ".join(f"{k}: {v}" for k, v in notes.items()) if notes else ""
    return "".join(c for c in text if c.isprintable())[:1000]


def _read_text(path: Path, what: str) -> str:
    """A config file's text: NotFound if it is not there; refused (InvalidName, Refused) if it
    cannot be read, is not a regular file (a FIFO would block the reader for good), is larger
    than any config or is not UTF-8."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"{path}: no such file") from None
    except OSError as e:
        raise Refused(f"{path}: cannot read it: {e.strerror or e}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # before open(), which refuses a folder with a traceback's words
        os.close(fd)
        raise InvalidName(f"{path}: not a regular file: not {what}")
    with open(fd, "rb") as f:
        try:
            data = f.read(MAX_CONFIG + 1)
        except OSError as e:
            raise Refused(f"{path}: cannot read it: {e.strerror or e}") from None
    if len(data) > MAX_CONFIG:
        raise InvalidName(f"{path}: larger than {what} can be")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidName(f"{path}: not UTF-8 text: not {what}") from None


def read(path: Path, vmid: int | None = None) -> PveGuest:
    """A config file; its guest id from its name (`<vmid>.conf`) unless given."""
    if vmid is None:
        stem = path.name.removesuffix(".conf")
        if not path.name.endswith(".conf") or not stem.isdigit():
            raise InvalidName(f"{path}: not named <vmid>.conf: give the guest id (--vmid)")
        vmid = names.vmid(stem)
    text = _read_text(path, "a Proxmox VE guest config")
    return replace(parse(vmid, text, str(path)), digest=config_digest(text))


def config_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def digest_now(path: Path) -> str:
    """The digest of the config at `path` as it is now; NotFound where it is gone."""
    return config_digest(_read_text(path, "a Proxmox VE guest config"))


@dataclass(frozen=True)
class PveStorage:
    """A storage of Proxmox VE's storage.cfg that has a path."""

    id: str
    type: str
    path: str
    shared: bool  # locked by Proxmox VE in its cluster file system, not with a local flock
    options: dict[str, str]


def read_storages(text: str) -> list[PveStorage]:
    """storage.cfg's storages with a path, read as Proxmox VE's SectionConfig reads it: `#`
    lines skipped; a `type: id` header (type in any case) starts a section, whose indented
    `key value` lines run to the next empty line (another line in it is ignored, a header too);
    a section whose id Proxmox VE refuses is skipped whole; a bare boolean is true; its `local`
    is always the dir storage at /var/lib/vz."""
    lines = iter(line for line in text.split("\n") if not line.lstrip().startswith("#"))
    sections: dict[str, tuple[str, dict[str, str | None]]] = {}
    for line in lines:
        head = _STORAGE_HEAD.fullmatch(line) if line else None
        if head is None:
            continue  # an empty line between sections, or one Proxmox VE ignores
        options: dict[str, str | None] = {}
        for prop_line in lines:
            if prop_line in ("", "0"):  # what ends Perl's `while ($line = $nextline->())`
                break
            if (prop := _STORAGE_PROPERTY.fullmatch(prop_line)) is not None:
                options.setdefault(prop["key"], prop["value"])  # a duplicate is refused: the first stays
        if _PVE_STORAGE.fullmatch(head["id"]):
            sections[head["id"]] = (head["type"].lower(), options)
    local = sections.get(PVE_LOCAL[0])
    if local is None or local[0] != "dir" or (local[1].get("path") or PVE_LOCAL[1]) != PVE_LOCAL[1]:
        sections[PVE_LOCAL[0]] = ("dir", {"path": PVE_LOCAL[1]})
    else:
        local[1]["path"] = PVE_LOCAL[1]
    return [PveStorage(sid, kind, str(options["path"]), kind in _SHARED_TYPES or _true(options, "shared"),
                       {k: v or "" for k, v in options.items()})
            for sid, (kind, options) in sorted(sections.items()) if options.get("path")]


def _true(options: dict[str, str | None], key: str) -> bool:
    """A boolean property as Proxmox VE reads it (a bare key is true)."""
    return key in options and (options[key] is None or str(options[key]).lower() in ("1", "yes", "on", "true"))


def _same_place(storage: PveStorage, path: Path) -> bool:
    """Whether a storage of Proxmox VE is at `path`: the same text, or, for a storage of local
    disks, the same directory (a symlink or bind mount to it). A network one's mount point is
    not stat'ed: on a dead NFS server that would hang while stork holds its storage lock."""
    if os.path.normpath(storage.path) == os.path.normpath(path):
        return True
    if storage.type in _SHARED_TYPES:
        return False
    try:
        theirs, ours = os.stat(storage.path), os.stat(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise Refused(f"cannot tell whether Proxmox VE's storage {storage.id!r} ({storage.path}) is {path}: "
                      f"{e.strerror or e}") from None
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


def storages_at(config_dir: Path, path: Path) -> list[PveStorage]:
    """Proxmox VE's storages at `path` (_same_place). Fails closed: Refused when storage.cfg
    cannot be read, names no storage there, or keeps its images elsewhere (content-dirs)."""
    cfg = config_dir / "storage.cfg"
    try:
        text = _read_text(cfg, "Proxmox VE's storage.cfg")
    except StorkError as e:
        raise Refused(f"cannot read Proxmox VE's storages: {e} (set pve_config = false on a storage no Proxmox VE "
                      "uses)") from None
    found = [s for s in read_storages(text) if _same_place(s, path)]
    if not found:
        raise Refused(f"no storage in {cfg} has path {path}: set pve_config = false on a storage no Proxmox VE uses")
    for s in found:
        if "images=" in s.options.get("content-dirs", ""):
            raise Refused(f"Proxmox VE's storage {s.id!r} keeps its images elsewhere (content-dirs): not read")
    return found


class _Files:
    """The volumes of `images` by their files' (device, inode), read once when first asked: a
    path through a bind mount names a volume its text does not show."""

    def __init__(self, images: str) -> None:
        self.images = images
        self._known: dict[tuple[int, int], str] | None = None

    def volname_of(self, path: str) -> str | None:
        """The volname of the file at `path`, None for none of this storage's; Refused where it
        cannot be told (a file that cannot be stat'ed, a folder that cannot be read)."""
        real = os.path.realpath(path)
        if real.startswith(self.images + "/"):
            return real[len(self.images) + 1:]
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None  # no such file on this node: none of this storage's here
        except OSError as e:
            raise Refused(f"cannot tell which file {path} is: {e.strerror or e}") from None
        return self._by_inode().get((st.st_dev, st.st_ino))

    def _by_inode(self) -> dict[tuple[int, int], str]:
        if self._known is None:
            known: dict[tuple[int, int], str] = {}
            try:
                folders = [e for e in os.scandir(self.images) if e.is_dir(follow_symlinks=False)]
                for folder in folders:
                    for entry in os.scandir(folder.path):
                        with contextlib.suppress(FileNotFoundError):  # removed meanwhile: no volume
                            found = entry.stat(follow_symlinks=False)
                            known[(found.st_dev, found.st_ino)] = f"{folder.name}/{entry.name}"
            except FileNotFoundError:
                pass  # no images folder yet: no volume
            except OSError as e:
                raise Refused(f"cannot read {self.images}: {e.strerror or e}") from None
            self._known = known
        return self._known


def _named(value: str, ids: tuple[str, ...], files: _Files) -> str | None:
    """The volname of this storage a volume key's value names (by one of its `ids` or by a path
    to its file), None for none of its volumes; Refused for a value that is none of a volume
    id, a path or no volume (it might name one)."""
    target = target_of(value)
    if target in _NO_VOLUME:
        return None
    if target.startswith("/"):
        return files.volname_of(target)
    storage, colon, rest = target.partition(":")
    if colon and _PVE_STORAGE.fullmatch(storage) and rest:
        return _short(rest) if storage in ids else None
    raise Refused(f"cannot read {value!r} as a volume")


def _guest_folders(config_dir: Path) -> Iterator[Path]:
    """Each node's folder of guest configs (qemu-server, lxc) that exists. Fails closed:
    Refused for one that cannot be listed."""
    nodes = config_dir / "nodes"
    try:
        node_names = sorted(os.listdir(nodes))
    except OSError as e:
        raise Refused(f"cannot read Proxmox VE's guest configs in {nodes}: {e.strerror or e} (set pve_config = false "
                      "on a storage no Proxmox VE uses)") from None
    for node in node_names:
        for kind in ("qemu-server", "lxc"):
            folder = nodes / node / kind
            if _there(folder):
                yield folder


def _there(path: Path) -> bool:
    """Whether anything is at `path`; Refused where that cannot be told (fails closed)."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise Refused(f"cannot tell whether {path} is there: {e.strerror or e}") from None
    return True


RESCANS = 3  # looks after a pass for configs it did not read, before the check is given up for now


def users_by_volume(config_dir: Path, ids: tuple[str, ...], images: Path) -> dict[str, list[str]]:
    """The Proxmox VE guests (of every node) whose configs name each volume of this storage
    (its `images` folder, known to Proxmox VE as `ids`), by volname: `Proxmox VE guest <vmid>
    (<where>)`. Fails closed: Refused naming what could not be read (a config that cannot be
    read might name any volume). A migration (or HA's recovery) moves a config to another
    node's folder by one rename, which takes no lock stork holds: one the pass read in neither
    folder (listed in neither, or gone when read) shows in a listing after it, and is read
    where it is then; StorageUnavailable (tried again later) where such configs keep coming."""
    files = _Files(os.path.realpath(images))
    found: dict[str, list[str]] = {}
    read_ids = _users_pass(config_dir, ids, files, found)
    for looked in range(RESCANS + 1):
        if not (missed := _config_ids(config_dir) - read_ids):
            return found
        if looked < RESCANS:
            read_ids |= _users_pass(config_dir, ids, files, found, only=missed)
    shown = sorted(missed, key=lambda vmid: (len(vmid), vmid))
    raise StorageUnavailable(f"Proxmox VE's guest configs {', '.join(shown[:5])}{' ...' if len(shown) > 5 else ''} "
                             "appeared or moved while the configs were read: try again")


def _users_pass(config_dir: Path, ids: tuple[str, ...], files: _Files, found: dict[str, list[str]],
                only: set[str] | None = None) -> set[str]:
    """Read the configs (those of the guest ids `only`, where given) into `found`: the guest
    ids whose configs were read."""
    read_ids: set[str] = set()
    for folder in _guest_folders(config_dir):
        for conf in _confs(folder):
            vmid = conf.removesuffix(".conf")
            if only is not None and vmid not in only:
                continue
            with contextlib.suppress(NotFound):  # removed since the listing (or moved: see above)
                guest = read(folder / conf, int(vmid) if vmid.isascii() and vmid.isdigit() else 0)
                read_ids.add(vmid)
                for where, value in guest.references:
                    try:
                        volname = _named(value, ids, files)
                    except Refused as e:
                        raise Refused(f"{folder / conf}: {e}") from None
                    if volname is not None:
                        found.setdefault(volname, []).append(f"Proxmox VE guest {vmid} ({where})")
    return read_ids


def _confs(folder: Path) -> list[str]:
    try:
        return sorted(name for name in os.listdir(folder) if name.endswith(".conf"))
    except OSError as e:
        raise Refused(f"cannot read Proxmox VE's guest configs in {folder}: {e.strerror or e}") from None


def _config_ids(config_dir: Path) -> set[str]:
    """The guest ids whose configs every node's folders list now."""
    return {conf.removesuffix(".conf") for folder in _guest_folders(config_dir) for conf in _confs(folder)}


def users(config_dir: Path, ids: tuple[str, ...], images: Path, volname: str) -> list[str]:
    """The Proxmox VE guests whose configs name the volume `volname` (users_by_volume)."""
    return users_by_volume(config_dir, ids, images).get(volname, [])


def guest_config(config_dir: Path, vmid: int) -> Path | None:
    """The config of Proxmox VE's guest `vmid` on any node, if there is one (fails closed).
    Looked for twice where the first pass finds none: a migration that moved it from a folder
    not looked in yet to one looked in already (users_by_volume) is over by the second."""
    for _ in range(2):
        if found := next((path for folder in _guest_folders(config_dir)
                          if _there(path := folder / f"{vmid}.conf")), None):
            return found
    return None
