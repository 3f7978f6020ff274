"""Real filesystems on loop devices (and a zfs-fuse pool) for the storage tests. Each is made when this machine can
(root, the mkfs tool, the kernel's filesystem); otherwise the reason why is kept, and the tests
that need it skip with it. The session detaches what it made at its end, also when tests fail."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass
class LoopFs:
    kind: str
    image: Path
    device: str
    mount: Path

    def close(self) -> None:
        """Unmount, detach and delete, each step attempted even if one before it failed."""
        with contextlib.suppress(subprocess.CalledProcessError):
            _run(["umount", str(self.mount)])
        with contextlib.suppress(subprocess.CalledProcessError):
            _run(["losetup", "-d", self.device])
        self.image.unlink(missing_ok=True)


def _run(argv: list[str]) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=120).stdout


def unavailable(kind: str) -> str:
    """Why a `kind` filesystem cannot be made here ("" if it can)."""
    if os.geteuid() != 0:
        return "needs root (loop devices and mount)"
    if not shutil.which(f"mkfs.{kind}"):
        return f"mkfs.{kind} is not installed (.ci/run installs it)"
    if not shutil.which("losetup"):
        return "losetup is not installed"
    with open("/proc/filesystems") as f:
        if kind not in f.read().split():
            return f"this kernel has no {kind} filesystem"
    return ""


def make(kind: str, where: Path, size_mib: int = 1024) -> LoopFs | str:
    """A fresh `kind` filesystem on a sparse file in `where`, mounted at `where/<kind>`;
    or why none could be made."""
    if why := unavailable(kind):
        return why
    image, mount = where / f"{kind}.img", where / kind
    with open(image, "wb") as f:
        f.truncate(size_mib << 20)
    mount.mkdir()
    try:
        device = _run(["losetup", "-f", "--show", str(image)]).strip()
    except subprocess.CalledProcessError as e:
        image.unlink()
        return f"no loop device: {e.stderr.strip()}"
    fs = LoopFs(kind, image, device, mount)
    try:
        _run([f"mkfs.{kind}", "-q", *(["-m", "reflink=1"] if kind == "xfs" else []), device])
        _run(["mount", device, str(mount)])
    except subprocess.CalledProcessError as e:
        fs.close()
        return f"cannot make a {kind} filesystem: {e.stderr.strip()}"
    return fs


def damage_on_disk(fs: LoopFs, path: Path) -> None:
    """Overwrite the first block of `path`'s data on a btrfs's device, beneath the file system
    (unmounted meanwhile): its checksum no longer matches, and reading the file fails with EIO,
    as it does at a bad sector. `path` must be past btrfs's inline size (a few KiB)."""
    os.sync()
    extents = _run(["filefrag", "-v", "-b4096", str(path)]).splitlines()
    first = next(line for line in extents if line.strip().startswith("0:"))
    logical = int(first.split(":")[2].split("..")[0]) * 4096  # the physical column: btrfs's logical address
    _run(["umount", str(fs.mount)])
    try:
        mapped = _run(["btrfs-map-logical", "-l", str(logical), fs.device])
        physical = int(mapped.split("physical ")[1].split()[0])
        with open(fs.device, "r+b") as device:
            device.seek(physical)
            device.write(b"\xa5" * 4096)
            device.flush()
            os.fsync(device.fileno())
    finally:
        _run(["mount", fs.device, str(fs.mount)])


@dataclass
class ZfsPool:
    """A file-backed pool in the zfs-fuse daemon (started here, and stopped at close, if none
    was running), mounted at `mount`."""

    name: str
    vdev: Path
    mount: Path
    daemon: int | None  # the pid of the daemon this session started

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            _run(["zpool", "destroy", "-f", self.name])
        if self.daemon is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.daemon, 15)
            _wait_gone(self.daemon)
        self.vdev.unlink(missing_ok=True)


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.05)


def _zfs_answers() -> bool:
    return subprocess.run(["zpool", "list"], capture_output=True, timeout=30, check=False).returncode == 0


def zfs_pool(where: Path, size_mib: int = 512) -> ZfsPool | str:
    """A fresh pool on a sparse file in `where`, mounted at `where/zfs`; or why none could be made."""
    if os.geteuid() != 0:
        return "needs root (the zfs-fuse daemon)"
    if not (shutil.which("zfs-fuse") and shutil.which("zpool")):
        return "zfs-fuse is not installed (.ci/run installs it)"
    if not Path("/dev/fuse").exists():
        return "no /dev/fuse"
    daemon = None
    if not _zfs_answers():
        pidfile = where / "zfs-fuse.pid"
        try:
            _run(["zfs-fuse", "--pidfile", str(pidfile), "--no-kstat-mount"])
        except subprocess.CalledProcessError as e:
            return f"zfs-fuse does not start: {e.stderr.strip()}"
        deadline = time.monotonic() + 10
        while not (pidfile.exists() and pidfile.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.05)
        daemon = int(pidfile.read_text())
        while not _zfs_answers() and time.monotonic() < deadline:
            time.sleep(0.1)
    name, vdev, mount = f"stork{os.getpid()}", where / "zfs.vdev", where / "zfs"
    with open(vdev, "wb") as f:
        f.truncate(size_mib << 20)
    pool = ZfsPool(name, vdev, mount, daemon)
    try:
        _run(["zpool", "create", "-m", str(mount), name, str(vdev)])
    except subprocess.CalledProcessError as e:
        pool.close()
        return f"cannot make a zfs pool: {e.stderr.strip()}"
    return pool


def _has_device_mapper() -> bool:
    """Whether the kernel has device-mapper (not whether /dev/mapper/control exists: lvm makes
    that node on its own, also where the kernel has no driver behind it)."""
    with contextlib.suppress(OSError), open("/proc/misc") as f:
        return any(line.split()[1:] == ["device-mapper"] for line in f)
    return False


DEVICE_MAPPER = _has_device_mapper()


def lvm(*args: str) -> str:
    return _run(["lvm", *args])


@contextlib.contextmanager
def volume_group(where: Path, size_mib: int = 256) -> Iterator[str]:
    """A volume group on a loop device, seen by LVM through an lvm.conf of its own (through
    LVM_SYSTEM_DIR, so the machine's LVM never scans it); without device-mapper, with
    `activation = 0`, under which LVM still creates, renames, tags and removes LVs."""
    image = where / "pv.img"
    with open(image, "wb") as f:
        f.truncate(size_mib << 20)
    device = _run(["losetup", "-f", "--show", str(image)]).strip()
    conf = where / "etc"
    conf.mkdir()
    activation = "" if DEVICE_MAPPER else "global { activation = 0 }\n"
    (conf / "lvm.conf").write_text(f'{activation}devices {{ filter = [ "a|^{device}$|", "r|.*|" ] }}\n')
    before = os.environ.get("LVM_SYSTEM_DIR")
    os.environ["LVM_SYSTEM_DIR"] = str(conf)
    name = f"stork{os.getpid()}"
    control = Path("/dev/mapper/control")
    had_control = control.exists()
    try:
        lvm("pvcreate", "-q", device)
        lvm("vgcreate", "-q", name, device)
        yield name
    finally:
        for argv in (["vgremove", "-q", "-y", "-f", name], ["pvremove", "-q", "-y", device]):
            subprocess.run(["lvm", *argv], capture_output=True, check=False)
        subprocess.run(["losetup", "-d", device], capture_output=True, check=False)
        image.unlink(missing_ok=True)
        if not had_control and not DEVICE_MAPPER:  # lvm makes the node even where no driver backs it
            control.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                control.parent.rmdir()
        if before is None:
            os.environ.pop("LVM_SYSTEM_DIR", None)
        else:
            os.environ["LVM_SYSTEM_DIR"] = before
