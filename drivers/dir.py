"""Directory storage: raw and qcow2 files, the seed's reference case.

    <path>/<vmid>/vm-<vmid>-disk-<n>.<fmt>   a guest's disk
    <path>/base/<name>.<fmt>                 a base image: mode 0444 and, where the file
                                             system allows, immutable (chattr +i)

A linked clone is a qcow2 overlay whose backing file is the base, stored as a path
relative to the overlay (`../base/<name>.<fmt>`), so the storage can be moved or mounted
elsewhere. A clone's base is read back from the qcow2 header. `.overlays/` keeps one blank
overlay per base, copied for each new clone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import structlog

from drivers import names, qemu
from drivers.base import Driver
from drivers.errors import AlreadyExists
from drivers.names import FORMATS, VolName

log = structlog.get_logger(__name__)
ALL = frozenset(FORMATS)
OVERLAYS = ".overlays"  # blank overlays of bases, copied to make linked clones


def _set_immutable(path: Path, on: bool) -> None:
    """chattr +i/-i; some file systems (tmpfs, overlay) refuse it: warn, do not fail."""
    proc = subprocess.run(
        ["chattr", "+i" if on else "-i", "--", str(path)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0 and on:
        log.warning("chattr_failed", path=str(path), error=proc.stderr.strip())


class DirDriver(Driver):
    type_name = "dir"
    formats = FORMATS
    default_format = "raw"
    linked_clone_format = "qcow2"
    FEATURES = {
        "make_base": {"current": ALL},
        "linked_clone": {"base": ALL},
        "copy": {"current": ALL, "base": ALL},
        "resize": {"current": ALL},
        "move": {"current": ALL},
    }

    def path(self, vol: VolName) -> Path:
        return self.storage.path / str(vol)

    def list_volumes(self, owner: int | None = None) -> list[VolName]:
        root = self.storage.path
        if owner is not None:
            folders = [str(owner)]
        elif root.is_dir():
            folders = [f.name for f in os.scandir(root) if f.is_dir() and (f.name == "base" or f.name.isdigit())]
        else:
            folders = []
        found = []
        for folder in folders:
            with contextlib.suppress(FileNotFoundError):
                for entry in os.scandir(root / folder):
                    with contextlib.suppress(Exception):  # stray files are not volumes
                        found.append(names.volname(f"{folder}/{entry.name}"))
        return sorted(found, key=str)

    def exists(self, vol: VolName) -> bool:
        return self.path(vol).is_file()

    def allocate(self, vol: VolName, size: int) -> None:
        path = self.path(vol)
        if path.exists():
            raise AlreadyExists(f"volume {self.volid(vol)} already exists")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._create_over(vol, size)

    def recreate(self, vol: VolName, size: int) -> None:
        self._create_over(vol, size)  # rename(2) replaces it: the name is never free

    def _create_over(self, vol: VolName, size: int) -> None:
        path = self.path(vol)
        temp = path.with_name(f".{path.name}.tmp")  # a half-made image never has a volume's name
        qemu.create(temp, vol.fmt, size)
        os.rename(temp, path)

    def free(self, vol: VolName) -> None:
        path = self.path(vol)
        if vol.is_base:
            _set_immutable(path, False)
            self._overlay_path(vol).unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        if not vol.is_base:
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # the guest's folder, once it holds nothing

    def make_base(self, vol: VolName, base: VolName) -> None:
        src, dst = self.path(vol), self.path(base)
        if dst.exists():
            raise AlreadyExists(f"base image {self.volid(base)} already exists")
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.rename(src, dst)
        self.protect_base(base)

    def protect_base(self, base: VolName) -> None:
        path = self.path(base)
        path.chmod(0o444)
        _set_immutable(path, True)

    def unmake_base(self, base: VolName, vol: VolName) -> None:
        src, dst = self.path(base), self.path(vol)
        _set_immutable(src, False)
        self._overlay_path(base).unlink(missing_ok=True)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.rename(src, dst)
        dst.chmod(0o644)

    def link_clone(self, base: VolName, vol: VolName) -> None:
        """Copy the base's blank overlay: every clone's header is the same, since the
        backing path `../base/<name>` is relative and every guest folder is one level deep,
        and copying 200 KiB is much cheaper than starting qemu-img for each clone."""
        path = self.path(vol)
        if path.exists():
            raise AlreadyExists(f"volume {self.volid(vol)} already exists")
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.tmp")
        shutil.copyfile(self._blank_overlay(base), temp)
        os.rename(temp, path)

    def _overlay_path(self, base: VolName) -> Path:
        return self.storage.path / OVERLAYS / f"{base.name}.{base.fmt}.qcow2"

    def _blank_overlay(self, base: VolName) -> Path:
        """An empty qcow2 overlay of `base`, made once with qemu-img (under the storage lock)."""
        proto = self._overlay_path(base)
        if not proto.exists():
            proto.parent.mkdir(parents=True, exist_ok=True)
            temp = proto.with_name(f".{proto.name}.tmp")
            backing = os.path.relpath(self.path(base), proto.parent)
            qemu.create(temp, "qcow2", 0, backing=backing, backing_fmt=base.fmt)
            os.rename(temp, proto)
        return proto

    def parent_of(self, vol: VolName) -> VolName | None:
        if vol.fmt != "qcow2":
            return None
        header = qemu.read_qcow2_header(self.path(vol))
        if header is None or not header.backing_file:
            return None
        backing = (self.path(vol).parent / header.backing_file).resolve()
        try:
            relative = backing.relative_to(self.storage.path.resolve())
            return names.volname(str(relative))
        except Exception:
            return None  # a backing file outside this storage is not a stork base

    def virtual_size(self, vol: VolName) -> int:
        path = self.path(vol)
        if vol.fmt == "qcow2" and (header := qemu.read_qcow2_header(path)):
            return header.virtual_size
        return path.stat().st_size

    def allocated_size(self, vol: VolName) -> int:
        return self.path(vol).stat().st_blocks * 512

    def resize(self, vol: VolName, size: int) -> None:
        qemu.resize(self.path(vol), vol.fmt, size)
